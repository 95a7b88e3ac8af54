import numpy as np
import pytest
import torch

from person_retrieval import assistants as A
from person_retrieval.assistants import grammar
from person_retrieval.papers.ctgi import mti_rerank, mtg_captions
from person_retrieval.world import PROFILES, render, sample_person, sample_state


@pytest.fixture(scope="module")
def setup():
    vlm = A.mini_vlm("tiny", seed=0, progress=False)
    rng = np.random.default_rng(11)
    ims = [render(sample_person(rng, i), sample_state(rng, PROFILES["cuhk_pedes"]), 64) for i in range(10)]
    return vlm, ims


def test_mtg_enriches_without_asking_twice(setup):
    vlm, ims = setup
    lm = A.MiniLM(seed=0)
    res = mtg_captions(ims, A.MiniVLM(vlm.recognizer, seed=0), lm, rounds=6, seed=0, batch=4)
    assert len(res) == len(ims)
    for r in res:
        assert len(r.qa) <= 6 and r.caption.endswith(".")
        covered = grammar.claimed_groups(grammar.parse_claims(r.initial))
        for q, a in r.qa:  # each kept question asked about something not yet said, and its answer said something
            g = set(grammar.question_groups(q))
            assert g and not g <= covered and grammar.claimed_groups(grammar.parse_claims(a))
            covered |= g | grammar.claimed_groups(grammar.parse_claims(a))
    n_init = np.mean([len(grammar.parse_claims(r.initial)) for r in res])
    n_final = np.mean([len(grammar.parse_claims(r.caption)) for r in res])
    assert n_final > n_init
    again = mtg_captions(ims, A.MiniVLM(vlm.recognizer, seed=0), A.MiniLM(seed=0), rounds=6, seed=0, batch=4)
    assert [[q for q, _ in r.qa] for r in again] == [[q for q, _ in r.qa] for r in res]  # same seed, same questions
    none = mtg_captions(ims[:2], vlm, lm, rounds=0)
    assert all(r.qa == [] for r in none)


def _scorer(vlm, ims):
    probs = [p for _, _, p in vlm.perceive(ims)]
    return lambda text: torch.tensor([vlm.claim_probability(p, grammar.parse_claims(text)) for p in probs])


def test_mti_no_anchor_changes_nothing(setup):
    vlm, ims = setup
    never = A.MiniVLM(vlm.recognizer, judge_threshold=1.1)  # never says yes
    scores = torch.linspace(0.5, 0.1, len(ims))
    r = mti_rerank("a man in a black coat", scores, ims, never, A.MiniLM(), _scorer(vlm, ims), top_k=5)
    assert r.anchor is None and torch.equal(r.scores, scores) and r.vlm_calls == 5 and r.llm_calls == 0


def test_mti_anchor_refines_and_ranks_first(setup):
    vlm, ims = setup
    always = A.MiniVLM(vlm.recognizer, judge_threshold=0.0)
    scores = torch.linspace(0.5, 0.1, len(ims))
    lm = A.MiniLM()
    r = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), top_k=5, lam=0.5)
    assert r.anchor == 0 and r.scores[0] == 1.0 and not r.early_exit and r.llm_calls == 1
    assert r.vlm_calls == 1 + 8  # the confirmation, then one diagnostic question per missing group
    assert len(grammar.parse_claims(r.refined)) > len(grammar.parse_claims("a man"))
    keep = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), lam=1.0)
    assert torch.allclose(keep.scores[1:], scores[1:])
    early = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), xi=0.4)
    assert early.early_exit and torch.equal(early.scores, scores) and early.vlm_calls == 1
    with pytest.raises(ValueError, match="lam"):
        mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), lam=1.5)


# ---------------------------------------------------------------------------------------------
# Batched MTI: the same decisions as one query at a time, with the calls the sequential algorithm makes.
def _gallery_scorer(vlm, ims):
    probs = [p for _, _, p in vlm.perceive(ims)]
    return lambda texts: torch.tensor([[vlm.claim_probability(p, grammar.parse_claims(t)) for p in probs] for t in texts])


