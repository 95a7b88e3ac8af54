"""The world's language: a lexicon with synonyms, caption grammars in three dataset styles, dialogue
questions and answers, and relative (edit) captions for composed retrieval.

Like human annotators, a caption mentions only part of what is visible; which part is random per
caption, with per-style salience (ICFG-PEDES annotators write long, thorough text; RSTPReid text
talks about the scene and the walking direction and skips details). :func:`caption` returns the text
and the set of slots it mentions, so coverage can be measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..datasets.formats import tokenize  # noqa: F401  (the world's captions are tokenized as the formats are)
from .attributes import Person, visible_slots
from .render import State

# ---------------------------------------------------------------------------------------------
# Lexicon: canonical value -> surface forms. The first form is the canonical one.
COLOR_WORDS = {
    "black": ["black"], "white": ["white"], "gray": ["gray", "grey"], "navy": ["navy", "dark blue", "navy blue"],
    "blue": ["blue"], "light blue": ["light blue", "pale blue"], "red": ["red"], "brown": ["brown"],
    "khaki": ["khaki", "beige"], "green": ["green"], "pink": ["pink"], "yellow": ["yellow"],
    "purple": ["purple"], "orange": ["orange"],
}
HAIR_COLOR_WORDS = {"black": ["black", "dark"], "brown": ["brown"], "blonde": ["blonde", "blond"], "gray": ["gray", "grey", "white"], "red": ["red", "ginger"]}
UPPER_WORDS = {
    "t-shirt": ["t-shirt", "tee", "short-sleeved shirt"], "shirt": ["shirt", "long-sleeved shirt", "button-up shirt"],
    "jacket": ["jacket", "zip-up jacket"], "coat": ["coat", "long coat", "overcoat"],
    "sweater": ["sweater", "jumper", "pullover"], "hoodie": ["hoodie", "hooded sweatshirt"],
}
LOWER_WORDS = {"trousers": ["trousers", "pants", "slacks"], "jeans": ["jeans", "denim pants"], "shorts": ["shorts"], "skirt": ["skirt"]}
SHOE_WORDS = {"sneakers": ["sneakers", "trainers", "running shoes"], "boots": ["boots"], "leather shoes": ["leather shoes", "dress shoes"], "sandals": ["sandals"]}
HAT_WORDS = {"cap": ["cap", "baseball cap"], "beanie": ["beanie", "knit hat"], "sun hat": ["sun hat", "wide-brimmed hat"]}
BAG_WORDS = {"backpack": ["backpack", "rucksack"], "shoulder bag": ["shoulder bag", "messenger bag"], "handbag": ["handbag", "purse"]}
HELD_WORDS = {"umbrella": ["umbrella"], "phone": ["phone", "cell phone", "mobile phone"], "paper bag": ["paper bag", "shopping bag"], "bottle": ["bottle", "water bottle"]}
ACCESSORY_WORDS = {"glasses": ["glasses", "spectacles"], "scarf": ["scarf"], "face mask": ["face mask", "mask"]}
HAIR_STYLE_WORDS = {"short": ["short"], "long": ["long"], "ponytail": ["ponytail"], "bald": ["bald"]}
PATTERN_WORDS = {"striped": ["striped", "stripes"], "checked": ["checked", "plaid", "checkered"], "logo": ["logo", "print"]}
GENDER_WORDS = {"man": ["man", "male", "guy", "gentleman"], "woman": ["woman", "female", "lady"]}
AGE_WORDS = {"young": ["young"], "adult": ["middle-aged", "adult"], "elderly": ["elderly", "old"]}

#: Every slot's lexicon, for parsers of free text.
LEXICON: dict[str, dict[str, list[str]]] = {
    "gender": GENDER_WORDS, "age": AGE_WORDS, "hair_style": HAIR_STYLE_WORDS, "hair_color": HAIR_COLOR_WORDS,
    "upper_type": UPPER_WORDS, "upper_color": COLOR_WORDS, "upper_pattern": PATTERN_WORDS,
    "lower_type": LOWER_WORDS, "lower_color": COLOR_WORDS, "shoes_type": SHOE_WORDS, "shoes_color": COLOR_WORDS,
    "hat": HAT_WORDS, "bag": BAG_WORDS, "held": HELD_WORDS, "accessory": ACCESSORY_WORDS,
}

PLURAL_NOUNS = {"trousers", "pants", "slacks", "jeans", "denim pants", "shorts", "sneakers", "trainers",
                "running shoes", "boots", "leather shoes", "dress shoes", "sandals", "glasses", "spectacles"}

STYLES = ("cuhk_pedes", "icfg_pedes", "rstpreid")

#: Probability that an annotator mentions each visible group, per style.
SALIENCE = {
    "cuhk_pedes": {"upper": 0.95, "lower": 0.88, "shoes": 0.70, "hair": 0.55, "hat": 0.75, "bag": 0.75, "held": 0.55, "accessory": 0.40},
    "icfg_pedes": {"upper": 1.00, "lower": 0.95, "shoes": 0.85, "hair": 0.80, "hat": 0.90, "bag": 0.85, "held": 0.70, "accessory": 0.60},
    "rstpreid": {"upper": 0.90, "lower": 0.70, "shoes": 0.35, "hair": 0.35, "hat": 0.65, "bag": 0.70, "held": 0.45, "accessory": 0.25},
}
#: The "web" of the world (the mini CLIP's pretraining corpus) is alt-text, not annotation: a line naming
#: one to three salient things, as the captions CLIP was trained on describe a picture in passing.
WEB_SALIENCE = {"upper": 0.6, "lower": 0.35, "shoes": 0.1, "hair": 0.2, "hat": 0.3, "bag": 0.25, "held": 0.25, "accessory": 0.1}
#: Within a mentioned group, probability of each detail.
DETAIL = {"color": 0.92, "type": 0.85, "pattern": 0.65, "hair_style": 0.75, "hair_color": 0.75, "bag_color": 0.5}

GROUP_SLOTS = {
    "upper": ["upper_type", "upper_color", "upper_pattern"], "lower": ["lower_type", "lower_color"],
    "shoes": ["shoes_type", "shoes_color"], "hair": ["hair_style", "hair_color"], "hat": ["hat"],
    "bag": ["bag"], "held": ["held"], "accessory": ["accessory"],
}


def _pick(rng, forms: list[str]) -> str:
    return forms[int(rng.integers(len(forms)))]


def _a(phrase: str) -> str:
    """Prefix the indefinite article, except for plural nouns ("blue jeans", "white sneakers")."""
    first = phrase.split()[0]
    if any(phrase == n or phrase.endswith(" " + n) for n in PLURAL_NOUNS):
        return phrase
    return ("an " if first[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------------------------------------
@dataclass
class Mention:
    slots: set
    phrases: dict  # group -> noun phrase or clause material


def _upper_np(p: Person, rng, color: bool, typ: bool, pattern: bool) -> str:
    noun = _pick(rng, UPPER_WORDS[p.upper_type]) if typ else _pick(rng, ["top", "upper garment"])
    col = _pick(rng, COLOR_WORDS[p.upper_color]) + " " if color else ""
    pc = _pick(rng, COLOR_WORDS[p.pattern_color])
    if pattern and p.upper_pattern == "striped":
        return _a(f"{col}{noun}") + f" with {pc} stripes" if rng.random() < 0.5 else _a(f"{col}striped {noun}")
    if pattern and p.upper_pattern == "checked":
        return _a(f"{col}{_pick(rng, ['checked', 'plaid'])} {noun}")
    if pattern and p.upper_pattern == "logo":
        return _a(f"{col}{noun}") + f" with a {pc} logo on the front"
    return _a(f"{col}{noun}")


def _lower_np(p: Person, rng, color: bool, typ: bool) -> str:
    noun = _pick(rng, LOWER_WORDS[p.lower_type]) if typ else "bottoms"
    col = _pick(rng, COLOR_WORDS[p.lower_color]) + " " if color else ""
    return _a(f"{col}{noun}") if noun != "bottoms" else f"{col}bottoms"


def _shoes_np(p: Person, rng, color: bool, typ: bool) -> str:
    noun = _pick(rng, SHOE_WORDS[p.shoes_type]) if typ else "shoes"
    col = _pick(rng, COLOR_WORDS[p.shoes_color]) + " " if color else ""
    return f"{col}{noun}"


def _hair_np(p: Person, rng, style: bool, color: bool) -> str:
    if p.hair_style == "bald":
        return "bald"
    col = _pick(rng, HAIR_COLOR_WORDS[p.hair_color]) + " " if color else ""
    if p.hair_style == "ponytail":
        return f"{col}hair in a ponytail" if style else f"{col}hair"
    return f"{p.hair_style + ' ' if style else ''}{col}hair"


def _mentions(p: Person, state: State, style: str, rng) -> tuple[set, dict]:
    vis = set(visible_slots(p, state.view))
    sal = WEB_SALIENCE if style == "web" else SALIENCE[style]
    slots: set = set()
    ph: dict = {}
    if rng.random() < sal["upper"]:
        c, t = rng.random() < DETAIL["color"], rng.random() < DETAIL["type"]
        pat = "upper_pattern" in vis and rng.random() < DETAIL["pattern"]
        if not (c or t):
            c = True
        ph["upper"] = _upper_np(p, rng, c, t, pat)
        slots |= {s for s, on in (("upper_color", c), ("upper_type", t), ("upper_pattern", pat)) if on}
    if rng.random() < sal["lower"]:
        c, t = rng.random() < DETAIL["color"], rng.random() < DETAIL["type"]
        if not (c or t):
            t = True
        ph["lower"] = _lower_np(p, rng, c, t)
        slots |= {s for s, on in (("lower_color", c), ("lower_type", t)) if on}
    if rng.random() < sal["shoes"]:
        c, t = rng.random() < DETAIL["color"], rng.random() < 0.6
        if not (c or t):
            c = True
        ph["shoes"] = _shoes_np(p, rng, c, t)
        slots |= {s for s, on in (("shoes_color", c), ("shoes_type", t)) if on}
    if rng.random() < sal["hair"]:
        st, c = rng.random() < DETAIL["hair_style"], rng.random() < DETAIL["hair_color"] and "hair_color" in vis
        if not (st or c):
            st = True
        ph["hair"] = _hair_np(p, rng, st, c)
        slots |= {s for s, on in (("hair_style", st), ("hair_color", c)) if on}
    for g in ("hat", "bag", "held", "accessory"):
        if g in vis and rng.random() < sal[g]:
            slots.add(g)
            if g == "hat":
                col = _pick(rng, COLOR_WORDS[p.hat_color]) + " " if rng.random() < DETAIL["color"] else ""
                ph[g] = _a(col + _pick(rng, HAT_WORDS[p.hat]))
            elif g == "bag":
                col = _pick(rng, COLOR_WORDS[p.bag_color]) + " " if rng.random() < DETAIL["bag_color"] else ""
                ph[g] = _a(col + _pick(rng, BAG_WORDS[p.bag]))
            elif g == "held":
                ph[g] = _a(_pick(rng, HELD_WORDS[p.held]))
            else:
                w = _pick(rng, ACCESSORY_WORDS[p.accessory])
                if p.accessory == "scarf" and rng.random() < 0.5:
                    w = _pick(rng, COLOR_WORDS[p.pattern_color]) + " scarf"
                ph[g] = _a(w) if w not in PLURAL_NOUNS else _pick(rng, ["", "a pair of "]) + w
    slots.add("gender")
    return slots, ph


def _subject(p: Person, rng, style: str) -> str:
    noun = _pick(rng, GENDER_WORDS[p.gender])
    if style == "icfg_pedes":
        return _a(f"{_pick(rng, AGE_WORDS[p.age])} {noun}")
    if style == "rstpreid":
        return f"the {noun}"
    return _pick(rng, [_a(noun), f"the {noun}", f"this {noun}"])


def _carry_clause(g: str, phrase: str, p: Person, rng) -> str:
    pos = p.possessive
    if g == "bag":
        where = {"backpack": f" on {pos} back", "shoulder bag": f" over {pos} shoulder", "handbag": f" in {pos} hand"}[p.bag]
        return _pick(rng, ["carrying", "has"]) + f" {phrase}" + (where if rng.random() < 0.5 else "")
    if g == "held":
        return _pick(rng, ["holding", "carrying"]) + f" {phrase}" + (f" in {pos} hand" if rng.random() < 0.4 else "")
    if g == "hair":
        return f"has {phrase}" if phrase != "bald" else "is bald"
    if g == "hat":
        return _pick(rng, ["wearing", "has on"]) + f" {phrase}" + (f" on {pos} head" if rng.random() < 0.3 else "")
    return f"wearing {phrase}"


def _verb_phrase(clause: str) -> str:
    """'carrying a bag' -> 'is carrying a bag'; 'has ...' and 'is ...' stay as they are."""
    return clause if clause.startswith(("has ", "is ")) else "is " + clause


_VIEW_PHRASES = {
    "front": ["towards the camera", "facing the camera"],
    "back": ["away from the camera", "with {pos} back to the camera"],
    "side": ["from one side to the other", "across the scene", "sideways past the camera"],
}
_SCENE_PHRASES = {"street": "on the street", "campus": "on campus", "mall": "in a shopping mall", "park": "in a park",
                  "station": "in a station", "parking": "in a parking lot",
                  "studio": "in a studio"}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def caption(person: Person, state: State, style: str, rng: np.random.Generator) -> tuple[str, set]:
    """One annotator's caption of one image, in ``style``; returns ``(text, mentioned slots)``."""
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; expected one of {STYLES}")
    p = person
    slots, ph = _mentions(p, state, style, rng)
    pron, pos = p.pronoun, p.possessive
    wear = [ph[g] for g in ("upper", "lower", "shoes") if g in ph]
    order = rng.permutation(len(wear)) if rng.random() < 0.35 else np.arange(len(wear))
    wear = [wear[i] for i in order]
    extras = [(g, ph[g]) for g in ("hair", "hat", "bag", "held", "accessory") if g in ph]
    rng.shuffle(extras)
    subj = _subject(p, rng, style)
    sentences: list[str] = []
    if style == "cuhk_pedes":
        lead = subj
        if extras and extras[0][0] == "hair" and rng.random() < 0.5:
            lead = f"{subj} with {extras.pop(0)[1]}"
        verb = _pick(rng, ["is wearing", "wears", "is dressed in", "has on"])
        sentences.append(f"{lead} {verb} {_join(wear)}" if wear else f"{lead} is walking")
        if extras:
            sentences.append(f"{pron} " + _join([_verb_phrase(_carry_clause(g, x, p, rng)) for g, x in extras]))
    elif style == "icfg_pedes":
        lead = subj
        if extras and extras[0][0] == "hair":
            lead = f"{subj} with {extras.pop(0)[1]}"
        if "upper" in ph:
            sentences.append(f"{lead} is wearing {ph['upper']} {_pick(rng, ['on the upper body', 'on top', 'over the body'])}")
        else:
            sentences.append(f"{lead} is standing in the picture")
        if "lower" in ph:
            sentences.append(f"{pron} is wearing {ph['lower']} {_pick(rng, ['on the lower body', 'below', 'on the legs'])}")
        if "shoes" in ph:
            sentences.append(f"{pron} has a pair of {ph['shoes']} on {pos} feet")
        for g, x in extras:
            sentences.append(f"{pron} {_verb_phrase(_carry_clause(g, x, p, rng))}")
    else:  # rstpreid
        move = "walking" if state.pose == "walking" else "standing"
        vp = _pick(rng, _VIEW_PHRASES[state.view]).format(pos=pos)
        sentences.append(f"{subj} is {move} {vp} {_SCENE_PHRASES[state.scene]}")
        if wear:
            sentences.append(f"{pron} {_pick(rng, ['is wearing', 'wears', 'is in'])} {_join(wear)}")
        for g, x in extras[:2]:
            sentences.append(f"{pron} {_verb_phrase(_carry_clause(g, x, p, rng))}")
        if len(extras) > 2:
            sentences.append(f"{pron} also " + _join([_verb_phrase(_carry_clause(g, x, p, rng)) for g, x in extras[2:]]))
    return " ".join(_cap(s.strip()) + "." for s in sentences), slots


