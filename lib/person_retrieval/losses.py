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
    logits = img @ txt.T * logit_scale
    target = positive_mask(pids)
    target = target / target.sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def sdm_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, logit_scale: float = 50.0, eps: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity distribution matching: KL(p || q) between the softmax of the scaled
    similarities ``p`` and the true matching distribution ``q`` (uniform over same-person rows),
    image-to-text plus text-to-image."""
    q = positive_mask(pids)
    q = q / q.sum(1, keepdim=True)
    sim = img @ txt.T * logit_scale
    loss = 0.0
    for s in (sim, sim.T):
        p = F.softmax(s, dim=1)
        loss = loss + (p * (F.log_softmax(s, dim=1) - torch.log(q + eps))).sum(1).mean()
    return loss


def id_loss(img_logits: torch.Tensor, txt_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """IRRA's identity loss: cross-entropy of a shared identity classifier on both modalities."""
    return (F.cross_entropy(img_logits, pids) + F.cross_entropy(txt_logits, pids)) / 2


def tal_loss(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """RDE's triplet alignment loss, both directions.

    For an anchor, the positive score is the softmax(S/tau)-weighted mean over its positives (weights
    not back-propagated), the negative score a smooth maximum ``tau * log sum exp(S/tau)`` over its
    negatives, and the loss a hinge ``[margin - positive + negative]_+``. As tau -> 0 this is the hardest
    -negative triplet loss; a larger tau spreads the gradient over many negatives.
    """
    pos = positive_mask(pids).bool()
    sim = img @ txt.T
    big = -1e4  # a finite "minus infinity": exp(big / tau) underflows to exactly 0, with no NaN gradients
    loss = 0.0
    for s in (sim, sim.T):
        w = torch.softmax(s.detach().masked_fill(~pos, big) / tau, dim=1)  # weights over positives only
        p = (w * s).sum(1)
        n = tau * torch.logsumexp(s.masked_fill(pos, big) / tau, dim=1)  # smooth max over negatives
        loss = loss + F.relu(margin - p + n).mean()
    return loss
