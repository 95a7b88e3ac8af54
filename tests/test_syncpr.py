"""SynCPR's pipeline (quadruples, dual panels, the filter, shards and resume) and ITCPR's layouts and
evaluation (notebook 03)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from person_retrieval import params
from person_retrieval.assistants import MiniLM, mini_vlm, prompts
from person_retrieval.datasets import DatasetFormatError, read_itcpr, read_syncpr
from person_retrieval.papers import syncpr

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- stage 1
def test_quadruples_parse_and_vary():
    text = "Reference: A man in a red coat.\nTarget: A man in a blue coat.\nForward: Wearing a blue coat.\nReverse: Wearing a red coat."
    q = syncpr.parse_quadruple(text)
    assert q == syncpr.Quadruple("A man in a red coat.", "A man in a blue coat.", "Wearing a blue coat.", "Wearing a red coat.")
    assert syncpr.parse_quadruple(text.replace("Reverse: Wearing a red coat.", "Reverse:")) is None
    assert syncpr.parse_quadruple("**Reference**: a\n**Target**: b\nForward: c\nReverse: d").forward == "c"
    quads = syncpr.make_quadruples(MiniLM(0), range(12))
    assert all(quads) and len({q.reference for q in quads}) == 12
    assert quads == syncpr.make_quadruples(MiniLM(0), range(12))  # deterministic
    assert syncpr.make_quadruples(MiniLM(0), [5])[0] == quads[5]  # a quadruple depends on its index alone (shards)
    hints = syncpr.quadruple_hints(range(40))
    assert len({h.split(" with ")[0] for h in hints}) > 4  # genders and ages vary


def test_statistics_known_answer():
    t = [{"reference_caption": "A man in a red coat.", "target_caption": "A man in a blue coat.", "edit_caption": "Wearing a blue coat.",
          "cpr_id": 1, "reference_image_path": "a", "target_image_path": "b"},
         {"reference_caption": "A man in a blue coat.", "target_caption": "A man in a red coat.", "edit_caption": "Wearing a red coat.",
          "cpr_id": 2, "reference_image_path": "b", "target_image_path": "a"},
         {"reference_caption": "A woman in a skirt.", "target_caption": "A woman in jeans.", "edit_caption": "In jeans.",
          "cpr_id": 3, "reference_image_path": "c", "target_image_path": "d"}]
    s = syncpr.statistics(t)
    assert s["triplets"] == 3 and s["quadruples"] == 2 and s["group ids"] == 3
    assert s["mean caption words"] == pytest.approx((4 + 4 + 2) / 3)  # words, as the datasets' tokenizer splits them
    assert s["vocabulary"] == len({"wearing", "a", "blue", "coat", "red", "in", "jeans"})
    assert s["male (%)"] == pytest.approx(200 / 3)
    assert syncpr.statistics_table({"x": s}).iloc[0]["set"] == "SynCPR (reported)"


# ---------------------------------------------------------------------------------------------- stage 3
def test_keep_rule_and_rejection_reasons():
    s = np.array([[9, 9, 9, 9], [10, 10, 9, 4], [2, 9, 9, 9], [8, 8, 9, 9]])
    assert syncpr.kept(s).tolist() == [True, False, False, True]  # 8.5 is kept: "at least"
    t = syncpr.rejection_table(s).set_index("reason")
    assert t.loc["relevance", "rejected with it below the bar (%)"] == 25
    assert t.loc["naturalness", "rejected, lowest score (%)"] == 25
    assert t.loc["identity", "rejected with it below the bar (%)"] == 0  # the kept [8, 8, 9, 9] is no rejection
    assert t.loc["any (rejected)", "rejected with it below the bar (%)"] == 50


class _SeeingRecognizer:
    """A recognizer that sees perfectly the images of one world folder (their true attributes, one-hot) and
    nothing in any other image (uniform): the filter's own logic is tested, apart from how well a small
    network perceives."""

    def __init__(self, root):
        from person_retrieval.world.attributes import Person
        from person_retrieval.world.build import read_world_meta
        from person_retrieval.world.labels import HEADS, labels
        from person_retrieval.world.render import State

        meta = read_world_meta(root)
        tup = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        self.heads, self.known = HEADS, {}
        for im in meta["images"]:
            lab = labels(Person(**tup(meta["people"][str(im["person"])])), State(**tup(im["state"])))
            self.known[syncpr._load(Path(root), im["path"]).tobytes()] = lab

    def predict(self, images, batch=256):
        out = {h: torch.full((len(images), len(v)), 1 / len(v)) for h, v in self.heads.items()}
        for i, im in enumerate(images):
            lab = self.known.get(np.ascontiguousarray(im).tobytes())
            for h, k in (lab or {}).items():
                if k >= 0:
                    out[h][i] = torch.nn.functional.one_hot(torch.tensor(k), len(self.heads[h])).float()
        return out


def test_the_filter_rejects_each_kind_of_fault(tiny_world):
    """Purpose-made bad triplets (noise for an image, another person, another text, another relative caption)
    score lower on their own dimension than the good ones, and are rejected for it; the good ones are kept."""
    import pandas as pd
    from person_retrieval.assistants import MiniVLM

    root = tiny_world["syncpr"]
    vlm = MiniVLM(_SeeingRecognizer(root), seed=0)
    vlm.calibrated = False  # a perfect eye needs no calibration: the evidence itself is 1 for what fits
    demo = syncpr.fault_examples(read_syncpr(root), root, n=6, seed=0)
    s = syncpr.filter_scores(vlm, demo["references"], demo["targets"], demo["target_texts"], demo["edits"])
    table = pd.DataFrame(s, columns=syncpr.DIMENSIONS).assign(example=demo["labels"], kept=syncpr.kept(s))
    check = syncpr.fault_check(table).set_index("fault")
    for fault in syncpr.FAULTS:
        assert check.loc[fault, "faulty mean"] < check.loc[fault, "good mean"] - 2, (fault, check)
        assert check.loc[fault, "faulty rejected for it"] >= 4, (fault, check)
    assert table[table.example == "good"]["kept"].all(), table


def test_mini_vlm_scale_is_calibrated_on_real_renders():
    """Fresh real renders with their true description score high on alignment (10 is the median fit), far
    above the same renders with another person's description; noise scores lowest on naturalness."""
    from person_retrieval.assistants import grammar
    from person_retrieval.assistants.mini import outfit_claims
    from person_retrieval.world import render, sample_person, sample_state

    vlm = mini_vlm("tiny", 0, progress=False)
    rng = np.random.default_rng(123)
    people = [sample_person(rng, i) for i in range(40)]
    ims = [render(p, sample_state(rng), 64) for p in people]
    true = [grammar.render_claims(outfit_claims(p)) for p in people]
    crit = prompts.SYNCPR_CRITERIA
    fit = np.array(vlm.score(ims, crit["alignment"], texts=true))
    wrong = np.array(vlm.score(ims, crit["alignment"], texts=true[1:] + true[:1]))
    assert np.median(fit) >= 8 and fit.mean() > wrong.mean() + 1, (fit, wrong)  # tiny recognizer: 9.25 vs 7.93 measured
    noise = [np.random.default_rng(i).integers(0, 256, (64, 32, 3), dtype=np.uint8) for i in range(8)]
    assert np.mean(vlm.score(noise, crit["naturalness"])) < np.mean(vlm.score(ims, crit["naturalness"])) - 2


