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


def test_irra_runs_train_with_irr_at_paper_only():
    """Issue 44 item 14: IRRA as published (IRR on) at paper and with real weights; the mini CLIP's IRRA runs
    without it, and keep their cache keys (no task_kw passed when off)."""
    from person_retrieval.papers.ctgi import IRR, CTGISettings

    assert IRR == {"tiny": False, "small": False, "paper": True}
    s = CTGISettings()
    assert s.fit_kwargs("irra", "paper") == {"task_kw": {"irr": True}}
    assert s.fit_kwargs("irra", "small", weights="ViT-B-16") == {"task_kw": {"irr": True}}
    assert s.fit_kwargs("irra", "small") == {} and s.fit_kwargs("irra", "tiny") == {}
    assert s.fit_kwargs("rde", "paper") == {}  # RDE has no IRR
    assert CTGISettings(epochs=3, irr=True).fit_kwargs("irra", "small") == {"epochs": 3, "task_kw": {"irr": True}}
    assert CTGISettings(irr=False).fit_kwargs("irra", "paper") == {}


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
    # eq. 3 for every image, eq. 2 for each image with a kept answer (random weights rarely say anything)
    assert vlm.usage.items["describe"] == 2 and lm.usage.items["generate"] == 2 + sum(bool(r.qa) for r in res)
    scores = torch.rand(2, len(ims), generator=torch.Generator().manual_seed(0))
    b = mti_rerank_batch(["a man in a red coat", "a woman with a bag"], scores, ims, vlm, lm,
                         lambda texts: torch.zeros(len(texts), len(ims)), top_k=3)
    order = scores.topk(3, dim=1).indices.tolist()
    checks = sum(3 if a is None else order[q].index(a) + 1 for q, a in enumerate(b.anchor))
    assert vlm.usage.items["judge"] == checks  # the anchor checks, sent as CTGI's anchor prompt (anchor_check)
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


# ---------------------------------------------------------------------------------------------
# MTG's eqs. 2 and 3 as two calls; MTI's anchor prompt and its early exit, with scripted assistants.
def _im(k: int) -> np.ndarray:
    """A constant image whose pixel value is its id (what the scripted MLLM reads)."""
    return np.full((8, 4, 3), k, dtype=np.uint8)


class _Scripted(A.VisionLanguageModel):
    """A scripted MLLM that records its calls. ``silent`` images answer noise (nothing is kept); ``yes``
    holds the image ids (or (image id, text) pairs) it confirms."""

    name = "scripted"

    def __init__(self, silent=(), yes=()):
        super().__init__()
        self.calls, self.silent, self.yes = [], set(silent), set(yes)

    @staticmethod
    def ids(images):
        return [int(im[0, 0, 0]) for im in images]

    def _describe(self, images, instructions):
        self.calls.append(("describe", self.ids(images), list(instructions)))
        return [f"A man, image {k}." for k in self.ids(images)]

    def _answer(self, images, questions):
        self.calls.append(("answer", self.ids(images), list(questions)))
        return ["zzz qqq" if k in self.silent else "He is carrying a black backpack." for k in self.ids(images)]

    def _judge(self, images, texts):
        self.calls.append(("judge", self.ids(images), list(texts)))
        return [k in self.yes or (k, t) in self.yes for k, t in zip(self.ids(images), texts)]


