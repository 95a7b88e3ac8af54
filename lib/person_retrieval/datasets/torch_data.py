"""Torch-side data: images decoded once into a uint8 tensor, captions tokenized once.

Small crops (128x64) make it cheaper to hold a whole split in memory (10,000 images are 250 MB) than
to decode JPEGs every epoch; real 384x128 data streams the same way with more memory.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .formats import TPRSplit

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


#: Decoded splits kept in memory, newest last, up to this many bytes: notebook 07 fine-tunes a dozen
#: models on the same images, and decoding a split's JPEGs costs seconds each time.
IMAGE_MEMO_BYTES = 2 * 1024**3
_image_memo: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def load_images(paths: Sequence[str], size: tuple[int, int], progress: bool = False) -> torch.Tensor:
    """Decode images into a ``(N, 3, H, W)`` uint8 tensor at ``size = (H, W)`` (bicubic resize if needed).

    The same files (same paths and modification times) at the same size are decoded once per process;
    the tensor returned is then shared, so treat it as read-only."""
    key = (tuple(str(p) for p in paths), tuple(size), tuple(os.stat(p).st_mtime_ns for p in paths))
    if key in _image_memo:
        _image_memo.move_to_end(key)
        return _image_memo[key]
    out = _decode_images(paths, size, progress)
    _image_memo[key] = out
    while sum(t.numel() for t in _image_memo.values()) > IMAGE_MEMO_BYTES and len(_image_memo) > 1:
        _image_memo.popitem(last=False)
    return out


def native_size(path) -> tuple[int, int]:
    """``(H, W)`` of an image file as stored (for :func:`load_images` without resizing)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _decode_images(paths: Sequence[str], size: tuple[int, int], progress: bool = False) -> torch.Tensor:
    from PIL import Image

    h, w = size
    out = torch.empty((len(paths), 3, h, w), dtype=torch.uint8)
    it = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, desc="load images", leave=False, mininterval=2.0)
    for i, p in enumerate(it):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BICUBIC)
            out[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    return out


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> CLIP-normalised float (on the images' device: the training loop moves uint8
    batches, a quarter of the bytes, and normalises them on the GPU)."""
    dev = images_u8.device
    return (images_u8.float() / 255.0 - CLIP_MEAN.to(dev)) / CLIP_STD.to(dev)


def random_crop_with_padding(images: torch.Tensor, pad: int, fill: float = 0) -> torch.Tensor:
    """A random crop with padding, a batch at a time: each image of ``images`` (B, C, H, W) is padded with
    ``pad`` pixels of ``fill`` on every side and cropped back to H x W at a uniform random offset, drawn per
    image (torchvision's ``Pad(pad)`` then ``RandomCrop((H, W))``; fill 0 on uint8 images is its black), so its
    content moves by at most ``pad`` pixels along each axis. Draws from torch's global generator (the training
    loop seeds and checkpoints it); returns a new tensor."""
    if pad <= 0 or not len(images):
        return images
    b, _, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (b,))
    dx = torch.randint(0, 2 * pad + 1, (b,))
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=fill)
    out = torch.empty_like(images)
    for k, (i, j) in enumerate(zip(dy.tolist(), dx.tolist())):  # slices: faster than one gather on the CPU
        out[k] = padded[k, :, i: i + h, j: j + w]
    return out


def random_erasing(images: torch.Tensor, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float | Sequence[float] = 0) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020), a batch at a time, as torchvision's ``RandomErasing`` draws it per
    image: with probability ``p`` a rectangle of ``scale`` of the image's area (uniform) and aspect ratio h/w in
    ``ratio`` (log-uniform) is tried up to ten times until it fits inside the image, placed uniformly, and set to
    ``value`` (a number or one per channel, in the images' units); an image where no try fits stays as it is.
    Draws from torch's global generator (a fixed number of draws per batch); returns a new tensor."""
    if p <= 0 or not len(images):
        return images
    b, c, h, w = images.shape
    apply = torch.rand(b) < p
    tries = 10  # torchvision's
    area = h * w * torch.empty(b, tries).uniform_(scale[0], scale[1])
    aspect = torch.exp(torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    eh, ew = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    fits = (eh < h) & (ew < w)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits (argmax returns the first maximum)
    apply &= fits.any(1)
    eh = torch.where(apply, eh.gather(1, first)[:, 0], 0)
    ew = torch.where(apply, ew.gather(1, first)[:, 0], 0)
    top = (torch.rand(b) * (h - eh + 1)).long().clamp(max=h - eh)  # uniform in 0..h-eh
    left = (torch.rand(b) * (w - ew + 1)).long().clamp(max=w - ew)
    v = torch.as_tensor(value, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    if len(v) not in (1, c):
        raise ValueError(f"value needs 1 or {c} numbers (one per channel), got {len(v)}")
    out = images.clone()
    for k in apply.nonzero()[:, 0].tolist():
        i, j = int(top[k]), int(left[k])
        out[k, :, i: i + int(eh[k]), j: j + int(ew[k])] = v
    return out


def trim_tokens(ids: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Drop padding columns beyond a batch's longest caption, rounded up to ``multiple`` columns.

    Exact for CLIP (causal text attention; padding id 0). Done on the CPU before a batch moves to the
    GPU, so the model never has to read a length back from the device, and the few rounded lengths
    keep compiled kernels reusable."""
    n = int((ids != 0).sum(1).max()) if ids.numel() else 1
    n = min(ids.shape[1], -(-max(n, 1) // multiple) * multiple)
    return ids[:, :n]


@dataclass
class RetrievalData:
    """A retrieval split ready for a model: gallery images, query token ids, and their person ids."""

    images: torch.Tensor  # (N_img, 3, H, W) uint8
    image_pids: torch.Tensor  # (N_img,)
    tokens: torch.Tensor  # (N_cap, L) int64
    caption_pids: torch.Tensor  # (N_cap,)
    caption_image_ids: torch.Tensor  # (N_cap,)
    captions: list
    image_paths: list | None = None
    #: Optional token ids of a text that belongs to each gallery *image* (N_img, L'): CECA's MLLM summaries.
    #: When set, models are called as ``embed_images(images, image_texts)`` and training batches carry
    #: ``"image_text"``.
    image_texts: torch.Tensor | None = None

    @classmethod
    def from_split(cls, split: TPRSplit, tokenize: Callable[[list[str]], torch.Tensor], size: tuple[int, int],
                   keep_pids: set | None = None, progress: bool = False) -> "RetrievalData":
        """Build from a :class:`TPRSplit`; ``keep_pids`` restricts to some identities (held-out validation)."""
        img_keep = [i for i, p in enumerate(split.image_pids) if keep_pids is None or p in keep_pids]
        remap = {old: new for new, old in enumerate(img_keep)}
        caps = [j for j, i in enumerate(split.caption_image_ids) if i in remap]
        return cls(
            images=load_images([split.image_paths[i] for i in img_keep], size, progress),
            image_pids=torch.tensor([split.image_pids[i] for i in img_keep]),
            tokens=tokenize([split.captions[j] for j in caps]),
            caption_pids=torch.tensor([split.caption_pids[j] for j in caps]),
            caption_image_ids=torch.tensor([remap[split.caption_image_ids[j]] for j in caps]),
            captions=[split.captions[j] for j in caps],
            image_paths=[split.image_paths[i] for i in img_keep],
        )


class PairDataset(Dataset):
    """Training pairs, one per caption: ``{"image", "ids", "pid"}`` with person ids remapped to
    0..K-1 (for identity classifiers). Random horizontal flips draw from torch's global generator,
    whose state the training loop checkpoints, so resumed runs see the same flips."""

    def __init__(self, data: RetrievalData, flip: bool = True):
        self.data = data
        uniq = torch.unique(data.caption_pids)
        self.num_ids = len(uniq)
        lut = {int(p): i for i, p in enumerate(uniq.tolist())}
        self.pids = torch.tensor([lut[int(p)] for p in data.caption_pids])
        self.lengths = (data.tokens != 0).sum(1)  # for length-bucketed batches
        self.flip = flip

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, j: int) -> dict:
        out = self.batch(torch.tensor([j]))
        item = {"image": out["image"][0], "ids": self.data.tokens[j], "pid": out["pid"][0]}
        if self.data.image_texts is not None:
            item["image_text"] = self.data.image_texts[self.data.caption_image_ids[j]]
        return item

    def batch(self, idx: torch.Tensor) -> dict:
        """A whole batch at once (vectorised: the training loop's fast path). Images stay uint8; the
        training loop normalises them on the training device (:func:`to_float`)."""
        img = self.data.images[self.data.caption_image_ids[idx]]
        if self.flip:
            flip = torch.rand(len(idx)) < 0.5
            img[flip] = img[flip].flip(-1)
        out = {"image": img, "ids": trim_tokens(self.data.tokens[idx]), "pid": self.pids[idx]}
        if self.data.image_texts is not None:
            out["image_text"] = trim_tokens(self.data.image_texts[self.data.caption_image_ids[idx]])
        return out