def test_batched_mti_matches_one_query_at_a_time(setup):
    vlm, ims = setup
    people = [p for p, _, _ in vlm.perceive(ims)]
    queries = [f"A {p.gender} in {p.upper_color} clothes." for p in people[:6]]
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(len(queries), len(ims), generator=g) * 0.8
    scorer = _gallery_scorer(vlm, ims)
    from person_retrieval.papers.ctgi import mti_rerank_batch

    b = mti_rerank_batch(queries, scores, ims, vlm, A.MiniLM(seed=0), scorer, top_k=4)
    for q, text in enumerate(queries):
        one = mti_rerank(text, scores[q], ims, vlm, A.MiniLM(seed=0), lambda t: scorer([t])[0], top_k=4, lam=0.3)
        assert one.anchor == b.anchor[q] and one.vlm_calls == int(b.vlm_calls[q]) and one.llm_calls == int(b.llm_calls[q])
        assert (one.refined is None) == (b.refined[q] is None)
        assert torch.allclose(one.scores, b.scores(0.3)[q])
    assert any(a is not None for a in b.anchor)
    for q, a in enumerate(b.anchor):  # a refined query ranks its anchor first, whatever lambda
        if b.refined[q] is not None:
            assert int(b.scores(1.0)[q].argmax()) == a and int(b.scores(0.0)[q].argmax()) == a
        else:
            assert torch.equal(b.scores(0.5)[q], scores[q])
    c = b.cost()
    assert c["queries"] == 6 and c["refined %"] + c["no anchor %"] + c["early exit %"] == pytest.approx(100)
    with pytest.raises(ValueError, match="lam must lie in"):
        b.scores(1.5)


def test_mti_early_exit_when_confident_and_confirmed(setup):
    vlm, ims = setup
    always = A.MiniVLM(vlm.recognizer, judge_threshold=0.0)
    scores = torch.linspace(0.5, 0.1, len(ims))
    scores[3] = 0.9
    lm = A.MiniLM()
    r = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), top_k=5, xi=0.85)
    assert r.early_exit and r.anchor == 3 and r.refined is None and torch.equal(r.scores, scores)
    assert r.vlm_calls == 1 and r.llm_calls == 0
    r = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), top_k=5, xi=0.95)  # below xi: refined instead
    assert not r.early_exit and r.refined is not None


def test_mini_vlm_remembers_what_it_saw(setup):
    vlm, ims = setup
    fresh = A.MiniVLM(vlm.recognizer, seed=0)
    calls = []
    real = fresh.recognizer.predict
    fresh.recognizer = type("R", (), {"predict": lambda self, x: (calls.append(len(x)), real(x))[1]})()
    first = fresh.judge(ims[:4], "a person in a red top")
    again = fresh.judge(ims[:4] + ims[:2], "a person in a red top")
    assert again[:4] == first and calls == [4]  # the second call found every image in the memo
    assert fresh.perceive(ims[:1])[0][0] == vlm.perceive(ims[:1])[0][0]


# ---------------------------------------------------------------------------------------------
# Pseudo-caption files and training on them.
def test_mtg_split_round_trip_and_caption_swap(tiny_world, tmp_path):
    from person_retrieval import datasets
    from person_retrieval.datasets import load_split
    from person_retrieval.papers import ctgi

    root = tiny_world["rstpreid"]
    splits = [load_split("rstpreid", root, s) for s in ("train", "val")]
    vlm = A.mini_vlm("tiny", seed=0, progress=False)
    f = tmp_path / "caps.json"
    caps = ctgi.mtg_split(splits, vlm, A.MiniLM(seed=0), f, rounds=3, seed=0, progress=False)
    assert f.is_file() and len(caps) == sum(len(s.image_paths) for s in splits)
    assert all(not k.startswith("/") and k.startswith("imgs") for k in caps)
    before = vlm.usage.total_items()
    assert ctgi.mtg_split(splits, vlm, A.MiniLM(seed=0), f) == caps and vlm.usage.total_items() == before  # read back
    swapped = datasets.with_pseudo_captions(splits[0], caps, "initial")
    assert len(swapped.captions) == len(splits[0].image_paths) and swapped.caption_image_ids == list(range(len(swapped.captions)))
    assert swapped.caption_pids == splits[0].image_pids and not set(swapped.captions) & set(splits[0].captions)
    with pytest.raises(ValueError, match="field must be"):
        datasets.with_pseudo_captions(splits[0], caps, "manual")
    with pytest.raises(KeyError, match="no pseudo-caption for image"):
        datasets.with_pseudo_captions(splits[0], {}, "caption")
    (tmp_path / "bad.json").write_text('{"imgs/a.jpg": "just a string"}')
    with pytest.raises(ValueError, match="expected an object mapping image paths"):
        datasets.read_pseudo_captions(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="mtg_split"):
        datasets.read_pseudo_captions(tmp_path / "missing.json")


