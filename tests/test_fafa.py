"""FAFA (notebook 04): the Q-Former's two readings, group batches, training through the loop with exact
resume, the claims' verdicts, and the real path's BLIP-2 classes at a tiny size."""
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from person_retrieval.papers import fafa
from person_retrieval.train import TaskSpec, TrainConfig, fit


def _tiny_model(image_dim=16, text_dim=12):
    size = fafa.QFORMER["tiny"]
    torch.manual_seed(0)
    return fafa.FAFAModel(fafa.qformer(size, image_dim), size.queries, torch.nn.Linear(text_dim, size.hidden), size.proj).eval()


def test_the_two_readings_and_the_text_mask():
    m = _tiny_model()
    img, txt = torch.randn(3, 5, 16), torch.randn(3, 4, 12)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    t = m.targets(img)
    assert t.shape == (3, fafa.QFORMER["tiny"].queries, fafa.QFORMER["tiny"].proj)
    c = m.compose(img, txt, mask)
    assert c.shape == (3, fafa.QFORMER["tiny"].proj)
    # padding is ignored: the second query, cut to its two real tokens, reads the same
    assert torch.allclose(m.compose(img[1:2], txt[1:2, :2], mask[1:2, :2]), c[1:2], atol=1e-5)
    # the composed query depends on the reference image (only the queries see it) and on the text
    assert not torch.allclose(m.compose(img.flip(0), txt, mask), c)
    assert not torch.allclose(m.compose(img, txt.flip(1), mask.flip(1).sort(1, descending=True).values), c)


def test_the_anchor_starts_at_the_zero_shot_composition_and_lets_the_qformer_in():
    size = fafa.QFORMER["tiny"]
    d = size.proj  # a square anchor keeps cosines exactly
    torch.manual_seed(0)
    m = fafa.FAFAModel(fafa.qformer(size, d), size.queries, torch.nn.Linear(d, size.hidden), size.proj, anchor=d).eval()
    img, gal, txt = torch.randn(3, 5, d), torch.randn(4, 5, d), torch.randn(3, 4, d)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    end = txt[torch.arange(3), mask.sum(1) - 1]  # each text's last real token
    n = torch.nn.functional.normalize
    want = n(n(img[:, 0], dim=-1) + n(end, dim=-1), dim=-1) @ n(gal[:, 0], dim=-1).T  # the zero-shot composition
    with torch.no_grad():
        got = fafa.losses.fda_scores(m.compose(img, txt, mask), m.targets(gal), 6)
        assert torch.allclose(got, want, atol=1e-5)  # gates at 0: the frozen encoders' cosines, nothing else
        assert m.targets(gal).std(1).max() < 1e-6  # every token of a target is its anchor
        m.gates.fill_(0.5)
        assert not torch.allclose(fafa.losses.fda_scores(m.compose(img, txt, mask), m.targets(gal), 6), want, atol=1e-3)
        assert m.targets(gal).std(1).max() > 1e-3  # the Q-Former's tokens now differ