def coverage(mentioned: set, person: Person, view: str) -> float:
    """Fraction of the visible slots (gender included) that a caption mentions."""
    vis = set(visible_slots(person, view))
    return len(vis & mentioned) / len(vis)


# ---------------------------------------------------------------------------------------------
# Dialogues: a questioner ("gpt") asks, the user (who saw the person) answers from what is visible.
QUESTIONS = {
    "upper": ["What is {pron} wearing on {pos} upper body?", "What color is {pos} top?", "Can you describe {pos} top?"],
    "lower": ["What is {pron} wearing on {pos} legs?", "What kind of pants or skirt does {pron} have on?", "What color are {pos} bottoms?"],
    "shoes": ["What shoes is {pron} wearing?", "What color are {pos} shoes?"],
    "hair": ["What does {pos} hair look like?", "What color is {pos} hair?"],
    "hat": ["Is {pron} wearing a hat?", "Does {pron} have anything on {pos} head?"],
    "bag": ["Is {pron} carrying a bag?", "Does {pron} have a backpack or a bag with {obj}?"],
    "held": ["Is {pron} holding anything?", "What does {pron} have in {pos} hands?"],
    "accessory": ["Is {pron} wearing glasses or any accessories?", "Does {pron} wear anything on {pos} face or neck?"],
}
OPENING_QUESTIONS = [
    "Can you describe the person you are looking for?",
    "What does the person look like?",
    "Please give me a short description of the person.",
]