def test_task_trains_on_pseudo_captions_with_stretched_text(tiny_world, tmp_path):
    from person_retrieval.datasets import load_split
    from person_retrieval.papers import ctgi, tpr

    root = tiny_world["rstpreid"]
    splits = [load_split("rstpreid", root, s) for s in ("train", "val")]
    f = tmp_path / "caps.json"
    caps = ctgi.mtg_split(splits, A.mini_vlm("tiny", seed=0, progress=False), A.MiniLM(seed=0), f, rounds=2, progress=False)
    t = tpr.IRRATask("rstpreid", str(root), scale="tiny", captions=str(f), caption_field="caption", context_length=248)
    assert t.backbone.context_length == 248 and t.backbone.config["stretched_from"] == 77
    train = t.train_data().data
    assert set(train.captions) <= {r["caption"] for r in caps.values()} and train.tokens.shape[1] == 248
    plain = tpr.IRRATask("rstpreid", str(root), scale="tiny")
    assert plain.backbone.context_length == 77 and set(plain.train_data().data.captions) == set(splits[0].captions)


def test_context_tokens_cut_long_captions_like_clip(tiny_world):
    from person_retrieval import models
    from person_retrieval.models import build_backbone
    from person_retrieval.papers.ctgi import context_tokens

    bb = build_backbone(None, "tiny")
    data = models.split_data("rstpreid", tiny_world["rstpreid"], "test", bb)
    data.captions[0] = " ".join(["red"] * 120)
    long, short = context_tokens(data, bb, 248), context_tokens(data, bb, 77)
    assert long.tokens.shape[1] == 248 and short.tokens.shape[1] == 77
    assert int((long.tokens[0] != 0).sum()) == 122 and int(short.tokens[0, -1]) == int(long.tokens[0].max())  # EOT kept
    assert torch.equal(long.tokens[1:, :77], short.tokens[1:])


def test_settings_list_the_runs_of_tables_1_to_4():
    from person_retrieval.papers.ctgi import CTGISettings

    runs = CTGISettings().runs()
    assert len(runs) == len(set(runs)) == 10
    assert [(m, d) for m, d, c, p in runs if not p] == [("irra", "rstpreid")]
    both = CTGISettings(ablation_methods=("irra", "rde")).runs()
    assert len(both) == 12 and set(both) - set(runs) == {("rde", "rstpreid", "single-turn", True), ("rde", "rstpreid", "MTG", False)}
    assert {(m, c) for m, d, c, p in runs if d == "cuhk_pedes"} == {("irra", "single-turn"), ("irra", "MTG"), ("rde", "MTG")}


