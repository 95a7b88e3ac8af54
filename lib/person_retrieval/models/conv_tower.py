"""The mini CLIP's convolutional image tower, and its first training on attributes.

A few stride-2 convolution stages keep a coarse spatial map of the person (head, top, legs and feet stay in
their cells); the map's cells, projected, are the **image tokens** (as a ViT's patch tokens are), and the
pooled feature is a position-aware projection of the whole map (a flattened map, not an average, since
*where* a colour is tells a top from trousers).

:func:`attribute_pretrained_tower` first trains the tower's trunk to recognise every attribute of people
who are in no dataset (the mini world's "ImageNet"); the mini CLIP's contrastive pretraining then locks it
and teaches the text tower to meet it (LiT, Zhai et al., CVPR 2022).
"""
from __future__ import annotations

import torch
import torch.nn as nn


#: The locked trunks' outputs, per (trunk weights, image): at most ``MEMO_LIMIT`` images (about 17 kB each
#: at small, so about 0.7 GB), shared by every run in this process.
_TRUNK_MEMO: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
MEMO_LIMIT = 40000
#: Images the trunk computes at once for the memo (see ``_locked_trunk``).
MEMO_CHUNK = 64


def _block(a: int, b: int, stride: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(a, b, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]


class ConvTower(nn.Module):
    """``forward(x) -> (pooled [B, D], tokens [B, h*w, D])`` on ``x`` of shape ``[B, 3, H, W]``.

    ``features``: four stages, each a stride-2 convolution followed by ``depth - 1`` stride-1 ones
    (``width, 2 width, 4 width, 4 width`` channels; a map of ``H/16 x W/16`` cells). ``trunk``: the flattened
    map to a ``hidden``-d feature (what the attribute heads read). ``head``: that feature to the joint space.
    ``token_proj``: each cell to the joint space (the image tokens).
    """

    output_tokens = True
    proj = None  # tokens come out projected already (Backbone.encode_image checks this)

    def __init__(self, image_size: tuple[int, int], embed_dim: int, width: int = 32, depth: int = 2, hidden: int = 256):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += _block(a, b, 2, 5 if k == 0 else 3)
            for _ in range(depth - 1):
                layers += _block(b, b, 1)
        self.features = nn.Sequential(*layers)
        self.image_size = tuple(image_size)
        self.grid = (image_size[0] // 16, image_size[1] // 16)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(chans[-1] * self.grid[0] * self.grid[1], hidden),
                                   nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))
        self.token_proj = nn.Conv2d(chans[-1], embed_dim, 1)
        self.hidden = hidden
        self.locked = False
        self._fingerprint = b""

    def lock(self, locked: bool = True) -> "ConvTower":
        """Freeze ``features`` and ``trunk`` (LiT): no gradients, batch-norm statistics and dropout fixed,
        whatever mode the module is put in. The projections to the joint space still learn.

        A locked trunk is a fixed function of its input, so on the CPU its output per image is remembered
        (keyed by the trunk's weights and the image's bytes, shared by every tower locked with the same
        weights): from the second epoch on, and in every later run from the same backbone, fine-tuning
        pays only for the projections and the text tower. The remembered output is computed in chunks of
        ``MEMO_CHUNK`` images whatever the batch, so it is the same bits whatever ran before in the process
        (a run's numbers do not depend on which other runs were cached)."""
        self.locked = locked
        if locked:
            import hashlib

            h = hashlib.blake2b(digest_size=16)
            for k, v in sorted({**self.features.state_dict(), **self.trunk.state_dict()}.items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.digest()
        for m in (self.features, self.trunk):
            m.requires_grad_(not locked)
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.locked:
            self.features.eval()
            self.trunk.eval()
        return self

    def trunk_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        return self.trunk(fmap), fmap

    @torch.no_grad()
    def _locked_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type != "cpu":  # on a GPU the trunk is cheap and hashing would synchronise
            return self.trunk_features(x)
        import hashlib

        memo = _TRUNK_MEMO
        keys = [self._fingerprint + hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.detach().contiguous()]
        todo, seen = [], set()  # the first place of each missing image (a repeated image is computed once)
        for i, k in enumerate(keys):
            if k not in memo and k not in seen:
                seen.add(k)
                todo.append(i)
        fresh = {}
        for s in range(0, len(todo), MEMO_CHUNK):
            # Always MEMO_CHUNK rows at once (the last chunk padded with copies): a convolution's last bits
            # depend on its batch size, so an image's remembered output must not depend on how many other
            # images happened to be missing with it, or a run's numbers would depend on what ran before.
            part = todo[s: s + MEMO_CHUNK]
            rows = x[part + [part[-1]] * (MEMO_CHUNK - len(part))]
            z, fmap = self.trunk_features(rows)
            fresh.update({keys[i]: (z[j].clone(), fmap[j].clone()) for j, i in enumerate(part)})
            if len(memo) + len(fresh) <= MEMO_LIMIT:
                memo.update(fresh)
        out = [fresh.get(k) or memo[k] for k in keys]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.locked:
            z, fmap = self._locked_trunk(x)
        else:
            z, fmap = self.trunk_features(x)
        tokens = self.token_proj(fmap).flatten(2).transpose(1, 2)
        return self.head(z), tokens


class AttributeHeads(nn.Module):
    """One linear classifier per attribute head of :data:`person_retrieval.world.labels.HEADS`."""

    def __init__(self, hidden: int):
        super().__init__()
        from ..world.labels import HEADS

        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEADS.items()})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: h(z) for k, h in self.heads.items()}