def test_mfr_reconstructs_the_qformer_hidden_states_as_the_release_does():
    size = fafa.QFORMER["tiny"]
    m = _tiny_model()
    h = m.qformer.config.hidden_size
    assert fafa.MFR_ON == "hidden" and m.phi[0].in_features == 2 * h and m.phi[-1].out_features == h and isinstance(m.phi[1], torch.nn.ReLU)
    old = fafa.FAFAModel(fafa.qformer(size, 16), size.queries, torch.nn.Linear(12, size.hidden), size.proj, mfr_on="projected")
    assert old.phi[0].in_features == 2 * size.proj and old.phi[-1].out_features == size.proj
    with pytest.raises(ValueError, match="unknown mfr_on 'tokens'"):
        fafa.mfr_phi("tokens", h, size.proj)
    img, txt, mask = torch.randn(3, 5, 16), torch.randn(3, 4, 12), torch.ones(3, 4, dtype=torch.long)
    seen = {}

    def fn(q, t, scale, phi, hidden):
        seen.update(q=q, t=t, hidden=hidden)
        return fafa.fafa_loss(q, t, torch.arange(3), scale, phi, parts=("mfr",), hidden=hidden)

    with torch.no_grad():
        loss, logs = m(img, txt, mask, img, loss_fn=fn)
        hq, ht = seen["hidden"]
        assert hq.shape == (3, h) and ht.shape == (3, h)
        assert torch.allclose(m.compose(img, txt, mask, hidden=True)[1], hq) and torch.allclose(m.targets(img, hidden=True)[1], ht)
        assert torch.allclose(m.compose(img, txt, mask, hidden=True)[0], seen["q"])  # the projected reading is unchanged
        assert float(loss) == pytest.approx(0.5 * float(logs["mfr"]))  # lambda2 = 0.5
        # not the projected features' MFR: the hidden states are neither projected nor normalised
        torch.manual_seed(1)
        on_hidden = float(fafa.losses.mfr_loss(hq, ht, m.phi, normalize=False))
        assert on_hidden > 0 and abs(on_hidden - float(fafa.losses.mfr_loss(hq, ht, m.phi))) > 1e-4
    with pytest.raises(ValueError, match="unknown mfr_on"):
        fafa.fit_fafa("nowhere", "tiny", mfr_on="tokens")


def _triplet_batches(sampler=None):
    groups = [[0, 1], [2], [3, 4, 5]]
    n = 6
    kw = {} if sampler is None else {"sampler": sampler}
    return fafa._TripletBatches(groups, torch.arange(n), torch.arange(n), torch.arange(n), torch.randn(n, 3, 4), torch.randn(n, 5, 4),
                                torch.tensor([[1, 1, 0, 0, 0]] * n), **kw)


def test_batches_are_whole_groups_with_the_grouped_sampler():
    d = _triplet_batches("groups")
    b = d.batch([2, 1])
    assert b["gid"].tolist() == [2, 2, 1, 1] and b["ref"].shape == (4, 3, 4)
    assert b["ref"][:, 0, 0].tolist() == d.img[[3, 4, 2, 2], 0, 0].tolist()  # group 2's first two, group 1's one twice
    assert b["text"].shape[1] == 2  # trimmed to the longest caption of the batch
    assert len(d) == 3