# ---------------------------------------------------------------------------------------------- shards and resume
@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return syncpr.mini_models("tiny", 0, progress=False)


def _cfg(models, n=12):
    return syncpr.SynthesisConfig(n_quadruples=n, panels=2, shard_size=3, seed=0, models=models)


def test_synthesis_writes_the_released_format(mini, tmp_path):
    lm, gen, vlm, names = mini
    cfg = _cfg(names, n=5)
    done = syncpr.synthesize(tmp_path / "s", cfg, lm, gen, vlm, progress=False)
    assert [d["shard"] for d in done] == [0, 1] and syncpr.synthesize(tmp_path / "s", cfg, lm, gen, vlm, progress=False) == []
    man = syncpr.assemble(tmp_path / "s", keep_mean=1)  # keep everything: the format, not the filter
    assert man["triplets"] == man["kept"] == 5 * 2 * 2
    syn = read_syncpr(tmp_path / "s")
    assert set(syn[0]) == {"reference_caption", "target_caption", "reference_image_path", "target_image_path", "edit_caption", "cpr_id"}
    by_id = {}
    for t in syn:
        by_id.setdefault(t["cpr_id"], []).append(t)
    assert len(by_id) == 10 and all(len(v) == 2 for v in by_id.values())  # a group: one direction of one quadruple, both panels
    fwd = [t for t in syn if t["cpr_id"] == 1]
    back = [t for t in syn if t["cpr_id"] == 2]
    assert fwd[0]["reference_image_path"] == back[0]["target_image_path"]  # the reverse triplet swaps the images
    assert syncpr.assemble(tmp_path / "s")["kept"] <= man["kept"]
    with pytest.raises(ValueError, match="another configuration"):
        syncpr.synthesize(tmp_path / "s", _cfg(names, n=6), lm, gen, vlm, progress=False)
    with pytest.raises(ValueError, match="shard"):
        syncpr.synthesize(tmp_path / "t", cfg, lm, gen, vlm, shard=2, num_shards=2)


