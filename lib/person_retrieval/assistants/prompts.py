"""Every instruction, question template and system message the five papers give, in one place.

Where a paper prints its prompt, the text below is the paper's, word for word (marked *verbatim*).
Where a paper only describes a prompt (TIPS shows its instructions in a figure that is not in the text;
SynCPR's slides describe its quadruple and filter prompts), the text is ours, written to do what the paper
says, and marked *ours*. Both backends receive exactly these strings: the transformers backend sends them
to the model; the mini backend recognises which prompt it was given by its :class:`Prompt` header.
"""
from __future__ import annotations

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """A named prompt template: ``format(**fields)`` fills ``{field}`` slots and checks none is missing."""

    name: str
    paper: str
    source: str  # "verbatim" (the paper's words) or "ours" (written from the paper's description)
    template: str

    @property
    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    @property
    def header(self) -> str:
        """The template's fixed opening (up to its first field): how a prompt is recognised."""
        return self.template.split("{", 1)[0].strip()[:80]

    def format(self, **fields) -> str:
        missing = [f for f in self.fields if f not in fields]
        extra = [f for f in fields if f not in self.fields]
        if missing or extra:
            raise ValueError(f"prompt {self.name!r} needs fields {self.fields}; missing {missing}, unexpected {extra}")
        return self.template.format(**fields)


PROMPTS: dict[str, Prompt] = {}


def _add(name: str, paper: str, source: str, template: str) -> Prompt:
    p = Prompt(name, paper, source, template.strip())
    PROMPTS[name] = p
    return p


def get(name: str) -> Prompt:
    if name not in PROMPTS:
        raise KeyError(f"no prompt {name!r}; known: {sorted(PROMPTS)}")
    return PROMPTS[name]


def identify(text: str) -> Prompt | None:
    """The prompt a text was made from: one whose every fixed piece of text appears in it, in order
    (the most specific such prompt), or None."""
    best, best_len = None, -1
    for p in PROMPTS.values():
        pieces = [lit.strip() for lit, _, _, _ in string.Formatter().parse(p.template) if lit.strip()]
        pos, ok = 0, bool(pieces) and text.lstrip().startswith(pieces[0][:40])
        for piece in pieces if ok else []:
            at = text.find(piece, pos)
            if at < 0:
                ok = False
                break
            pos = at + len(piece)
        total = sum(map(len, pieces))
        if ok and total > best_len:
            best, best_len = p, total
    return best


# =============================================================================================
# TIPS (Text-Image Pairs Synthesis)
# =============================================================================================
TIPS_RELATIVE_DESCRIPTION = _add("tips_relative_description", "TIPS App. A.1", "verbatim", """
You will be provided with two images of the same person. Your task is to generate two **relative descriptions** that focus only on the differences in lighting, viewpoint, background scene, human status (pose, expression, etc.), and carried items. Do not describe any similarities and do not include explanations, reasoning, or preambles such as "Compared to the other image." Just output the differences. Use the following strict format:

[1] (Differences observed when using Image1 as reference to describe Image2.) [2] (Differences observed when using Image2 as reference to describe Image1.) Output only the two lines above and nothing else.
""")

TIPS_SEED_PROMPT_ZERO_SHOT = _add("tips_seed_prompt_zero_shot", "TIPS App. A.2 (Fig. A1)", "ours", """
Write one new sentence describing a pedestrian for a person image generator. The sentence must include the suggested character, colour and clothing below, and may add other clothing, carried items and a scene. Follow the style and length of the examples. Output only the sentence.
Suggested character: {character}
Suggested colour: {color}
Suggested clothing: {clothing}
Examples:
{examples}
""")

TIPS_SEED_PROMPT_FEW_SHOT = _add("tips_seed_prompt_few_shot", "TIPS App. A.2 (Fig. A1)", "ours", """
Here are three descriptions of pedestrians written by annotators. Write one new description in the same style and of similar length, recombining only elements (people, garments, colours, carried items, scenes) that appear in these three sentences, so that it describes a different person. Output only the new description.
{examples}
""")

#: IDPG's difference prompt (Fig. A1's template is not in the text): what changes, drawn from lists of the five
#: kinds of difference IDPG's training descriptions name (App. A.1: lighting, viewpoint, background scene, human
#: status, carried items), e.g. "the same person, seen from the back, in dim light, now holding an umbrella"; the
#: wording of the mini IDPG's training captions (``generators.mini.difference_text``).
TIPS_DIFFERENCE_TEXT = _add("tips_difference_text", "TIPS App. A.2 (Fig. A1)", "ours", """
the same person, {differences}
""")