def test_the_default_sampler_gives_shuffled_batches_of_triplets():
    """As the release trains (a shuffled DataLoader of triplets; its grouped sampler is switched off): the loop's items
    are the triplets themselves, each with its cpr_id group's index, in the loop's random order."""
    from person_retrieval.train import epoch_order

    assert fafa.SAMPLER == "shuffled" and fafa.ITC_SCORE == "max_token"
    d = _triplet_batches()
    assert d.sampler == "shuffled" and len(d) == 6  # triplets, not groups
    order = epoch_order(len(d), seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    rows, gids = d.rows(order[:4])
    assert rows == order[:4].tolist() and gids == [{0: 0, 1: 0, 2: 1}.get(r, 2) for r in rows]
    b = d.batch([5, 0, 2])
    assert b["gid"].tolist() == [2, 0, 1] and torch.equal(b["ref"], d.img[[5, 0, 2]])
    # the tasks and the run functions draw shuffled batches unless told otherwise
    assert fafa.FAFATask("nowhere").sampler == "shuffled" and fafa.Blip2FAFATask("nowhere", "none").sampler == "shuffled"
    assert fafa.FAFATask("nowhere", sampler="groups").sampler == "groups"
    import inspect

    for f in (fafa.fit_fafa, fafa.fit_fafa_blip2, fafa.can_train, fafa.items_needed):
        assert inspect.signature(f).parameters["sampler"].default == "shuffled"
    for f in (fafa.fit_fafa, fafa.fit_fafa_blip2, fafa.fafa_loss):
        assert inspect.signature(f).parameters["itc_score"].default == "max_token"
    with pytest.raises(ValueError, match="unknown sampler"):
        fafa.FAFATask("nowhere", sampler="grouped")
    with pytest.raises(ValueError, match="unknown itc_score"):
        fafa.Blip2FAFATask("nowhere", "none", itc_score="mean")
    # the batch is counted in triplets: the grouped sampler's loop takes groups of PER_GROUP
    assert fafa._loop_batch(256, "shuffled") == 256 and fafa._loop_batch(256, "groups") == 128
    assert fafa.BLIP2_FAFA_CONFIG["batch_size"] == 256  # the release's --batch-size 256


def _itc_example():
    """Two composed queries and two targets of three tokens in R^4 (a 2x3x4 example)."""
    e = torch.eye(4)
    comp = torch.stack([e[0], e[1]])
    tgt = torch.stack([torch.stack([e[0], e[2], e[3]]),  # target 0: its mean token (1, 0, 1, 1) / 3
                       torch.stack([e[1], e[1], -e[0]])])  # target 1: its mean token (-1, 2, 0, 0) / 3
    return comp, tgt


def test_itc_is_blip2s_max_over_query_tokens_by_default():
    comp, tgt = _itc_example()
    got = fafa.itc_scores(comp, tgt)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # the best token cosine
    r3, r5 = 3 ** -0.5, 5 ** -0.5
    mean = fafa.itc_scores(comp, tgt, "mean_token")
    assert torch.allclose(mean, torch.tensor([[r3, -r5], [0.0, 2 * r5]]), atol=1e-6)  # the cosine to the mean token
    gids, phi = torch.tensor([0, 1]), torch.nn.Identity()
    loss, logs = fafa.fafa_loss(comp, tgt, gids, torch.tensor(1.0), phi, parts=("itc",))
    # InfoNCE both ways on scores [[1, 0], [0, 1]] at scale 1: every row -log(e / (e + 1)) = log(1 + 1/e)
    want = torch.log1p(torch.exp(torch.tensor(-1.0)))
    assert torch.allclose(loss, want) and torch.allclose(logs["itc"], want)
    old, _ = fafa.fafa_loss(comp, tgt, gids, torch.tensor(1.0), phi, parts=("itc",), itc_score="mean_token")
    n = torch.nn.functional.normalize  # the earlier reading, kept as the named option, exactly
    assert torch.allclose(old, fafa.losses.itc_loss(n(comp, dim=-1), n(tgt.mean(1), dim=-1), gids, 1.0))
    assert not torch.allclose(old, loss)
    with pytest.raises(ValueError, match="unknown itc_score"):
        fafa.itc_scores(comp, tgt, "max")


def test_run_keys_carry_the_sampler_and_the_itc_score():
    """A cached run of other batches or another ITC is never read back as this one: the run key holds both options
    (the ITC score only where ITC trains), so the keys of runs made before they existed differ too."""
    from person_retrieval.config import config_tag

    base = dict(root="r", seed=0, parts=["itc"], sampler="shuffled", itc_score="max_token")
    key = lambda **kw: config_tag(fafa._run_key({**base, **kw}, root="k"))  # noqa: E731
    assert len({key(), key(sampler="groups"), key(itc_score="mean_token")}) == 3
    assert key(parts=["fda"]) == key(parts=["fda"], itc_score="mean_token")  # no ITC trained: no matter
    assert key(parts=["fda"]) != key(parts=["fda"], sampler="groups")
    old = {k: v for k, v in base.items() if k not in ("sampler", "itc_score")}  # before the options: grouped, mean token
    assert config_tag({**old, "root": "k"}) not in {key(), key(sampler="groups", itc_score="mean_token")}


def test_fafa_trains_through_the_loop_and_resumes_exactly(tiny_world, tmp_path):
    """A FAFA run SIGKILLed in the middle of its second epoch (a real crash, in its own process) resumes from its
    last finished epoch and ends with the uninterrupted run's weights, bit for bit."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from person_retrieval.models import pretrained_mini_clip

    init = str(pretrained_mini_clip("tiny", 0, progress=False))
    kwargs = {"root": str(tiny_world["syncpr"]), "scale": "tiny", "init": init}
    spec = TaskSpec("_ddp_tasks:fafa_killed_mid_epoch", kwargs)  # plain FAFA unless PR_KILL_AT_STEP is set
    conf = dict(epochs=3, batch_size=4, lr=1e-3, gpus=0, seed=0, progress=False, warmup_epochs=0.3)
    full = fit(spec, TrainConfig(**conf, out_dir=str(tmp_path / "a")))
    steps = full.history[0]["step"]  # steps per epoch
    assert steps >= 2
    here = Path(__file__).resolve().parent
    code = ("import json, sys\nfrom person_retrieval.train import TaskSpec, TrainConfig, fit\n"
            "fit(TaskSpec('_ddp_tasks:fafa_killed_mid_epoch', json.loads(sys.argv[1])), TrainConfig(**json.loads(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent / "lib"), str(here)]),
           "PR_KILL_AT_STEP": str(steps + steps // 2 + 1)}  # half-way through the second epoch
    killed = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs), json.dumps({**conf, "out_dir": str(tmp_path / "b")})],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((tmp_path / "b" / "checkpoints" / "last_state.json").read_text())
    assert state["epoch"] == 0  # the first epoch was finished and saved; the second died half-way
    first = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    fit(spec, TrainConfig(**conf, out_dir=str(tmp_path / "b")))  # resumed: MFR's masks come from the restored RNG
    log = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(first) == 1 and log[0] == first[0] and len(log) == 3  # epoch 0 kept from the killed run, not redone
    wa, wb = (load_file(tmp_path / x / "checkpoints" / "last.safetensors") for x in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {"fda", "fd", "mfr"} <= set(full.history[0]) and 0 <= full.best["R1"] <= 100
    with pytest.raises(ValueError, match="unknown FAFA loss parts"):
        fafa.FAFATask(str(tiny_world["syncpr"]), parts=("fda", "triplet"))


def test_claims_need_every_seed():
    abl = pd.DataFrame([{"seed": s, "components": k, "R1": r} for s in (0, 1, 2) for k, r in
                        (("ITC", 10), ("FDA", 12 + s), ("FDA + FD", 13 + s), ("FDA + MFR", 11 + 2 * s), ("FDA + FD + MFR", 14 + s))])
    t1 = pd.DataFrame([{"method": "image only", "R1": 5.0, "trained on": "-"}, {"method": "text only", "R1": 20.0, "trained on": "-"},
                       {"method": "late fusion", "R1": 9.0, "trained on": "-"},
                       {"method": "FAFA", "R1": float("nan"), "trained on": "too small"},  # a set not trained on: no verdict from it
                       {"method": "FAFA", "R1": 15.0, "trained on": "x"}])
    anchor = pd.DataFrame([{"seed": s, "R1": r} for s, r in ((0, 21.0), (1, 22.0), (2, 19.0))])
    c = fafa.claims(abl, t1, anchor).set_index("claim")["holds"]
    assert not any("too small" in k for k in c.index)
    assert c["FDA beats ITC"] and c["FD adds to FDA"]
    assert not c["MFR adds to FDA"]  # behind at seed 0, level at seed 1, ahead at seed 2: not in every seed
    # FAFA's three seeds (14, 15, 16) against each untrained baseline: every seed must be ahead
    assert c["FAFA beats image only on ITCPR R1"] and not c["FAFA beats text only on ITCPR R1"]  # 14 < 20
    assert c["FAFA beats late fusion on ITCPR R1"]  # 14, 15, 16 against 9
    assert c["FAFA + anchor beats image only on ITCPR R1"] and not c["FAFA + anchor beats text only on ITCPR R1"]  # 19 < 20
    assert "FAFA + anchor" not in " ".join(fafa.claims(abl, t1).claim)  # no anchor runs: no anchor claims


def test_a_set_too_small_to_train_on_is_told(tmp_path):
    import json

    need = fafa.items_needed("tiny")  # triplets: the default batches are shuffled triplets
    assert need == -(-4 * fafa.FAFA_CONFIG["tiny"]["batch_size"] * 100 // 95)
    need_groups = fafa.items_needed("tiny", sampler="groups")  # cpr_id groups of PER_GROUP triplets
    assert need_groups == -(-4 * fafa.FAFA_CONFIG["tiny"]["batch_size"] // fafa.PER_GROUP * 100 // 95)

    def write(triplets, per_group):
        (tmp_path / "SynCPR.json").write_text(json.dumps([
            {"reference_caption": "a man", "target_caption": "a man", "reference_image_path": "r.jpg", "target_image_path": "t.jpg",
             "edit_caption": "wearing red", "cpr_id": i // per_group} for i in range(triplets)]))

    for triplets, ok in ((need - 1, False), (need, True)):
        write(triplets, 1)
        assert fafa.can_train(tmp_path, "tiny") is ok
    for groups, ok in ((need_groups - 1, False), (need_groups, True)):
        write(3 * groups, 3)  # enough triplets; the grouped sampler counts groups
        assert fafa.can_train(tmp_path, "tiny", sampler="groups") is ok


def test_blip2_real_path_at_a_tiny_size(tmp_path):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    with pytest.raises(FileNotFoundError, match="copy a local BLIP-2 ITM checkpoint"):
        fafa.load_blip2(tmp_path / "nothing")
    cfg = Blip2Config(vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2),
                      qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                          encoder_hidden_size=32, vocab_size=99, use_qformer_text_input=True, max_position_embeddings=32),
                      num_query_tokens=4, image_text_hidden_size=16)
    torch.manual_seed(0)
    itr = Blip2ForImageTextRetrieval(cfg).eval()
    itr.save_pretrained(tmp_path / "blip2")
    again = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "blip2"), local_files_only=True).eval()
    comp = fafa.Blip2Composer(again)
    tok = comp.image_tokens(torch.randn(2, 3, 16, 16))
    assert comp.targets(tok).shape == (2, 4, 16)
    ids, mask = torch.randint(1, 99, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    q = comp.compose(tok, ids, mask)
    assert q.shape == (2, 16) and torch.isfinite(q).all()
    assert fafa.losses.fda_scores(q, comp.targets(tok)).shape == (2, 2)


def _blip2_folder(tmp_path):
    """The stand-in BLIP-2 as the paper path writes it; its query tokens are drawn, not zero (with zeros, as
    transformers initialises them, the Q-Former's gradient through them is unbounded and the clipped step
    zeroes every gradient: a run would move its weights by the weight decay alone)."""
    from person_retrieval import standins

    folder = standins.write_blip2(tmp_path / "blip2-itm-vit-g")
    from safetensors.torch import load_file

    q = next(v for k, v in load_file(str(folder / "model.safetensors")).items() if k.endswith("query_tokens"))
    assert q.abs().sum() > 0
    return folder


def _tiny_syncpr(root, groups=20, seed=0):
    """A SynCPR-format folder of ``groups`` cpr_id groups, two triplets each, with small images on disk."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    trip = []
    for g in range(groups):
        for k in range(2):
            names = [f"images/{g:03d}_{k}_{w}.jpg" for w in ("ref", "tgt")]
            for n in names:
                Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)).save(root / n)
            trip.append({"reference_caption": "a man", "target_caption": "a man in red", "reference_image_path": names[0],
                         "target_image_path": names[1], "edit_caption": ["wearing a red jacket", "with a black bag"][k], "cpr_id": g})
    (root / "SynCPR.json").write_text(json.dumps(trip))
    return root


