"""The real path: FLUX.1-dev through diffusers, with the same LoRA, size-prefix, reference and dual-panel
code as the mini generator.

    pipe = load_flux("FLUX.1-dev")                 # a local folder, or a name under PR_WEIGHTS_DIR
    gen = flux_generator(pipe)                     # FlowGenerator: .spg / .idpg / .dual / .generate
    add_lora(pipe.transformer, "spg", rank=32)     # TIPS's rank
    opt = lora_optimizer(pipe.transformer)         # TIPS: AdamW, lr 1e-5, weight decay 0.01
    loss = lora_loss(gen, "spg", images, prompts, sizes=sizes); loss.backward(); opt.step()

TIPS's settings are the defaults (:data:`TIPS_DEFAULTS`): rank 32, lr 1e-5 with a 10-step warmup,
weight decay 0.01, batch 1 with 2-step accumulation, 192x384 images, 28 sampling steps. Nothing is
downloaded: a missing folder raises an error naming where to put it.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import torch

from .flow import Condition, VaeCodec, dual_condition, flow_matching_loss, spg_condition
from .lora import FLUX_ATTENTION
from .sampling import FlowGenerator
from .weights import resolve_flux  # noqa: F401  (re-exported)

TIPS_DEFAULTS = dict(rank=32, lr=1e-5, warmup_steps=10, weight_decay=0.01, batch_size=1, grad_accum=2, steps=20000,
                     width=192, height=384, sample_steps=28, guidance=3.5, size_drop=0.2, prompt_drop=0.1)


class FluxText:
    """FLUX.1-dev's text inputs from its pipeline: T5's token sequence and CLIP's pooled vector."""

    def __init__(self, pipe, max_sequence_length: int = 512):
        self.pipe, self.max_sequence_length = pipe, int(max_sequence_length)

    @torch.no_grad()
    def encode(self, texts: list[str], length: int | None = None) -> Condition:
        dev = self.pipe.transformer.device
        seq, pooled, _ = self.pipe.encode_prompt(prompt=list(texts), prompt_2=list(texts), device=dev,
                                                 max_sequence_length=int(length or self.max_sequence_length))
        return Condition(seq, pooled)


def load_flux(weights: str | os.PathLike = "FLUX.1-dev", dtype: torch.dtype | None = None, device: str | None = None):
    """``FluxPipeline.from_pretrained`` on a local folder, offline; ``dtype`` None: bfloat16 on a GPU,
    float32 on the CPU (where bfloat16 matmuls are several times slower)."""
    from diffusers import FluxPipeline

    if dtype is None:
        dtype = torch.bfloat16 if device and str(device).startswith("cuda") else torch.float32
    pipe = FluxPipeline.from_pretrained(str(resolve_flux(weights)), torch_dtype=dtype, local_files_only=True)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):  # frozen: only LoRA adapters learn
        part.requires_grad_(False)
    if device:
        pipe.to(device)
    return pipe


