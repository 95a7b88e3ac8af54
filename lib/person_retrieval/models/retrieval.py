"""The CLIP-style dual encoder and its evaluation, shared by the backbone's pretraining and every paper.

:class:`DualEncoder` is the plain model (cosine similarity of pooled features, an optional identity
classifier); paper modules (``person_retrieval.papers``) subclass it with their own heads. Every model
exposes ``embed_images``, ``embed_texts`` and ``similarity``, which is all :func:`evaluate_retrieval` needs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..datasets import load_split
from ..datasets.torch_data import RetrievalData, to_float, trim_tokens
from ..metrics import retrieval_metrics
from .backbone import Backbone


class DualEncoder(nn.Module):
    """CLIP-style retrieval: cosine similarity of pooled features. IRRA adds an identity classifier."""

    def __init__(self, backbone: Backbone, num_ids: int = 0):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.embed_dim, num_ids) if num_ids else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def embed_images(self, x: torch.Tensor) -> dict:
        return {"global": self.backbone.encode_image(x)[0]}

    def embed_texts(self, ids: torch.Tensor) -> dict:
        return {"global": self.backbone.encode_text(ids)[0]}

    @staticmethod
    def similarity(txt: dict, img: dict) -> torch.Tensor:
        return F.normalize(txt["global"], dim=-1) @ F.normalize(img["global"], dim=-1).T

    def forward(self, images, ids):
        """Training forward: embeddings, plus identity logits and CLIP's temperature where they are
        trained (everything DDP must see goes through here)."""
        return self._with_heads(self.embed_images(images), self.embed_texts(ids))

    def _with_heads(self, img: dict, txt: dict) -> tuple[dict, dict]:
        if self.classifier is not None:
            img["logits"], txt["logits"] = self.classifier(img["global"]), self.classifier(txt["global"])
        if self.backbone.logit_scale.requires_grad:
            txt["logit_scale"] = self.backbone.logit_scale.exp().clamp(max=100)
        return img, txt


def fixed_temperature(bb: Backbone) -> Backbone:
    """``bb`` with CLIP's temperature frozen (IRRA, RDE and the mini CLIP's pretraining use fixed ones)."""
    bb.clip.logit_scale.requires_grad_(False)
    return bb



def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k].float().cpu() for p in parts]) for k in parts[0]} if parts else {}


@torch.no_grad()
def encode_images(model: nn.Module, data: RetrievalData, batch: int = 256) -> dict:
    """All gallery image embeddings of a split (with each image's own text where the split carries one)."""
    model.eval()
    dev = next(model.parameters()).device
    img = []
    for s in range(0, len(data.images), batch):
        x = to_float(data.images[s: s + batch].to(dev))
        if data.image_texts is None:
            img.append(model.embed_images(x))
        else:  # a text per gallery image (CECA's summaries) goes in with it
            img.append(model.embed_images(x, trim_tokens(data.image_texts[s: s + batch]).to(dev)))
    return _cat(img)


@torch.no_grad()
def encode(model: nn.Module, data: RetrievalData, batch: int = 256) -> tuple[dict, dict]:
    """All gallery image embeddings and all query text embeddings of a split."""
    img = encode_images(model, data, batch)
    dev = next(model.parameters()).device
    txt = [model.embed_texts(trim_tokens(data.tokens[s: s + batch]).to(dev)) for s in range(0, len(data.tokens), batch)]
    return img, _cat(txt)


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, data: RetrievalData, return_similarity: bool = False):
    """Text-to-image R1/R5/R10/mAP/mINP of ``model`` on a split."""
    img, txt = encode(model, data)
    sim = model.similarity(txt, img)
    m = retrieval_metrics(sim, data.caption_pids, data.image_pids)
    return (m, sim) if return_similarity else m




def split_data(dataset: str, root, split: str, backbone: Backbone, progress: bool = False) -> RetrievalData:
    """One split of a TPR dataset, tokenized and sized for ``backbone``."""
    return RetrievalData.from_split(load_split(dataset, root, split), backbone.tokenize, backbone.image_size, progress=progress)