def test_load_blip2_reads_the_tokenizer_beside_the_weights(tmp_path):
    """The release's folder holds the model and BERT's tokenizer (a processor file is optional): load_blip2 reads
    both (it once asked AutoProcessor, which fails on a folder without preprocessor_config.json)."""
    folder = _blip2_folder(tmp_path)
    itr, inputs = fafa.load_blip2(folder)
    ids, mask = inputs.tokens(["wearing a red jacket", "with a bag"])
    assert ids.shape[0] == 2 and mask[1].sum() < mask[0].sum() and int(ids.max()) < itr.config.qformer_config.vocab_size
    from PIL import Image

    Image.new("RGB", (20, 40), (200, 10, 10)).save(tmp_path / "p.png")
    px = inputs.pixels([tmp_path / "p.png"])
    s = itr.config.vision_config.image_size
    assert px.shape == (1, 3, s, s)
    assert px[0, :, s // 2, 0].abs().sum() != px[0, :, s // 2, s // 2].abs().sum()  # square-padded: black bars at the sides
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer beside the BLIP-2 weights"):
        fafa.load_blip2(folder)


def test_fafa_trains_blip2s_qformer_without_any_mini_model(tmp_path, monkeypatch):
    """The paper's path: a copy of BLIP-2's Q-Former trained on SynCPR through the loop (max_steps honoured), the
    ViT frozen and left out of the checkpoint, the loaded model untouched, and nothing mini in the cache."""
    from person_retrieval import train

    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "cache"))
    folder, root = _blip2_folder(tmp_path), _tiny_syncpr(tmp_path / "SynCPR")
    itr, _ = fafa.blip2_model(folder)
    before = {k: v.clone() for k, v in itr.state_dict().items()}
    try:
        train.set_limits(max_steps=2, batch_size=4)
        assert fafa.items_needed(blip2=True) == 17 and fafa.can_train(root, blip2=True)
        res = fafa.fit_fafa_blip2(root, folder, seed=0, progress=False)
    finally:
        train.set_limits()
    assert res.history[-1]["step"] == 2 and {"fda", "fd", "mfr"} <= set(res.history[0]) and 0 <= res.best["R1"] <= 100
    saved = load_file(f"{res.out_dir}/checkpoints/last.safetensors")
    assert not any("vision" in k and "projection" not in k for k in saved) and any(k.startswith("qformer.") for k in saved)
    assert all(torch.equal(before[k], v) for k, v in itr.state_dict().items())  # runs train copies
    trained = res.model.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in trained if k.startswith("qformer.") and k in before)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["runs"]  # no mini CLIP, no mini world