TIPS_SEED_ALIGNMENT = _add("tips_seed_alignment", "TIPS App. A.2 (filter, seed images)", "ours", """
Score from 1 to 10 how well the person image matches the description below: every stated attribute (gender, clothing, colours, carried items, scene) must be visible and correct. Answer with one integer from 1 to 10 and nothing else.
Description: {text}
""")

TIPS_QUALITY = _add("tips_quality", "TIPS App. A.2 (filter, seed and expanded images)", "ours", """
Score from 1 to 10 the quality of this person image: high fidelity, natural realism, a plausible human body and minimal artifacts. Answer with one integer from 1 to 10 and nothing else.
""")

TIPS_IDENTITY_CONSISTENCY = _add("tips_identity_consistency", "TIPS App. A.2 (filter, expanded images)", "ours", """
The first image is a reference person and the second an expanded image. Score from 1 to 10 whether the second image shows the same identity with the same outfit (face, hair, body, clothing and their colours). Answer with one integer from 1 to 10 and nothing else.
""")

TIPS_VARIATION = _add("tips_variation", "TIPS App. A.2 (filter, expanded images)", "ours", """
The first image is a reference person and the second an expanded image. Does the second image differ noticeably from the first in viewpoint, pose, scene, lighting or carried items? Answer yes or no.
""")

TIPS_CAPTION = _add("tips_caption", "TIPS App. A.2 (captions)", "ours", """
Describe the person in the image in one or two sentences, following this template: {template}
Mention only what is visible: gender, hair, upper and lower clothing with colours, shoes, carried items and accessories. Output only the description.
""")

#: Caption templates for TIPS's captioning instruction (the paper draws two of 120 per image; these are ours).
TIPS_CAPTION_TEMPLATES: list[str] = []
_OPEN = ["A {person}", "The {person}", "This {person}", "There is a {person} who", "In the image, a {person}",
         "A pedestrian, a {person},", "Seen from a distance, a {person}", "The image shows a {person} who",
         "Walking by is a {person} who", "Captured by the camera, a {person}"]
_BODY = ["is wearing {upper} and {lower}, with {shoes}.", "wears {upper} over {lower} and {shoes}; {carry}.",
         "has {hair} and is dressed in {upper} with {lower}.", "is in {upper}, {lower} and {shoes}, {carry}.",
         "with {hair} wears {upper}, {lower} and {shoes}.", "is dressed in {upper}. {Pron} also wears {lower} and {shoes}.",
         "carries {carry} and wears {upper} with {lower}.", "wears {upper}; {pos} {lower} and {shoes} complete the outfit.",
         "has {hair}, wears {upper}, and {carry}.", "is seen in {upper} and {lower}. {Pron} has {hair}.",
         "is walking in {upper}, {lower} and {shoes}.", "can be seen wearing {upper}, with {lower}; {carry}."]
for _o in _OPEN:
    for _b in _BODY:
        TIPS_CAPTION_TEMPLATES.append(f"{_o} {_b}")
assert len(TIPS_CAPTION_TEMPLATES) == 120

# =============================================================================================
# SynCPR / ITCPR / FAFA (composed person retrieval)
# =============================================================================================
SYNCPR_QUADRUPLE = _add("syncpr_quadruple", "SynCPR (triplet pipeline, LLM quadruples)", "ours", """
Generate a text quadruple for composed person retrieval. Invent one person and describe them twice, in two different states: the same identity (gender, age, hair, body) but with one to three changes of clothing, colours, carried items, pose or scene between the two. Output exactly four lines and nothing else:
Reference: <a sentence describing the person in the first state>
Target: <a sentence describing the same person in the second state>
Forward: <a short relative caption: what changes from the reference to the target>
Reverse: <a short relative caption: what changes from the target back to the reference>
{hint}
""")

SYNCPR_FILTER = _add("syncpr_filter", "SynCPR (MLLM filtering, four dimensions)", "ours", """
The first image is a reference person and the second a target person. The relative caption is: "{edit}". Score each of the four dimensions from 1 to 10: naturalness (both images look like real photographs of people), identity (the two images show the same person), alignment (the target image shows what the target description says: "{target}"), relevance (the relative caption states the differences between the two images). Answer in the form "naturalness: N, identity: N, alignment: N, relevance: N" and nothing else.
""")

