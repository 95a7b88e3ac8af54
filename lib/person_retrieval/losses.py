"""Training objectives, one function each, named as in the papers.

All take L2-normalised image features ``img`` (B, D) and text features ``txt`` (B, D) whose row ``i``
is a matching pair, plus person ids ``pids`` (B,): rows of the same person are positives of each
other, not negatives (several positives per row), as IRRA and RDE treat them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attribute_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attribute recognition (the mini MLLM's recognizer, the mini CLIP's image tower, stage 1): one
    cross-entropy per head over the images where it is visible (target -1: hidden),
    L = sum_h CE(logits_h, y_h)."""
    return sum(F.cross_entropy(logits[k], targets[k], ignore_index=-1) for k in logits if (targets[k] >= 0).any())


def positive_mask(pids: torch.Tensor) -> torch.Tensor:
    """(B, B) float matrix: 1 where two rows show the same person."""
    return (pids.view(-1, 1) == pids.view(1, -1)).float()


def itc_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, with every same-person column a positive (targets spread evenly over them)."""
    return itc_from_scores(img @ txt.T, pids, logit_scale)


def itc_from_scores(scores: torch.Tensor, pids: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """The same InfoNCE from a ``(B, B)`` score matrix (row i and column i a matching pair), for scores that
    are not a plain dot product (BLIP-2's best-matching query token)."""
    logits = scores * logit_scale
    target = positive_mask(pids)
    target = target / target.sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def sdm_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, logit_scale: float = 50.0, eps: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity distribution matching: KL(p || q) between the softmax of the scaled
    similarities ``p`` and the true matching distribution ``q`` (uniform over same-person rows),
    image-to-text plus text-to-image."""
    return sdm_from_scores(img @ txt.T, pids, logit_scale, eps)


def sdm_from_scores(scores: torch.Tensor, pids: torch.Tensor, logit_scale: torch.Tensor | float = 50.0, eps: float = 1e-8) -> torch.Tensor:
    """The same SDM from a ``(B, B)`` score matrix (row i and column i a matching pair), for scores that are
    not one dot product (DiaNA's refined similarity: the mean cosine over attribute queries)."""
    q = positive_mask(pids)
    q = q / q.sum(1, keepdim=True)
    sim = scores * logit_scale
    loss = 0.0
    for s in (sim, sim.T):
        p = F.softmax(s, dim=1)
        loss = loss + (p * (F.log_softmax(s, dim=1) - torch.log(q + eps))).sum(1).mean()  # KL(p || q)
    return loss


def id_loss(img_logits: torch.Tensor, txt_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """IRRA's identity loss: cross-entropy of a shared identity classifier on both modalities."""
    return (F.cross_entropy(img_logits, pids) + F.cross_entropy(txt_logits, pids)) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IRRA's implicit relation reasoning: the masked words, predicted from the text tokens after they
    have attended to the image's tokens, scored by cross-entropy over the vocabulary ``V``.
    ``logits`` [M, |V|] and ``labels`` [M] at the M masked positions only (IRRA scores every position and
    ignores label 0; the loss is the same, without the |V| scores of each unmasked token)."""
    # L_irr = -1/|M| sum_{i in M} log p_i(y_i), p_i the softmax over V at masked word i (IRRA, CVPR 2023)
    return F.cross_entropy(logits.float(), labels)


def tal_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1,
             reduction: str = "mean") -> torch.Tensor:
    """RDE's triplet alignment loss, both directions.

    For an anchor, the positive score is the softmax(S/tau)-weighted mean over its positives (weights
    not back-propagated), the negative score a smooth maximum ``tau * log sum exp(S/tau)`` over its
    negatives, and the loss a hinge ``[margin - positive + negative]_+``. As tau -> 0 this is the hardest
    -negative triplet loss; a larger tau spreads the gradient over many negatives.

    ``reduction``: how the anchors' hinges combine, per direction: "mean" (notebook 01's RDE) or "sum", as
    the released code returns it (CECA's ``compute_rbs``: ``loss.sum()``), which weighs TAL B times more
    than a mean does against a term that is averaged.
    """
    # L = sum_{S in (S, S^T)} R_i [ m - sum_{j in P(i)} a_ij S_ij + tau log sum_{k not in P(i)} exp(S_ik / tau) ]_+,
    # a_ij = softmax_{j in P(i)}(S_ij / tau) (no gradient), R_i = 1/B sum_i ("mean") or sum_i ("sum")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pos = positive_mask(pids).bool()
    sim = img @ txt.T
    big = -1e4  # a finite "minus infinity": exp(big / tau) underflows to exactly 0, with no NaN gradients
    loss = 0.0
    for s in (sim, sim.T):
        w = torch.softmax(s.detach().masked_fill(~pos, big) / tau, dim=1)  # weights over positives only
        p = (w * s).sum(1)
        n = tau * torch.logsumexp(s.masked_fill(pos, big) / tau, dim=1)  # smooth max over negatives
        hinge = F.relu(margin - p + n)
        loss = loss + (hinge.sum() if reduction == "sum" else hinge.mean())
    return loss


# ---------------------------------------------------------------------------------------------
# FAFA (composed person retrieval, notebook 04). A composed query is one feature; a target image is T
# token features. Each loss normalises its inputs itself: the formulas are written in cosines.
def fda_scores(query: torch.Tensor, target_tokens: torch.Tensor, k: int = 6) -> torch.Tensor:
    """FAFA's query-target score: s[i, j] = the mean of the k largest cosines between query i and the
    tokens of target j. ``query`` [B, D], ``target_tokens`` [N, T, D] -> [B, N]."""
    q = F.normalize(query.float(), dim=-1)
    t = F.normalize(target_tokens.float(), dim=-1)
    cos = torch.einsum("bd,ntd->bnt", q, t)
    return cos.topk(min(k, cos.shape[-1]), dim=-1).values.mean(-1)


def fda_loss(query: torch.Tensor, target_tokens: torch.Tensor, pids: torch.Tensor, k: int = 6,
             logit_scale: torch.Tensor | float = 1 / 0.07, eps: float = 1e-8) -> torch.Tensor:
    """FAFA's fine-grained dynamic alignment. ``query`` [B, D] composed features, ``target_tokens`` [B, T, D]
    the targets' tokens, ``pids`` [B] group ids (equal ``cpr_id``: the same person in the same outfit).
    L_q2t = 1/B sum_i KL(p_i || q_i) = 1/B sum_i sum_j p_ij log(p_ij / (q_ij + eps)),  p_i = softmax_j(scale * s_ij),
    q_i = the row of equal ids, normalised; L_fda = L_q2t + L_t2q (the same over the transposed scores)."""
    s = fda_scores(query, target_tokens, k) * logit_scale
    q = positive_mask(pids)
    q = q / q.sum(1, keepdim=True)
    loss = 0.0
    for m in (s, s.T):  # q is symmetric: the same true distribution both ways
        p = F.softmax(m, dim=1)
        loss = loss + (p * (F.log_softmax(m, dim=1) - torch.log(q + eps))).sum(1).mean()  # sum_j p log(p / (q + eps))
    return loss


def fd_loss(features: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """FAFA's feature diversity: L_fd = 1 / (N (N - 1)) sum_{i != j} max(cos(f_i, f_j) - m, 0) over ``features``
    [N, D] (the batch's projected target tokens): tokens more alike than the margin are pushed apart."""
    f = F.normalize(features.float(), dim=-1)
    n = f.shape[0]
    if n < 2:
        return f.sum() * 0.0
    cos = f @ f.T
    off = ~torch.eye(n, dtype=torch.bool, device=f.device)
    return F.relu(cos[off] - margin).sum() / (n * (n - 1))  # 1/(N(N-1)) sum_{i!=j} max(cos - m, 0)


def mfr_loss(query: torch.Tensor, target_mean: torch.Tensor, phi, mask_ratio: float = 0.3, masks=None,
             generator: torch.Generator | None = None, normalize: bool = True) -> torch.Tensor:
    """FAFA's masked feature reasoning. ``query`` [B, D] composed features, ``target_mean`` [B, D] the mean
    target token features (normalised here unless ``normalize=False``: the release reconstructs the
    Q-Former's raw hidden states), ``phi`` one shared network from [2D] to [D]. A random
    ``mask_ratio`` of each one's dimensions is zeroed (tilde), and each is rebuilt from the other:
    L_mfr = E[ ||f_q - Phi([f_t, f~_q])||^2 + ||f_t - Phi([f_q, f~_t])||^2 ], the squared error taken over
    the masked dimensions (their mean). ``masks`` = (mask_q, mask_t), bool [B, D] with True = masked, to
    fix them (tests); else drawn with ``generator``."""
    fq, ft = query.float(), target_mean.float()
    if normalize:
        fq, ft = F.normalize(fq, dim=-1), F.normalize(ft, dim=-1)
    if masks is None:
        mq = torch.rand(fq.shape, generator=generator).to(fq.device) < mask_ratio
        mt = torch.rand(ft.shape, generator=generator).to(ft.device) < mask_ratio
    else:
        mq, mt = (m.to(fq.device).bool() for m in masks)
    rq = phi(torch.cat([ft, fq.masked_fill(mq, 0.0)], dim=-1))  # Phi([f_t, f~_q]) -> f_q
    rt = phi(torch.cat([fq, ft.masked_fill(mt, 0.0)], dim=-1))  # Phi([f_q, f~_t]) -> f_t
    err_q = ((rq - fq) ** 2)[mq]
    err_t = ((rt - ft) ** 2)[mt]
    return (err_q.mean() if err_q.numel() else rq.sum() * 0.0) + (err_t.mean() if err_t.numel() else rt.sum() * 0.0)


# ---------------------------------------------------------------------------------------------
# CECA (notebook 05): the MLLM's summary of each image as a third view.
def multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with several positives, as CECA's release computes it (``_row_multi_pos_ce``):
    minus the log of the softmax mass on the row's positives (not the mean of their log-probabilities).
    ``logits`` [B, N], ``pos`` [B, N] (1 or True: a positive; every row has one) -> [B]."""
    # CE_i = -log sum_{j in P(i)} softmax_j(l_i) = logsumexp_k l_ik - logsumexp_{j in P(i)} l_ij
    return torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos.bool(), float("-inf")), 1)


def cawl_weights(summary: torch.Tensor, txt: torch.Tensor, img: torch.Tensor, pids: torch.Tensor,
                 logit_scale: float = 50.0, clip: tuple[float, float] = (0.2, 5.0)) -> torch.Tensor:
    """CECA's confidence per sample (no gradient): w_i = p_ct(i) * p_ci(i), the softmax mass that summary i
    puts on its positive captions and on its positive images, divided by the batch mean, clipped to ``clip``
    (the release's floors too: each p at least 1e-8, their product at least 1e-8)."""
    # w_i = clip( p_ct(i) p_ci(i) / (1/B sum_k p_ct(k) p_ci(k)), 0.2, 5 ),  p_cx(i) = sum_{j in P(i)} softmax_j(s C_i . X_j)
    with torch.no_grad():
        pos = positive_mask(pids)
        p_ct = (F.softmax(summary @ txt.T * logit_scale, dim=1) * pos).sum(1).clamp(1e-8, 1.0)
        p_ci = (F.softmax(summary @ img.T * logit_scale, dim=1) * pos).sum(1).clamp(1e-8, 1.0)
        w = (p_ct * p_ci).clamp_min(1e-8)
        return (w / w.mean().clamp_min(1e-8)).clamp(*clip)  # w / mean(w), clipped to [0.2, 5]


def cawl_loss(summary: torch.Tensor, txt: torch.Tensor, img: torch.Tensor, pids: torch.Tensor, logit_scale: float = 50.0,
              clip: tuple[float, float] = (0.2, 5.0), clip_one_minus_w: bool = False) -> torch.Tensor:
    """CECA's confidence-aware weighting loss over normalised summary ``C``, caption ``T`` and image ``I``
    features (row i one sample; positives by person id), averaged over the batch as the release averages it:
    L = 1/B sum_i [ w_i (CE_c->t(i) + CE_c->i(i)) + (1 - w_i) (CE_i->t(i) + CE_t->i(i)) / 2 ],  w = :func:`cawl_weights`,
    each CE :func:`multi_positive_ce` (minus the log of the positives' summed softmax mass) at ``logit_scale``
    50, the release's. A confident summary teaches the caption and the image; an unsure one hands the sample
    back to plain image-text alignment. The supplement gives no formula for CAWL; this is the release's form
    (``compute_gate_infonce_per_from_scores``), which wins where the two could differ.

    w is divided by its batch mean, so its mean is 1 and some samples of every batch have w > 1, where the
    release's 1 - w is negative and *raises* those samples' image-text loss (pushes an image away from its own
    caption). ``clip_one_minus_w=True`` takes max(1 - w_i, 0) instead (this project's earlier default)."""
    # L = 1/B sum_i [ w_i (CE_ct + CE_ci) + r_i (CE_it + CE_ti) / 2 ],  r_i = 1 - w_i, or max(1 - w_i, 0) (clip_one_minus_w)
    w = cawl_weights(summary, txt, img, pids, logit_scale, clip)
    pos = positive_mask(pids).bool()
    ce_c = multi_positive_ce(summary @ txt.T * logit_scale, pos) + multi_positive_ce(summary @ img.T * logit_scale, pos)
    it = img @ txt.T * logit_scale
    ce_it = (multi_positive_ce(it, pos) + multi_positive_ce(it.T, pos)) / 2  # (CE_i->t + CE_t->i) / 2; row i of it.T is caption i
    rest = (1 - w).clamp_min(0) if clip_one_minus_w else 1 - w
    return (w * ce_c + rest * ce_it).mean()