def flux_shift(pipe, height: int, width: int) -> float:
    """FLUX.1-dev's resolution-dependent time shift ``exp(mu)`` for an image of ``height x width``."""
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sc = pipe.scheduler.config
    if not sc.get("use_dynamic_shifting", False):
        return float(sc.get("shift", 1.0))
    n = VaeCodec(pipe.vae).grid(height, width)
    mu = calculate_shift(n[0] * n[1], sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                         sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
    return math.exp(mu)


def flux_generator(pipe, height: int = TIPS_DEFAULTS["height"], width: int = TIPS_DEFAULTS["width"],
                   steps: int = TIPS_DEFAULTS["sample_steps"], guidance: float = TIPS_DEFAULTS["guidance"], batch: int = 4,
                   max_sequence_length: int = 512) -> FlowGenerator:
    """A :class:`FlowGenerator` over a loaded pipeline: VAE latents, FLUX's text encoders, its distilled
    guidance (no classifier-free pass) and its time shift."""
    t = pipe.transformer
    distilled = bool(getattr(t.config, "guidance_embeds", False))
    return FlowGenerator(t, VaeCodec(pipe.vae), FluxText(pipe, max_sequence_length), (height, width), steps=steps,
                         guidance=1.0 if distilled else guidance, flux_guidance=guidance if distilled else None,
                         shift=flux_shift(pipe, height, width), batch=batch, dtype=t.dtype)


def lora_optimizer(transformer, lr: float = TIPS_DEFAULTS["lr"], weight_decay: float = TIPS_DEFAULTS["weight_decay"]):
    """AdamW over the trainable (adapter) parameters only."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the transformer has no trainable parameters: add a LoRA adapter first (add_lora)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lora_loss(gen: FlowGenerator, kind: str, images: torch.Tensor, prompts: list[str], *, sizes=None,
              references: torch.Tensor | None = None, right: tuple[torch.Tensor, list[str]] | None = None,
              rng: random.Random | None = None) -> torch.Tensor:
    """One LoRA training loss of a ``kind`` of generator on a batch, the conditions built as at sampling:

    * ``"spg"``: ``sizes`` per image, each dropped (``None``) with probability 0.2;
    * ``"idpg"``: ``references`` beside the targets ``images``; prompts dropped (``""``) with probability 0.1;
    * ``"dual"``: ``images``/``prompts`` are the left panels, ``right = (images, prompts)`` the right ones;
    * ``"base"``: plain text-to-image.
    """
    rng = rng or random
    p_drop = TIPS_DEFAULTS
    if kind == "spg":
        if sizes is None or len(sizes) != len(prompts):
            raise ValueError("SPG training needs one size (w_r, h_r) per image")
        sizes = [None if rng.random() < p_drop["size_drop"] else s for s in sizes]
        cond, x = spg_condition(gen.text, list(prompts), sizes), images
    elif kind == "idpg":
        if references is None or len(references) != len(images):
            raise ValueError("IDPG training needs one reference image per target image")
        cond, x = gen.text.encode(["" if rng.random() < p_drop["prompt_drop"] else t for t in prompts]), images
    elif kind == "dual":
        if right is None:
            raise ValueError("dual-panel training needs the right panels: right=(images, prompts)")
        cond, x = dual_condition(gen.text, list(prompts), list(right[1])), torch.cat([images, right[0]], -1)
    elif kind == "base":
        cond, x = gen.text.encode(list(prompts)), images
    else:
        raise ValueError(f"unknown generator kind {kind!r}; expected spg, idpg, dual or base")
    tokens = gen.codec.encode(x).to(gen.dtype)
    ref = gen.codec.encode(references).to(gen.dtype) if kind == "idpg" else None
    grid = gen.codec.grid(*x.shape[-2:])
    return flow_matching_loss(gen.transformer, tokens, cond.to(tokens.device, gen.dtype), grid, reference=ref,
                              ref_grid=gen.codec.grid(*references.shape[-2:]) if ref is not None else None,
                              guidance=gen.flux_guidance, prediction=gen.prediction)


def train_flux_lora(gen: FlowGenerator, kind: str, target, steps: int = TIPS_DEFAULTS["steps"], *, rank: int = TIPS_DEFAULTS["rank"],
                    lr: float = TIPS_DEFAULTS["lr"], batch_size: int = TIPS_DEFAULTS["batch_size"],
                    grad_accum: int = TIPS_DEFAULTS["grad_accum"], warmup_steps: int = TIPS_DEFAULTS["warmup_steps"],
                    seed: int = 0, out_file: str | os.PathLike | None = None, progress: bool = True) -> list[float]:
    """Train adapter ``kind`` (``"spg"``, ``"idpg"`` or ``"dual"``) on a few-shot :class:`~.mini.TargetSet`
    with TIPS's recipe (AdamW, linear warmup, batch 1 x 2 accumulation). IDPG's difference prompt is
    the target image's caption here (TIPS has an MLLM write one). Returns the loss per optimizer step;
    ``out_file`` saves the adapter (:func:`~.lora.save_lora`). ``train.limits()["max_steps"]`` caps ``steps``
    (the one cap every training run honours)."""
    from .lora import add_lora, save_lora, use_adapter

    steps = lora_steps(steps)

    add_lora(gen.transformer, kind, rank)
    use_adapter(gen.transformer, kind)
    gen.transformer.train()
    opt = lora_optimizer(gen.transformer, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup_steps)))
    rng = random.Random(seed)
    pairs = target.pairs()
    caps = target.captions
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"FLUX LoRA {kind}", mininterval=2.0)
    history = []
    for _ in it:
        total = 0.0
        for _ in range(grad_accum):
            if kind == "spg":
                idx = [rng.randrange(len(caps)) for _ in range(batch_size)]
                loss = lora_loss(gen, kind, target.images[idx], [rng.choice(caps[i]) for i in idx],
                                 sizes=[target.sizes[i] for i in idx], rng=rng)
            else:
                pr = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
                a, b = [x for x, _ in pr], [y for _, y in pr]
                if kind == "idpg":
                    loss = lora_loss(gen, kind, target.images[b], [caps[i][0] for i in b], references=target.images[a], rng=rng)
                else:
                    loss = lora_loss(gen, kind, target.images[a], [caps[i][0] for i in a],
                                     right=(target.images[b], [caps[i][-1] for i in b]), rng=rng)
            (loss / grad_accum).backward()
            total += float(loss) / grad_accum
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append(total)
    gen.transformer.eval()
    for p in gen.transformer.parameters():  # trained: nothing downstream (sampling, figures) should carry grad
        p.requires_grad_(False)
    if out_file is not None:
        save_lora(gen.transformer, kind, out_file)
    return history


def lora_steps(steps: int = TIPS_DEFAULTS["steps"]) -> int:
    """The LoRA training steps a run takes: ``steps`` capped by ``train.limits()["max_steps"]``."""
    from ..limits import limits

    cap = limits()["max_steps"]
    return int(steps) if cap is None else min(int(steps), int(cap))


def lora_folder(dataset: str, seed: int, rank: int, steps: int = TIPS_DEFAULTS["steps"]) -> Path:
    """Where the FLUX.1-dev LoRAs of ``(dataset, seed, rank)`` are saved: ``.cache/models/flux-<dataset>-seed<seed>-r<rank>``,
    suffixed ``-steps<N>`` when they were trained for other than TIPS's 20,000 steps (``steps`` or the run's
    ``max_steps`` cap), so a shortened run never stands in for a full one."""
    from ..config import cache_dir

    n = lora_steps(steps)
    return cache_dir() / "models" / (f"flux-{dataset}-seed{seed}-r{int(rank)}" + ("" if n == TIPS_DEFAULTS["steps"] else f"-steps{n}"))


def lora_rank(folder) -> int:
    """The rank in a :func:`lora_folder` name."""
    return int(re.search(r"-r(\d+)(-steps\d+)?$", Path(folder).name).group(1))


def find_lora_folder(dataset: str, seed: int, adapters, steps: int = TIPS_DEFAULTS["steps"], rank: int | None = None) -> Path | None:
    """The folder holding every LoRA of ``adapters`` for ``(dataset, seed)`` trained for ``steps`` (capped as
    :func:`lora_folder` says), whatever its rank (``rank`` None; the rank is read from each file when it is
    loaded): TIPS's rank 32 first, then the highest. None when there is none."""
    from ..config import cache_dir

    tail = lora_folder(dataset, seed, 1, steps).name.split("-r1", 1)[1]
    found = []
    for d in (cache_dir() / "models").glob(f"flux-{dataset}-seed{seed}-r*"):
        m = re.fullmatch(rf"flux-{re.escape(dataset)}-seed{seed}-r(\d+){re.escape(tail)}", d.name)
        if m and (rank is None or int(m.group(1)) == rank) and all((d / f"{a}.safetensors").is_file() for a in adapters):
            found.append((int(m.group(1)) != TIPS_DEFAULTS["rank"], -int(m.group(1)), d))
    return min(found)[2] if found else None