#: SynCPR keeps a triplet when the mean of its four scores reaches this value.
SYNCPR_KEEP_MEAN = 8.5
#: The filter's four dimensions one at a time (ours, the same four as :data:`SYNCPR_FILTER`), for
#: assistants scored one criterion per call (``VisionLanguageModel.score``: the mini MLLM).
SYNCPR_CRITERIA = {
    "naturalness": "naturalness: the image looks like a real photograph of a person, with a plausible body and no artifacts",
    "identity": "identity consistency: the two images show the same person (face, hair, body), whatever they wear",
    "alignment": "text-image alignment: the image shows what the description says",
    "relevance": "relevance of the relative caption: it states what changes from the first image to the second",
}

# =============================================================================================
# CECA (conversational attribute mining, supplement C)
# =============================================================================================
CECA_QUESTIONS = {  # verbatim
    "Q1": "What is the gender of the person in the image? Describe the hair of the person.",
    "Q2": "What kind of clothes is the person wearing on the upper body? Is the person wearing a hat?",
    "Q3": "What kind of pants or lower-body garment is the person wearing?",
    "Q4": "What kind of shoes is the person wearing?",
    "Q5": "Is the person holding anything in hand?",
}
CECA_SUMMARY = _add("ceca_summary", "CECA supplement C", "verbatim", """
Based on the image and the answers to the previous questions, please provide a summary description of the person.
{answers}
""")
#: The summary request as CAM's last turn (supplement C, verbatim): the MLLM, with the image and the five
#: answers earlier in the same conversation, writes the summary. :data:`CECA_SUMMARY` appends the answers
#: for a text-only writer (``ceca.cam(..., summary_by="lm")``, an option; notebook 00's demo).
CECA_SUMMARY_TURN = CECA_SUMMARY.template.split("{", 1)[0].strip()

# =============================================================================================
# DiaNA / ChatPR (supplement B)
# =============================================================================================
#: Fig. 1a as the supplement prints it, its "..." lines included (the figure elides them; so does this prompt), then
#: the dialogue to classify in the example's own form ("- Captions:", "- Dialogue:", "- Output:"), with no line added.
DIANA_CATEGORIZE = _add("diana_categorize", "DiaNA supplement B.1 (Fig. 1a)", "verbatim", """
Task Definition
You are provided with two captions describing person and a dialogue with multi-round question-answer interactions. Classify each round of question and answer into the following four categories based on its semantic alignment with the captions:
- Matched: The answer either aligns with the information present in the annotated captions or accurately reflects the absence of such details not mentioned in the captions.
- Contradictory: The answer contradicts the information present in the captions.
- Hallucinatory: The answer introduces fabricated information that is not present in the captions.
- Repeated: The question or answer reiterates information that has been mentioned in earlier dialogue rounds.
Workflow
- Understand the two sentences in the captions.
- Read the questions and the provided answers of each round dialogue.
- The Assistant asks the User about the person.
- The User answers the question based on the captions.
- ...
- Make sure that each round of dialogue is checked.
Examples
- Captions: ["A pedestrian with short black hair is wearing a purple shirt, red and white shoes ...", "The person is wearing denim crop shorts, red sneakers ..."]
- Dialogue:
Assistant: What is the pedestrian wearing?
User: The pedestrian is wearing a purple shirt.
Assistant: Can you describe the pedestrian's shoes?
User: The pedestrian is wearing a pair of blue shoes.
...
- Output:
Matched, Contradictory, ...
- Captions: {captions}
- Dialogue:
{dialogue}
- Output:
""")
DIANA_CATEGORIES = ("Matched", "Contradictory", "Hallucinatory", "Repeated")
#: The part of :data:`DIANA_CATEGORIZE` before the dialogue to classify (Fig. 1a alone).
DIANA_INSTRUCTION = DIANA_CATEGORIZE.template.rsplit("- Captions: {captions}", 1)[0]
#: One call per round (ours): the paper's instruction, then one added line asking for the dialogue's last round
#: only (earlier rounds are context, for "Repeated"). Small models that cannot keep count of rounds (SmolLM2-135M
#: answers one category for two rounds) can still do this.
DIANA_CATEGORIZE_LAST = _add("diana_categorize_last", "DiaNA supplement B.1 (one round per call)", "ours",
                             DIANA_INSTRUCTION + """Now classify only the LAST round of the following dialogue (the earlier rounds are context). Output one category and nothing else.
- Captions: {captions}
- Dialogue:
{dialogue}
- Output:
""")

