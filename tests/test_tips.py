"""TIPS (notebook 02_tips): prompts, differences, the filter's rule and redraws, the sharded synthesis and its
resume, the CUHK-PEDES folder it writes, the few-shot split, the web corpus, TTA, and the real path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from person_retrieval.assistants import MiniLM, grammar
from person_retrieval.config import rng_for
from person_retrieval.datasets import load_split, read_tpr_annotations
from person_retrieval.papers import tips

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_instructions_carry_the_papers_elements():
    ex = [f"A man wears a {c} shirt." for c in ("red", "blue", "green", "black")]
    zs = tips.prompt_asks([0, 1], "zero_shot", ex, seed=0)
    lists = tips.attribute_lists()
    for ask in zs:
        assert sum(e in ask for e in ex) == 3  # three examples
        for field, options in (("Suggested character", lists["character"]), ("Suggested colour", lists["color"]),
                               ("Suggested clothing", lists["clothing"])):
            line = next(x for x in ask.splitlines() if x.startswith(field))
            assert line.split(": ", 1)[1] in options
    assert tips.prompt_asks([0, 1], "zero_shot", ex, seed=0) == zs and zs[0] != zs[1]  # drawn per index, reproducibly
    fs = tips.prompt_asks([3], "few_shot", ex, seed=0)[0]
    assert sum(e in fs for e in ex) == 3 and "Suggested" not in fs
    with pytest.raises(ValueError, match="at least 3 example"):
        tips.prompt_asks([0], "few_shot", ex[:2])
    with pytest.raises(ValueError, match="scenario"):
        tips.prompt_asks([0], "many_shot", ex)


def test_the_mini_llm_follows_the_suggestions_and_recombines_the_examples():
    lm = MiniLM(0)
    ex = ["A man wears a red shirt and black jeans.", "A woman wears a blue coat and a gray skirt.", "A man wears green shorts and boots."]
    asks = tips.prompt_asks(range(6), "zero_shot", ex, seed=0)
    for ask, text in zip(asks, tips.seed_prompts(lm, range(6), "zero_shot", ex, seed=0)):
        colour = next(x for x in ask.splitlines() if x.startswith("Suggested colour")).split(": ")[1]
        assert colour in grammar.parse_claims(text).values(), (ask, text)
    allowed = {v for e in ex for v in grammar.parse_claims(e).values()}
    for text in tips.seed_prompts(lm, range(6), "few_shot", ex, seed=0):
        assert set(grammar.parse_claims(text).values()) <= allowed, text


def test_difference_prompts_say_the_state_they_ask_for():
    diffs = tips.draw_differences(200, np.random.default_rng(0))
    assert all(want for _, want in diffs)
    for text, want in diffs:
        assert text.startswith("the same person, ")
        if "view" in want:
            assert tips._VIEWS[want["view"]] in text
        if "pose" in want:
            assert want["pose"] in text
        if "brightness" in want:  # lighting: its phrase, rendered at its brightness by the oracle
            assert [p for p, b in tips.LIGHTING.items() if b == want["brightness"]][0] in text
        if "held" in want:
            assert tips.carried_text(want["held"]) in text
    assert len({t for t, _ in diffs}) > 10
    # the paper's five kinds of difference (TIPS App. A.1) all occur, alone too
    kinds = [{k for k in want} for _, want in diffs]
    assert all(any(k in w for w in kinds) for k in ("view", "pose", "scene", "brightness", "held"))
    assert {"brightness"} in kinds or {"held"} in kinds
    assert tips.carried_text("umbrella") == "now holding an umbrella" and tips.carried_text("none") == "with empty hands"
    ours = tips.draw_differences(100, np.random.default_rng(0), tips.DIFFERENCES_VIEW_POSE_SCENE)
    assert all(set(w) <= {"view", "pose", "scene"} and "light" not in t and "holding" not in t for t, w in ours)
    from person_retrieval.generators.mini import difference_text
    from person_retrieval.world.render import State

    none = {"view": "none", "pose": "none", "scene": "none"}  # view, pose and scene in the mini IDPG's training wording
    assert all(t == difference_text(State(**none), State(**{**none, **w})) for t, w in ours)
    with pytest.raises(ValueError, match="kinds must be"):
        tips.draw_differences(1, np.random.default_rng(0), ("weather",))


def test_the_oracle_renders_the_lighting_and_the_carried_item_asked_for():
    from person_retrieval.world.attributes import sample_person
    from person_retrieval.world.render import CameraProfile

    person = sample_person(np.random.default_rng(0), 0).replace(held="none")
    want = {"view": "back", "brightness": tips.LIGHTING["in dim light"], "held": "umbrella"}
    st = tips._oracle_state(np.random.default_rng(1), CameraProfile(), None, (64, 32), want)
    assert st.view == "back" and st.brightness == tips.LIGHTING["in dim light"]
    assert tips.oracle_expansion_person(person, want).held == "umbrella" and tips.oracle_expansion_person(person, {"view": "back"}) is person


def test_filter_rule_and_redraws_known_answers():
    assert tips.passes(np.array([[9, 9], [8, 10], [10, 9]])).tolist() == [True, False, True]
    assert tips.passes(np.array([[9, 9, 1], [9, 9, 0], [9, 8, 1]])).tolist() == [True, False, False]
    assert tips.passes(np.array([[7, 7]]), keep_score=7).tolist() == [True]
    # image i passes at draw number i (0-based); image 3 never does within 3 draws
    calls = []

    def draw(todo, t):
        calls.append((todo.tolist(), t))
        return torch.full((len(todo), 3, 2, 2), t, dtype=torch.uint8)

    def score(todo, im):
        return np.array([[10, 10] if t <= int(im[k, 0, 0, 0]) else [10, 3] for k, t in enumerate(todo)])

    images, scores, ok, every = tips._redraw(draw, score, 4, 9, 3)
    assert calls == [([0, 1, 2, 3], 0), ([1, 2, 3], 1), ([2, 3], 2)]
    assert ok.tolist() == [True, True, True, False] and len(every) == 4 + 3 + 2
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2, 2]  # the last draw stays for the image given up
    # "until it passes": with a cap of 5 draws image 3 passes at its fourth draw; the cap is stated in the config
    assert tips._redraw(draw, score, 4, 9, 5)[2].tolist() == [True] * 4
    assert tips.MAX_TRIES == 5 and tips.TIPSConfig(n_prompts=1).max_tries == tips.MAX_TRIES


def test_oracle_person_shows_what_the_prompt_says():
    text = "A woman with long black hair is wearing a red coat, blue jeans and white sneakers, carrying a backpack."
    claims = grammar.parse_claims(text)
    for i in range(5):
        p = tips.oracle_person(text, rng_for(0, "t", i), i)
        assert all(getattr(p, k) == v for k, v in claims.items() if hasattr(p, k))


# ---------------------------------------------------------------------------------------------- synthesis
@pytest.fixture(scope="module")
def mini():
    return tips.mini_models("tiny", 0, progress=False)


@pytest.fixture(scope="module")
def domain(tiny_world):
    return tips.domain("tiny", 0, "cuhk_pedes", None, "zero_shot")


def _cfg(models, n=8, source="oracle"):
    return tips.TIPSConfig(n_prompts=n, scenario="zero_shot", source=source, shard_size=3, val_every=3, keep_score=6, seed=0, models=models)


def test_synthesis_writes_a_cuhk_pedes_folder(mini, domain, tmp_path):
    lm, gen, vlm, names = mini
    ex, sizes, profile = domain
    cfg = _cfg(names)
    done = tips.synthesize(tmp_path / "s", cfg, lm, gen, vlm, ex, sizes, profile, progress=False)
    assert [d["shard"] for d in done] == [0, 1, 2]
    assert tips.synthesize(tmp_path / "s", cfg, lm, gen, vlm, ex, sizes, profile, progress=False) == []
    man = tips.assemble(tmp_path / "s")
    data = read_tpr_annotations("cuhk_pedes", tmp_path / "s")
    assert man["images"] == len(data) > 0 and man["pairs"] == 2 * len(data)
    assert all(len(e["captions"]) == 2 and e["captions"][0] != e["captions"][1] for e in data)
    assert all((e["split"] == "val") == ((e["id"] - 1) % 3 == 2) for e in data)
    train = load_split("cuhk_pedes", tmp_path / "s", "train")  # the TPR reader takes it as it is
    assert len(train.image_paths) == man["train_images"]
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "s" / "shards").glob("*.json"))]
    kept = sum(sum(r["seed_kept"]) + sum(r["expansion_kept"]) for r in recs)
    assert kept == man["images"]  # every kept image, and only those, is in the folder
    # an identity's images: its seed, then the expansions that passed, up to 4
    by = {}
    for e in data:
        by.setdefault(e["id"], []).append(e["file_path"])
    assert all(any(p.endswith("_seed.png") for p in v) and len(v) <= 5 for v in by.values())
    table = tips.rejection_table(tmp_path / "s")
    assert set(table.criterion) >= {"alignment", "quality", "identity", "variation", "given up after every draw"}
    with pytest.raises(ValueError, match="another configuration"):
        tips.synthesize(tmp_path / "s", _cfg(names, n=9), lm, gen, vlm, ex, sizes, profile, progress=False)


def test_rejection_table_known_answer(tmp_path):
    (tmp_path / "synthesis.json").write_text(json.dumps({"keep_score": 9}))
    (tmp_path / "scores.json").write_text(json.dumps({
        "seed_draws": [[9, 9], [8, 9], [9, 2], [10, 10]], "seed_kept": [True, False],
        "expansion_draws": [[9, 9, 0], [9, 9, 1]], "expansion_kept": [True]}))
    t = tips.rejection_table(tmp_path).set_index(["images", "criterion"])["failed (%)"]
    assert t["seed", "alignment"] == 25 and t["seed", "quality"] == 25 and t["seed", "any (draw rejected)"] == 50
    assert t["seed", "given up after every draw"] == 50 and t["expansion", "variation"] == 50 and t["expansion", "quality"] == 0
    (tmp_path / "synthesis.json").write_text(json.dumps({"keep_score": 9, "max_tries": 5}))
    assert set(tips.rejection_table(tmp_path)["max draws"]) == {5}  # the redraws' cap beside the rates


def test_the_papers_rejection_rates_include_the_generalization_scenario():
    ref = tips.reported_rejections().set_index(["images", "scenario"])["failed (%)"]
    assert ref["seed", "zero_shot"] == 19.6 and ref["seed", "few_shot"] == 17.5 and ref["seed", "generalization"] == 14.6
    assert ref["expansion", "average over the scenarios"] == 36.2
    assert set(tips.reported_rejections().criterion) == {"any (draw rejected)"}  # the rows of ours they compare with


def test_a_killed_synthesis_resumes_to_the_same_manifest(mini, kill_after_first_shard, domain, tmp_path):
    lm, gen, vlm, names = mini
    ex, sizes, profile = domain
    cfg = _cfg(names, n=12)
    tips.synthesize(tmp_path / "whole", cfg, lm, gen, vlm, ex, sizes, profile, progress=False)
    tips.synthesize(tmp_path / "split", cfg, lm, gen, vlm, ex, sizes, profile, shard=1, num_shards=2, progress=False)
    with pytest.raises(RuntimeError, match="not synthesized yet"):
        tips.assemble(tmp_path / "split")
    tips.synthesize(tmp_path / "split", cfg, lm, gen, vlm, ex, sizes, profile, shard=0, num_shards=2, progress=False)
    whole = tips.assemble(tmp_path / "whole")
    assert tips.assemble(tmp_path / "split") == whole
    assert (tmp_path / "split" / "reid_raw.json").read_bytes() == (tmp_path / "whole" / "reid_raw.json").read_bytes()
    killed = tmp_path / "killed"
    code = ("import sys, json; from person_retrieval.papers import tips as T; c = json.loads(sys.argv[2]); c['models'] = tuple(c['models']); "
            "lm, gen, vlm, _ = T.mini_models('tiny', 0, progress=False); ex, sizes, prof = T.domain('tiny', 0, 'cuhk_pedes', None, 'zero_shot'); "
            "import time; orig = T.synthesize_shard\n"
            "def slow(*a, **k):\n    time.sleep(0.5); return orig(*a, **k)\n"
            "T.synthesize_shard = slow; T.synthesize(sys.argv[1], T.TIPSConfig.from_json(c), lm, gen, vlm, ex, sizes, prof, progress=False)")
    kill_after_first_shard(code, killed, cfg.as_json())
    left = tips.missing_shards(killed)
    assert 0 < len(left) < cfg.n_shards, left
    tips.synthesize(killed, cfg, lm, gen, vlm, ex, sizes, profile, progress=False)
    assert tips.assemble(killed) == whole
    assert not list((killed / "imgs").glob("*.partial"))


def test_config_checks():
    with pytest.raises(ValueError, match="expansions must be 0"):
        tips.TIPSConfig(n_prompts=4, source="spg")
    with pytest.raises(ValueError, match="scenario"):
        tips.TIPSConfig(n_prompts=4, scenario="any")
    assert tips.TIPSConfig(n_prompts=100, shard_size=48).n_shards == 3
    with pytest.raises(ValueError, match="differences"):
        tips.TIPSConfig(n_prompts=4, differences=("view", "weather"))
    c = tips.TIPSConfig(n_prompts=4, differences=tips.DIFFERENCES_VIEW_POSE_SCENE, models=("a", "b"))
    assert tips.TIPSConfig.from_json(json.loads(json.dumps(c.as_json()))) == c
    assert c.as_json() != tips.TIPSConfig(n_prompts=4, models=("a", "b")).as_json()  # the kinds enter the cache key


# ---------------------------------------------------------------------------------------------- other sets
def test_few_shot_split_keeps_a_share_of_training_identities(tiny_world):
    root = tiny_world["cuhk_pedes"]
    ids = tips.train_identities("cuhk_pedes", root)
    a = tips.few_shot_split("cuhk_pedes", root, 0.25, seed=0)
    b = tips.few_shot_split("cuhk_pedes", root, 0.25, seed=1)
    got = tips.train_identities("cuhk_pedes", a)
    assert len(got) == round(0.25 * len(ids)) and set(got) <= set(ids)
    assert got == tips.train_identities("cuhk_pedes", tips.few_shot_split("cuhk_pedes", root, 0.25, seed=0))
    assert got != tips.train_identities("cuhk_pedes", b)
    assert len(tips.train_identities("cuhk_pedes", tips.few_shot_split("cuhk_pedes", root, 0.0001, 0))) == 2  # at least two
    assert load_split("cuhk_pedes", a, "test").captions == load_split("cuhk_pedes", root, "test").captions  # images through the link
    full = tips.few_shot_split("cuhk_pedes", root, 0.25, seed=0, val="full")  # ours: the whole val split
    assert tips.train_identities("cuhk_pedes", full) == got
    assert load_split("cuhk_pedes", full, "val").captions == load_split("cuhk_pedes", root, "val").captions
    with pytest.raises(ValueError, match="few_shot_share"):
        tips.few_shot_split("cuhk_pedes", root, 0.0)
    with pytest.raises(ValueError, match="val must be"):
        tips.few_shot_split("cuhk_pedes", root, 0.25, val="some")


def test_few_shot_model_selection_spends_the_same_budget_as_training(tiny_world):
    """Issue 45, item 2: the few-shot split's val identities are the training share of the labelled val
    identities (at least 2), drawn by the seed, not the whole val split."""
    root = tiny_world["cuhk_pedes"]
    n_train, n_val = len(tips.train_identities("cuhk_pedes", root)), len(tips.split_identities("cuhk_pedes", root, "val"))
    for share in (0.25, 0.5, 0.0001):
        a = tips.few_shot_split("cuhk_pedes", root, share, seed=0)
        tr, va = tips.train_identities("cuhk_pedes", a), tips.split_identities("cuhk_pedes", a, "val")
        assert len(tr) == max(2, round(share * n_train)) and len(va) == max(2, round(share * n_val))
        assert set(va) <= set(tips.split_identities("cuhk_pedes", root, "val")) and va != tr
        assert abs(len(va) / n_val - len(tr) / n_train) <= 1 / min(n_val, n_train) + 2 / n_val  # the same share, up to rounding
        assert json.loads((a / "subset.json").read_text())["val_identities"] == va
    va1 = tips.split_identities("cuhk_pedes", tips.few_shot_split("cuhk_pedes", root, 0.25, seed=1), "val")
    assert va1 != tips.split_identities("cuhk_pedes", tips.few_shot_split("cuhk_pedes", root, 0.25, seed=0), "val")  # drawn by seed
    va0 = tips.split_identities("cuhk_pedes", tips.few_shot_split("cuhk_pedes", root, 0.25, seed=0), "val")
    sub = load_split("cuhk_pedes", tips.few_shot_split("cuhk_pedes", root, 0.25, seed=0), "val")  # what model selection reads
    assert len(set(sub.image_pids)) == len(va0) and 0 < len(sub.captions) < len(load_split("cuhk_pedes", root, "val").captions)


def test_web_corpus_has_the_asked_size_and_new_people(tiny_world):
    from person_retrieval.models.pretrain import pretrain_corpus

    root = tips.web_corpus("tiny", 0, 30)
    data = read_tpr_annotations("cuhk_pedes", root)
    assert sum(len(e["captions"]) for e in data) == 30 and {e["split"] for e in data} == {"train", "val"}
    own = set(pretrain_corpus("tiny", 0, n_ids=15, height=64)[1])
    assert len(own & {c for e in data for c in e["captions"]}) < 5  # not the backbone's own pretraining captions


def test_small_sets_get_a_batch_that_fits(tiny_world, tmp_path):
    root = tips.few_shot_split("cuhk_pedes", tiny_world["cuhk_pedes"], 0.0001, 0)
    n = len(load_split("cuhk_pedes", root, "train").captions)
    b = tips._small_set_batch("cuhk_pedes", root, "tiny", 0)["batch_size"]
    assert 2 <= b <= n // 2 and b & (b - 1) == 0
    b2 = tips._small_set_batch("cuhk_pedes", root, "tiny", 2)["batch_size"]  # the global batch: two processes share it
    assert b2 == max(b, 4) and b2 % 2 == 0
    assert tips._small_set_batch("cuhk_pedes", tiny_world["cuhk_pedes"], "tiny", 0) == {}  # a full set keeps the baselines' batch


# ---------------------------------------------------------------------------------------------- TTA
def test_tta_eq3_mixes_raw_features_then_takes_the_cosine():
    """Eq. 3 as printed on hand-made 2-D features whose norms differ: f_t = (1, 0), f_p = (0, 3), alpha = 0.6 give
    f_q = (0.6, 1.2), whose cosines to g1 = (3, 0) and g2 = (0, 0.5) are 1/sqrt(5) and 2/sqrt(5): g2 first.
    Mixing the cosines instead gives 0.6 and 0.4: g1 first."""
    from person_retrieval.metrics import retrieval_metrics
    from person_retrieval.models import DualEncoder

    txt, prev = {"global": torch.tensor([[1.0, 0.0]])}, {"global": torch.tensor([[0.0, 3.0]])}
    gal = {"global": torch.tensor([[3.0, 0.0], [0.0, 0.5]])}
    assert torch.allclose(tips.tta_query(txt, prev, 0.6)["global"], torch.tensor([[0.6, 1.2]]))
    eq3 = tips.tta_scores(DualEncoder.similarity, txt, prev, gal, 0.6)  # mix="features", the default
    assert torch.allclose(eq3, torch.tensor([[1.0, 2.0]]) / 5 ** 0.5, atol=1e-6)
    sims = tips.tta_scores(DualEncoder.similarity, txt, prev, gal, 0.6, mix="similarities")
    assert torch.allclose(sims, torch.tensor([[0.6, 0.4]]), atol=1e-6)
    assert torch.equal(sims, tips.tta_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.6))
    pids = torch.tensor([0, 1])  # the query is person 1: Eq. 3 finds it first, the mix of similarities does not
    assert retrieval_metrics(eq3, torch.tensor([1]), pids)["R1"] == 100 and retrieval_metrics(sims, torch.tensor([1]), pids)["R1"] == 0
    # alpha = 1 is the text alone, alpha = 0 the preview alone, in both forms
    for mix in tips.TTA_MIXES:
        assert torch.equal(tips.tta_scores(DualEncoder.similarity, txt, prev, gal, 1.0, mix), DualEncoder.similarity(txt, gal))
        assert torch.allclose(tips.tta_scores(DualEncoder.similarity, txt, prev, gal, 0.0, mix), DualEncoder.similarity(prev, gal))
    # a model with two embeddings (RDE): every key of the text's is mixed, image-only keys of the preview's are not read
    from person_retrieval.papers.tpr import RDEModel

    txt2, prev2 = {**txt, "tse": torch.tensor([[0.0, 2.0]])}, {**prev, "tse": torch.tensor([[1.0, 0.0]]), "image": torch.zeros(1, 2)}
    gal2 = {**gal, "tse": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    q = tips.tta_query(txt2, prev2, 0.5)
    assert set(q) == {"global", "tse"} and torch.allclose(q["tse"], torch.tensor([[0.5, 1.0]]))
    want = (torch.tensor([[0.5, 1.5]]) / 2.5 ** 0.5 + torch.tensor([[0.5, 1.0]]) / 1.25 ** 0.5) / 2  # global (0.5, 1.5), tse (0.5, 1)
    assert torch.allclose(tips.tta_scores(RDEModel.similarity, txt2, prev2, gal2, 0.5), want, atol=1e-6)
    with pytest.raises(ValueError, match="lack"):
        tips.tta_query(txt2, prev, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        tips.tta_query(txt, prev, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        tips.tta_similarity(eq3, eq3, -0.1)
    with pytest.raises(ValueError, match="mix"):
        tips.tta_scores(DualEncoder.similarity, txt, prev, gal, 0.6, mix="cosines")


def test_tta_both_forms_agree_for_unit_features_up_to_the_mixed_querys_norm():
    from person_retrieval.models import DualEncoder

    g = torch.Generator().manual_seed(0)
    f_t, f_p, gal = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (5, 5, 20))
    txt, prev, img = {"global": f_t}, {"global": f_p}, {"global": gal * 3.0}  # the gallery's norm never matters (cosine)
    for a in (0.0, 0.3, 0.6, 1.0):
        eq3 = tips.tta_scores(DualEncoder.similarity, txt, prev, img, a)
        sims = tips.tta_scores(DualEncoder.similarity, txt, prev, img, a, mix="similarities")
        norm = (a * f_t + (1 - a) * f_p).norm(dim=-1, keepdim=True)  # |f_q|, one number per query
        assert torch.allclose(eq3 * norm, sims, atol=1e-6) and torch.equal(eq3.argsort(1), sims.argsort(1))
    # raw (non-unit) features: the two forms part
    txt_raw = {"global": f_t * torch.tensor([[0.2], [5.0], [1.0], [0.1], [3.0]])}
    eq3 = tips.tta_scores(DualEncoder.similarity, txt_raw, prev, img, 0.6)
    sims = tips.tta_scores(DualEncoder.similarity, txt_raw, prev, img, 0.6, mix="similarities")
    assert not torch.equal(eq3.argsort(1), sims.argsort(1))


class _LookupModel(torch.nn.Module):
    """A stand-in retrieval model with hand-set features: gallery or preview image i (every pixel = i) has
    ``img[i]``, the caption with token id t has ``txt[t - 1]``; cosine similarity as the dual encoder's."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor):
        super().__init__()
        self.img, self.txt, self.w = img, txt, torch.nn.Parameter(torch.zeros(1))

    def embed_images(self, x):
        from person_retrieval.datasets.torch_data import CLIP_MEAN, CLIP_STD

        i = ((x[:, 0, 0, 0] * CLIP_STD[0, 0, 0] + CLIP_MEAN[0, 0, 0]) * 255).round().long()
        return {"global": self.img[i]}

    def embed_texts(self, ids):
        return {"global": self.txt[ids[:, 0] - 1]}

    @staticmethod
    def similarity(txt, img):
        from person_retrieval.models import DualEncoder

        return DualEncoder.similarity(txt, img)


