"""The CLIP backbone over open_clip: a mini CLIP trained here, or real weights, with token outputs.

* ``build_backbone(weights=None, scale=...)``: a small CLIP-architecture model for the mini world: open_clip's
  CLIP with its text transformer and CLIP's own BPE vocabulary, and a convolutional image tower
  (:class:`.conv_tower.ConvTower`, whose map cells are the image tokens; ``vision="vit"`` gives open_clip's
  ``VisionTransformer`` instead). It is trained by :mod:`.pretrain`.
* ``build_backbone(weights="ViT-B-16")`` (or a local checkpoint path): the real model at 384x128, its
  position grid resized for the non-square input as IRRA does. Nothing is downloaded: a missing file
  raises an error saying which file and where to put it.

:class:`Backbone` returns pooled features *and* token features for both modalities (RDE, CECA, FAFA and
DiaNA need tokens), and can drop padding beyond the longest caption of a batch (exact, since CLIP's
text attention is causal).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import cache_dir

CLIP_CONTEXT = 77


@dataclass(frozen=True)
class MiniClipConfig:
    embed_dim: int = 128
    image_size: tuple[int, int] = (128, 64)  # (height, width)
    patch_size: int = 16
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 3
    head_width: int = 32
    context_length: int = CLIP_CONTEXT
    #: Keep the 49,408 x width token table at its random initialisation (the world's texts use a few
    #: hundred of CLIP's tokens, and a trainable table costs a dense 49,408-row gradient every step).
    #: Off by default: measured at small, it trains 7-13% faster on the CPU but learns much less
    #: (validation R1 6.8 against 11.7 after three pretraining epochs).
    freeze_token_embedding: bool = False
    #: The image tower: "conv" (:class:`.conv_tower.ConvTower`, trained on attributes first, then locked
    #: while the text tower learns to meet it) or "vit" (open_clip's VisionTransformer, trained with the
    #: text tower from scratch: the first mini CLIP, which read only the coarse colours).
    vision: str = "conv"
    conv_width: int = 32
    conv_depth: int = 2
    conv_hidden: int = 256


MINI_CONFIGS = {
    "tiny": MiniClipConfig(embed_dim=64, image_size=(64, 32), patch_size=8, vision_width=64, vision_layers=2,
                           text_width=64, text_layers=2, head_width=32, conv_width=8, conv_depth=1, conv_hidden=64),
    "small": MiniClipConfig(),
}


def weights_dir() -> Path:
    """Where real weights are looked for by name (``PR_WEIGHTS_DIR`` overrides)."""
    return Path(os.environ.get("PR_WEIGHTS_DIR") or cache_dir() / "weights")


class Backbone(nn.Module):
    """A CLIP model with pooled and token outputs for images and texts.

    ``encode_image(x) -> (pooled [B, D], tokens [B, N, D])`` (patch tokens, projected);
    ``encode_text(ids) -> (pooled [B, D], tokens [B, L, D])`` (EOT-pooled, as CLIP).
    """

    def __init__(self, clip: nn.Module, tokenizer, name: str, config: dict | None = None):
        super().__init__()
        self.clip = clip
        self.clip.visual.output_tokens = True
        self.tokenizer = tokenizer
        self.name = name
        self.config = config or {}

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.image_size)  # type: ignore[return-value]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.clip.visual
        pooled, tokens = visual(images)
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return pooled, tokens

    def encode_text(self, ids: torch.Tensor, trim: bool = True, shared_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``shared_prefix``: the tokens every row of the batch begins with (DiaNA's system message) go
        through the transformer once, not once per row; the same function (causal attention), computed
        in a different order, so equal to float rounding. On CPU batches only (it reads ``ids``)."""
        c = self.clip
        if trim and ids.device.type == "cpu":  # drop padding beyond the longest caption (exact: causal mask)
            n = int((ids != 0).sum(1).max())  # (on a GPU this would be a sync: batches come pre-trimmed)
            ids = ids[:, : max(n, 1)]
        L = ids.shape[1]
        x = c.token_embedding(ids) + c.positional_embedding[:L]
        p = common_prefix(ids) if shared_prefix and ids.device.type == "cpu" and len(ids) > 1 else 0
        if 8 <= p < L:  # a prefix of a few tokens is not worth the second path
            head, rest = _blocks_with_shared_prefix(c.transformer.resblocks, x[:1, :p], x[:, p:])
            x = torch.cat([head.expand(len(ids), -1, -1), rest], 1)
        else:
            x = c.transformer(x, attn_mask=c.attn_mask[:L, :L])
        x = c.ln_final(x)
        tokens = x @ c.text_projection
        eot = ids.argmax(dim=-1)  # the end-of-text token has the largest id in CLIP's vocabulary
        pooled = tokens[torch.arange(ids.shape[0]), eot]
        return pooled, tokens

    def encode_text_ends(self, content: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Several prefixes of every text in one pass (DiaNA's rounds curve: a dialogue cut to N rounds is a
        prefix of the whole dialogue). ``content`` [B, m]: each text's tokens without its end-of-text token
        (0-padded); ``ends`` [B, K]: the lengths of K prefixes of each row (1 <= end <= the row's length).
        Returns tokens [B, m + K, D]: the first m as :meth:`encode_text` gives them for any prefix that
        holds them (the attention is causal: a token never sees what follows it), then K end-of-text
        tokens, the k-th placed at position ``ends[:, k]`` and attending to the first ``ends[:, k]`` tokens
        and itself, exactly the text cut there; no other token attends to them. So prefix k's pooled
        feature is ``tokens[:, m + k]``, equal to encoding it alone up to float rounding."""
        c = self.clip
        B, m = content.shape
        K = ends.shape[1]
        dev = content.device
        eot = torch.full((B, K), self._eot_id, dtype=content.dtype, device=dev)
        x = torch.cat([c.token_embedding(content) + c.positional_embedding[:m], c.token_embedding(eot) + c.positional_embedding[ends]], 1)
        col = torch.arange(m, device=dev)
        see = torch.zeros(B, m + K, m + K, dtype=torch.bool, device=dev)
        see[:, :m, :m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        see[:, m:, :m] = col.view(1, 1, m) < ends.unsqueeze(-1)  # end k sees the first ends[:, k] tokens
        see[:, m:, m:] = torch.eye(K, dtype=torch.bool, device=dev)  # and itself
        p = min(common_prefix(content) if B > 1 else 0, int(ends.min()))  # every row and every end sees the shared head
        if p >= 8:
            head, rest = _blocks_with_shared_prefix(c.transformer.resblocks, x[:1, :p], x[:, p:], see[:, p:, p:])
            x = torch.cat([head.expand(B, -1, -1), rest], 1)
        else:
            x = _blocks_with_shared_prefix(c.transformer.resblocks, None, x, see)[1]
        return c.ln_final(x) @ c.text_projection

    @property
    def _eot_id(self) -> int:
        return int(self.tokenize([""])[0].max())  # CLIP's end-of-text token: the largest id of its vocabulary

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        return self.encode_image(images)[0], self.encode_text(ids)[0]


def common_prefix(ids: torch.Tensor) -> int:
    """How many leading tokens every row of ``ids`` shares."""
    same = (ids == ids[:1]).all(0)
    return int(same.long().cumprod(0).sum())


def _blocks_with_shared_prefix(blocks, x_p: torch.Tensor | None, x_s: torch.Tensor,
                               see: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """CLIP's residual attention blocks over rows that all begin with the same ``p`` tokens: ``x_p``
    [1, p, D] goes through once (causally; None: no shared prefix); each row's rest ``x_s`` [B, s, D] attends
    to all of the prefix's keys and values and to its own as ``see`` allows ([s, s] or, per row, [B, s, s];
    True: may attend; default causal)."""
    B, s, D = x_s.shape
    p = 0 if x_p is None else x_p.shape[1]
    if see is None:
        see = torch.ones(s, s, dtype=torch.bool, device=x_s.device).tril()
    if p:
        see = torch.cat([torch.ones((*see.shape[:-1], p), dtype=torch.bool, device=see.device), see], -1)
    if see.dim() == 3:
        see = see.unsqueeze(1)  # one mask per row, the same for every head
    for blk in blocks:
        a = blk.attn
        H = a.num_heads
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
        merge = lambda o: o.transpose(1, 2).reshape(o.shape[0], -1, D)  # noqa: E731
        q_s, k_s, v_s = (heads(t) for t in F.linear(blk.ln_1(x_s), a.in_proj_weight, a.in_proj_bias).chunk(3, -1))
        if p:
            q_p, k_p, v_p = (heads(t) for t in F.linear(blk.ln_1(x_p), a.in_proj_weight, a.in_proj_bias).chunk(3, -1))
            o_p = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True)
            k_s, v_s = torch.cat([k_p.expand(B, -1, -1, -1), k_s], 2), torch.cat([v_p.expand(B, -1, -1, -1), v_s], 2)
            x_p = x_p + blk.ls_1(a.out_proj(merge(o_p)))
            x_p = x_p + blk.ls_2(blk.mlp(blk.ln_2(x_p)))
        o_s = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=see)
        x_s = x_s + blk.ls_1(a.out_proj(merge(o_s)))
        x_s = x_s + blk.ls_2(blk.mlp(blk.ln_2(x_s)))
    return x_p, x_s


# ---------------------------------------------------------------------------------------------
def _tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")  # CLIP's BPE vocabulary ships inside open_clip


def mini_clip(cfg: MiniClipConfig) -> Backbone:
    """A randomly initialised CLIP of the mini size (trained on the world by the pretraining step)."""
    import open_clip

    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                  layers=cfg.vision_layers, head_width=cfg.head_width)
    text = dict(context_length=cfg.context_length, vocab_size=49408, width=cfg.text_width,
                heads=max(1, cfg.text_width // cfg.head_width), layers=cfg.text_layers)
    model = open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)
    if cfg.vision == "conv":
        from .conv_tower import ConvTower

        model.visual = ConvTower(cfg.image_size, cfg.embed_dim, cfg.conv_width, cfg.conv_depth, cfg.conv_hidden)
    elif cfg.vision != "vit":
        raise ValueError(f"MiniClipConfig.vision must be 'conv' or 'vit', got {cfg.vision!r}")
    model.token_embedding.weight.requires_grad_(not cfg.freeze_token_embedding)
    return Backbone(model, _tokenizer(), "mini-clip", asdict(cfg))


def build_backbone(weights: str | None = None, scale: str = "small", image_size: tuple[int, int] = (384, 128)) -> Backbone:
    """``weights=None``: the (untrained) mini CLIP for ``scale``; otherwise the real model (see module doc)."""
    if weights is None:
        if scale not in MINI_CONFIGS:
            raise ValueError(f"no mini CLIP for scale {scale!r}; expected one of {sorted(MINI_CONFIGS)} (or pass weights)")
        return mini_clip(MINI_CONFIGS[scale])
    return load_real_clip(weights, image_size)


def resolve_weights(weights: str) -> tuple[str, Path]:
    """(open_clip architecture, checkpoint file) for a name like "ViT-B-16" or a path."""
    p = Path(weights).expanduser()
    if p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"weights file {p} does not exist")
        arch = os.environ.get("PR_CLIP_ARCH", "ViT-B-16-quickgelu" if "openai" in p.name.lower() else "ViT-B-16")
        return arch, p
    arch = weights.split(":")[0]
    name = arch.replace("/", "-")
    d = weights_dir()
    for cand in (d / f"{name}.safetensors", d / name / "open_clip_model.safetensors", d / f"{name}.bin"):
        if cand.is_file():
            _register_config(name, cand)
            return arch, cand
    raise FileNotFoundError(
        f"no local weights for {weights!r}: put the open_clip checkpoint at {d / (name + '.safetensors')} "
        f"(or {d / name / 'open_clip_model.safetensors'}), set PR_WEIGHTS_DIR to the folder holding it, or pass "
        "the checkpoint's path as weights. Nothing is downloaded. OpenAI's CLIP weights use the quick-gelu "
        "variant: name the file ViT-B-16-quickgelu.safetensors."
    )


def _register_config(name: str, checkpoint: Path) -> None:
    """An architecture open_clip does not ship (a fine-tuned variant, the paper-path test's tiny ViT) is
    described by an open_clip model config, ``<name>.json``, beside its checkpoint (or ``open_clip_config.json``
    in its folder, as open_clip's hub exports are): registered under ``name`` before loading."""
    import json

    import open_clip

    for cfg in (checkpoint.with_name(f"{name}.json"), checkpoint.parent / "open_clip_config.json"):
        if cfg.is_file():
            try:
                model_cfg = json.loads(cfg.read_text())
                model_cfg = model_cfg.get("model_cfg", model_cfg)
                model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{cfg}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg): {e}") from None
            from open_clip.factory import _MODEL_CONFIGS

            _MODEL_CONFIGS[name] = model_cfg
            open_clip.get_model_config(name)
            return


def load_real_clip(weights: str, image_size: tuple[int, int] = (384, 128)) -> Backbone:
    """Real CLIP weights from disk, at ``image_size`` (height, width), position grid resized (bicubic)."""
    import open_clip

    arch, path = resolve_weights(weights)
    model = open_clip.create_model(arch, pretrained=str(path), force_image_size=tuple(image_size), load_weights=True)
    return Backbone(model, _tokenizer(), f"{arch}@{path.name}", {"arch": arch, "image_size": list(image_size)})


# ---------------------------------------------------------------------------------------------
def stretch_positional_embedding(pos_embed: torch.Tensor, keep: int = 20, length: int = 248) -> torch.Tensor:
    """CTGI's / Long-CLIP's knowledge-preserved stretching of text positions.

    The first ``keep`` rows (well-trained short-range positions) are kept; every later gap between
    rows ``i`` and ``i+1`` is filled with the original row and ``r - 1`` linear interpolants
    (``r = (length - keep) / (n - keep)``, 4 for 77 -> 248), and the last row is extended past the end
    along its final difference. With keep=20, 77 positions become 20 + 4 * 57 = 248.
    """
    n, d = pos_embed.shape
    if not 0 <= keep < n:
        raise ValueError(f"keep must lie in [0, {n}), got {keep}")
    if (length - keep) % (n - keep):
        raise ValueError(f"length - keep ({length - keep}) must be a multiple of n - keep ({n - keep})")
    r = (length - keep) // (n - keep)
    head, tail = pos_embed[:keep], pos_embed[keep:]
    nxt = torch.cat([tail[1:], (2 * tail[-1] - tail[-2]).unsqueeze(0)])  # the last row extends linearly
    w = torch.arange(r, dtype=pos_embed.dtype, device=pos_embed.device).view(1, r, 1) / r
    filled = tail.unsqueeze(1) * (1 - w) + nxt.unsqueeze(1) * w  # (n - keep, r, d)
    return torch.cat([head, filled.reshape(-1, d)])


def stretch_text_encoder(backbone: Backbone, keep: int = 20, length: int = 248) -> Backbone:
    """Make ``backbone`` accept ``length`` text tokens by stretching its positional embedding (in place)."""
    c = backbone.clip
    before = int(c.positional_embedding.shape[0])
    with torch.no_grad():
        new = stretch_positional_embedding(c.positional_embedding.detach(), keep, length)
    c.positional_embedding = nn.Parameter(new)
    mask = torch.full((length, length), float("-inf")).triu_(1)
    c.register_buffer("attn_mask", mask, persistent=False)
    c.context_length = length
    backbone.config = {**backbone.config, "context_length": length, "stretched_from": before, "stretch_keep": keep}
    return backbone