def test_ctgi_stages_run_on_transformers_assistants(setup, tmp_path):
    """The real path: MTG and MTI through a (tiny, random) Qwen2-VL and Llama, loaded from folders as a
    user's Qwen2-VL-7B and reconstructor would be. Random weights answer noise: no anchor is confirmed,
    so MTI leaves every ranking as it was, and MTG keeps no answer that claims nothing."""
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersLM, TransformersVLM
    from person_retrieval.papers.ctgi import mti_rerank_batch

    _, ims = setup
    model, proc = tiny.qwen2_vl()
    model.save_pretrained(tmp_path / "vlm")
    proc.save_pretrained(tmp_path / "vlm")
    lm_model, tok = tiny.llama_lm()
    lm_model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    vlm = TransformersVLM.load(tmp_path / "vlm", max_new_tokens=4)
    lm = TransformersLM.load(tmp_path / "lm")
    res = mtg_captions(ims[:2], vlm, lm, rounds=2, seed=0)
    assert len(res) == 2 and all(isinstance(r.caption, str) and isinstance(r.initial, str) for r in res)
    assert vlm.usage.items["describe"] == 2 and lm.usage.items["generate"] == 2
    scores = torch.rand(2, len(ims), generator=torch.Generator().manual_seed(0))
    b = mti_rerank_batch(["a man in a red coat", "a woman with a bag"], scores, ims, vlm, lm,
                         lambda texts: torch.zeros(len(texts), len(ims)), top_k=3)
    for q, a in enumerate(b.anchor):
        if a is None:  # nothing confirmed in the top 3: three calls, ranking as it was
            assert int(b.vlm_calls[q]) == 3 and int(b.llm_calls[q]) == 0 and torch.equal(b.scores(0.5)[q], scores[q])
        elif not b.early_exit[q]:  # confirmed: refined by the reconstructor, the anchor ranked first
            assert int(b.llm_calls[q]) == 1 and isinstance(b.refined[q], str) and float(b.scores(0.5)[q, a]) == 1.0


class _Mumbler(A.VisionLanguageModel):
    """An MLLM whose every answer is noise the grammar cannot read (an untrained stand-in)."""

    name = "mumbler"

    def _answer(self, images, questions):
        return ["zzz qqq"] * len(images)

    def _describe(self, images, instructions):
        return ["a person"] * len(images)


def test_mtg_counts_the_answers_that_did_not_parse(setup):
    """Notebook 07 at paper with stand-in assistants: MTG must finish and say how much was noise, not hide it."""
    from person_retrieval.papers.ctgi import mtg_counts

    vlm, ims = setup
    res = mtg_captions(ims[:3], _Mumbler(), A.MiniLM(seed=0), rounds=2, seed=0)
    assert all(r.asked == 2 and r.qa == [] for r in res)
    data = {str(i): {"initial": r.initial, "caption": r.caption, "qa": r.qa, "asked": r.asked} for i, r in enumerate(res)}
    c = mtg_counts(data)
    assert c["images"] == 3 and c["questions asked"] == 6 and c["answers kept"] == 0 and c["answers unparsed (dropped)"] == 6
    assert c["initial captions unparsed"] == 3
    good = mtg_captions(ims[:3], A.MiniVLM(vlm.recognizer, seed=0), A.MiniLM(seed=0), rounds=2, seed=0)
    c2 = mtg_counts({str(i): {"initial": r.initial, "caption": r.caption, "qa": r.qa, "asked": r.asked} for i, r in enumerate(good)})
    assert c2["answers kept"] > 0 and c2["answers unparsed (dropped)"] == c2["questions asked"] - c2["answers kept"]
    assert np.isnan(mtg_counts({"x": {"initial": "", "caption": "", "qa": []}})["questions asked"])  # a file written before counting


def test_subset_root_cuts_the_training_splits_and_keeps_the_test_split(tiny_world, tmp_path):
    from person_retrieval.datasets import load_split
    from person_retrieval.papers.ctgi import subset_root

    for d in ("cuhk_pedes", "icfg_pedes"):
        sub = subset_root(d, tiny_world[d], 5, tmp_path / d)
        assert len(load_split(d, sub, "train").image_paths) == 5
        full, cut = load_split(d, tiny_world[d], "test"), load_split(d, sub, "test")
        assert cut.captions == full.captions and [p.split("/")[-1] for p in cut.image_paths] == [p.split("/")[-1] for p in full.image_paths]
    assert len(load_split("cuhk_pedes", tmp_path / "cuhk_pedes", "val").image_paths) == 5
