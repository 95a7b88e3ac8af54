"""CECA (notebook 05): CAWL's weights and loss, the mixer, the model, and CAM's summaries on disk."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from person_retrieval import losses
from person_retrieval.assistants import MiniLM, VisionLanguageModel, mini_vlm, prompts
from person_retrieval.datasets import load_split
from person_retrieval.papers import ceca


def _feats(seed, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(3)]


# ---------------------------------------------------------------------------------------------- CAWL
def test_cawl_weights_are_the_summary_s_positive_mass_over_its_batch_mean():
    c, t, i = _feats(0)
    pids = torch.tensor([0, 0, 1, 2, 3, 4])
    w = losses.cawl_weights(c, t, i, pids, logit_scale=10.0, clip=(0.0, 1e9))
    pos = (pids.view(-1, 1) == pids.view(1, -1)).float()
    raw = (F.softmax(c @ t.T * 10, 1) * pos).sum(1) * (F.softmax(c @ i.T * 10, 1) * pos).sum(1)
    torch.testing.assert_close(w, raw / raw.mean())
    assert abs(float(w.mean()) - 1) < 1e-6
    clipped = losses.cawl_weights(c, t, i, pids, logit_scale=10.0)
    assert float(clipped.min()) >= 0.2 and float(clipped.max()) <= 5.0
    assert not losses.cawl_weights(c.requires_grad_(), t, i, pids).requires_grad  # no gradient through w


def test_cawl_is_near_zero_when_every_view_agrees_and_large_when_the_summary_points_elsewhere():
    e = torch.eye(4)
    pids = torch.arange(4)
    agree = losses.cawl_loss(e, e, e, pids, logit_scale=50.0)
    assert float(agree) < 1e-6
    wrong = losses.cawl_loss(e.roll(1, 0), e, e, pids, logit_scale=50.0)
    assert float(wrong) > 10


def test_clipped_cawl_differs_from_the_released_one_exactly_where_one_minus_w_is_negative():
    c, t, i = _feats(1, n=8)
    pids = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    released = losses.cawl_loss(c, t, i, pids, logit_scale=20.0)
    clipped = losses.cawl_loss(c, t, i, pids, logit_scale=20.0, clip_one_minus_w=True)
    w = losses.cawl_weights(c, t, i, pids, logit_scale=20.0)
    pos = (pids.view(-1, 1) == pids.view(1, -1)).float()
    it = i @ t.T * 20.0
    ce = lambda m: -torch.log((F.softmax(m, 1) * pos).sum(1))  # noqa: E731  minus the log of the positives' mass
    ce_it = (ce(it) + ce(it.T)) / 2
    assert (w > 1).any()
    torch.testing.assert_close(released - clipped, ((1 - w).clamp(max=0) * ce_it).mean())


# A 3-sample batch with hand-computed values: C = identity, similarities in {0, 1} and logit scale ln 2, so
# every exp(logit) is 1 or 2 and every softmax mass a fraction. pids (0, 0, 1): samples 0 and 1 are one person.
LN2 = math.log(2)
HAND_PIDS = torch.tensor([0, 0, 1])
HAND_C = torch.eye(3)
HAND_T = torch.eye(3)  # S_ct = C T^T = identity
HAND_I = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # S_ci = I^T = [[0,0,1],[0,1,0],[0,0,1]]
# p_ct = (3/4, 3/4, 2/4), p_ci = (2/4, 3/4, 2/4): products 6/16, 9/16, 4/16, mean 19/48 -> w = (18, 27, 12) / 19
HAND_W = torch.tensor([18 / 19, 27 / 19, 12 / 19])
# CE = -log(positives' mass): c->t (4/3, 4/3, 2), c->i (2, 4/3, 2) inside the logs; S_it = I: i->t masses (2/3, 3/4, 2/5),
# t->i (2/4, 3/4, 2/4)
HAND_CE_C = torch.tensor([math.log(8 / 3), math.log(16 / 9), math.log(4)])
HAND_CE_IT = torch.tensor([math.log(3) / 2, math.log(4 / 3), math.log(5) / 2])


def test_cawl_weights_hand_computed():
    w = losses.cawl_weights(HAND_C, HAND_T, HAND_I, HAND_PIDS, logit_scale=LN2)
    torch.testing.assert_close(w, HAND_W)


def test_cawl_hand_computed_released_form_and_the_clipped_option():
    released = (18 * math.log(8 / 3) + math.log(3) / 2 + 27 * math.log(16 / 9) - 8 * math.log(4 / 3)
                + 12 * math.log(4) + 7 * math.log(5) / 2) / 19 / 3  # 1/B sum_i [w_i CE_c + (1 - w_i) CE_it]
    got = losses.cawl_loss(HAND_C, HAND_T, HAND_I, HAND_PIDS, logit_scale=LN2)
    assert got.item() == pytest.approx(released, rel=1e-6)
    assert got.item() == pytest.approx(float((HAND_W * HAND_CE_C + (1 - HAND_W) * HAND_CE_IT).mean()), rel=1e-6)
    # sample 1 has w = 27/19 > 1: clipping 1 - w = -8/19 to 0 removes its -8/19 CE_it(1), over B = 3
    clipped = losses.cawl_loss(HAND_C, HAND_T, HAND_I, HAND_PIDS, logit_scale=LN2, clip_one_minus_w=True)
    assert clipped.item() - got.item() == pytest.approx(8 / 19 * math.log(4 / 3) / 3, rel=1e-5)


def test_cawl_defaults_are_the_release_s():
    import inspect

    assert inspect.signature(losses.cawl_loss).parameters["logit_scale"].default == 50.0
    assert inspect.signature(losses.cawl_loss).parameters["clip_one_minus_w"].default is False
    assert inspect.signature(losses.cawl_weights).parameters["clip"].default == (0.2, 5.0)
    task = inspect.signature(ceca.CECATask.__init__).parameters
    assert {k: task[k].default for k in ceca.RELEASE_LOSS} == ceca.RELEASE_LOSS == {"cawl": "released", "cawl_scale": 50.0,
                                                                                     "tal_reduction": "sum"}


def test_the_task_adds_summed_tal_and_averaged_cawl_as_the_release_does():
    """L = sum_i TAL_global(i) + sum_i TAL_tokens(i) + 1/B sum_i CAWL(i), weights 1 (the release's processor sums
    the model's three losses; compute_rbs sums TAL, build.py averages CAWL)."""
    c, t, i = _feats(3, n=5)
    g, tok_i, tok_t = _feats(4, n=5)
    pids = torch.tensor([0, 0, 1, 2, 3])
    img = {"global": g, "tse": tok_i, "summary": c, "image": i}
    txt = {"global": t, "tse": tok_t}
    task = ceca.CECATask.__new__(ceca.CECATask)  # the loss alone: no data, no backbone
    task.tau, task.margin, task.cawl, task.cawl_scale, task.tal_reduction = 0.015, 0.1, "released", 50.0, "sum"
    batch = {"image": None, "ids": None, "image_text": None, "pid": pids}
    total, logs = task.loss(lambda *a: (img, txt), batch, lambda x: x)
    tal_g = losses.tal_loss(g, t, pids, reduction="sum")
    tal_t = losses.tal_loss(tok_i, tok_t, pids, reduction="sum")
    cawl = losses.cawl_loss(c, t, i, pids, logit_scale=50.0)
    torch.testing.assert_close(total, tal_g + tal_t + cawl)
    torch.testing.assert_close(logs["tal_global"], 5 * losses.tal_loss(g, t, pids))  # the sum is B times the mean
    task.tal_reduction, task.cawl = "mean", "clipped"  # the earlier balance, and the named option
    total, _ = task.loss(lambda *a: (img, txt), batch, lambda x: x)
    torch.testing.assert_close(total, losses.tal_loss(g, t, pids) + losses.tal_loss(tok_i, tok_t, pids)
                               + losses.cawl_loss(c, t, i, pids, clip_one_minus_w=True))


def test_fit_ceca_keys_runs_by_the_loss_settings(monkeypatch):
    monkeypatch.setattr(ceca, "fit_tpr", lambda *a, **k: k["task_kw"])
    kw = ceca.fit_ceca("icfg_pedes", "root", "summaries")
    assert {k: kw[k] for k in ceca.RELEASE_LOSS} == ceca.RELEASE_LOSS
    assert {k: kw[k] for k in ceca.RELEASE_FUSION} == ceca.RELEASE_FUSION  # the feature mixes and omega key the run too
    assert ceca.fit_ceca("icfg_pedes", "root", "summaries", task_kw={"mix_test": ceca.FIRST_COMMIT_MIX_TEST})["mix_test"] == 0.1
    assert ceca.fit_ceca("icfg_pedes", "root", "summaries", variant="CECA, CAWL with 1 - w clipped at 0")["cawl"] == "clipped"
    assert ceca.fit_ceca("icfg_pedes", "root", "summaries", variant="CECA without CAWL (TAL only)")["cawl"] is None
    with pytest.raises(ValueError):
        ceca.CECATask(summaries="s", cawl="ours")


# ---------------------------------------------------------------------------------------------- BCM
def test_the_gate_starts_at_sigmoid_minus_three_and_a_closed_gate_is_the_identity():
    blk = ceca.MixerBlock(16, heads=8, gate_init=-3.0)
    assert abs(float(torch.sigmoid(blk.gate.detach())) - 0.0474) < 1e-3
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        blk.gate.fill_(-1e4)
    torch.testing.assert_close(blk(x, ctx), x)
    with torch.no_grad():
        blk.gate.fill_(-3.0)
    assert not torch.allclose(blk(x, ctx), x)


def test_the_mixer_ignores_the_summary_s_padding():
    torch.manual_seed(0)
    mix = ceca.BidirectionalMixer(16, heads=4, cond_ratio=0.5).eval()
    with torch.no_grad():
        mix.image_side.gate.fill_(0.0)
        mix.summary_side.gate.fill_(0.0)
    img, ip = torch.randn(2, 6, 16), torch.randn(2, 16)
    s, sp = torch.randn(2, 4, 16), torch.randn(2, 16)
    valid = torch.tensor([[True, True, False, False], [True, True, True, False]])
    a_img, a_sum = mix(img, ip, s, sp, valid)
    s2 = s.clone()
    s2[~valid] = 100.0  # padding changed
    b_img, b_sum = mix(img, ip, s2, sp, valid)
    torch.testing.assert_close(a_img, b_img)
    torch.testing.assert_close(a_sum[valid], b_sum[valid])


# ---------------------------------------------------------------------------------------------- BCM, as released
def test_bcm_ranks_the_summary_s_words_by_its_eos_and_the_image_s_tokens_by_the_attention_they_receive():
    """ChatCrossEmbeddingLayer.py: the image side reads the summary's top int((77 - 2) r) words by its [EOS] row
    (text_topk_from_attn), the summary side the image's top int(N r) tokens by the column mean of the attention
    map (image_topk_from_attn), not by the [CLS] row."""
    s_tok = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])  # sos, 3 words, eos
    s_pooled, s_valid = torch.tensor([[1.0, 0.0]]), torch.tensor([[False, True, True, True, False]])
    # image: pooled (0, 1); token a = (2, 0) is orthogonal to it, token b = (0, 0.5) along it
    p, a, b = (0.0, 1.0), (2.0, 0.0), (0.0, 0.5)
    i_tok, i_pooled = torch.tensor([[a, b]]), torch.tensor([p])
    # by hand: A = softmax_j(x_i . x_j / sqrt(2)) over x = (p, a, b); a receives more on average, b more from [CLS]
    dot = lambda u, v: (u[0] * v[0] + u[1] * v[1]) / math.sqrt(2)  # noqa: E731
    rows = [[math.exp(dot(u, v)) for v in (p, a, b)] for u in (p, a, b)]
    col = [sum(r[j] / sum(r) for r in rows) / 3 for j in (1, 2)]
    assert col[0] > col[1] and dot(p, b) > dot(p, a)  # the two rankings disagree here
    torch.testing.assert_close(ceca.received_attention(i_tok, i_pooled), torch.tensor([col]))
    s_ctx, s_ok, i_ctx = ceca.bcm_contexts(i_tok, i_pooled, s_tok, s_pooled, s_valid, cond_ratio=0.05)  # int(75 * 0.05) = 3
    torch.testing.assert_close(s_ctx, torch.tensor([[[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]]]))  # the words, by their EOS score
    assert s_ok.tolist() == [[True, True, True]]
    torch.testing.assert_close(i_ctx, torch.tensor([[a]]))  # int(2 * 0.05) -> at least 1: token a, not b
    s_ctx, s_ok, _ = ceca.bcm_contexts(i_tok, i_pooled, s_tok, s_pooled, s_valid, cond_ratio=0.3)  # 22 wanted, 3 words
    assert s_ok.tolist() == [[True, True, True, False, False]]  # a short summary gives all its words, nothing else


