"""Same seed, same results: CTGI's MTG captions and MTI re-ranking do not depend on the process's hash seed,
on what the assistants were asked before (a cached caption file skips MTG's calls), or on the batch."""
import json
import os
import subprocess
import sys
import textwrap

from person_retrieval import assistants as A

# One MTG pass and one MTI pass over a tiny world's test split, with a mini CLIP (untrained, seeded) as
# the retrieval model. With "warm" the assistants first answer unrelated calls, as they do in a run whose
# pseudo-caption cache was cold (MTG asked thousands of questions before MTI started).
SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from person_retrieval import assistants as A
    from person_retrieval.datasets import load_split
    from person_retrieval.models import DualEncoder, build_backbone, split_data
    from person_retrieval.papers import ctgi
    from person_retrieval.viz import load_image
    from person_retrieval.world import dataset_root

    root = dataset_root("rstpreid", None, "tiny", 0, progress=False)
    vlm, lm = A.MiniVLM(A.trained_recognizer("tiny", 0, progress=False), seed=1), A.MiniLM(seed=1)
    train = load_split("rstpreid", root, "train")
    ims = [load_image(p) for p in train.image_paths[:12]]
    if sys.argv[1] == "warm":
        ctgi.mtg_captions(ims[6:], vlm, lm, rounds=3, seed=5)
        vlm.describe(ims[:2], "Describe the person in the image.")
    mtg = ctgi.mtg_captions(ims, vlm, lm, rounds=4, seed=1, batch=5)
    torch.manual_seed(0)
    bb = build_backbone(None, "tiny")
    model = DualEncoder(bb).eval()
    data = split_data("rstpreid", root, "test", bb)
    sim, text_scores = ctgi.scores_and_scorer(model, data)
    gallery = data.images.permute(0, 2, 3, 1).contiguous().numpy()
    always = A.MiniVLM(vlm.recognizer, seed=1, judge_threshold=0.0)  # every query finds an anchor
    if sys.argv[1] == "warm":
        always.answer(gallery[:3], ["What colour is the top?"] * 3)
    b = ctgi.mti_rerank_batch(data.captions, sim, gallery, always, lm, text_scores, top_k=5)
    ranks = b.scores(0.5).argsort(dim=1, descending=True)[:, :10].tolist()
    print(json.dumps({"mtg": [[r.initial, r.qa, r.caption] for r in mtg], "refined": b.refined, "ranks": ranks}))
""")


def _run(hash_seed: str, mode: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_mtg_and_mti_are_the_same_in_two_processes_whatever_came_before(tiny_world):
    a, b = _run("1", "cold"), _run("4242", "warm")
    assert any(r for r in a["refined"]), "no query was refined: the test would not see MTI's texts"
    assert a["mtg"] == b["mtg"]
    assert a["refined"] == b["refined"]
    assert a["ranks"] == b["ranks"]


def test_an_answer_depends_on_its_input_alone(tiny_world):
    from person_retrieval.viz import load_image
    from person_retrieval.datasets import load_split

    split = load_split("rstpreid", tiny_world["rstpreid"], "train")
    ims = [load_image(p) for p in split.image_paths[:4]]
    rec = A.trained_recognizer("tiny", 0, progress=False)
    q = ["What is the person wearing on the lower body?", "Describe the shoes.", "What colour is the hair?", "Is there a bag?"]
    one = A.MiniVLM(rec, seed=3)
    first = one.answer(ims, q)
    one.answer(ims[::-1], q[::-1])  # more calls in between change nothing
    assert one.answer(ims, q) == first
    assert [A.MiniVLM(rec, seed=3).answer([im], [qq])[0] for im, qq in zip(ims, q)] == first  # nor the batch
    # identical items in one call draw their own streams, as rows of a sampled batch do
    lm = A.MiniLM(seed=0)
    job = A.prompts.CTGI_AGGREGATE.format(query="a man in a red coat", answers="He wears black trousers. He has a bag.")
    outs = lm.generate([job] * 6)
    assert len(set(outs)) > 1 and lm.generate([job] * 6) == outs and A.MiniLM(seed=0).generate([job])[0] == outs[0]


def test_item_rng_separates_its_parts():
    from person_retrieval.assistants.mini import item_rng, item_rngs

    draw = lambda g: g.integers(1 << 62)  # noqa: E731
    assert draw(item_rng(0, b"ab", "c")) == draw(item_rng(0, b"ab", "c"))
    assert draw(item_rng(0, b"ab", "c")) != draw(item_rng(0, b"a", "bc"))  # part boundaries count
    assert draw(item_rng(0, "x")) != draw(item_rng(1, "x"))
    a, b, c = item_rngs(0, [("x",), ("x",), ("y",)])
    assert draw(a) != draw(b) and draw(item_rng(0, "y", 0)) == draw(c)