def answer(person: Person, state: State, group: str, rng: np.random.Generator) -> str:
    """A grounded answer about ``group`` for this image: what is visible, 'no' for absent items,
    and 'cannot see' for what the viewpoint hides."""
    p, pron, pos = person, person.pronoun, person.possessive
    vis = set(visible_slots(p, state.view))
    P = _cap(pron)
    if group == "upper":
        return f"{P} is wearing {_upper_np(p, rng, True, True, 'upper_pattern' in vis)}."
    if group == "lower":
        return f"{P} is wearing {_lower_np(p, rng, True, True)}."
    if group == "shoes":
        return f"{P} has {_shoes_np(p, rng, True, True)}."
    if group == "hair":
        return f"{P} is bald." if p.hair_style == "bald" else f"{P} has {_hair_np(p, rng, True, 'hair_color' in vis)}."
    if group == "hat":
        return f"Yes, {_a(_pick(rng, COLOR_WORDS[p.hat_color]) + ' ' + _pick(rng, HAT_WORDS[p.hat]))}." if p.hat != "none" else f"No, {pron} is not wearing a hat."
    if group == "bag":
        return f"Yes, {pron} is carrying {_a(_pick(rng, COLOR_WORDS[p.bag_color]) + ' ' + _pick(rng, BAG_WORDS[p.bag]))}." if p.bag != "none" else f"No, {pron} has no bag."
    if group == "held":
        return f"{P} is holding {_a(_pick(rng, HELD_WORDS[p.held]))}." if p.held != "none" else f"No, {pos} hands are empty."
    if group == "accessory":
        if p.accessory != "none" and "accessory" not in vis:
            return f"I cannot see {pos} face from this angle."
        if p.accessory == "none":
            return "No, nothing like that."
        w = _pick(rng, ACCESSORY_WORDS[p.accessory])
        return f"Yes, {pron} is wearing {w if w in PLURAL_NOUNS else _a(w)}."
    raise ValueError(f"unknown question group {group!r}; expected one of {list(QUESTIONS)}")