def flux_loras(pipe, gen: FlowGenerator, dataset: str, root, seed: int = 0, adapters=("spg", "idpg", "dual"), rank: int | None = None,
               steps: int = TIPS_DEFAULTS["steps"], progress: bool = True, log=print) -> tuple[Path, dict]:
    """The LoRA ``adapters`` of FLUX.1-dev for ``dataset`` on ``pipe.transformer``: loaded from the folder that
    holds them (:func:`find_lora_folder`, any rank when ``rank`` is None), or trained now on TIPS's few-shot
    set of the dataset at ``root`` (100 identities x 3 images, fewer when the folder has fewer) with
    :func:`train_flux_lora` (``steps`` capped by ``max_steps``; rank 32 when None) and saved, saying so through
    ``log``. Returns ``(folder, {adapter: {"loss": last loss}} for those trained now)``."""
    from .lora import load_lora

    folder = find_lora_folder(dataset, seed, adapters, steps, rank) or lora_folder(dataset, seed, rank or TIPS_DEFAULTS["rank"], steps)
    todo = [a for a in adapters if not (folder / f"{a}.safetensors").is_file()]
    report = {}
    if todo:
        n = lora_steps(steps)
        r = lora_rank(folder)
        log(f"training FLUX.1-dev LoRA {', '.join(todo)} on {dataset} at {root} ({n} steps, rank {r}); saved to {folder}")
        target = few_shot_target(dataset, root, gen.image_size, seed)
        for a in todo:
            report[a] = {"loss": train_flux_lora(gen, a, target, steps, rank=r, seed=seed,
                                                 out_file=folder / f"{a}.safetensors", progress=progress)[-1]}
    for a in adapters:
        if a not in todo:
            load_lora(pipe.transformer, folder / f"{a}.safetensors", a)
    return folder, report