def test_a_killed_synthesis_resumes_to_the_same_manifest(mini, kill_after_first_shard, tmp_path):
    lm, gen, vlm, names = mini
    cfg = _cfg(names)
    # unbroken, and split over two "processes" (shard 0 and shard 1 of 2)
    syncpr.synthesize(tmp_path / "whole", cfg, lm, gen, vlm, progress=False)
    syncpr.synthesize(tmp_path / "split", cfg, lm, gen, vlm, shard=1, num_shards=2, progress=False)
    with pytest.raises(RuntimeError, match="not synthesized yet"):
        syncpr.assemble(tmp_path / "split")
    syncpr.synthesize(tmp_path / "split", cfg, lm, gen, vlm, shard=0, num_shards=2, progress=False)
    whole = syncpr.assemble(tmp_path / "whole")
    assert syncpr.assemble(tmp_path / "split") == whole
    # a real kill: a process synthesizing the same configuration, killed once its first shard is on disk
    killed = tmp_path / "killed"
    code = ("import sys, json; from person_retrieval.papers import syncpr as S; c = json.loads(sys.argv[2]); "
            "c['beta_range'] = tuple(c['beta_range']); c['models'] = tuple(c['models']); "
            "lm, gen, vlm, _ = S.mini_models('tiny', 0, progress=False); "
            "S.synthesize(sys.argv[1], S.SynthesisConfig(**c), lm, gen, vlm, progress=False)")
    kill_after_first_shard(code, killed, cfg.as_json())
    left = syncpr.missing_shards(killed)
    assert 0 < len(left) < cfg.n_shards, left  # stopped part-way
    syncpr.synthesize(killed, cfg, lm, gen, vlm, progress=False)
    assert syncpr.assemble(killed) == whole
    assert not list((killed / "images").glob("*.partial"))


def test_the_flux_path_and_transformers_assistants_run_the_same_stages(tmp_path):
    """The tiny FLUX.1-dev config (its dual adapter), a tiny Llama and a tiny Qwen2-VL: random weights, so the
    LLM's quadruples do not parse and the MLLM's scores do not either (rejections), but every stage runs."""
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersLM, TransformersVLM
    from person_retrieval.generators import flux, lora

    lm = TransformersLM(*tiny.llama_lm())
    quads = syncpr.make_quadruples(lm, range(2))
    assert quads == [None, None] and lm.usage.items["generate"] == 2
    pipe = flux.tiny_flux_pipeline()
    lora.add_lora(pipe.transformer, "dual", rank=4)
    gen = flux.flux_generator(pipe, height=32, width=16, steps=2)
    refs, tgts = syncpr.dual_pairs(gen, ["a man in red", "a woman"], ["a man in blue", "a woman with a bag"], [0.5, 1.0])
    assert refs.shape == tgts.shape == (2, 3, 32, 16) and refs.dtype == torch.uint8
    model, proc = tiny.qwen2_vl()
    vlm = TransformersVLM(model, proc, max_new_tokens=4)
    s = syncpr.filter_scores(vlm, refs, tgts, ["a man in blue", "a woman with a bag"], ["in blue", "with a bag"])
    assert s.shape == (2, 4) and vlm.usage.unparsed["syncpr_filter"] == 2 and not syncpr.kept(s).any()


