"""Pretraining the mini CLIP (notebook 00), in two stages, as a web-scale CLIP is built from an
ImageNet-trained image tower in LiT (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning",
CVPR 2022):

1. :class:`TowerAttributeTask`: the convolutional image tower learns to recognise every attribute of
   people who are in no dataset (the mini world's "ImageNet": labelled images, not captions);
2. :class:`ClipPretrainTask`: contrastive learning on the world's "web" corpus (other people again, one
   caption each), the image tower's trunk locked, its projections and the whole text tower learning.

Shared by every paper: their mini-world runs all start from :func:`pretrained_mini_clip`, trained once per
``(scale, seed, configuration)`` and cached under ``.cache/models/``.
"""
from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import losses
from ..metrics import head_accuracy
from ..config import cache_dir, config_tag, get_scale, rng_for
from ..datasets.torch_data import PairDataset, RetrievalData
from .backbone import MINI_CONFIGS, Backbone, build_backbone
from ..world.labels import HEADS, labelled_images
from .conv_tower import AttributeHeads
from .retrieval import DualEncoder, evaluate_retrieval, fixed_temperature


PRETRAIN_IDS = {"tiny": 240, "small": 6000}
#: What the pretraining corpus is (part of the cache key: a change to it retrains the backbone).
CORPUS = "web alt-text v1, token alignment"


def pretrain_corpus(scale: str = "small", seed: int = 0, n_ids: int | None = None, height: int | None = None):
    """The mini CLIP's pretraining data, rendered in memory: many identities, two images each in a mix
    of the three domains' cameras, each with one alt-text line (the 'web' of the world,
    :func:`person_retrieval.world.language.web_caption`), none of them in a dataset."""
    from ..world import PROFILES, STYLES, render, sample_person, sample_state
    from ..world.language import web_caption

    sc = get_scale(scale)
    n = n_ids or PRETRAIN_IDS[sc.name]
    h = height or sc.image_height
    rng = rng_for(seed, "pretrain-corpus")
    imgs, caps, pids = [], [], []
    styles = list(STYLES)
    for pid in range(n):
        person = sample_person(rng, pid)
        for _ in range(2):
            style = styles[int(rng.integers(3))]
            state = sample_state(rng, PROFILES[style])
            imgs.append(render(person, state, h))
            caps.append(web_caption(person, state, rng)[0])
            pids.append(pid)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, caps, torch.tensor(pids)


TOWER_IDS = {"tiny": {"train": 300, "val": 60}, "small": {"train": 8000, "val": 400}}


