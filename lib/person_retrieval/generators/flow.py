"""Rectified flow on Flux transformers: image codecs, token positions, the training loss, the sampler.

One code path serves the mini generator (pixel patches, the mini CLIP's text features) and FLUX.1-dev
(its VAE's packed latents, its CLIP and T5 encoders): both are a ``FluxTransformer2DModel`` that maps
noisy image tokens, text tokens and a timestep to a velocity.

Rectified flow (the objective Flux is trained with). With data ``x_0``, noise ``e ~ N(0, I)`` and
``t in [0, 1]``:

    x_t = (1 - t) x_0 + t e,        v*(x_t, t) = e - x_0,        L = E || v_theta(x_t, t, c) - (e - x_0) ||^2

Sampling integrates ``dx/dt = v`` from ``t = 1`` (noise) to ``t = 0`` with Euler steps; classifier-free
guidance mixes the conditional and unconditional velocities, ``v = v_u + g (v_c - v_u)``.

Conditionings, all without changing the architecture:

* **SPG** (size prefix): the text sequence is ``(C_size; C_sep; C_txt)``, see :func:`spg_condition`.
* **IDPG** (reference): the reference image's clean tokens are appended to the noisy target tokens with
  their own positions (first position axis = 1); the velocity is read, and the loss taken, on the target
  tokens only.
* **Dual panel**: the canvas is two crops wide; the prompt marks each panel (:func:`dual_condition`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Text conditioning
@dataclass
class Condition:
    """What a Flux transformer is conditioned on: a token sequence ``[B, L, D]`` and a pooled vector ``[B, P]``."""

    seq: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.seq.shape[0]

    def index(self, idx) -> "Condition":
        return Condition(self.seq[idx], self.pooled[idx])

    def to(self, device, dtype=None) -> "Condition":
        return Condition(self.seq.to(device, dtype), self.pooled.to(device, dtype))

    @staticmethod
    def cat(parts: list["Condition"]) -> "Condition":
        """Stack the conditions of several batches (their sequence lengths must agree)."""
        return Condition(torch.cat([p.seq for p in parts]), torch.cat([p.pooled for p in parts]))


class TextEncoder(Protocol):
    """``encode(texts, length)``: ``length=None`` gives the encoder's natural length for the batch,
    an int a fixed one (truncated or padded), so pieces can be concatenated across a batch."""

    def encode(self, texts: list[str], length: int | None = None) -> Condition: ...


#: The separator between the size condition and the prompt (TIPS: "via a separator token").
SEPARATOR = ";"
SIZE_TOKENS = 8  # fixed length of the size part, so a batch with and without it lines up
SEP_TOKENS = 3


def size_text(size: tuple[int, int] | None) -> str:
    """The size condition as text, ``"w_r, h_r"`` (TIPS); ``None`` is the dropped condition (empty)."""
    if size is None:
        return ""
    w, h = size
    if int(w) <= 0 or int(h) <= 0:
        raise ValueError(f"a size condition needs a positive width and height, got {size!r}")
    return f"{int(w)}, {int(h)}"


def spg_condition(encoder: TextEncoder, prompts: list[str], sizes: list[tuple[int, int] | None]) -> Condition:
    """SPG's condition ``(C_size; C_sep; C_txt)``: the size text and the prompt are encoded separately
    and concatenated along the sequence; a dropped size (``None``) is the empty text in the same slots.
    The pooled vector is the prompt's."""
    if len(prompts) != len(sizes):
        raise ValueError(f"{len(prompts)} prompts but {len(sizes)} size conditions")
    own = getattr(encoder, "encode_sizes", None)  # an encoder that cannot read numbers brings its own
    c_size = own(list(sizes)) if own is not None else encoder.encode([size_text(s) for s in sizes], SIZE_TOKENS).seq
    c_sep = encoder.encode([SEPARATOR] * len(prompts), SEP_TOKENS)
    c_txt = encoder.encode(list(prompts))
    return Condition(torch.cat([c_size, c_sep.seq, c_txt.seq], 1), c_txt.pooled)