def few_shot_target(dataset: str, root, image_size, seed: int = 0):
    """TIPS's few-shot set for the LoRAs: 100 identities x 3 images of ``dataset``'s train split at ``root``
    (as many as it has, at least 2, when fewer), at the generator's ``image_size``."""
    from ..datasets import load_split
    from .mini import mini_config, target_set

    cfg = mini_config("small", {"image_size": tuple(image_size)})
    split = load_split(dataset, root, "train", check_images=False)
    counts = {}
    for p in split.image_pids:
        counts[p] = counts.get(p, 0) + 1
    eligible = sum(c >= cfg.images_per_id for c in counts.values())
    if eligible < 2:
        raise ValueError(f"{dataset} at {root}: {eligible} identities with {cfg.images_per_id}+ images; the LoRAs' few-shot set needs 2")
    if eligible < cfg.target_ids:
        cfg = mini_config("small", {"image_size": tuple(image_size), "target_ids": eligible})
    return target_set(dataset, root, cfg, seed)


@torch.no_grad()
def pipeline_sample(pipe, cond: Condition, height: int = TIPS_DEFAULTS["height"], width: int = TIPS_DEFAULTS["width"],
                    steps: int = TIPS_DEFAULTS["sample_steps"], guidance: float = TIPS_DEFAULTS["guidance"], seed: int = 0) -> torch.Tensor:
    """Sample with ``FluxPipeline.__call__`` itself from a condition built here (an SPG size-prefixed or a
    dual-panel one): uint8 ``[B, 3, H, W]``."""
    dev = pipe.transformer.device
    out = pipe(prompt_embeds=cond.seq.to(dev, pipe.transformer.dtype), pooled_prompt_embeds=cond.pooled.to(dev, pipe.transformer.dtype),
               height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
               generator=torch.Generator().manual_seed(int(seed))).images
    return (out.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu()


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline of FLUX.1-dev's classes at a tiny, randomly initialised size, with tokenizers built
    in code: the real loading, LoRA and sampling code runs on it in seconds (tests, GPU timings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789,.;:")
    clip_vocab = {**{c: i for i, c in enumerate(letters)}, **{c + "</w>": len(letters) + i for i, c in enumerate(letters)}}
    clip_vocab.update({"<|startoftext|>": len(clip_vocab), "<|endoftext|>": len(clip_vocab) + 1})
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=clip_vocab["<|startoftext|>"], eos_token_id=clip_vocab["<|endoftext|>"],
                                        pad_token_id=clip_vocab["<|endoftext|>"]))
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
                         + [(c, -2.0 - i) for i, c in enumerate(letters)], extra_ids=0, model_max_length=512)
    t5 = T5EncoderModel(T5Config(vocab_size=len(letters) + 4, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    # four blocks: 8x down, as FLUX.1-dev's VAE (a 192x384 image is 24x48 latents, 12x24 tokens)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096, shift=3.0)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=transformer)


__all__ = ["FLUX_ATTENTION", "TIPS_DEFAULTS", "FluxText", "find_lora_folder", "few_shot_target", "flux_generator", "flux_loras",
           "flux_shift", "load_flux", "lora_folder", "lora_loss", "lora_steps",
           "lora_optimizer", "pipeline_sample", "train_flux_lora", "resolve_flux", "tiny_flux_pipeline"]