class _LabelledImages:
    """Rendered images and their attribute targets, served a batch at a time (random horizontal flips from
    torch's global generator, which the training loop checkpoints)."""

    def __init__(self, images: torch.Tensor, targets: dict[str, torch.Tensor]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> dict:
        img = self.images[idx]
        flip = torch.rand(len(idx)) < 0.5
        img[flip] = img[flip].flip(-1)
        return {"image": img, **{f"y:{h}": t[idx] for h, t in self.targets.items()}}


class _TowerClassifier(torch.nn.Module):
    def __init__(self, tower, hidden: int):
        super().__init__()
        self.tower, self.heads = tower, AttributeHeads(hidden)

    def forward(self, x):
        return self.heads(self.tower.trunk_features(x)[0])


class TowerAttributeTask:
    """Stage 1: the mini CLIP's image tower learns every attribute head of
    :data:`person_retrieval.world.labels.HEADS` on rendered people who are in no dataset; selected on the
    mean per-head accuracy over held-out people (``acc``)."""

    def __init__(self, scale: str = "small", seed: int = 0, n_ids: dict | None = None):
        self.scale, self.seed = scale, seed
        self.n_ids = n_ids or TOWER_IDS[get_scale(scale).name]

    def build(self) -> torch.nn.Module:
        bb = build_backbone(None, self.scale)
        return _TowerClassifier(bb.clip.visual, bb.clip.visual.hidden)

    @cached_property
    def _data(self):
        h = get_scale(self.scale).image_height
        return {part: labelled_images(rng_for(self.seed, "image-tower", part), n, h)[:2] for part, n in self.n_ids.items()}

    def train_data(self) -> _LabelledImages:
        return _LabelledImages(*self._data["train"])

    def loss(self, model, batch, gather):
        logits = model(batch["image"])
        loss = losses.attribute_loss(logits, {k[2:]: v for k, v in batch.items() if k.startswith("y:")})
        return loss, {}

    def evaluate(self, model) -> dict:
        from ..datasets.torch_data import to_float

        x, y = self._data["val"]
        dev = next(model.parameters()).device
        preds = {h: [] for h in y}
        for s in range(0, len(x), 256):
            out = model(to_float(x[s: s + 256].to(dev)))
            for h in preds:
                preds[h].append(out[h].argmax(-1).cpu())
        acc = head_accuracy({h: torch.cat(p) for h, p in preds.items()}, y)
        return {"acc": float(np.mean(list(acc.values()))), **{f"acc_{h}": v for h, v in acc.items()}}


def pretrained_image_tower(scale: str = "small", seed: int = 0, gpus: int = 0, progress: bool = True) -> Path:
    """Stage 1's weights (the whole tower: trunk and untrained projections) for ``(scale, seed)``, cached."""
    from ..train import TaskSpec, TrainConfig, fit, process_tag, shared_gpus

    gpus = shared_gpus(gpus)
    sc = get_scale(scale).name
    tag = config_tag(TOWER_CONFIG[sc], MINI_CONFIGS[sc], TOWER_IDS[sc], sorted(HEADS), *process_tag(gpus))
    out = cache_dir() / "models" / f"image_tower-{scale}-seed{seed}-{tag}"
    done = out / "tower.safetensors"
    if done.is_file():
        return done
    cfg = TrainConfig(**{**TOWER_CONFIG[sc], "gpus": gpus, "seed": seed, "out_dir": str(out), "progress": progress, "select": "acc"})
    res = fit(TaskSpec("person_retrieval.models.pretrain:TowerAttributeTask", {"scale": scale, "seed": seed}), cfg)
    from safetensors.torch import save_model

    tmp = done.with_name(done.name + ".tmp")
    save_model(res.model.tower, str(tmp))
    tmp.replace(done)
    return done


class _PretrainEncoder(DualEncoder):
    """The dual encoder of stage 2, which also returns the mean of the image tokens (``cells``)."""

    def embed_images(self, x: torch.Tensor) -> dict:
        pooled, tokens = self.backbone.encode_image(x)
        return {"global": pooled, "cells": tokens.mean(1)}


class ClipPretrainTask:
    """Contrastive pretraining of the mini CLIP (ITC with CLIP's learnable temperature, or a fixed one
    when ``temperature`` is given) on the world's generic captions; 5% of the identities are held out
    for validation retrieval."""

    def __init__(self, scale: str = "small", seed: int = 0, n_ids: int | None = None, temperature: float | None = None,
                 tower: str | None = None, lock_image: bool = True):
        self.scale, self.seed, self.n_ids, self.temperature = scale, seed, n_ids, temperature
        self.tower, self.lock_image = tower, lock_image

    @cached_property
    def backbone(self) -> Backbone:
        bb = build_backbone(None, self.scale)
        if self.tower:  # stage 1's image tower, locked (LiT) unless lock_image=False
            from safetensors.torch import load_model

            load_model(bb.clip.visual, self.tower)
            if self.lock_image:
                bb.clip.visual.lock()
        if self.temperature is not None:
            with torch.no_grad():
                bb.clip.logit_scale.fill_(math.log(1 / self.temperature))
            fixed_temperature(bb)
        return bb

    def build(self) -> DualEncoder:
        return _PretrainEncoder(self.backbone)

    @cached_property
    def _data(self) -> tuple[RetrievalData, RetrievalData]:
        images, caps, pids = pretrain_corpus(self.scale, self.seed, self.n_ids)
        tok = self.backbone.tokenize(caps)
        n_val = max(8, int(0.05 * int(pids.max() + 1)))
        val = pids < n_val

        def part(m):
            idx = torch.nonzero(m).squeeze(1)
            return RetrievalData(images=images[idx], image_pids=pids[idx], tokens=tok[idx], caption_pids=pids[idx],
                                 caption_image_ids=torch.arange(len(idx)), captions=[caps[i] for i in idx.tolist()])

        return part(~val), part(val)

    def train_data(self) -> PairDataset:
        return PairDataset(self._data[0])

    def evaluate(self, model) -> dict:
        return evaluate_retrieval(model, self._data[1])

    def loss(self, model, batch, gather):
        img, txt = model(batch["image"], batch["ids"])
        scale = txt.get("logit_scale", self.backbone.logit_scale.exp())
        i, t = F.normalize(gather(img["global"]), dim=-1), F.normalize(gather(txt["global"]), dim=-1)
        pid = gather(batch["pid"])
        loss = losses.itc_loss(i, t, pid, scale)
        # The image tokens join the joint space too (their mean meets the caption), as CLIP's projected
        # patch tokens do: methods that read tokens (RDE's token selection, FAFA, CECA) start from it.
        cells = losses.itc_loss(F.normalize(gather(img["cells"]), dim=-1), t, pid, scale)
        return loss + cells, {"temperature": (1 / scale).detach(), "itc_tokens": cells.detach()}


def pretrained_mini_clip(scale: str = "small", seed: int = 0, gpus: int = 0, progress: bool = True, **train_kw) -> Path:
    """The pretrained mini CLIP's weights for ``(scale, seed)``, trained here and cached when missing."""
    from ..train import TaskSpec, TrainConfig, fit, process_tag, shared_gpus

    gpus = shared_gpus(gpus)
    task_kw = {"scale": scale, "seed": seed, **PRETRAIN_TASK.get(scale, {})}
    parts = [PRETRAIN_CONFIG[scale], MINI_CONFIGS[scale], PRETRAIN_IDS[scale], train_kw, PRETRAIN_TASK.get(scale, {}), CORPUS]
    if MINI_CONFIGS[scale].vision == "conv":
        tower = pretrained_image_tower(scale, seed, gpus, progress)
        task_kw["tower"] = str(tower)
        parts.append(tower.parent.name)  # stage 1's own cache key (not its path: caches can move)
    tag = config_tag(*parts, *process_tag(gpus))
    out = cache_dir() / "models" / f"mini_clip-{scale}-seed{seed}-{tag}"
    done = out / "backbone.safetensors"
    if done.is_file():
        return done
    cfg = TrainConfig(**{**PRETRAIN_CONFIG[scale], "gpus": gpus, "seed": seed, "out_dir": str(out), "progress": progress, **train_kw})
    res = fit(TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", task_kw), cfg)
    from safetensors.torch import save_model

    tmp = done.with_name(done.name + ".tmp")
    save_model(res.model.backbone, str(tmp))
    tmp.replace(done)
    return done


#: The pretraining objective's temperature. CLIP learns it from 0.07; the mini CLIP, trained for
#: minutes rather than weeks, learns faster with a fixed sharper one (measured on a GPU, 12 epochs at
#: small: IRRA's CUHK-style test R1 after fine-tuning 24.6 with 0.03 fixed, 20.1 with CLIP's learned one).
PRETRAIN_TASK = {"tiny": {"temperature": 0.03}, "small": {"temperature": 0.03}}
TOWER_CONFIG = {
    "tiny": dict(epochs=2, batch_size=32, lr=3e-3, warmup_epochs=0.3, weight_decay=1e-4),
    "small": dict(epochs=8, batch_size=128, lr=3e-3, warmup_epochs=0.3, weight_decay=1e-4),
}
PRETRAIN_CONFIG = {
    "tiny": dict(epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0.3),
    "small": dict(epochs=10, batch_size=64, lr=1e-3, warmup_epochs=0.3),
}
