"""The MLLM filter's judge (the mini MLLM's 1-10 scores) against the world's truth: the measurement, its
scale fitted on validation renders, and the recognizer trained across capture sizes."""
import importlib
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from person_retrieval import assistants as A

R = importlib.import_module("person_retrieval.world.render")
from person_retrieval.assistants import grammar, judge_check, prompts
from person_retrieval.assistants.mini import RECOGNIZER_CONFIGS, ScoreScale, captured, outfit_claims, recognizer_tag


class _Seeing:
    """A recognizer that sees perfectly every image rendered while it watches (its true labels, one-hot) and
    nothing in any other image (uniform): the judge's own logic is tested, apart from how well a network
    perceives."""

    def __init__(self, monkeypatch):
        from person_retrieval.world.labels import HEADS, labels

        self.heads, self.known, real = HEADS, {}, R.render
        self.net = SimpleNamespace(size=(64, 32))
        self.tag = "seeing"

        def render(person, state, height=128, backdrop=None):
            im = real(person, state, height, backdrop)
            self.known[im.tobytes()] = labels(person, state)
            return im

        monkeypatch.setattr(R, "render", render)

    def predict(self, images, batch=256):
        out = {h: torch.full((len(images), len(v)), 1 / len(v)) for h, v in self.heads.items()}
        for i, im in enumerate(images):
            for h, k in (self.known.get(np.ascontiguousarray(im).tobytes()) or {}).items():
                if k >= 0:
                    out[h][i] = torch.nn.functional.one_hot(torch.tensor(k), len(self.heads[h])).float()
        return out


def test_a_seeing_judge_accepts_the_true_caption_and_rejects_another_persons(monkeypatch):
    from person_retrieval.world import sample_person, sample_state

    vlm = A.MiniVLM(_Seeing(monkeypatch), seed=0)
    rng = np.random.default_rng(5)
    p = sample_person(rng, 1).replace(gender="woman", upper_color="red", lower_color="blue", upper_type="t-shirt")
    q = p.replace(gender="man", upper_color="green", lower_color="black", hair_style="short")
    im = R.render(p, sample_state(rng), 64)
    true, false = grammar.render_claims(outfit_claims(p)), grammar.render_claims(outfit_claims(q))
    got = vlm.score([im, im], prompts.TIPS_SEED_ALIGNMENT.name, texts=[true, false])
    assert got[0] >= judge_check.TIPS_BAR > got[1], got
    # the measurement: a seeing judge meets both bars (it cannot see what a view hides, so not every true pair)
    table = judge_check.judge_table(vlm, "tiny", seed=0, n=24).set_index(["pipeline", "capture size (w x h)", "criterion"])
    for crit in ("seed alignment", "quality", "seed filter (alignment and quality)"):
        rows = table.xs(("TIPS", crit), level=("pipeline", "criterion"))
        assert (rows["accepted true (%)"] >= 80).all() and (rows["rejected false (%)"] >= 80).all(), (crit, rows)


def test_judge_table_columns_and_ranges():
    vlm = A.mini_vlm("tiny", 0, progress=False)
    table = judge_check.judge_table(vlm, "tiny", seed=0, n=4)
    assert list(table.columns) == ["pipeline", "capture size (w x h)", "camera factor", "criterion", "bar", "true pairs",
                                   "accepted true (%)", "false pairs", "rejected false (%)"]
    sizes = judge_check.capture_sizes("tiny")
    assert sizes == [(32, 64), (16, 32), (8, 16)] and list(table["camera factor"].unique()) == [1, 2, 4]
    assert len(table) == len(sizes) * (len(judge_check.TIPS_CRITERIA) + len(judge_check.SYNCPR_CRITERIA))
    for c in ("accepted true (%)", "rejected false (%)"):
        assert table[c].between(0, 100).all(), table[c]
    assert (table["true pairs"] == 4).all() and set(table["bar"]) == {9, 8.5}
    assert judge_check.meets_bars(table).dtype == bool
    with pytest.raises(ValueError, match="pipelines"):
        judge_check.judge_table(vlm, "tiny", pipelines=("ctgi",))
    with pytest.raises(ValueError, match="at least 2"):
        judge_check.judge_table(vlm, "tiny", n=1)


def test_score_scale_anchors():
    s = ScoreScale.fit(np.array([0.8, 0.9, 1.0, 0.95, 0.85]), np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert s.top == 0.9 and 0.5 < s.threshold <= 0.8 and s.bottom == 0.4
    assert s.score(1.0) == 10 and s.score(s.threshold) == 9 and s.score(0.3) == 1
    assert s.score(s.threshold - 1e-3) <= 8
    assert ScoreScale.fit(np.array([0.5, 0.5])).score(0.25) == 6  # one anchor: 10 at the median, in proportion below


def test_recognizer_cache_key_and_name_change_with_capture_augmentation():
    cfg = RECOGNIZER_CONFIGS["tiny"]
    assert cfg.capture_factors == (1, 2, 4) and RECOGNIZER_CONFIGS["small"].capture_factors == (1, 2, 4)
    assert recognizer_tag("tiny") == recognizer_tag("tiny", cfg)
    assert recognizer_tag("tiny", replace(cfg, capture_factors=())) != recognizer_tag("tiny")
    assert recognizer_tag("tiny", replace(cfg, capture_factors=(1, 2))) != recognizer_tag("tiny")
    assert cfg.realism and recognizer_tag("tiny", replace(cfg, realism=False)) != recognizer_tag("tiny")
    # the mini MLLM's name (what keys the TIPS, SynCPR and ChatPedes caches) carries the recognizer's weights
    rec = A.trained_recognizer("tiny", 0, progress=False)
    other = A.AttributeRecognizer(type(rec.net)(rec.net.size, 16))
    assert A.MiniVLM(rec).name != A.MiniVLM(other).name and rec.tag in A.MiniVLM(rec).name


def test_captured_images_lose_detail_as_a_smaller_capture_does():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 64, 32), generator=g, dtype=torch.uint8)
    y = captured(x, torch.tensor([1, 2, 4]))
    assert y.dtype == torch.uint8 and y.shape == x.shape and torch.equal(y[0], x[0])
    detail = [float((v.float()[:, 1:] - v.float()[:, :-1]).abs().mean()) for v in y]
    assert detail[0] > detail[1] > detail[2]


def test_training_breakage_breaks_only_the_chosen_images_and_never_the_checks_grid():
    from person_retrieval.assistants.mini import TRAINING_GRIDS, training_breakage

    assert (8, 4) not in TRAINING_GRIDS  # the judge check's broken_image grid stays unseen in training
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 64, 32), generator=g, dtype=torch.uint8)
    which = torch.tensor([True, False, True, False, True, False])
    y = training_breakage(x, which, g)
    assert torch.equal(y[~which], x[~which]) and all(not torch.equal(y[i], x[i]) for i in (0, 2, 4))


def test_a_recognizer_with_a_realism_head_round_trips(tmp_path):
    from person_retrieval.assistants.mini import REAL, AttributeRecognizer, RecognizerNet

    rec = AttributeRecognizer(RecognizerNet((64, 32), 8, realism=True))
    rec.save(tmp_path / "r")
    again = AttributeRecognizer.load(tmp_path / "r")
    x = torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8)
    a, b = rec.predict(x, realness=True), again.predict(x, realness=True)
    assert REAL in a and torch.allclose(a[REAL], b[REAL]) and a[REAL].shape == (2,) and REAL not in rec.predict(x)
    assert again.tag == rec.tag