def dialogue(person: Person, state: State, rng: np.random.Generator, rounds: int = 5, style: str = "cuhk_pedes") -> list[list[dict]]:
    """A ChatPedes dialogue as released: a list of rounds, each ``[{"from": "gpt", "value": question},
    {"from": "user", "value": answer}]``; an opening request answered with a partial caption, then
    ``rounds - 1`` question/answer rounds, preferring groups the opening did not mention."""
    text, mentioned = caption(person, state, style, rng)
    turns = [[{"from": "gpt", "value": _pick(rng, OPENING_QUESTIONS)}, {"from": "user", "value": text}]]
    groups = list(QUESTIONS)
    said = {g for g, slots in GROUP_SLOTS.items() if set(slots) & mentioned}
    fresh = [g for g in groups if g not in said]
    rng.shuffle(fresh)
    stale = [g for g in groups if g in said]
    rng.shuffle(stale)
    for g in (fresh + stale)[: max(0, rounds - 1)]:
        q = _pick(rng, QUESTIONS[g]).format(pron=person.pronoun, pos=person.possessive, obj="him" if person.gender == "man" else "her")
        turns.append([{"from": "gpt", "value": q}, {"from": "user", "value": answer(person, state, g, rng)}])
    return turns


# ---------------------------------------------------------------------------------------------
# Composed retrieval: edit one to three slots and say so in a short relative caption.
EDITABLE = ["upper_color", "upper_type", "lower_color", "lower_type", "hat", "bag", "held", "accessory"]