def test_blip2_rows_of_table_1_on_itcpr(tmp_path):
    from person_retrieval.datasets import ITCPR

    folder = _blip2_folder(tmp_path)
    itr, inputs = fafa.blip2_model(folder)
    root = _tiny_syncpr(tmp_path / "ITCPR", groups=3)
    ims = sorted(p.relative_to(root).as_posix() for p in (root / "images").iterdir())
    bench = ITCPR(root=root, queries=[{"file_path": ims[0], "caption": "wearing red", "instance_id": 1, "person_id": 1}],
                  gallery=[{"file_path": p, "instance_id": 1 if i == 1 else -1, "person_id": i} for i, p in enumerate(ims)])
    sims = fafa.blip2_baseline_similarities(fafa.Blip2Composer(itr), inputs, bench)
    assert set(sims) == {"image only", "text only", "late fusion", "BLIP-2 Q-Former, no CPR training"}
    assert all(s.shape == (1, len(ims)) and torch.isfinite(s).all() for s in sims.values())
    assert abs(float(sims["image only"][0, 0]) - 1) < 1e-4  # the reference against itself


def test_04_at_paper_needs_blip2_weights(tmp_path, monkeypatch):
    """At paper the mini CLIP and the mini Q-Former are never trained (notebook 04 once trained the mini CLIP for
    17 CPU-minutes first): without `weights` the first cell says what to set."""
    from pathlib import Path

    import papermill as pm
    from test_tpr_paper import write_root

    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "cache"))
    root = write_root(tmp_path / "data")
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "04_fafa.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters={"scale": "paper", "data_root": str(root), "max_steps": 2},
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert "scale='paper' needs BLIP-2 weights: set parameter 'weights'" in e.value.evalue and e.value.exec_count == 3
    assert not (tmp_path / "cache" / "models").exists()