def number_tokens(sizes: list[tuple[int, int] | None], dim: int, null: torch.Tensor, scale: float) -> torch.Tensor:
    """Size tokens ``[B, SIZE_TOKENS, dim]`` for a text encoder that never learned numbers: even slots hold
    sinusoidal features of ``log2 w_r``, odd slots of ``log2 h_r`` (the diffusion timestep's kind of
    embedding, norm ``scale``); a dropped size (``None``) keeps ``null`` (the empty text's slots). Every slot
    carries the size: measured at small, with the code in two of the eight slots the frozen base's attention
    gave them so little weight that the adapter's loss did not change when the size did."""
    out = null.expand(len(sizes), -1, -1).clone()
    half = dim // 2
    # Angular frequencies per unit of log2 size, geometric from 1/8 (a monotone, coarse code) to 8 (fine).
    freqs = 2.0 ** (torch.arange(half, dtype=torch.float32) / half * 6.0 - 3.0)
    for i, s in enumerate(sizes):
        if s is None:
            continue
        size_text(s)  # validates
        for slot in range(out.shape[1]):
            x = torch.log2(torch.tensor(float(s[slot % 2]))) * freqs
            emb = torch.cat([torch.sin(x), torch.cos(x)])
            out[i, slot, : 2 * half] = emb / emb.norm() * scale
    return out


def dual_prompts(left: list[str], right: list[str]) -> tuple[list[str], list[str]]:
    """The panel-marked halves of a dual-panel prompt."""
    return [f"on the left: {t}" for t in left], [f"on the right: {t}" for t in right]


def dual_condition(encoder: TextEncoder, left: list[str], right: list[str],
                   lengths: tuple[int, int] | None = None) -> Condition:
    """A two-panel canvas's condition: each panel's marked prompt encoded on its own (so neither is cut
    by the encoder's context) and concatenated; the pooled vector is their mean. ``lengths`` fixes each
    half's length (the unconditional input ``("", "")`` keeps the panel marks)."""
    lp, rp = dual_prompts(left, right)
    a, b = encoder.encode(lp, lengths and lengths[0]), encoder.encode(rp, lengths and lengths[1])
    return Condition(torch.cat([a.seq, b.seq], 1), (a.pooled + b.pooled) / 2)


# ---------------------------------------------------------------------------------------------
# Image codecs: images <-> token sequences
class PixelCodec:
    """Pixel space: every ``p x p`` RGB patch, scaled to [-1, 1], is one token of ``3 p^2`` values."""

    def __init__(self, patch: int):
        self.patch = int(patch)
        self.channels = 3 * self.patch ** 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float ``[B, 3, H, W]`` -> tokens ``[B, N, 3 p^2]`` in [-1, 1]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        b, c, h, w = x.shape
        gh, gw = self.grid(h, w)
        p = self.patch
        x = x * 2 - 1
        return x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens -> images ``[B, 3, H, W]`` in [0, 1]."""
        gh, gw = self.grid(height, width)
        p, b = self.patch, tokens.shape[0]
        x = tokens.float().reshape(b, gh, gw, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, height, width)
        return ((x + 1) / 2).clamp(0, 1)


class PackedLatentCodec:
    """Latent space, as FLUX.1-dev packs it: an autoencoder's latents, shifted and scaled, packed 2x2 into
    tokens. Subclasses give the autoencoder: ``factor`` (its downsampling), ``latent_channels``, and
    ``latents(x)`` / ``pixels(z)`` between images in [-1, 1] and raw latents."""

    factor: int
    latent_channels: int
    shift: float = 0.0
    scale: float = 1.0

    @property
    def channels(self) -> int:
        return self.latent_channels * 4

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.factor * 2
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be a multiple of {f} (autoencoder factor {self.factor} x packing 2)")
        return height // f, width // f

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float ``[B, 3, H, W]`` -> tokens ``[B, N, 4 c]``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        self.grid(*x.shape[-2:])
        z = (self.latents(x * 2 - 1).float() - self.shift) * self.scale
        b, c, h, w = z.shape
        return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens -> images ``[B, 3, H, W]`` in [0, 1]."""
        gh, gw = self.grid(height, width)
        b, c = tokens.shape[0], self.latent_channels
        z = tokens.float().reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * 2, gw * 2)
        x = self.pixels(z / self.scale + self.shift)
        return ((x.float() + 1) / 2).clamp(0, 1)