def edit_person(person: Person, rng: np.random.Generator, n_edits: int | None = None) -> tuple[Person, str]:
    """Change 1-3 things about a person's outfit; return the edited person and the relative caption."""
    from .attributes import ACCESSORIES, BAGS, COLORS, HATS, HELD, LOWER_TYPES, UPPER_TYPES

    n = n_edits or int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    slots = list(rng.choice(EDITABLE, size=n, replace=False))
    p = person
    parts: list[str] = []
    for s in slots:
        if s == "upper_color":
            new = str(rng.choice([c for c in COLORS if c != p.upper_color]))
            p = p.replace(upper_color=new)
            parts.append(_pick(rng, [f"wearing a {new} {_pick(rng, UPPER_WORDS[p.upper_type])} instead", f"change the top to {new}", f"in a {new} {p.upper_type}"]))
        elif s == "upper_type":
            new = str(rng.choice([t for t in UPPER_TYPES if t != p.upper_type]))
            p = p.replace(upper_type=new)
            parts.append(_pick(rng, [f"wearing a {p.upper_color} {new}", f"swap the top for a {new}"]))
        elif s == "lower_color":
            new = str(rng.choice([c for c in COLORS if c != p.lower_color]))
            p = p.replace(lower_color=new)
            parts.append(_pick(rng, [f"with {new} {_pick(rng, LOWER_WORDS[p.lower_type])}" if p.lower_type != "skirt" else f"with a {new} skirt", f"change the bottoms to {new}"]))
        elif s == "lower_type":
            choices = [t for t in LOWER_TYPES if t != p.lower_type and not (t == "skirt" and p.gender == "man")]
            new = str(rng.choice(choices))
            p = p.replace(lower_type=new)
            parts.append(f"wearing {_a(p.lower_color + ' ' + new)}")
        elif s == "hat":
            if p.hat == "none":
                new = str(rng.choice(HATS[1:]))
                p = p.replace(hat=new)
                parts.append(f"add {_a(p.hat_color + ' ' + new)}")
            else:
                p = p.replace(hat="none")
                parts.append(_pick(rng, ["without the hat", "no hat", "take off the hat"]))
        elif s == "bag":
            if p.bag == "none":
                new = str(rng.choice(BAGS[1:]))
                p = p.replace(bag=new)
                parts.append(f"carrying {_a(p.bag_color + ' ' + new)}")
            else:
                p = p.replace(bag="none")
                parts.append(_pick(rng, ["without the bag", "no bag"]))
        elif s == "held":
            new = str(rng.choice([h for h in HELD if h != p.held]))
            p = p.replace(held=new)
            parts.append("empty hands" if new == "none" else f"holding {_a(new)}")
        elif s == "accessory":
            new = str(rng.choice([a for a in ACCESSORIES if a != p.accessory]))
            p = p.replace(accessory=new)
            parts.append("no accessories" if new == "none" else f"wearing {new if new == 'glasses' else _a(new)}")
    return p, _cap(_join(parts)) + "."