def test_beta_range_parameter_is_checked():
    rule = params.number_range(0, 2)
    assert rule("beta_range", [0.5, 1]) == [0.5, 1.0] and rule("beta_range", "[0.2, 0.4]") == [0.2, 0.4]
    for bad, msg in (([1.0, 0.5], "low <= high"), ([0.5], "pair"), ("x", "pair"), ([0.5, 3], r"\[0, 2\]")):
        with pytest.raises(ValueError, match=msg):
            rule("beta_range", bad)
    assert syncpr.draw_betas(5, (0.5, 1.0), np.random.default_rng(0)) == syncpr.draw_betas(5, (0.5, 1.0), np.random.default_rng(0))
    assert all(0.5 <= b <= 1.0 for b in syncpr.draw_betas(50, (0.5, 1.0), np.random.default_rng(1)))


# ---------------------------------------------------------------------------------------------- ITCPR
def test_world_itcpr_is_shaped_like_the_release(tiny_world):
    b = read_itcpr(tiny_world["itcpr"])
    assert min(q["instance_id"] for q in b.queries) == 1 and min(q["person_id"] for q in b.queries) == 1
    truths = {}
    for g in b.gallery:
        if g["instance_id"] > 0:
            truths[g["instance_id"]] = truths.get(g["instance_id"], 0) + 1
    assert set(truths) == {q["instance_id"] for q in b.queries} and 2 in truths.values()
    # the person in the old outfit is in the gallery, and is a distractor
    pid = b.queries[0]["person_id"]
    assert any(g["person_id"] == pid and g["instance_id"] == -1 for g in b.gallery)
    assert 5 <= np.mean([len(q["caption"].split()) for q in b.queries]) <= 14


def _fixture(tmp_path, nested: bool) -> Path:
    """A folder laid out as ITCPR's release: files under datasets/, ids as numeric strings, a query with
    two ground truths, one gallery file listed twice."""
    from PIL import Image

    root = tmp_path / "ITCPR"
    base = root / "datasets" if nested else root
    for p in ("Celeb-reID/q1.jpg", "Celeb-reID/q2.jpg", "Celeb-reID/g1.jpg", "PRCC/g2.jpg", "PRCC/g3.jpg", "LAST/d1.jpg"):
        (base / p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 8, 3), len(p), np.uint8)).save(base / p)
    q = [{"file_path": "Celeb-reID/q1.jpg", "datasets": "Celeb-reID", "person_id": "1", "instance_id": "1", "caption": "wearing a red top."},
         {"file_path": "Celeb-reID/q2.jpg", "datasets": "Celeb-reID", "person_id": 2, "instance_id": 2, "caption": "wearing a dark blue skirt."}]
    g = [{"file_path": "Celeb-reID/g1.jpg", "datasets": "Celeb-reID", "person_id": "1", "instance_id": "1"},
         {"file_path": "PRCC/g2.jpg", "datasets": "PRCC", "person_id": 2, "instance_id": 2},
         {"file_path": "PRCC/g3.jpg", "datasets": "PRCC", "person_id": 2, "instance_id": 2},
         {"file_path": "LAST/d1.jpg", "datasets": "LAST", "person_id": 2, "instance_id": -1},
         {"file_path": "LAST/d1.jpg", "datasets": "LAST", "person_id": 2, "instance_id": -1}]
    (base / "query.json").write_text(json.dumps(q))
    (base / "gallery.json").write_text(json.dumps(g))
    return root


