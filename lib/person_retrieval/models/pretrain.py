"""Pretraining the mini CLIP (notebook 00): contrastive learning on the world's "web" corpus.

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
from ..config import cache_dir, config_tag, get_scale, rng_for
from ..datasets.torch_data import PairDataset, RetrievalData
from .backbone import MINI_CONFIGS, Backbone, build_backbone
from .retrieval import DualEncoder, evaluate_retrieval, fixed_temperature


PRETRAIN_IDS = {"tiny": 240, "small": 6000}


def pretrain_corpus(scale: str = "small", seed: int = 0, n_ids: int | None = None, height: int | None = None):
    """The mini CLIP's pretraining data, rendered in memory: many identities, two images each in a mix
    of the three domains' cameras, each with one caption in a random style (the 'web' of the world)."""
    from ..world import PROFILES, STYLES, caption, render, sample_person, sample_state

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
            caps.append(caption(person, state, style, rng)[0])
            pids.append(pid)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, caps, torch.tensor(pids)


class ClipPretrainTask:
    """Contrastive pretraining of the mini CLIP (ITC with CLIP's learnable temperature, or a fixed one
    when ``temperature`` is given) on the world's generic captions; 5% of the identities are held out
    for validation retrieval."""

    def __init__(self, scale: str = "small", seed: int = 0, n_ids: int | None = None, temperature: float | None = None):
        self.scale, self.seed, self.n_ids, self.temperature = scale, seed, n_ids, temperature

    @cached_property
    def backbone(self) -> Backbone:
        bb = build_backbone(None, self.scale)
        if self.temperature is not None:
            with torch.no_grad():
                bb.clip.logit_scale.fill_(math.log(1 / self.temperature))
            fixed_temperature(bb)
        return bb

    def build(self) -> DualEncoder:
        return DualEncoder(self.backbone)

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
        loss = losses.itc_loss(i, t, gather(batch["pid"]), scale)
        return loss, {"temperature": (1 / scale).detach()}


def pretrained_mini_clip(scale: str = "small", seed: int = 0, gpus: int = 0, progress: bool = True, **train_kw) -> Path:
    """The pretrained mini CLIP's weights for ``(scale, seed)``, trained here and cached when missing."""
    from ..train import TaskSpec, TrainConfig, fit

    task_kw = {"scale": scale, "seed": seed, **PRETRAIN_TASK.get(scale, {})}
    tag = config_tag(PRETRAIN_CONFIG[scale], MINI_CONFIGS[scale], PRETRAIN_IDS[scale], train_kw, PRETRAIN_TASK.get(scale, {}))
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
PRETRAIN_CONFIG = {
    "tiny": dict(epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0.3),
    "small": dict(epochs=6, batch_size=64, lr=1e-3, warmup_epochs=0.3),
}