#: How often a relative caption also names one unchanged garment (ITCPR's annotators often describe the
#: target's outfit more fully: "wearing a yellow top and dark blue pants"); sets the mean length near
#: ITCPR's 9.5 words.
CONTEXT_P = 0.7


def relative_caption(src: Person, dst: Person, rng: np.random.Generator, context_p: float = CONTEXT_P) -> str:
    """A relative caption in ITCPR's and SynCPR's style taking ``src`` to ``dst``: each changed group named
    in full as the target has it ("wearing a red plaid shirt", "carrying a black backpack on her back",
    "no hat"), sometimes with one unchanged garment for context."""
    changed = {s for s in ("upper_color", "upper_type", "upper_pattern", "lower_color", "lower_type", "shoes_color",
                           "shoes_type", "hat", "hat_color", "bag", "bag_color", "held", "accessory")
               if getattr(src, s) != getattr(dst, s)}
    groups = [g for g in ("upper", "lower", "shoes", "hat", "bag", "held", "accessory")
              if any(s in changed for s in GROUP_SLOTS.get(g, [g]))]
    p, parts, wear = dst, [], []
    for g in groups:
        if g == "upper":
            wear.append(_upper_np(p, rng, True, True, True))
        elif g == "lower":
            wear.append(_lower_np(p, rng, True, True))
        elif g == "shoes":
            wear.append(_shoes_np(p, rng, True, True))
        elif g == "hat":
            parts.append(_pick(rng, ["no hat", "without the hat", "not wearing a hat"]) if p.hat == "none" else
                         _carry_clause("hat", _a(_pick(rng, COLOR_WORDS[p.hat_color]) + " " + _pick(rng, HAT_WORDS[p.hat])), p, rng))
        elif g == "bag":
            parts.append(_pick(rng, ["no bag", "without the bag", "not carrying a bag"]) if p.bag == "none" else
                         _carry_clause("bag", _a(_pick(rng, COLOR_WORDS[p.bag_color]) + " " + _pick(rng, BAG_WORDS[p.bag])), p, rng))
        elif g == "held":
            parts.append(_pick(rng, ["empty-handed", "holding nothing"]) if p.held == "none" else
                         _carry_clause("held", _a(_pick(rng, HELD_WORDS[p.held])), p, rng))
        else:
            parts.append("no accessories" if p.accessory == "none" else
                         "wearing " + (_pick(rng, ACCESSORY_WORDS["glasses"]) if p.accessory == "glasses" else _a(_pick(rng, ACCESSORY_WORDS[p.accessory]))))
    same = [g for g in ("upper", "lower") if g not in groups]
    if same and rng.random() < context_p:
        g = same[int(rng.integers(len(same)))]
        wear.append(_upper_np(p, rng, True, True, False) if g == "upper" else _lower_np(p, rng, True, True))
    if wear:
        parts.insert(0, _pick(rng, ["wearing", "in", "dressed in"]) + " " + _join(wear))
    return _cap(", ".join(parts) if parts else "the same outfit") + "."


