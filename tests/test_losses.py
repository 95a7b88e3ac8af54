import math

import pytest
import torch
import torch.nn.functional as F

from person_retrieval import losses

EYE = torch.eye(2)
SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
DISTINCT = torch.tensor([0, 1])


def test_itc_known_value():
    # logits = I: each row's softmax puts e/(e+1) on its match, so the loss is log(1 + 1/e) both ways
    assert losses.itc_loss(EYE, EYE, DISTINCT, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_itc_same_person_columns_are_positives():
    same = torch.tensor([3, 3])
    # both columns are positives with half the target each: loss = log 2 when logits are equal
    assert losses.itc_loss(EYE, EYE, same, 0.0).item() == pytest.approx(math.log(2))


def test_sdm_is_a_kl_divergence():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    pids = torch.tensor([0, 0, 1, 2, 2, 2])
    v = losses.sdm_loss(a, b, pids)
    assert v.item() > 0
    q = (pids.view(-1, 1) == pids.view(1, -1)).float()
    q = q / q.sum(1, keepdim=True)
    def kl_p_q(s):  # KL(p || q) with p the predicted matching distribution
        p = F.softmax(s * 50, 1)
        return (p * (torch.log(p) - torch.log(q + 1e-8))).sum(1).mean()

    manual = kl_p_q(a @ b.T) + kl_p_q(b @ a.T)
    assert v.item() == pytest.approx(manual.item(), rel=1e-4, abs=1e-4)
    # perfectly separated features with distinct ids: almost nothing to match
    assert losses.sdm_loss(EYE, EYE, DISTINCT).item() < 1e-6


def test_id_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert losses.id_loss(logits, logits, DISTINCT).item() == pytest.approx(F.cross_entropy(logits, DISTINCT).item())


def test_tal_hinge_known_values():
    assert losses.tal_loss(EYE, EYE, DISTINCT).item() == pytest.approx(0.0)  # margin met: 0.1 - 1 + 0 < 0
    # swapped: positive 0, smooth-max negative 1 -> 0.1 + 1 per row, two directions
    assert losses.tal_loss(EYE, SWAP, DISTINCT).item() == pytest.approx(2.2, abs=1e-4)


def test_tal_without_negatives_is_zero_with_finite_gradients():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    v = losses.tal_loss(x, x, torch.tensor([5, 5]))
    v.backward()
    assert v.item() == 0.0 and torch.isfinite(x.grad).all()


def test_tal_tends_to_the_hardest_negative_triplet_loss_as_tau_shrinks():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    pids = torch.arange(5)
    s = img @ txt.T
    off = s.masked_fill(torch.eye(5, dtype=torch.bool), -9)
    hard = sum(F.relu(0.1 - m.diag() + o.max(1).values).mean() for m, o in ((s, off), (s.T, off.T)))
    assert losses.tal_loss(img, txt, pids, tau=1e-4, margin=0.1).item() == pytest.approx(hard.item(), abs=1e-3)


def test_attribute_loss_ignores_hidden_targets_and_heads_hidden_everywhere():
    import torch.nn.functional as F

    from person_retrieval.losses import attribute_loss

    g = torch.Generator().manual_seed(0)
    logits = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(4, 2, generator=g)}
    targets = {"a": torch.tensor([0, -1, 2, 1]), "b": torch.tensor([-1, -1, -1, -1])}
    want = F.cross_entropy(logits["a"][[0, 2, 3]], targets["a"][[0, 2, 3]])
    assert torch.allclose(attribute_loss(logits, targets), want)


# ---------------------------------------------------------------------------------------------- FAFA
def test_fda_scores_mean_the_top_k_token_cosines():
    q = torch.tensor([[1.0, 0.0]])
    # target tokens at angles with cosines 1, 0.6, 0, -1 to the query (raw lengths: normalised inside)
    toks = torch.tensor([[[2.0, 0.0], [0.6, 0.8], [0.0, 3.0], [-1.0, 0.0]]])
    assert losses.fda_scores(q, toks, k=2).item() == pytest.approx((1 + 0.6) / 2)
    assert losses.fda_scores(q, toks, k=6).item() == pytest.approx((1 + 0.6 + 0 - 1) / 4)  # k beyond T: all tokens