def test_choose_alpha_picks_the_known_best_alpha_on_validation():
    """Gallery: person 0 at (1, 0), person 1 at (0, 1). Query A (person 0): its text points at person 1, its preview
    (0.55, 0) at person 0, so it is right for alpha < 0.55 / 1.55 = 0.355. Query B (person 1): its text is right,
    its preview (0.3, 0) wrong, so it is right for alpha > 0.3 / 1.3 = 0.231. Only alpha = 0.3 on the grid gets both."""
    from person_retrieval.datasets.torch_data import RetrievalData

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.55, 0.0], [0.3, 0.0]])  # gallery 0, 1; previews of A and B: 2, 3
    model = _LookupModel(img, txt=torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    val = RetrievalData(images=torch.tensor([0, 1], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous(),
                        image_pids=torch.tensor([0, 1]), tokens=torch.tensor([[1], [2]]), caption_pids=torch.tensor([0, 1]),
                        caption_image_ids=torch.tensor([0, 1]), captions=["a", "b"])
    val_previews = torch.tensor([2, 3], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    alpha, curve = tips.choose_alpha(model, val, val_previews)
    assert alpha == 0.3 and [r["alpha"] for r in curve] == list(tips.ALPHA_GRID)
    assert {r["alpha"]: r["R1"] for r in curve} == {a: (100.0 if a == 0.3 else 50.0) for a in tips.ALPHA_GRID}
    # mixing the cosines ignores the previews' small norms: A needs alpha < 0.5, B alpha > 0.5, never both
    sims = tips.choose_alpha(model, val, val_previews, mix="similarities")[1]
    assert all(r["R1"] == 50.0 for r in sims if r["alpha"] != 0.5)  # (at 0.5 both queries tie)
    # ties: the higher mAP, then the alpha nearest the paper's 0.6 (a flat curve keeps it)
    assert tips.best_alpha([{"alpha": a, "R1": 10.0, "mAP": 5.0} for a in tips.ALPHA_GRID]) == tips.ALPHA == 0.6
    assert tips.best_alpha([{"alpha": 0.2, "R1": 10.0, "mAP": 6.0}, {"alpha": 0.6, "R1": 10.0, "mAP": 5.0}]) == 0.2
    with pytest.raises(ValueError, match="empty"):
        tips.best_alpha([])


def test_tta_previews_and_their_similarity(mini, tiny_world, tmp_path):
    from person_retrieval import models
    from person_retrieval.models.retrieval import encode_images

    lm, gen, vlm, names = mini
    bb = models.build_backbone(None, "tiny")
    model = models.DualEncoder(bb).eval()
    data = models.split_data("cuhk_pedes", tiny_world["cuhk_pedes"], "test", bb)
    texts = data.captions[:6]
    prev, per = tips.previews(gen, texts, (32, 64), seed=0, cache=tmp_path / "p.safetensors")
    assert prev.shape == (6, 3, *gen.image_size) and prev.dtype == torch.uint8 and per > 0
    again, per2 = tips.previews(gen, texts, (32, 64), seed=0, cache=tmp_path / "p.safetensors")
    assert torch.equal(again, prev) and per2 == per  # from the cache, with the time it took
    assert not torch.equal(tips.previews(gen, texts[::-1], (32, 64), seed=0, cache=tmp_path / "p.safetensors")[0], prev)  # other texts: redrawn
    img = encode_images(model, data)
    s = tips.preview_similarity(model, prev, img, bb.image_size)
    x = F.interpolate(prev.float(), size=bb.image_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255).round().to(torch.uint8)
    sub = type(data)(images=x, image_pids=torch.zeros(6, dtype=torch.long), tokens=data.tokens[:1], caption_pids=data.caption_pids[:1],
                     caption_image_ids=torch.zeros(1, dtype=torch.long), captions=texts[:1])
    ref = model.similarity(encode_images(model, sub), img)
    assert s.shape == (6, len(data.images)) and torch.allclose(s, ref, atol=1e-5)
    assert torch.equal(model.similarity(tips.preview_features(model, prev, bb.image_size), img), s)
    all_prev = tips.previews(gen, data.captions, (32, 64), seed=0)[0]
    rows, extra = tips.evaluate_tta(model, data, all_prev, [1.0, 0.6, 0.0])  # Eq. 3 on the model's raw features
    plain = models.evaluate_retrieval(model, data)
    assert rows[0]["alpha"] == 1.0 and rows[0]["R1"] == plain["R1"] and extra >= 0
    rows_s, _ = tips.evaluate_tta(model, data, all_prev, [1.0, 0.6, 0.0], mix="similarities")
    assert rows_s[0]["R1"] == plain["R1"] and rows_s[2]["R1"] == rows[2]["R1"]  # alpha 0: the preview alone, either way


# ---------------------------------------------------------------------------------------------- the real path
def test_the_flux_path_and_transformers_assistants_run_every_stage():
    """FLUX.1-dev's classes at a tiny size with SPG and IDPG adapters, a tiny Llama and a tiny Qwen2-VL: random
    weights, so the answers are noise and the MLLM's scores do not parse (rejections), but every stage runs."""
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersLM, TransformersVLM
    from person_retrieval.generators import flux, lora

    lm = TransformersLM(*tiny.llama_lm())
    texts = tips.seed_prompts(lm, range(2), "zero_shot", ["a man in red .", "a woman in blue .", "a man with a bag ."])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and lm.usage.items["generate"] == 2
    pipe = flux.tiny_flux_pipeline()
    for a in ("spg", "idpg"):
        lora.add_lora(pipe.transformer, a, rank=4)
    gen = flux.flux_generator(pipe, height=32, width=16, steps=2)
    seeds = tips.draw_seeds(gen, "spg", ["a man in red", "a woman"], [(32, 64), (64, 128)], seed=0)
    assert seeds.shape == (2, 3, 32, 16) and seeds.dtype == torch.uint8
    diffs = [d for d, _ in tips.draw_differences(2, np.random.default_rng(0))]
    exp = tips.expand(gen, "spg+idpg", seeds, diffs, seed=0)
    assert exp.shape == seeds.shape
    model, proc = tiny.qwen2_vl()
    vlm = TransformersVLM(model, proc, max_new_tokens=4)
    s = tips.seed_scores(vlm, seeds, ["a man in red", "a woman"])
    e = tips.expansion_scores(vlm, exp, seeds)
    assert s.shape == (2, 2) and e.shape == (2, 3) and not tips.passes(s).any() and not tips.passes(e).any()
    assert vlm.usage.unparsed["score"] >= 4 and vlm.usage.unparsed["tips_variation"] == 2
    caps = tips.captions(vlm, seeds, np.random.default_rng(0))
    assert len(caps) == 2 and all(len(c) == 2 for c in caps)


# ---------------------------------------------------------------------------------------------
# Issue 41: 02_tips at paper retrieves with the user's CLIP (clip_weights), never the mini CLIP
def test_02_tips_trains_its_retrieval_models_on_clip_weights(monkeypatch, tmp_path):
    from person_retrieval import params
    from person_retrieval.papers import tpr
    from person_retrieval.standins import smoke_parameters

    src = (Path(__file__).resolve().parents[1] / "notebooks" / "src" / "02_tips.py").read_text()
    assert "clip_weights: Optional[str] = None" in src and "clip_weights=clip_weights" in src
    with pytest.raises(ValueError, match="parameter 'clip_weights'"):
        params.check(dict(clip_weights=str(tmp_path / "no-such-clip.safetensors")), clip_weights=lambda n, v: params.check_weights(v, n))
    paths = {k: tmp_path / k for k in ("data_root", "flux", "vlm", "llm", "blip2", "swin")}
    smoke = smoke_parameters("02_tips", {**paths, "clip_name": "ViT-B-16"})
    assert smoke["clip_weights"] == "ViT-B-16" and smoke["weights"] == str(paths["flux"]) and smoke["n_synthetic"] == 2
    calls = []
    monkeypatch.setattr(tpr, "fit_baseline", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(tips, "_small_set_batch", lambda *a, **k: {})
    tips.fine_tune("irra", "cuhk_pedes", tmp_path, "paper", 0, weights="ViT-B-16", init="phase1.safetensors", pretrained=True)
    tips.fine_tune("rde", "cuhk_pedes", tmp_path, "paper", 0, weights="ViT-B-16")
    assert [c["weights"] for c in calls] == ["ViT-B-16"] * 2
    assert calls[0]["epochs"] == tpr.BASELINE_CONFIG["paper"]["epochs"] // 2 and calls[0]["init"] == "phase1.safetensors"


def test_table3_fine_tunes_raw_and_tips_on_the_same_schedule(monkeypatch, tmp_path):
    """Issue 45, item 3: the few-shot phase 2 halves epochs and learning rate (TIPS Sec. 4.1); Table 3's TIPS
    run (schedule="full") trains with the baselines' own, as its Raw run does."""
    from person_retrieval.papers import tpr

    calls = []
    monkeypatch.setattr(tpr, "fit_baseline", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(tips, "_small_set_batch", lambda *a, **k: {})
    base = tpr.BASELINE_CONFIG["tiny"]
    tips.fine_tune("irra", "cuhk_pedes", tmp_path, "tiny", 0, init="phase1.safetensors", pretrained=True)
    tips.fine_tune("irra", "cuhk_pedes", tmp_path, "tiny", 0, init="phase1.safetensors", pretrained=True, schedule="full")
    tips.fine_tune("irra", "cuhk_pedes", tmp_path, "tiny", 0)
    assert calls[0]["epochs"] == max(1, base["epochs"] // 2) and calls[0]["lr"] == base["lr"] / 2
    assert "epochs" not in calls[1] and "lr" not in calls[1] and calls[1]["init"] == "phase1.safetensors"
    assert {k: v for k, v in calls[1].items() if k != "init"} == {k: v for k, v in calls[2].items() if k != "init"}
    with pytest.raises(ValueError, match="schedule must be"):
        tips.fine_tune("irra", "cuhk_pedes", tmp_path, "tiny", 0, schedule="quarter")
    src = (Path(__file__).resolve().parents[1] / "notebooks" / "src" / "02_tips.py").read_text()
    assert 'schedule="full"' in src  # the notebook's Table 3 asks for it


def test_tta_query_subset_keeps_the_gallery():
    from person_retrieval.datasets.torch_data import RetrievalData

    n = 10
    data = RetrievalData(images=torch.zeros(4, 3, 8, 4, dtype=torch.uint8), image_pids=torch.arange(4), tokens=torch.arange(n)[:, None],
                         caption_pids=torch.arange(n) % 4, caption_image_ids=torch.arange(n) % 4, captions=[f"c{i}" for i in range(n)])
    sub = tips.query_subset(data, 3)
    assert sub.captions == ["c0", "c4", "c9"] and sub.tokens[:, 0].tolist() == [0, 4, 9] and sub.caption_pids.tolist() == [0, 0, 1]
    assert sub.images is data.images and tips.query_subset(data, None) is data and tips.query_subset(data, 50) is data


def test_domain_at_paper_reads_a_folder_with_fewer_than_tips_identities(tiny_world, tmp_path):
    """At paper the prompts' examples and sizes come from the LoRAs' few-shot set: 100 identities x 3 images,
    or as many as the folder has (a stand-in holds a few dozen) instead of an error."""
    from person_retrieval.generators import flux

    (tmp_path / "CUHK-PEDES").symlink_to(tiny_world["cuhk_pedes"], target_is_directory=True)
    examples, sizes, _ = tips.domain("paper", 0, "cuhk_pedes", tmp_path, "zero_shot")
    ts = flux.few_shot_target("cuhk_pedes", tmp_path / "CUHK-PEDES", (32, 16), 0)
    assert 2 <= len(set(ts.pids)) < 100 and ts.images.shape[-2:] == (32, 16) and len(sizes) == len(ts.sizes) and len(examples) >= 3