class _RecordingLM(A.LanguageModel):
    """A language model that records each batch and answers with the name of the prompt it was given."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.batches = []

    def _generate(self, batch, max_new_tokens):
        self.batches.append(list(batch))
        return [f"<{A.prompts.identify(t).name} {len(self.batches)}.{i}>" for i, t in enumerate(batch)]


def test_mtg_makes_eq2_and_eq3_as_two_calls():
    from person_retrieval.assistants import prompts as P

    vlm, lm = _Scripted(silent={2}), _RecordingLM()
    res = mtg_captions([_im(0), _im(1), _im(2)], vlm, lm, rounds=2, seed=0, batch=2)
    # per batch: eq. 1, one answer call per round, then eq. 2 and eq. 3, each its own generate call
    assert [c[0] for c in vlm.calls] == ["describe", "answer", "answer", "describe", "answer", "answer"]
    assert vlm.calls[0][2] == [P.CTGI_INITIAL] * 2
    kinds = [[P.identify(t).name for t in b] for b in lm.batches]
    assert kinds == [["rephrase", "rephrase"], ["ctgi_reconstruct", "ctgi_reconstruct"], ["ctgi_reconstruct"]]
    for i, r in enumerate(res[:2]):  # eq. 2 reads the kept answers only; eq. 3 reads T_s and eq. 2's output
        eq2, eq3 = lm.batches[0][i], lm.batches[1][i]
        assert len(r.qa) == 2 and all(a in eq2 for _, a in r.qa) and r.initial not in eq2
        assert eq2 == P.REPHRASE.format(text=" ".join(a for _, a in r.qa))
        assert r.enriched == f"<rephrase 1.{i}>" and eq3 == P.CTGI_RECONSTRUCT.format(initial=r.initial, enriched=r.enriched)
        assert r.caption == f"<ctgi_reconstruct 2.{i}>"
        assert eq3.index(r.initial) < eq3.index(r.enriched) < eq3.index("Rephrase the description using all the above information.")
    silent = res[2]  # every answer said nothing: no eq. 2 call, eq. 3 rephrases T_s alone
    assert silent.qa == [] and silent.asked == 2 and silent.enriched == ""
    assert lm.batches[2] == [P.CTGI_RECONSTRUCT.format(initial=silent.initial, enriched="")] and silent.caption == "<ctgi_reconstruct 3.0>"
    assert lm.usage.calls["generate"] == 3 and lm.usage.items["generate"] == 5


def test_mtg_eq2_and_eq3_on_the_mini_assistants_keep_what_was_said(setup):
    vlm, ims = setup
    for r in mtg_captions(ims[:4], A.MiniVLM(vlm.recognizer, seed=0), A.MiniLM(seed=0), rounds=6, seed=0):
        answered = grammar.parse_claims(" ".join(a for _, a in r.qa))
        enriched, final = grammar.parse_claims(r.enriched), grammar.parse_claims(r.caption)
        assert r.qa and enriched and set(enriched) <= set(answered)  # eq. 2: the answers' claims, nothing else
        assert set(grammar.parse_claims(r.initial)) - {"gender"} <= set(final)  # eq. 3 keeps T_s


class _Asker(_Scripted):
    """A transformers-like MLLM (it has ``ask``): answers each anchor prompt from a script."""

    def __init__(self, replies):
        super().__init__()
        self.replies, self.asked = list(replies), []

    def ask(self, images, texts, max_new_tokens=None):
        self.asked.append((self.ids([ims[0] for ims in images]), list(texts)))
        return [self.replies.pop(0) for _ in texts]

    def _judge(self, images, texts):
        raise AssertionError("a transformers MLLM gets CTGI's anchor prompt, not the generic judge prompt")


def test_anchor_check_sends_ctgis_anchor_prompt():
    from person_retrieval.assistants import prompts as P
    from person_retrieval.papers.ctgi import anchor_check

    vlm = _Asker(["Yes.", "No, the coat is blue.", "Maybe"])
    got = anchor_check(vlm, [_im(0), _im(1), _im(2)], ["a man in a red coat", "a woman", "a child"])
    assert got == [True, False, False] and vlm.usage.unparsed["ctgi_anchor_check"] == 1
    assert vlm.asked == [([0, 1, 2], [P.CTGI_ANCHOR_CHECK.format(query=q) for q in ("a man in a red coat", "a woman", "a child")])]
    assert vlm.usage.calls["judge"] == 1 and vlm.usage.items["judge"] == 3
    assert P.CTGI_ANCHOR_CHECK.source == "ours" and "no prompt printed" in P.CTGI_ANCHOR_CHECK.paper
    mini = _Scripted(yes={1})  # no ask: its yes/no role, judge, with the query itself
    assert anchor_check(mini, [_im(0), _im(1)], ["a man", "a man"]) == [False, True] and mini.calls[0][2] == ["a man", "a man"]


def test_early_exit_rule():
    from person_retrieval.papers.ctgi import early_exit

    assert early_exit(0.9, True) and early_exit(0.9, True, xi=0.85)
    assert not early_exit(0.9, False)  # above xi, not confirmed
    assert not early_exit(0.8, True)  # confirmed, not above xi
    assert not early_exit(0.85, True)  # equal is not above
    assert early_exit(0.5, True, xi=0.4) and not early_exit(0.5, True, xi=0.6)


def test_mti_early_exit_needs_both_the_similarity_and_the_confirmation():
    from person_retrieval.papers.ctgi import mti_rerank_batch

    gallery = [_im(k) for k in range(5)]
    scores = torch.tensor([[0.90, 0.80, 0.10, 0.10, 0.10],    # top-1 above xi and confirmed: exits
                           [0.90, 0.88, 0.10, 0.10, 0.10],    # top-1 above xi, not confirmed (rank 2 is): refined
                           [0.70, 0.60, 0.10, 0.10, 0.10],    # top-1 confirmed, not above xi: refined
                           [0.86, 0.10, 0.10, 0.10, 0.10]])   # above xi, nothing confirmed: left alone, no exit
    queries = ["q0 a man", "q1 a man", "q2 a man", "q3 a man"]
    vlm = _Scripted(yes={(0, queries[0]), (1, queries[1]), (0, queries[2])})
    b = mti_rerank_batch(queries, scores, gallery, vlm, A.MiniLM(seed=0), lambda texts: torch.zeros(len(texts), 5), top_k=3, xi=0.85)
    assert b.early_exit.tolist() == [True, False, False, False]
    assert b.anchor == [0, 1, 0, None]
    assert b.refined[0] is None and b.refined[1] is not None and b.refined[2] is not None and b.refined[3] is None
    assert int(b.vlm_calls[0]) == 1 and int(b.llm_calls[0]) == 0 and torch.equal(b.scores(0.5)[0], scores[0])
    assert float(b.scores(0.5)[1, 1]) == 1.0  # the anchor, confirmed at rank 2, ranked first
    assert int(b.vlm_calls[3]) == 3 and torch.equal(b.scores(0.5)[3], scores[3])
    assert b.cost()["early exit %"] == 25
    low = mti_rerank_batch(queries[:1], scores[:1], gallery, vlm, A.MiniLM(seed=0), lambda texts: torch.zeros(len(texts), 5), xi=0.95)
    assert not bool(low.early_exit[0]) and low.refined[0] is not None  # the same query, a higher xi: refined