def test_fda_known_value_and_group_positives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    toks = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # one token each; s = identity
    # distinct ids: p_i = softmax(scale * [1, 0]) = (a, 1 - a), q_i one-hot: the eps term prices the stray mass,
    # sum_j p log(p / (q + eps)) = a log(a / (1 + eps)) + (1 - a) log((1 - a) / eps), twice (both directions)
    scale = 2.0
    a = 1 / (1 + math.exp(-scale))
    expect = 2 * (a * math.log(a / (1 + 1e-8)) + (1 - a) * math.log((1 - a) / 1e-8))
    assert losses.fda_loss(q, toks, torch.tensor([0, 1]), k=1, logit_scale=scale).item() == pytest.approx(expect, rel=1e-5)
    # one group: q_i = (1/2, 1/2) -> KL(p || q) = sum p log(2 p)
    p = torch.softmax(torch.tensor([scale, 0.0]), 0)
    expect = 2 * float((p * torch.log(2 * p)).sum())
    assert losses.fda_loss(q, toks, torch.tensor([5, 5]), k=1, logit_scale=scale).item() == pytest.approx(expect, rel=1e-5)


def test_fd_known_value():
    f = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 5.0]])
    # cosines: (1,2) 0.8, (1,3) 0, (2,3) 0.6; over margin 0.5: 0.3 and 0.1, each counted twice, over 3 * 2 pairs
    assert losses.fd_loss(f, margin=0.5).item() == pytest.approx(2 * (0.3 + 0.1) / 6)
    assert losses.fd_loss(f, margin=0.9).item() == 0
    assert losses.fd_loss(f[:1]).item() == 0


def test_mfr_known_value_on_the_masked_dimensions():
    fq = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    ft = torch.tensor([[0.0, 2.0]])  # normalised: (0, 1)
    phi = lambda x: x[:, :2]  # noqa: E731  Phi([a, b]) = a: "rebuild each from the other" as a plain copy
    mq, mt = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    # rebuilt q = f_t = (0, 1): error on q's masked dim 0: (0 - 0.6)^2; rebuilt t = f_q = (0.6, 0.8): on dim 1: (0.8 - 1)^2
    v = losses.mfr_loss(fq, ft, phi, masks=(mq, mt)).item()
    assert v == pytest.approx(0.36 + 0.04)
    # on raw hidden states (the release's): rebuilt q = (0, 2) vs (3, 4) on dim 0: 9; rebuilt t = (3, 4) vs (0, 2) on dim 1: 4
    assert losses.mfr_loss(fq, ft, phi, masks=(mq, mt), normalize=False).item() == pytest.approx(9.0 + 4.0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    x = losses.mfr_loss(torch.randn(16, 2), torch.randn(16, 2), net, mask_ratio=0.3, generator=g)
    x.backward()
    assert x.item() > 0 and net[0].weight.grad is not None


# S = img @ txt.T with img = I: S = txt.T. Distinct ids, tau 0.015, margin 0.1. Active hinges (the smooth max
# tau log sum exp(S / tau) over each anchor's two negatives): i->t row 0: 0.1 - 0.2 + smax(0.5, 0.1),
# row 1: 0.1 - 0.4 + smax(0.35, 0.0); t->i column 0: 0.1 - 0.2 + smax(0.35, 0.0), column 1: 0.1 - 0.4 + smax(0.5, 0.6);
# the others are below zero (row 2: 0.1 - 0.9 + smax(0, 0.6); column 2: 0.1 - 0.9 + smax(0.1, 0)).
TAL_S = torch.tensor([[0.2, 0.5, 0.1], [0.35, 0.4, 0.0], [0.0, 0.6, 0.9]])


def _smax(*v, tau=0.015):
    return tau * math.log(sum(math.exp(x / tau) for x in v))


def test_tal_sum_and_mean_reductions_hand_computed():
    total = (0.1 - 0.2 + _smax(0.5, 0.1)) + (0.1 - 0.4 + _smax(0.35, 0.0)) \
        + (0.1 - 0.2 + _smax(0.35, 0.0)) + (0.1 - 0.4 + _smax(0.5, 0.6))  # about 0.4 + 0.05 + 0.25 + 0.3
    pids = torch.arange(3)
    summed = losses.tal_loss(torch.eye(3), TAL_S.T, pids, reduction="sum")
    assert summed.item() == pytest.approx(total, abs=1e-6)
    assert losses.tal_loss(torch.eye(3), TAL_S.T, pids).item() == pytest.approx(total / 3, abs=1e-6)  # "mean", the default
    with pytest.raises(ValueError):
        losses.tal_loss(torch.eye(3), TAL_S.T, pids, reduction="none")


def test_multi_positive_ce_is_minus_the_log_of_the_positives_mass():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))  # softmax (1/6, 2/6, 3/6) on both rows
    pos = torch.tensor([[True, True, False], [False, False, True]])
    # row 0: -log(1/6 + 2/6) = log 2 (the soft-target mean would be (log 6 + log 3) / 2); row 1: -log(3/6) = log 2
    torch.testing.assert_close(losses.multi_positive_ce(logits, pos), torch.tensor([math.log(2), math.log(2)]))
    torch.testing.assert_close(losses.multi_positive_ce(logits, pos.float()), torch.tensor([math.log(2), math.log(2)]))