def _hand_head(head):
    """Weights a hand can follow: self-attention off (output projection 0), cross-attention uniform over the
    context (query and key maps 0) passing it unchanged (value and output maps the identity), the refiner's
    MLP the identity (GELU(y) - GELU(-y) = y), gate 0 (sigmoid 1/2); RDE's MLP off and its projection the
    identity. Then a head's embedding is max_i (x_i / |x_i| + mean(context) / 2)."""
    r = head.refiner
    with torch.no_grad():
        for mha in (r.sa, r.ca):
            mha.in_proj_bias.zero_()
            mha.out_proj.bias.zero_()
            mha.in_proj_weight.zero_()
        r.sa.out_proj.weight.zero_()
        r.ca.in_proj_weight[4:6] = torch.eye(2)  # the value map
        r.ca.out_proj.weight.copy_(torch.eye(2))
        r.mlp[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
        r.mlp[0].bias.zero_()
        r.mlp[2].weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
        r.mlp[2].bias.zero_()
        r.gate.fill_(0.0)
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()


def test_the_refined_token_head_on_a_hand_computed_input():
    """One side of BCM as released: all own tokens (ratio 1.0), L2-normalised, plus the gated MLP of self- and
    cross-attention, then embedded and max-pooled. Tokens (3, 4) and (0, -2) normalise to (0.6, 0.8) and (0, -1);
    the context's valid tokens (1, 0) and (3, 2) average to (2, 1), half of it added: (1.6, 1.3) and (1, -0.5)."""
    head = ceca.RefinedTokenSelection(2, ratio=1.0, heads=1)
    _hand_head(head)
    tok, pooled = torch.tensor([[[3.0, 4.0], [0.0, -2.0]]]), torch.tensor([[1.0, 0.0]])
    cond, cond_ok = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]]), torch.tensor([[True, True, False]])
    with torch.no_grad():
        torch.testing.assert_close(head(tok, pooled, cond=cond, cond_valid=cond_ok), torch.tensor([[1.6, 1.3]]))
        torch.testing.assert_close(head(tok, pooled), torch.tensor([[0.6, 0.8]]))  # no context: self-attention only (0 here)
        head.refiner.gate.fill_(-1e4)  # a closed gate: the normalised tokens as they are
        torch.testing.assert_close(head(tok, pooled, cond=cond, cond_valid=cond_ok), torch.tensor([[0.6, 0.8]]))


