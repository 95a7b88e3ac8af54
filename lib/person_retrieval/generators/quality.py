"""Measurements of generated images: clarity, identity, and distance to real images.

* :func:`high_frequency_energy`: the share of an image's spectral energy above a radial frequency
  (SPG: a smaller size condition must give a blurrier image at the same physical resolution).
* :func:`identity_agreement`: how often the attribute recognizer reads the same identity attributes
  (gender, age, build, skin, hair style and colour) in two images (IDPG: expansions against their seed).
* :func:`frechet_distance`: the Frechet distance between Gaussians fitted to two feature sets. On the
  mini CLIP's image features it is a *Frechet mini-CLIP distance*, not FID: there is no Inception
  network here, and its values are not comparable with published FIDs.
"""
from __future__ import annotations

import numpy as np
import torch

from ..metrics import frechet_distance

__all__ = ["BLUR_CUTOFF", "READBACK_SLOTS", "HeldOutPrompts", "clip_image_features", "frechet_distance", "high_frequency_energy",
           "identity_agreement", "read_back", "readback_table", "through_codec"]


def high_frequency_energy(images: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Per image: the fraction of the (mean-removed, grey) image's spectral energy at radial frequencies
    above ``cutoff`` cycles per pixel (Nyquist is 0.5). ``images``: uint8 ``[B, 3, H, W]``."""
    if not 0 < cutoff < 0.5:
        raise ValueError(f"cutoff must be between 0 and 0.5 cycles per pixel, got {cutoff}")
    x = images.float().mean(1) / 255.0
    x = x - x.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    high = (fy ** 2 + fx ** 2).sqrt() > cutoff
    total = power.sum((-2, -1)).clamp_min(1e-12)
    return (power * high).sum((-2, -1)) / total


def identity_agreement(recognizer, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """For image pairs ``(a[i], b[i])``: the share of pairs on which the recognizer reads the same value,
    per identity attribute, and ``"mean"`` over them."""
    from ..assistants.mini import IDENTITY

    if len(a) != len(b):
        raise ValueError(f"{len(a)} images against {len(b)}")
    pa, pb = recognizer.predict(a), recognizer.predict(b)
    out = {h: float((pa[h].argmax(-1) == pb[h].argmax(-1)).float().mean()) for h in IDENTITY}
    out["mean"] = float(np.mean([out[h] for h in IDENTITY]))
    return out


@torch.no_grad()
def clip_image_features(backbone, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised pooled image features of uint8 images, resized to the backbone's input size."""
    import torch.nn.functional as F

    from ..datasets.torch_data import to_float

    backbone = backbone.eval()
    out = []
    for s in range(0, len(images), batch):
        x = images[s: s + batch]
        if tuple(x.shape[-2:]) != tuple(backbone.image_size):
            x = F.interpolate(x.float(), size=backbone.image_size, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
        out.append(F.normalize(backbone.encode_image(to_float(x))[0].float(), dim=-1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The measurements the notebook reports
#: Where the notebook measures clarity: 1/8 cycle per pixel, the Nyquist frequency of the mini generator's
#: latent grid (4x down). Above a quarter cycle its autoencoder reconstructs almost nothing: measured at
#: small, the sharpest target images keep 1.0% of their energy there through the codec, against 7.3% in
#: the images, so no sample could show clarity at that band. Chosen from real images, before sampling.
BLUR_CUTOFF = 0.125


@torch.no_grad()
def flow_path(gen, image: torch.Tensor, ts=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0) -> list[np.ndarray]:
    """The rectified-flow path ``x_t = (1 - t) x_0 + t eps`` of one image (uint8 ``[3, H, W]`` or ``[1, 3, H, W]``),
    mixed in the generator's token space and drawn through its decoder: one uint8 ``[H, W, 3]`` array per ``t``.
    Without gradients: a decoder whose weights require them (FLUX.1-dev's VAE as loaded) gives plain arrays."""
    x0 = gen.codec.encode(image.reshape(-1, *image.shape[-3:])[:1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed))).to(x0)
    out = []
    for t in ts:
        x = gen.codec.decode((1 - t) * x0 + t * eps, *gen.image_size)[0]
        out.append((x.permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8))
    return out


@torch.no_grad()
def through_codec(codec, images: torch.Tensor) -> torch.Tensor:
    """uint8 images encoded and decoded by a generator's codec: the clarity its samples can reach."""
    x = codec.decode(codec.encode(images), *images.shape[-2:])
    return (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def size_sweep(gen, prompts: list[str], sizes: list, seed: int = 0, cutoff: float = BLUR_CUTOFF, real: dict | None = None,
               also: tuple[float, ...] = (0.25,)):
    """SPG at each size condition (same prompts, same noise): ``(images per size, table)``. The table has
    the mean and standard error of :func:`high_frequency_energy` above ``cutoff`` per size (in %), and
    beside it the same for ``real[size]`` (the target images taken at that size) as they are and through
    the generator's codec; the means above each ``also`` cutoff follow."""
    import pandas as pd

    def pct(x, c):
        return 100 * float(high_frequency_energy(x, c).mean())

    images, rows = {}, []
    for s in sizes:
        x = gen.spg(prompts, [s] * len(prompts), seed=seed)
        e = high_frequency_energy(x, cutoff).numpy()
        images[s] = x
        r = real.get(s) if real else None
        rc = None if r is None else through_codec(gen.codec, r)
        row = {"size condition": "none" if s is None else f"{s[0]}x{s[1]}", "w_r": np.nan if s is None else s[0],
               "hf_energy": 100 * float(e.mean()), "hf_energy_se": 100 * float(e.std(ddof=1) / np.sqrt(len(e))) if len(e) > 1 else np.nan,
               "real images hf_energy": np.nan if r is None else pct(r, cutoff),
               "real through codec hf_energy": np.nan if r is None else pct(rc, cutoff), "real images n": 0 if r is None else len(r)}
        for c in also:
            row[f"hf_energy above {c}"] = pct(x, c)
            row[f"real images above {c}"] = np.nan if r is None else pct(r, c)
        rows.append(row)
    return images, pd.DataFrame(rows)


def falls_significantly(images_by_size: list[torch.Tensor], cutoff: float = BLUR_CUTOFF, z: float = 2.0) -> bool:
    """Whether high-frequency energy falls from each size to the next, beyond noise: the images are
    paired (same prompt, same noise), so each step's mean paired drop must exceed ``z`` standard errors."""
    e = [high_frequency_energy(x, cutoff).double() for x in images_by_size]
    for a, b in zip(e, e[1:]):
        d = a - b
        if len(d) < 2 or not float(d.mean()) > z * float(d.std() / len(d) ** 0.5):
            return False
    return True


def identity_study(gen, recognizer, prompts: list[str], differences: list[str], size=None, seed: int = 0):
    """IDPG against independent sampling. For each prompt: one SPG seed image, one IDPG expansion per
    difference prompt, and as many further SPG samples of the same prompt with other noise. Returns
    ``(images, table)``: the images by role, and the identity agreement (:func:`identity_agreement`) of
    expansion-vs-seed and independent-vs-seed, per identity attribute."""
    import pandas as pd

    n, k = len(prompts), len(differences)
    seeds = gen.spg(prompts, [size] * n, seed=seed)
    refs = seeds.repeat_interleave(k, 0)
    expansions = gen.idpg(refs, [d for _ in range(n) for d in differences], seed=seed + 1)
    independent = torch.cat([gen.spg(prompts, [size] * n, seed=seed + 2 + j) for j in range(k)])
    independent = independent.reshape(k, n, *independent.shape[1:]).transpose(0, 1).reshape(n * k, *independent.shape[1:])
    a = identity_agreement(recognizer, expansions, refs)
    b = identity_agreement(recognizer, independent, refs)
    table = pd.DataFrame([{"attribute": h, "IDPG expansion vs seed": 100 * a[h], "independent SPG sample vs seed": 100 * b[h]} for h in a])
    return {"seeds": seeds, "expansions": expansions, "independent": independent}, table


# ---------------------------------------------------------------------------------------------
# Where alignment is lost: per-slot read-back on fixed held-out prompts
#: The slots read back: garments' colours and types, shoes, hair and gender (what the papers' prompts state
#: most and the recognizer reads at the generator's size).
READBACK_SLOTS = ("upper_color", "lower_color", "upper_type", "lower_type", "shoes_color", "hair_style", "gender")
#: The four filter criteria that judge one image against its prompt: TIPS's seed filter (alignment and
#: quality) and SynCPR's single-image pair (naturalness, and alignment with the target's description).
#: SynCPR's identity and relevance compare two images, so they are not in this table.
READBACK_CRITERIA = {"TIPS alignment": "tips_seed_alignment", "TIPS quality": "tips_quality",
                     "SynCPR naturalness": "naturalness", "SynCPR alignment": "alignment"}


class HeldOutPrompts:
    """``n`` people in no dataset, each rendered in the studio at ``image_size`` and captioned once in a
    random dataset style: the prompts (``texts``), the slots each prompt states (``mentioned``), each
    person's true value index per slot (``truth``, the recognizer's classes) and the renders (uint8)."""

    def __init__(self, seed: int, n: int, image_size: tuple[int, int]):
        from ..config import rng_for
        from ..world import STYLES, caption, render, sample_person
        from ..world.attributes import attribute_vector
        from ..world.labels import HEADS
        from .mini import studio_state

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        rng = rng_for(seed, "generator-readback-prompts")  # its own stream: no dataset's people or captions
        self.texts, self.mentioned, self.truth, imgs = [], [], [], []
        for i in range(n):
            person = sample_person(rng, 10 ** 7 + i)
            state = studio_state(rng)
            text, slots = caption(person, state, STYLES[int(rng.integers(len(STYLES)))], rng)
            values = attribute_vector(person)
            self.texts.append(text)
            self.mentioned.append(set(slots))
            self.truth.append({s: HEADS[s].index(values[s]) for s in READBACK_SLOTS})
            imgs.append(render(person, state, int(image_size[0])))
        self.renders = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        if tuple(self.renders.shape[-2:]) != tuple(image_size):
            raise ValueError(f"renders came out {tuple(self.renders.shape[-2:])}, not the generator's {tuple(image_size)}")

    def __len__(self) -> int:
        return len(self.texts)


def read_back(recognizer, images: torch.Tensor, prompts: HeldOutPrompts, slots=READBACK_SLOTS) -> dict[str, tuple[float, int]]:
    """Per slot: ``(% of the prompts stating it whose true value the recognizer reads in the image, how many
    prompts state it)``; slots no prompt states are left out."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    pred = recognizer.predict(images)
    out = {}
    for s in slots:
        idx = [i for i, m in enumerate(prompts.mentioned) if s in m]
        if idx:
            got = pred[s].argmax(-1)[idx]
            want = torch.tensor([prompts.truth[i][s] for i in idx])
            out[s] = (100.0 * float((got == want).float().mean()), len(idx))
    return out


def readback_table(recognizer, vlm, sets: dict[str, torch.Tensor], prompts: HeldOutPrompts, slots=READBACK_SLOTS):
    """One row per image set and slot: ``read_back`` (%), ``prompts`` (how many state the slot),
    ``chance`` (100 / the slot's classes), and the four single-image filter criteria's mean scores
    (:data:`READBACK_CRITERIA`) with the share passing TIPS's seed filter (both of its scores >= 9)."""
    import pandas as pd

    from ..assistants.prompts import SYNCPR_CRITERIA
    from ..world.labels import HEADS

    rows = []
    for name, images in sets.items():
        scores = {}
        for col, crit in READBACK_CRITERIA.items():
            criterion = SYNCPR_CRITERIA[crit] if crit in SYNCPR_CRITERIA else crit
            needs_text = crit != "tips_quality" and crit != "naturalness"
            scores[col] = np.asarray(vlm.score(images, criterion, texts=list(prompts.texts) if needs_text else None), float)
        passed = 100.0 * float(((scores["TIPS alignment"] >= 9) & (scores["TIPS quality"] >= 9)).mean())
        for s, (pct, k) in read_back(recognizer, images, prompts, slots).items():
            rows.append({"images": name, "slot": s, "read_back": pct, "prompts": k, "chance": 100.0 / len(HEADS[s]),
                         **{c: float(v.mean()) for c, v in scores.items()}, "TIPS seed filter passed": passed})
    return pd.DataFrame(rows)