DIANA_SYSTEM = ("You are an intelligent system designed to retrieve pedestrian images from dialogues. Extract key attributes "
                "such as clothing, accessories, gender, and distinctive features from the conversation. Use the aggregated "
                "information from all dialogue turns to perform accurate person image retrieval.")  # verbatim
DIANA_DESCRIPTION_INSTRUCTIONS = [  # verbatim (Fig. 1c)
    "Please describe the person you saw.",
    "What is the person wearing in the picture?",
    "Can you detail the clothing and accessories of the person?",
    "Describe the appearance of the individual in the image.",
    "How would you describe the attire of the person in the image?",
    "Please provide details about the person's outfit.",
    "Describe the attire and notable features of the individual in the picture.",
]

# =============================================================================================
# CTGI (multi-turn generation and interaction)
# =============================================================================================
CTGI_INITIAL = "Describe the person in the image."  # verbatim (P_init, Eq. 1)
#: MTG's attribute question pool (the paper shows one example, "Is the person riding the bicycle?"; the rest are
#: ours, several deliberately overlapping, as the paper notes its pool does, which is why it reconstructs).
CTGI_QUESTION_POOL = [
    "Is the person riding the bicycle?",
    "What is the gender of the person?",
    "What does the person's hair look like?",
    "What is the person wearing on the upper body?",
    "What color is the person's top?",
    "Does the top have a pattern or a logo?",
    "What is the person wearing on the lower body?",
    "What color are the person's pants or skirt?",
    "What shoes is the person wearing?",
    "What color are the person's shoes?",
    "Is the person wearing a hat?",
    "Is the person carrying a bag?",
    "Is the person holding anything in hand?",
    "Is the person wearing glasses, a scarf or a mask?",
]
#: Eq. 3, T_e = MLLM(T_e | T_s, p): p is the paper's, word for word, placed after T_s and eq. 2's T_e as its
#: "above" says; the opening line and the two labels are ours. (Eq. 2, T_e = MLLM([a_1, ..., a_N]), has no
#: printed prompt: MTG sends the answers with the text-only REPHRASE below.)
CTGI_RECONSTRUCT = _add("ctgi_reconstruct", "CTGI Eq. 3 (p verbatim; the opening line and labels ours)", "verbatim", """
Two descriptions of the same person follow.
Initial description: {initial}
Description: {enriched}
Rephrase the description using all the above information.
""")
#: MTI step 1: the paper prints no anchor prompt, only "the MLLM is prompted to judge alignment with q"; ours.
CTGI_ANCHOR_CHECK = _add("ctgi_anchor_check", "CTGI MTI step 1 (no prompt printed: 'prompted to judge alignment with q')", "ours", """
Does the person in the image match this description? Answer yes or no.
Description: {query}
""")
#: MTI's diagnostic templates (step 2): one question per kind of missing attribute (ours, as the paper describes).
CTGI_DIAGNOSTIC = {
    "upper": "What is the person wearing on the upper body, and in what color?",
    "lower": "What is the person wearing on the lower body, and in what color?",
    "shoes": "What color and kind of shoes is the person wearing?",
    "hair": "What does the person's hair look like?",
    "hat": "Is the person wearing a hat?",
    "bag": "Is the person carrying a bag?",
    "held": "Is the person holding anything in hand?",
    "accessory": "Is the person wearing glasses, a scarf or a mask?",
}
CTGI_AGGREGATE = _add("ctgi_aggregate", "CTGI Eq. 6 (T_aggr)", "ours", """
Merge the user's query and the answers about the person into one refined description of the same person. Keep everything the query says and add the answered details. Output only the description.
Query: {query}
Answers: {answers}
""")

# =============================================================================================
# Generic roles (used by several notebooks)
# =============================================================================================
JUDGE = _add("judge", "CTGI MTI / TIPS filters (yes/no form)", "ours", """
Does the image show a person matching this description? Answer yes or no.
Description: {text}
""")
SCORE = _add("score", "TIPS / SynCPR filters (1-10 form)", "ours", """
Score the image from 1 to 10 on this criterion: {criterion}
Answer with one integer from 1 to 10 and nothing else.
""")
REPHRASE = _add("rephrase", "TIPS TTA / CTGI reconstructor (text-only)", "ours", """
Rephrase this description of a person in different words, keeping every detail and adding nothing. Output only the new description.
Description: {text}
""")