def web_caption(person: Person, state: State, rng: np.random.Generator) -> tuple[str, set]:
    """An alt-text line for a picture of ``person`` (the pretraining "web"): lower case, no sentence, one to
    three salient things named in passing; returns ``(text, mentioned slots)``. Unlike the datasets'
    annotators, the web names few details and never in the annotators' sentences."""
    p = person
    slots, ph = _mentions(p, state, "web", rng)
    if len(ph) > 3:  # alt-text names a few things, the first ones that catch the eye
        keep = [g for g in ph][:3]
        ph = {g: ph[g] for g in keep}
        slots = {"gender"} | {s for g in keep for s in GROUP_SLOTS.get(g, [g])} & slots
    if rng.random() < 0.3:
        noun, slots = "person", slots - {"gender"}
    else:
        noun = _pick(rng, GENDER_WORDS[p.gender])
    wear = [ph[g] for g in ("upper", "lower", "shoes") if g in ph]
    extra = [_carry_clause(g, ph[g], p, rng) for g in ("hair", "hat", "bag", "held", "accessory") if g in ph]
    form = int(rng.integers(3))
    if form == 0 or not (wear or extra):
        extra = ["with " + x[4:] if x.startswith("has ") else x for x in extra]
        text = _a(noun) + (f" in {_join(wear)}" if wear else "") + (" " + _join(extra) if extra else "")
    elif form == 1:
        text = f"{_pick(rng, ['photo of', 'picture of', 'image of'])} {_a(noun)} " + _join(
            [f"wearing {_join(wear)}"] * bool(wear) + extra)
    else:
        text = ", ".join(wear + [x.split(" ", 1)[1] for x in extra] + [noun])
    if rng.random() < 0.4:
        text += " " + _SCENE_PHRASES[state.scene]
    return text.strip(), slots