@pytest.mark.parametrize("nested", [False, True], ids=["files in the root", "files under datasets/"])
def test_itcpr_release_layouts_read(tmp_path, nested):
    b = read_itcpr(_fixture(tmp_path, nested))
    assert [q["instance_id"] for q in b.queries] == [1, 2] and b.queries[0]["person_id"] == 1
    assert len(b.gallery) == 5 and b.gallery_paths()[3] == b.gallery_paths()[4]
    assert Path(b.query_paths()[0]).is_file()


def test_itcpr_evaluation_counts_only_the_instance(tmp_path):
    b = read_itcpr(_fixture(tmp_path, True))
    # query 1: its truth first; query 2: the same person in another image (instance -1) first, then both truths
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.0], [0.1, 0.5, 0.4, 0.9, 0.8]])
    m = syncpr.evaluate_itcpr(sim, b)
    assert m["R1"] == 50 and m["R5"] == 100
    # AP of query 2: truths at ranks 3 and 4 -> (1/3 + 2/4) / 2; mINP: 2/4
    assert m["mAP"] == pytest.approx(100 * (1 + (1 / 3 + 2 / 4) / 2) / 2)
    assert m["mINP"] == pytest.approx(100 * (1 + 2 / 4) / 2)


def test_malformed_itcpr_names_file_and_entry(tmp_path):
    root = _fixture(tmp_path, True)
    g = json.loads((root / "datasets" / "gallery.json").read_text())
    g[2]["instance_id"] = "two"
    (root / "datasets" / "gallery.json").write_text(json.dumps(g))
    with pytest.raises(DatasetFormatError, match=r"gallery.json: entry 2 field 'instance_id' is 'two'"):
        read_itcpr(root)
    shutil.rmtree(root / "datasets")
    with pytest.raises(DatasetFormatError, match="no query.json here or in"):
        read_itcpr(root)


def test_quadruples_are_counted_from_group_ids():
    t = [{"cpr_id": c} for c in (1, 2, 1, 5, 6)]
    assert syncpr.quadruple_count(t) == 2


# ---------------------------------------------------------------------------------------------
# Issue 41: an LLM whose quadruples do not parse (a random stand-in at paper) is said plainly, and the run goes on
class _Babbler:
    """A language model whose answers never hold the four lines."""

    def generate(self, prompts, max_new_tokens=64):
        return [f"lorem ipsum {i} dolor" for i, _ in enumerate(prompts)]


def test_unparsed_quadruples_are_counted_plainly_and_draw_nothing(tmp_path):
    quads, answers = syncpr.make_quadruples(_Babbler(), range(3), answers=True)
    assert quads == [None] * 3 and len(answers) == 3
    msg = syncpr.parse_summary(quads, answers)
    assert msg.startswith("0 of 3 quadruples parsed") and "lorem ipsum 0 dolor" in msg and "Reference:" in msg

    class NoGen:  # the dual panel is never asked for an empty batch (the FLUX tokenizer raised IndexError on one)
        image_size = (32, 16)

        def dual(self, *a, **k):
            raise AssertionError("drew with no quadruple")

    refs, tgts = syncpr.dual_pairs(NoGen(), [], [], [])
    assert refs.shape == tgts.shape == (0, 3, 32, 16) and refs.dtype == torch.uint8
    cfg = syncpr.paper_config(4, (0.5, 1.0), 0, ("babbler", "nogen", "novlm"))
    assert cfg.n_quadruples == 4 and cfg.shard_size == 4 and cfg.panels == 10  # the release's pairs per quadruple
    syncpr.synthesize(tmp_path / "syn", cfg, _Babbler(), NoGen(), None, progress=False)
    manifest = syncpr.assemble(tmp_path / "syn")
    assert manifest["triplets"] == 0 and manifest["kept"] == 0
    assert syncpr.synthesis_summary(manifest).startswith("0 of 4 quadruples parsed; 0 candidate triplets, 0 kept")
    assert syncpr.statistics([])["triplets"] == 0 and len(syncpr.rejection_table(syncpr.read_scores(tmp_path / "syn"))) == 5
    assert syncpr.paper_config(None, (0.5, 1.0), 0, ()).n_quadruples == syncpr.REPORTED["quadruples"]


