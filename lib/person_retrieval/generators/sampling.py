"""One sampling front end for every generator: the mini one and FLUX.1-dev.

:class:`FlowGenerator` holds a Flux transformer (with its named LoRA adapters), an image codec and a
text encoder, and offers the papers' four uses:

* ``generate(prompts)``: plain text-to-image (the base model, no adapter);
* ``spg(prompts, sizes)``: TIPS's seed person generator, size condition ``(w_r, h_r)`` or ``None``;
* ``idpg(references, prompts)``: TIPS's identity-preserving expansion of reference images;
* ``dual(left, right)``: SynCPR's two-panel canvas cropped into a pair, with ``beta`` per sample
  (SynCPR's dynamic LoRA strength).

Images come back as uint8 tensors ``[B, 3, H, W]``, as the datasets' loaders give them. Deterministic:
the same seed, prompts and batch size give the same images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .flow import Condition, dual_condition, euler_sample, spg_condition
from .lora import adapter as adapter_ctx


class FlowGenerator:
    def __init__(self, transformer, codec, text, image_size: tuple[int, int], *, steps: int = 28, guidance: float = 3.0,
                 shift: float = 1.0, flux_guidance: float | None = None, batch: int = 64, device=None,
                 dtype: torch.dtype = torch.float32, prediction: str = "velocity", size_guidance: float = 0.0,
                 spg_guidance: float | None = None, reference_guidance: float = 0.0):
        self.transformer = transformer.eval()
        self.codec, self.text = codec, text
        self.image_size = tuple(int(v) for v in image_size)
        self.steps, self.guidance, self.shift, self.flux_guidance = int(steps), float(guidance), float(shift), flux_guidance
        self.batch = int(batch)
        self.device = device or next(transformer.parameters()).device
        self.dtype = dtype
        self.prediction = prediction  # what the transformer outputs: "velocity" (Flux) or "sample"
        self.size_guidance = float(size_guidance)  # SPG: a second guidance term on the size alone
        self.spg_guidance = None if spg_guidance is None else float(spg_guidance)  # SPG's own scale (None: ``guidance``)
        self.reference_guidance = float(reference_guidance)  # IDPG: extra guidance on the reference image

    @property
    def adapters(self) -> list[str]:
        return sorted(getattr(self.transformer, "peft_config", {}) or {})

    # -- the one loop ----------------------------------------------------------------------------
    def _run(self, cond: Condition, null: Condition | None, size: tuple[int, int], seed: int, name: str | None,
             beta: float | Sequence[float], reference: torch.Tensor | None = None, steps: int | None = None,
             partial: Condition | None = None, partial_scale: float = 0.0, guidance: float | None = None,
             reference_scale: float = 0.0) -> torch.Tensor:
        H, W = size
        grid = self.codec.grid(H, W)
        n = len(cond)
        betas = [float(beta)] * n if not isinstance(beta, Sequence) else [float(b) for b in beta]
        if len(betas) != n:
            raise ValueError(f"{len(betas)} beta values for {n} samples")
        if null is not None and len(null) not in (1, n):
            raise ValueError(f"{len(null)} unconditional inputs for {n} samples (give one, or one per sample)")
        out = torch.empty(n, 3, H, W, dtype=torch.uint8)
        ref_tokens = self.codec.encode(reference) if reference is not None else None
        for b_val in sorted(set(betas)):  # the LoRA strength is per adapter: one pass per value
            idx = [i for i, b in enumerate(betas) if b == b_val]
            with adapter_ctx(self.transformer, name, b_val):
                for k in range(0, len(idx), self.batch):
                    part = idx[k: k + self.batch]
                    nl = null if null is None or len(null) == 1 else null.index(part)
                    tok = euler_sample(self.transformer, cond.index(part), grid, self.codec.channels, steps=steps or self.steps,
                                       guidance_scale=self.guidance if guidance is None else guidance, null=nl, seed=seed * 100003 + part[0],
                                       reference=None if ref_tokens is None else ref_tokens[part], shift=self.shift,
                                       flux_guidance=self.flux_guidance, device=self.device, dtype=self.dtype,
                                       prediction=self.prediction, partial=None if partial is None else partial.index(part),
                                       partial_scale=partial_scale, reference_scale=reference_scale)
                    img = self.codec.decode(tok, H, W)
                    out[part] = (img * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu()
        return out

    def _null(self) -> Condition:
        return self.text.encode([""])

    # -- the papers' uses ----------------------------------------------------------------------------
    def generate(self, prompts: list[str], seed: int = 0, adapter: str | None = None, beta: float = 1.0) -> torch.Tensor:
        """Text to image (the base model unless ``adapter`` is named)."""
        return self._run(self.text.encode(list(prompts)), self._null(), self.image_size, seed, adapter, beta)

    def spg(self, prompts: list[str], sizes: Sequence[tuple[int, int] | None] | tuple[int, int] | None = None, seed: int = 0,
            beta: float = 1.0, adapter: str = "spg", size_guidance: float | None = None) -> torch.Tensor:
        """Seed person images at the fixed physical resolution, with clarity set by the size condition
        ``(w_r, h_r)`` (one for all, one per prompt, or ``None``: the adapter's own default).
        ``size_guidance`` (default: the generator's) adds guidance on the size alone, against the same
        prompt without it."""
        prompts = list(prompts)
        if sizes is None or (isinstance(sizes, tuple) and len(sizes) == 2 and all(isinstance(v, int) for v in sizes)):
            sizes = [sizes] * len(prompts)  # type: ignore[list-item]
        cond = spg_condition(self.text, prompts, list(sizes))
        # Guidance's other branch is the empty prompt without a size (SPG's training drops both for 10%):
        # guiding on the size alone, with the prompt in both branches, left the samples without a person.
        null = spg_condition(self.text, [""], [None])
        g_size = self.size_guidance if size_guidance is None else float(size_guidance)
        no_size = spg_condition(self.text, prompts, [None] * len(prompts)) if g_size else None
        return self._run(cond, null, self.image_size, seed, adapter, beta, partial=no_size, partial_scale=g_size,
                         guidance=self.spg_guidance)

    def idpg(self, references: torch.Tensor, prompts: list[str], seed: int = 0, beta: float = 1.0,
             adapter: str = "idpg", reference_guidance: float | None = None) -> torch.Tensor:
        """New images of each reference's person, changed as each difference prompt says.
        ``reference_guidance`` (default: the generator's) adds guidance on the reference image, against
        the same empty prompt without it (InstructPix2Pix's image guidance, minus one)."""
        if len(references) != len(prompts):
            raise ValueError(f"{len(references)} reference images but {len(prompts)} difference prompts")
        H, W = self.image_size
        if tuple(references.shape[-2:]) != (H, W):
            raise ValueError(f"reference images must be {H}x{W} (the generator's resolution), got {tuple(references.shape[-2:])}")
        g_ref = self.reference_guidance if reference_guidance is None else float(reference_guidance)
        return self._run(self.text.encode(list(prompts)), self._null(), self.image_size, seed, adapter, beta, reference=references,
                         reference_scale=g_ref)

    def dual(self, left: list[str], right: list[str], seed: int = 0, beta: float | Sequence[float] = 1.0,
             adapter: str = "dual") -> tuple[torch.Tensor, torch.Tensor]:
        """One person in two states: a canvas two crops wide, cropped into ``(left, right)`` images."""
        if len(left) != len(right):
            raise ValueError(f"{len(left)} left prompts but {len(right)} right prompts")
        H, W = self.image_size
        null = dual_condition(self.text, [""], [""])  # the panel marks without captions, as in training
        canvas = self._run(dual_condition(self.text, list(left), list(right)), null, (H, 2 * W), seed, adapter, beta)
        return canvas[..., :W].contiguous(), canvas[..., W:].contiguous()