class VaeCodec(PackedLatentCodec):
    """FLUX.1-dev's latent space: its VAE (``AutoencoderKL``), with the shift and scale of its config."""

    def __init__(self, vae):
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self.shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mode()

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.device, self.vae.dtype), return_dict=False)[0]


def image_ids(grid: tuple[int, int], index: int = 0, device=None) -> torch.Tensor:
    """Flux's 3-axis token positions ``[N, 3]``: ``(index, row, column)``. The target is index 0, a
    reference image index 1 (its own positions, as in-context Flux models place a condition image)."""
    gh, gw = grid
    ids = torch.zeros(gh, gw, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(gh, device=device)[:, None]
    ids[..., 2] = torch.arange(gw, device=device)[None, :]
    return ids.reshape(gh * gw, 3)


# ---------------------------------------------------------------------------------------------
def velocity(transformer, x: torch.Tensor, cond: Condition, t: torch.Tensor, img_ids: torch.Tensor,
             guidance: float | None = None) -> torch.Tensor:
    """One transformer call: the predicted velocity for every image token of ``x``."""
    txt_ids = torch.zeros(cond.seq.shape[1], 3, device=x.device, dtype=img_ids.dtype)
    kw = {}
    inner = getattr(transformer, "module", transformer)  # attributes live on the model inside a DDP wrapper
    if getattr(inner.config, "guidance_embeds", False):  # FLUX.1-dev's distilled guidance
        kw["guidance"] = torch.full((x.shape[0],), float(guidance if guidance is not None else 3.5), device=x.device, dtype=x.dtype)
    return transformer(hidden_states=x, encoder_hidden_states=cond.seq.to(x.dtype), pooled_projections=cond.pooled.to(x.dtype),
                       timestep=t.to(x.dtype), img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **kw)[0]


def predicted_velocity(out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """The velocity from the network's output: the output itself (``"velocity"``, Flux's own), or, for a
    network that predicts the clean image (``"sample"``), ``v = (x_t - x0_hat) / t`` (``t`` floored at
    :data:`T_FLOOR`). Predicting the image is what makes pixel-space transformers with large patches
    work (Li and He, 2025, "Back to Basics: Let Denoising Generative Models Denoise"): a clean patch lies
    near a low-dimensional manifold, the noise in it does not, and a small network cannot carry 192
    noise values through itself; the loss stays the velocity loss of rectified flow."""
    if prediction == "velocity":
        return out
    if prediction == "sample":
        tt = t.clamp_min(T_FLOOR).reshape(-1, *[1] * (xt.ndim - 1))
        return (xt - out) / tt
    raise ValueError(f"prediction must be 'velocity' or 'sample', got {prediction!r}")


T_FLOOR = 0.05


def flow_matching_loss(transformer, x0: torch.Tensor, cond: Condition, grid: tuple[int, int],
                       reference: torch.Tensor | None = None, ref_grid: tuple[int, int] | None = None,
                       guidance: float | None = None, generator: torch.Generator | None = None,
                       prediction: str = "velocity") -> torch.Tensor:
    """The rectified-flow loss on target tokens ``x0 [B, N, C]`` (module docstring). ``t`` is drawn
    logit-normal (SD3 and Flux trainers), which spends more steps on the middle of the path. With a
    ``reference`` its clean tokens join the sequence and the loss stays on the target tokens."""
    b, n, _ = x0.shape
    dev = x0.device
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    t = torch.sigmoid(torch.randn(b, generator=generator, device=dev)).to(x0.dtype)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    ids = image_ids(grid, 0, dev)
    if reference is not None:
        xt = torch.cat([xt, reference.to(xt.dtype)], 1)
        ids = torch.cat([ids, image_ids(ref_grid or grid, 1, dev)])
    v = predicted_velocity(velocity(transformer, xt, cond, t, ids, guidance)[:, :n], xt[:, :n], t, prediction)
    return F.mse_loss(v.float(), (noise - x0).float())


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0; ``shift > 1`` spends more of them near the noise end
    (Flux's resolution-dependent shift, ``t' = s t / (1 + (s - 1) t)``)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(transformer, cond: Condition, grid: tuple[int, int], channels: int, *, steps: int = 28,
                 guidance_scale: float = 1.0, null: Condition | None = None, reference: torch.Tensor | None = None,
                 ref_grid: tuple[int, int] | None = None, seed: int = 0, shift: float = 1.0,
                 flux_guidance: float | None = None, device=None, dtype=torch.float32, prediction: str = "velocity",
                 partial: Condition | None = None, partial_scale: float = 0.0, reference_scale: float = 0.0) -> torch.Tensor:
    """Integrate the flow from noise to tokens ``[B, N, channels]``. Deterministic given ``seed`` (the
    noise comes from a seeded generator on the CPU). ``guidance_scale > 1`` with ``null`` is
    classifier-free guidance; ``flux_guidance`` is FLUX.1-dev's distilled guidance input instead.

    ``partial`` (the condition with one part left out, e.g. SPG's prompt without its size) adds a second
    guidance term for that part alone, as InstructPix2Pix guides its two conditions with two scales:
    ``v = v_u + g (v_c - v_u) + partial_scale (v_c - v_partial)``.

    ``reference_scale`` guides on the ``reference`` image as InstructPix2Pix guides on its input image:
    ``v += reference_scale (v_u - v_u without the reference's tokens)``, i.e. image guidance
    ``1 + reference_scale`` (it needs ``null``)."""
    if reference_scale and (reference is None or null is None or guidance_scale == 1.0):
        raise ValueError("reference_scale guides on the reference image against the empty prompt: "
                         "it needs a reference, a null condition and guidance_scale != 1")
    device = device or next(transformer.parameters()).device
    b, n = len(cond), grid[0] * grid[1]
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(b, n, channels, generator=g).to(device, dtype)
    ids = image_ids(grid, 0, device)
    cfg = guidance_scale != 1.0 and null is not None
    c = cond.to(device, dtype)
    nl = None
    if cfg:
        nl = null.to(device, dtype)
        if len(nl) == 1 and b > 1:
            nl = Condition(nl.seq.expand(b, -1, -1), nl.pooled.expand(b, -1))
    # One call for both halves of guidance when the sequences line up, two otherwise (never padding,
    # which would change what the tokens attend to).
    joint = cfg and nl.seq.shape[1] == c.seq.shape[1]
    if joint:
        c = Condition.cat([c, nl])
    part = None if partial is None else partial.to(device, dtype)
    ref = None
    if reference is not None:
        ref = reference.to(device, dtype)
        ids = torch.cat([ids, image_ids(ref_grid or grid, 1, device)])

    def v_of(x_in, cnd, t, with_ref=True):
        use_ref = ref is not None and with_ref  # without it: the target's tokens and positions alone
        if use_ref:
            r = ref if x_in.shape[0] == ref.shape[0] else torch.cat([ref] * (x_in.shape[0] // ref.shape[0]))
            x_in = torch.cat([x_in, r], 1)
        out = velocity(transformer, x_in, cnd, t.expand(x_in.shape[0]), ids if use_ref else ids[:n], flux_guidance)[:, :n].to(dtype)
        return predicted_velocity(out, x_in[:, :n], t.expand(x_in.shape[0]), prediction)

    ts = timesteps(steps, shift).to(device)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        if joint:
            vc, vu = v_of(torch.cat([x, x]), c, t).chunk(2)
        else:
            vc = v_of(x, c, t)
            vu = v_of(x, nl, t) if cfg else None
        v = vu + guidance_scale * (vc - vu) if cfg else vc
        if partial is not None and partial_scale:
            v = v + partial_scale * (vc - v_of(x, part, t))
        if reference_scale:
            v = v + reference_scale * (vu - v_of(x, nl, t, with_ref=False))
        x = x + (t_next - t) * v
    return x

