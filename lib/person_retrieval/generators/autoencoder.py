"""The mini generator's latent space: a small convolutional autoencoder trained here on the world.

FLUX.1-dev denoises in the latent space of its VAE and packs 2x2 latents into one token; the mini
generator does the same with :class:`MiniAutoencoder` (4x down, 8 channels: a 64x32 image is 16x8
latents, 8x4 = 32 tokens of 32 values). Why latent rather than pixel space (measured at small, on this
2-core CPU, against the pixel-space generator of 4x4 patches):

* the transformer sees 32 image tokens instead of 128, so it trains about 2.5x as many samples a second;
* the decoder only draws what reconstructs world images: the pixel-space samples carried a patch-grain
  texture (18% of their spectral energy above 0.25 cycles/pixel, against 3-7% in the target images)
  that swamped the blur the size condition must control.

The autoencoder is trained once per ``(scale, seed)`` on a broad set (the studio rendering and world
training images, every capture size), as FLUX's VAE is trained on far more than any one target domain,
with an L1 reconstruction loss, a small penalty on the latents' size and a little latent noise (so
nearby latents decode to nearby images: what a denoiser's slightly-off outputs need). Its latents are
then shifted and scaled to zero mean and unit variance (FLUX's ``shift_factor`` and ``scaling_factor``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow import PackedLatentCodec


class _Res(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.a = nn.Conv2d(width, width, 3, 1, 1)
        self.b = nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, x):
        return x + self.b(F.silu(self.a(F.silu(x))))


class MiniAutoencoder(nn.Module):
    """``factor x factor`` patches in (a strided convolution), residual 3x3 convolutions at the latent
    resolution, ``channels`` latents. The decoder mirrors it, then doubles the resolution with nearest
    upsampling and a 3x3 convolution until it is back at the image's (halving the width each time), as
    VAE decoders do. Drawing each patch at once with a transposed convolution (the first design) printed a
    block grid on every sample, at 4 pixels a period: measured at small, that grid carried most of the
    samples' high-frequency energy and hid the blur SPG controls. Images in [-1, 1]."""

    def __init__(self, channels: int = 8, width: int = 64, factor: int = 4, blocks: int = 2):
        super().__init__()
        self.channels, self.width, self.factor, self.blocks = int(channels), int(width), int(factor), int(blocks)
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"the autoencoder's factor must be a power of two, got {factor}")
        self.encoder = nn.Sequential(nn.Conv2d(3, width, factor, factor), *[_Res(width) for _ in range(blocks)], nn.SiLU(),
                                     nn.Conv2d(width, channels, 1))
        up, w = [], width
        for _ in range(factor.bit_length() - 1):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, max(w // 2, 8), 3, 1, 1), nn.SiLU()]
            w = max(w // 2, 8)
        self.decoder = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), *[_Res(width) for _ in range(blocks)], nn.SiLU(),
                                     *up, nn.Conv2d(w, 3, 3, 1, 1))

    def forward(self, x, latent_noise: float = 0.0, return_latent: bool = False):
        """The reconstruction (and the latent, with ``return_latent``); ``latent_noise`` adds Gaussian noise of
        that std to the latent first (training). Training calls this, not the two halves, so that it runs
        through DistributedDataParallel's forward."""
        z = self.encoder(x)
        y = self.decoder(z + latent_noise * torch.randn_like(z) if latent_noise else z)
        return (y, z) if return_latent else y


class MiniLatentCodec(PackedLatentCodec):
    """:class:`MiniAutoencoder` as an image codec (tokens of 2x2 packed, normalised latents)."""

    def __init__(self, ae: MiniAutoencoder, shift: float = 0.0, scale: float = 1.0):
        self.ae = ae.eval().requires_grad_(False)
        self.factor, self.latent_channels = ae.factor, ae.channels
        self.shift, self.scale = float(shift), float(scale)

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.ae.parameters()).device
        return torch.cat([self.ae.encoder(x[s: s + 512].to(dev)).cpu() for s in range(0, len(x), 512)])

    @torch.no_grad()
    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        dev = next(self.ae.parameters()).device
        return torch.cat([self.ae.decoder(z[s: s + 512].to(dev)).cpu() for s in range(0, len(z), 512)])


def save_codec(codec: MiniLatentCodec, path: str | Path) -> Path:
    """The autoencoder's weights with its shape, shift and scale in the safetensors metadata (atomically)."""
    from safetensors.torch import save_file

    ae = codec.ae
    meta = {"format": "person_retrieval-autoencoder-2", "channels": str(ae.channels), "width": str(ae.width),
            "factor": str(ae.factor), "blocks": str(ae.blocks), "shift": repr(codec.shift), "scale": repr(codec.scale)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_codec(path: str | Path) -> MiniLatentCodec:
    """A codec saved by :func:`save_codec`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder file at {path} (mini_generators trains and caches it)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "person_retrieval-autoencoder-2":
        raise ValueError(f"{path} is not an autoencoder written by save_codec (metadata {meta})")
    ae = MiniAutoencoder(int(meta["channels"]), int(meta["width"]), int(meta["factor"]), int(meta["blocks"]))
    ae.load_state_dict(load_file(str(path)))
    return MiniLatentCodec(ae, float(meta["shift"]), float(meta["scale"]))




def fitted_codec(ae: MiniAutoencoder, images: torch.Tensor) -> MiniLatentCodec:
    """The codec with the shift and scale that give ``images``' latents zero mean and unit variance."""
    codec = MiniLatentCodec(ae)
    z = codec.latents(images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images * 2 - 1)
    codec.shift, codec.scale = float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))
    return codec