# ---------------------------------------------------------------------------------------------
# Issue 46 items 6-7: candidates per quadruple as the release drew them; ITCPR's statistics per source
def test_candidates_per_quadruple_by_scale():
    # the release: 2.81 M candidates from 140,500 quadruples = 20 per quadruple = 10 pairs in both directions
    assert syncpr.RELEASE_PANELS == 10 and 2 * syncpr.RELEASE_PANELS * syncpr.REPORTED["quadruples"] == syncpr.RELEASE_CANDIDATES
    assert syncpr.SynthesisConfig(n_quadruples=1).panels == 10
    assert syncpr.paper_config(None, (0.5, 1.0), 0, ()).panels == 10
    assert syncpr.paper_config(2, (0.5, 1.0), 0, (), panels=3).panels == 3  # what a budget allows, when asked
    # the mini pipeline keeps its budget (and its cached syntheses): 2 pairs at tiny, 4 at small
    assert syncpr.mini_config("tiny", 0, ()).panels == 2 and syncpr.mini_config("small", 0, ()).panels == 4
    assert syncpr.paper_config(None, (0.5, 1.0), 0, (), scale="small").panels == 4


def test_candidates_table_beside_the_release():
    manifest = {"config": {"panels": 2}, "triplets": 12, "kept": 5,
                "shards": [{"quadruples": 3, "parsed": 3}, {"quadruples": 1, "parsed": 0}]}
    t = syncpr.candidates_table(manifest).set_index("set")
    assert t.loc["this run", "candidates per quadruple"] == 4 and t.loc["this run", "candidates per parsed quadruple"] == 4
    assert t.loc["this run", "kept per quadruple"] == pytest.approx(5 / 4)
    assert t.loc["SynCPR release", "candidates per quadruple"] == 20 and t.loc["SynCPR release", "candidate triplets"] == 2_810_000
    assert t.loc["SynCPR release", "kept per quadruple"] == pytest.approx(1_150_000 / 140_500)


def test_itcpr_statistics_per_source(tmp_path):
    b = read_itcpr(_fixture(tmp_path, False))
    t = syncpr.itcpr_statistics(b).set_index("subset")
    assert list(t.index) == ["Celeb-reID", "PRCC", "LAST", "all"]
    # both queries come from Celeb-reID, two people; the gallery: 1 Celeb-reID, 2 PRCC, 2 LAST rows
    assert t.loc["Celeb-reID", ["queries", "identities", "gallery", "ground truths"]].tolist() == [2, 2, 1, 1]
    assert t.loc["PRCC", ["queries", "gallery", "ground truths"]].tolist() == [0, 2, 2]
    assert t.loc["LAST", ["gallery", "ground truths"]].tolist() == [2, 0]
    assert t.loc["all", ["queries", "identities", "gallery", "ground truths"]].tolist() == [2, 2, 5, 3]
    # captions "wearing a red top." (4 words) and "wearing a dark blue skirt." (5)
    assert t.loc["all", "mean caption words"] == 4.5 and t.loc["all", "shortest caption words"] == 4 and t.loc["all", "longest caption words"] == 5
    assert t.loc["all", "gallery per query"] == 2.5


def test_itcpr_reported_statistics_are_the_slides():
    from person_retrieval.reports import reported

    r = reported("itcpr_statistics").set_index("subset")
    assert r.loc[["Celeb-reID", "PRCC", "LAST"], "queries"].tolist() == [1151, 146, 905]
    assert r.loc[["Celeb-reID", "PRCC", "LAST"], "identities"].tolist() == [512, 146, 541]
    assert r.loc[["Celeb-reID", "PRCC", "LAST"], "queries"].sum() == r.loc["all", "queries"] == 2202  # images per source = queries
    assert (r.loc["all", "shortest caption words"], r.loc["all", "longest caption words"], r.loc["all", "mean caption words"]) == (3, 32, 9.54)
    assert r.loc["all", "gallery"] == 20510 and r.loc["all", "ground truths"] == 2225