class _TokenBackbone(torch.nn.Module):
    """Hand-made tokens: the image's (3, 4) and (0, -2), pooled (1, 0); the summary's words (1, 0) and (0, 1)
    between start- and end-of-text tokens of (50, 50), pooled (2, 1)."""
    embed_dim, context_length = 2, 77

    def encode_image(self, x):
        return torch.tensor([[1.0, 0.0]]), torch.tensor([[[3.0, 4.0], [0.0, -2.0]]])

    def encode_text(self, ids):
        return torch.tensor([[2.0, 1.0]]), torch.tensor([[[50.0, 50.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]])


def test_bcm_refines_each_side_separately_and_blends_the_two_embeddings_as_released():
    """The image side reads the summary's two words (mean (0.5, 0.5)): max of (0.6, 0.8) + (0.25, 0.25) and
    (0, -1) + (0.25, 0.25) = (0.85, 1.05). The summary side reads the image's top int(2 * 0.3) -> 1 token by the
    attention it receives, (3, 4) (0.578 against 0.344), unnormalised: max of (1, 0) + (1.5, 2) and (0, 1) +
    (1.5, 2) = (2.5, 3). Blended 0.7 image + 0.3 summary: (1.345, 1.635)."""
    m = ceca.CECAModel(_TokenBackbone(), heads=1).eval()
    assert m.bcm is None and m.tse_img.ratio == 1.0 and m.tse_txt.ratio == 1.0  # the release's ratio=1.0 heads
    _hand_head(m.tse_img)
    _hand_head(m.tse_txt)
    with torch.no_grad():
        g = m.embed_images(torch.zeros(1, 3, 4, 2), torch.tensor([[49406, 320, 321, 49407]]))
    torch.testing.assert_close(g["tse"], torch.tensor([[1.345, 1.635]]))
    torch.testing.assert_close(g["global"], torch.tensor([[0.7 + 0.6, 0.3]]))  # 0.7 (1, 0) + 0.3 (2, 1)
    old = ceca.CECAModel(_TokenBackbone(), heads=1, bcm="mixer")  # the named option: this project's mixer before
    assert isinstance(old.bcm, ceca.BidirectionalMixer) and old.tse_img.ratio == 0.3
    with pytest.raises(ValueError, match="bcm must be one of"):
        ceca.CECAModel(_TokenBackbone(), bcm="concatenated")


def test_fit_ceca_keys_runs_by_the_bcm(monkeypatch):
    seen = {}
    monkeypatch.setattr(ceca, "fit_tpr", lambda *a, task_kw, **kw: seen.setdefault("kw", task_kw))
    ceca.fit_ceca("icfg_pedes", "/r", "/s")
    assert seen["kw"]["bcm"] == "released" and seen["kw"]["own_ratio"] == 1.0


# ---------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_backbone():
    from person_retrieval.models import build_backbone

    return build_backbone(None, "tiny")


def test_the_gallery_with_and_without_summaries(tiny_backbone):
    torch.manual_seed(0)
    m = ceca.CECAModel(tiny_backbone).eval()
    x = torch.randn(3, 3, *tiny_backbone.image_size)
    ids = tiny_backbone.tokenize(["a man in a red shirt", "a woman with a bag", "a man in black jeans"])
    with torch.no_grad():
        plain = m.embed_images(x)
        with_s = m.embed_images(x, ids)
        txt = m.embed_texts(ids)
    assert set(with_s) == {"global", "tse", "image", "summary"} and set(plain) == {"global", "tse", "image"}
    torch.testing.assert_close(plain["global"], plain["image"])
    torch.testing.assert_close(with_s["global"], 0.7 * with_s["image"] + 0.3 * with_s["summary"])  # unnormalised, as released
    assert m.similarity(txt, with_s).shape == (3, 3)


class _FixedBackbone(torch.nn.Module):
    """Hand-made pooled features: the image's (3, 0), the summary's (0, 10) (ten times the norm)."""
    embed_dim = 2

    def encode_image(self, x):
        return torch.tensor([[3.0, 0.0]]), torch.ones(1, 4, 2)

    def encode_text(self, ids):
        return torch.tensor([[0.0, 10.0]]), torch.ones(1, ids.shape[1], 2)


class _Fixed(torch.nn.Module):
    """A token-selection head that returns ``out`` whatever it reads (so the mix of the two heads shows)."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.tensor([out])

    def forward(self, tokens, pooled, valid=None):
        return self.out


def _hand_model(**kw):
    m = ceca.CECAModel(_FixedBackbone(), use_bcm=False, **kw)
    m.tse_img, m.tse_txt = _Fixed([1.0, 0.0]), _Fixed([0.0, 4.0])  # image TSE, summary TSE (the text side's head)
    return m


SUMMARY_IDS = torch.tensor([[49406, 320, 1237, 49407, 0]])


def test_the_release_mixes_unnormalised_features_then_normalises():
    """build.py L91 and L96: merge = 0.3 c + 0.7 i on the features as they come, global and token level; TAL and
    the similarity normalise after. (3, 0) and (0, 10) mix to (2.1, 3.0), not to the normalised mix (0.7, 0.3)."""
    m = _hand_model().train()
    g = m.embed_images(torch.zeros(1, 3, 4, 2), SUMMARY_IDS)
    torch.testing.assert_close(g["global"], torch.tensor([[2.1, 3.0]]))
    torch.testing.assert_close(F.normalize(g["global"], dim=-1), torch.tensor([[2.1, 3.0]]) / math.sqrt(2.1 ** 2 + 3.0 ** 2))
    assert not torch.allclose(F.normalize(g["global"], dim=-1), F.normalize(torch.tensor([[0.7, 0.3]]), dim=-1), atol=1e-2)
    torch.testing.assert_close(g["tse"], torch.tensor([[0.7, 1.2]]))  # 0.7 image TSE + 0.3 summary TSE
    torch.testing.assert_close(g["image"], torch.tensor([[3.0, 0.0]]))  # CAWL still reads the unmixed features
    torch.testing.assert_close(g["summary"], torch.tensor([[0.0, 10.0]]))
    torch.testing.assert_close(ceca.mix_features(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 10.0]), 0.3), torch.tensor([2.1, 3.0]))


def test_the_test_time_mix_is_the_release_s_and_the_first_commit_s_is_an_option():
    """At test metrics.py L87 and L118 mix 0.7 image + 0.3 summary (d257075, the newest); the first commit
    (0af8faa) had 0.9 image + 0.1 summary: ``mix_test=FIRST_COMMIT_MIX_TEST``."""
    assert ceca.RELEASE_FUSION == {"mix_train": 0.3, "mix_test": 0.3, "omega": 0.5} and ceca.FIRST_COMMIT_MIX_TEST == 0.1
    g = _hand_model().eval().embed_images(torch.zeros(1, 3, 4, 2), SUMMARY_IDS)
    torch.testing.assert_close(g["global"], torch.tensor([[2.1, 3.0]]))
    m = _hand_model(mix_test=ceca.FIRST_COMMIT_MIX_TEST)
    test, train = m.eval().embed_images(torch.zeros(1, 3, 4, 2), SUMMARY_IDS), m.train().embed_images(torch.zeros(1, 3, 4, 2), SUMMARY_IDS)
    torch.testing.assert_close(test["global"], torch.tensor([[2.7, 1.0]]))  # 0.9 (3, 0) + 0.1 (0, 10)
    torch.testing.assert_close(test["tse"], torch.tensor([[0.9, 0.4]]))  # 0.9 (1, 0) + 0.1 (0, 4)
    torch.testing.assert_close(train["global"], torch.tensor([[2.1, 3.0]]))  # training keeps 0.3
    assert m.training
    torch.testing.assert_close(m.embed_images(torch.zeros(1, 3, 4, 2), SUMMARY_IDS, mix=0.5)["global"], torch.tensor([[1.5, 5.0]]))


def test_omega_fuses_the_global_and_the_token_level_similarity():
    """The supplement's omega (section F): (1 - omega) global + omega refined (token-level); the release's
    (BGE + TSE) / 2 is omega = 0.5."""
    m = _hand_model()
    txt = {"global": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "tse": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    img = {"global": torch.tensor([[2.0, 0.0]]), "tse": torch.tensor([[1.0, 1.0]])}
    s_g, s_t = torch.tensor([[1.0], [0.0]]), torch.tensor([[math.sqrt(0.5)], [math.sqrt(0.5)]])
    torch.testing.assert_close(m.similarity(txt, img), (s_g + s_t) / 2)
    m.omega = 0.3
    torch.testing.assert_close(m.similarity(txt, img), 0.7 * s_g + 0.3 * s_t)
    m.omega = 1.0
    torch.testing.assert_close(m.similarity(txt, img), s_t)


def test_msum_is_r1_plus_r5_plus_r10():
    m = {"R1": 40.5, "R5": 60.25, "R10": 70.0, "mAP": 30.0, "mINP": 10.0}
    assert ceca.msum(m) == 170.75
    assert ceca.with_msum(m) == {**m, "Msum": 170.75}


# ---------------------------------------------------------------------------------------------- CAM
def test_cam_asks_the_five_questions_and_summarises_the_answers(tiny_world):
    split = load_split("icfg_pedes", tiny_world["icfg_pedes"], "test")
    from person_retrieval.viz import load_image

    vlm, lm = mini_vlm("tiny", 0, progress=False), MiniLM(0)
    recs = ceca.cam([load_image(p) for p in split.image_paths[:3]], vlm, lm)
    assert [sorted(r) for r in recs] == [sorted([*prompts.CECA_QUESTIONS, "summary"])] * 3
    # one conversation per image: five questions and the summary request, all to the MLLM; the LM writes nothing
    assert vlm.usage.items["converse"] == 18 and vlm.usage.calls["converse"] == 6 and lm.usage.items["generate"] == 0
    assert all(r["summary"] for r in recs)
    old = ceca.cam([load_image(p) for p in split.image_paths[:3]], vlm, lm, summary_by="lm")  # the named option
    assert lm.usage.items["generate"] == 3 and [r["Q1"] for r in old] == [r["Q1"] for r in recs]
    with pytest.raises(ValueError, match="summary_by must be one of"):
        ceca.cam([load_image(split.image_paths[0])], vlm, lm, summary_by="llm")


class _Recorder(VisionLanguageModel):
    """An MLLM that records every dialogue it is given and answers "answer k" (the k-th turn)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _converse(self, images, dialogues):
        self.seen.append(dialogues)
        return [f"answer {len(d) // 2 + 1}" for d in dialogues]


def test_cam_is_one_conversation_each_question_seeing_the_earlier_answers():
    vlm = _Recorder()
    recs = ceca.cam([np.zeros((8, 4, 3), np.uint8)] * 2, vlm)
    q = list(prompts.CECA_QUESTIONS.values())
    third = vlm.seen[2][0]  # the dialogue Q3 is asked in
    assert third == [{"role": "user", "content": q[0]}, {"role": "assistant", "content": "answer 1"},
                     {"role": "user", "content": q[1]}, {"role": "assistant", "content": "answer 2"},
                     {"role": "user", "content": q[2]}]
    last = vlm.seen[5][1]  # the summary request: after the five rounds, to the MLLM, with the image
    assert len(vlm.seen) == 6 and len(last) == 11 and last[-1] == {"role": "user", "content": prompts.CECA_SUMMARY_TURN}
    assert [m["content"] for m in last[1:10:2]] == [f"answer {k}" for k in range(1, 6)]
    assert prompts.CECA_SUMMARY_TURN == ("Based on the image and the answers to the previous questions, please provide a "
                                         "summary description of the person.")
    assert recs[0] == {"Q1": "answer 1", "Q2": "answer 2", "Q3": "answer 3", "Q4": "answer 4", "Q5": "answer 5", "summary": "answer 6"}


def test_the_cam_cache_key_changes_with_the_conversation(tiny_world, monkeypatch):
    """Summaries cached before the conversation (CAM_VERSION 1) are never read back as the conversation's; the
    text-only writer's summaries are cached apart."""
    monkeypatch.setattr(ceca, "summarize_split", lambda *a, **k: None)
    root, vlm, lm = tiny_world["rstpreid"], _Recorder(), MiniLM(0)
    now = ceca.build_summaries("rstpreid", root, "tiny", vlm=vlm, lm=lm)
    assert now == ceca.build_summaries("rstpreid", root, "tiny", vlm=vlm, lm=MiniLM(1))  # the LM writes nothing here
    assert now != ceca.build_summaries("rstpreid", root, "tiny", vlm=vlm, lm=lm, summary_by="lm")
    monkeypatch.setattr(ceca, "CAM_VERSION", 1)
    assert now != ceca.build_summaries("rstpreid", root, "tiny", vlm=vlm, lm=lm)


def test_the_mini_mllm_s_answers_depend_on_the_conversation(tiny_world):
    """The mini MLLM keeps the gender the conversation stated, repeats its own previous turn when it repeats,
    and summarises the answers given (with what else it sees), not a fresh look alone."""
    from person_retrieval.assistants import Noise
    from person_retrieval.assistants.grammar import parse_claims
    from person_retrieval.viz import load_image

    split = load_split("icfg_pedes", tiny_world["icfg_pedes"], "test")
    im = load_image(split.image_paths[0])
    vlm = mini_vlm("tiny", 0, progress=False)
    seen = vlm.perceive([im])[0][0]
    other = "woman" if seen.gender == "man" else "man"
    q = list(prompts.CECA_QUESTIONS.values())
    said = [{"role": "user", "content": q[0]}, {"role": "assistant", "content": f"The person is a {other}."}]
    a3 = vlm.converse([im], [said + [{"role": "user", "content": q[2]}]])[0]
    assert parse_claims(a3).get("gender") == other  # the stated gender carries on
    assert parse_claims(vlm.converse([im], [[{"role": "user", "content": q[2]}]])[0]).get("gender") == seen.gender
    colour = "green" if seen.lower_color != "green" else "red"
    told = said + [{"role": "user", "content": q[2]}, {"role": "assistant", "content": f"The person wears {colour} shorts."},
                   {"role": "user", "content": prompts.CECA_SUMMARY_TURN}]
    summary = parse_claims(vlm.converse([im], [told])[0])
    assert summary.get("lower_color") == colour and summary.get("lower_type") == "shorts" and summary.get("gender") == other
    assert summary.get("upper_type") == seen.upper_type  # not asked: what it sees
    echo = mini_vlm("tiny", 0, progress=False, noise=Noise(repetition=1.0))
    assert echo.converse([im], [said + [{"role": "user", "content": q[1]}]])[0] == f"The person is a {other}."


def test_a_transformers_mllm_reads_the_earlier_turns_through_its_chat_template():
    """Qwen2-VL's chat template over the dialogue: the Q3 prompt holds Q1, its answer, Q2, its answer, then Q3,
    in that order, and the image once, in the first turn."""
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersVLM

    vlm = TransformersVLM(*tiny.qwen2_vl(), max_new_tokens=2)
    q = list(prompts.CECA_QUESTIONS.values())
    d = [{"role": "user", "content": q[0]}, {"role": "assistant", "content": "a man with short hair"},
         {"role": "user", "content": q[1]}, {"role": "assistant", "content": "a red shirt and no hat"}, {"role": "user", "content": q[2]}]
    text = vlm.chat_prompts([d])[0]
    at = [text.index(t) for t in (q[0], "a man with short hair", q[1], "a red shirt and no hat", q[2])]
    assert at == sorted(at) and text.count("<|image_pad|>") == 1 and text.index("<|image_pad|>") < at[0]
    assert text.endswith("<|im_start|>assistant\n")
    assert len(vlm.converse([np.zeros((56, 28, 3), np.uint8)], [d])) == 1


class _Dies:
    """An MLLM that fails after ``n`` conversation turns (a killed run)."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def converse(self, images, dialogues):
        self.n -= 1
        if self.n < 0:
            raise RuntimeError("killed")
        return self.inner.converse(images, dialogues)


def test_summaries_resume_after_a_crash_and_match_an_unbroken_run(tiny_world, tmp_path):
    split = load_split("rstpreid", tiny_world["rstpreid"], "train")
    vlm, lm = mini_vlm("tiny", 0, progress=False), MiniLM(0)
    whole = ceca.summarize_split(split, vlm, lm, tmp_path / "a" / "train.json", batch=16, progress=False)
    out = tmp_path / "b" / "train.json"
    with pytest.raises(RuntimeError, match="killed"):
        ceca.summarize_split(split, _Dies(vlm, 6 * 2 + 2), lm, out, batch=16, progress=False)  # dies in the third batch
    assert not out.exists()
    partial = out.with_name("train.json.partial.jsonl")
    assert len(partial.read_text().splitlines()) == 32
    with open(partial, "a") as f:
        f.write('{"image": "cut sho')  # a line a crash cut short
    ceca.summarize_split(split, vlm, lm, out, batch=16, progress=False)
    assert json.loads(out.read_text()) == json.loads(whole.read_text()) and not partial.exists()
    assert len(json.loads(out.read_text())) == len(split.image_paths)


def test_a_missing_or_empty_summary_is_an_error_naming_the_image(tiny_world, tmp_path):
    split = load_split("rstpreid", tiny_world["rstpreid"], "test")
    table = {ceca.image_key(p, split.root): {"summary": "a man in red"} for p in split.image_paths}
    gone = ceca.image_key(split.image_paths[3], split.root)
    del table[gone]
    (tmp_path / "test.json").write_text(json.dumps(table))
    with pytest.raises(KeyError, match=f"image '{gone}' has no summary in .*test.json"):
        ceca.summaries_of(split.image_paths, split.root, tmp_path, "test")
    table[gone] = {"summary": "  "}
    (tmp_path / "test.json").write_text(json.dumps(table))
    with pytest.raises(KeyError, match=f"image '{gone}' has an empty summary"):
        ceca.summaries_of(split.image_paths, split.root, tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="no CECA summaries for split 'val'"):
        ceca.read_summaries(tmp_path, "val")


def test_transformers_assistants_write_summaries_through_the_same_code(tiny_world, tmp_path):
    """A tiny Qwen2-VL answers Q1-Q5 and writes the summary in one conversation (a tiny Llama, the text-only
    option, writes it from the answers): random weights, so the words are noise, but every image gets its record
    through the very code the mini assistants use."""
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersLM, TransformersVLM

    split = load_split("rstpreid", tiny_world["rstpreid"], "test")
    split.image_paths, split.image_pids = split.image_paths[:2], split.image_pids[:2]
    vlm = TransformersVLM(*tiny.qwen2_vl(), max_new_tokens=4)
    lm = TransformersLM(*tiny.llama_lm())
    out = ceca.summarize_split(split, vlm, None, tmp_path / "test.json", progress=False)
    recs = json.loads(out.read_text())
    assert len(recs) == 2 and all(sorted(r) == sorted([*prompts.CECA_QUESTIONS, "summary"]) for r in recs.values())
    assert vlm.usage.items["converse"] == 12 and lm.usage.items["generate"] == 0
    ceca.summarize_split(split, vlm, lm, tmp_path / "lm" / "test.json", progress=False, summary_by="lm")
    assert vlm.usage.items["converse"] == 22 and lm.usage.items["generate"] == 2


def test_identity_spread_known_answer():
    from person_retrieval.datasets.torch_data import RetrievalData

    sim = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    data = RetrievalData(images=torch.zeros(4, 3, 2, 1, dtype=torch.uint8), image_pids=torch.tensor([7, 7, 8, 9]),
                         tokens=torch.zeros(1, 4, dtype=torch.long), caption_pids=torch.tensor([7]),
                         caption_image_ids=torch.tensor([0]), captions=["x"])
    s = ceca.identity_spread(sim, data)
    assert s["queries"] == 1 and abs(s["same-identity spread"] - float(np.std([1, 3], ddof=1))) < 1e-6
    assert abs(s["relative spread"] - float(np.std([1, 3], ddof=1) / np.std([1, 3, 0, 0], ddof=1))) < 1e-6


def test_evaluating_several_gallery_settings_at_once_matches_one_at_a_time(tiny_backbone):
    """The sweep encodes the queries and the mixer once; each setting must score as the plain evaluation does."""
    from person_retrieval.datasets.torch_data import RetrievalData
    from person_retrieval.models import evaluate_retrieval

    torch.manual_seed(0)
    m = ceca.CECAModel(tiny_backbone).eval()
    caps = ["a man in a red shirt", "a woman with a bag", "a man in black jeans", "a woman in a white dress"]
    ids = tiny_backbone.tokenize(caps)
    data = RetrievalData(images=torch.randint(0, 255, (4, 3, *tiny_backbone.image_size), dtype=torch.uint8), image_pids=torch.arange(4),
                         tokens=ids, caption_pids=torch.arange(4), caption_image_ids=torch.arange(4), captions=caps, image_texts=ids.flip(0))
    res = ceca.evaluate_settings(m, data, [0.0, 0.3, 0.7], batch=3)
    for w in (0.0, 0.3, 0.7):
        m.omega = w
        want, sim = evaluate_retrieval(m, data, return_similarity=True)
        torch.testing.assert_close(res[f"omega={w:g}"][1], sim, rtol=1e-4, atol=1e-5)
        assert res[f"omega={w:g}"][0]["Msum"] == pytest.approx(want["R1"] + want["R5"] + want["R10"])
    m.omega = ceca.RELEASE_FUSION["omega"]
    _, plain = evaluate_retrieval(m, ceca.without_summaries(data), return_similarity=True)
    torch.testing.assert_close(res["without summaries"][1], plain, rtol=1e-4, atol=1e-5)


def test_an_empty_summary_is_counted_and_the_answers_stand_in(tiny_world, tmp_path):
    """Before: a summary that came back empty (a weak or random LLM) stopped notebook 05 with a KeyError; now the
    image's five answers stand in and the count says how many."""
    split = load_split("rstpreid", tiny_world["rstpreid"], "test")
    keys = [ceca.image_key(p, split.root) for p in split.image_paths]
    table = {k: {**{q: f"answer {q}" for q in prompts.CECA_QUESTIONS}, "summary": "a man in red"} for k in keys}
    table[keys[1]]["summary"] = " "
    table[keys[2]]["Q3"] = ""
    (tmp_path / "test.json").write_text(json.dumps(table))
    texts = ceca.summaries_of(split.image_paths, split.root, tmp_path, "test")
    assert texts[0] == "a man in red" and texts[1] == "answer Q1 answer Q2 answer Q3 answer Q4 answer Q5"
    n = len(keys)
    assert ceca.cam_counts(tmp_path) == {"images": n, "answers": 5 * n, "empty answers": 1, "empty summaries (answers used)": 1,
                                         "images with no text": 0}


def test_05_at_paper_needs_real_clip_weights(tmp_path, monkeypatch):
    """At paper the mini CLIP is never trained: without `weights` the first cell says what to set."""
    import papermill as pm
    from test_tpr_paper import write_root

    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "cache"))
    root = write_root(tmp_path / "data")
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "05_ceca.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters={"scale": "paper", "data_root": str(root), "max_steps": 2},
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert "scale='paper' needs real CLIP weights: set parameter 'weights'" in e.value.evalue and e.value.exec_count == 3
    assert not (tmp_path / "cache" / "models").exists()
