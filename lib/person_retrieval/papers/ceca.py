"""CECA: conversational attribute mining, the bidirectional cross-attention mixer and the confidence-aware
weighting loss (notebook 05).

"Tackling Alignment Ambiguity in Person Retrieval through Conversational Attribute Mining", Zou et al.,
CVPR 2026 (code: https://github.com/sugelamyd123/CECA). Built on the RDE-style model of notebook 01:

* **CAM** (:func:`cam`, :func:`build_summaries`): an MLLM answers five attribute questions about every image,
  train and test, in one conversation, and then, image in view, summarises its answers into one
  description, stored per image, offline;
* **BCM** (:class:`CondRefiner` inside each side's token head, :class:`RefinedTokenSelection`, as the release's
  ``model/ChatCrossEmbeddingLayer.py``): the image's tokens attend to the summary's most attended words and the
  summary's words to the image's most attended tokens, each side refined separately through a gated residual
  that starts near zero, then embedded and blended ``0.7 image + 0.3 summary``;
* **CAWL** (:func:`person_retrieval.losses.cawl_loss`): a confident summary teaches caption and image.

At test time only the gallery side reads summaries; the query caption is unchanged. Two weights, as the
release and the supplement have them (:data:`RELEASE_FUSION`):

* the **summary's share in the gallery's features**, global and token level alike, mixed *unnormalised* and
  normalised after (:func:`mix_features`): ``0.7 image + 0.3 summary`` in training (the release's
  ``model/build.py`` L91 and L96, ``mix_train``) and at test (``utils/metrics.py`` L87 and L118 as of commit
  d257075, the release's newest, ``mix_test``; its first commit 0af8faa tested with ``0.9 image + 0.1 summary``,
  ``mix_test=0.1``; d257075's message: "different datasets and pretrain weights need different set of
  parameter");
* **omega**, the supplement's fusion weight (section F) "for combining the global similarity and the refined
  similarity during retrieval": ``(1 - omega) global + omega token-level`` (:meth:`CECAModel.similarity`).
  The release adds them as ``(BGE + TSE) / 2`` (``utils/metrics.py`` L138), omega = 0.5, the default; the
  supplement's Figure 4 peaks at omega = 0.3 on ICFG-PEDES. Only retrieval reads omega, never training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from ..assistants import prompts
from ..config import cache_dir, config_tag
from ..datasets import TPR_FORMATS, load_split
from ..datasets.torch_data import RetrievalData, load_images, native_size
from ..models.retrieval import fixed_temperature
from .tpr import SHORT_EPOCHS, RDEModel, RDETask, TokenSelection, _path_key, fit_tpr, select_tokens, word_mask

QUESTIONS = prompts.CECA_QUESTIONS
#: Bumped when what CAM writes changes (cached summaries are then rebuilt). 2: Q1-Q5 and the summary as one
#: conversation with the MLLM, the summary written by the MLLM with the image (issue 44).
CAM_VERSION = 2
#: Who writes the summary: "mllm" (the supplement: the MLLM, in the same conversation, with the image) or
#: "lm" (a text-only model from the five answers appended to the request: this project's first reading).
SUMMARY_BY = ("mllm", "lm")
#: Fine-tuning epochs per scale in notebook 05, for every run there (RDE and IRRA included).
EPOCHS = SHORT_EPOCHS


# ---------------------------------------------------------------------------------------------
# CAM: five questions and a summary per image, one conversation
def cam(images, vlm, lm=None, summary_by: str = "mllm") -> list[dict]:
    """CECA's conversation about each image (supplement C): the MLLM ``vlm`` answers Q1-Q5 in one dialogue,
    each question asked with the earlier questions and answers in context (:meth:`converse`), and then,
    in the same dialogue, with the image, the summary request (:data:`prompts.CECA_SUMMARY_TURN`).
    ``summary_by="lm"`` (an option): ``lm``, a text-only model, writes the summary from the five answers
    appended to the request (:data:`prompts.CECA_SUMMARY`) instead. Batched over the images, one call per
    turn. One dict per image: ``{"Q1": answer, ..., "Q5": answer, "summary": text}``."""
    if summary_by not in SUMMARY_BY:
        raise ValueError(f"summary_by must be one of {SUMMARY_BY}, got {summary_by!r}")
    if summary_by == "lm" and lm is None:
        raise ValueError("summary_by='lm' needs a language model: pass lm")
    images = list(images)
    dialogues: list[list[dict]] = [[] for _ in images]
    answers = {}
    for q, text in QUESTIONS.items():
        for d in dialogues:
            d.append({"role": "user", "content": text})
        answers[q] = vlm.converse(images, dialogues)
        for d, a in zip(dialogues, answers[q]):
            d.append({"role": "assistant", "content": a})
    if summary_by == "mllm":
        for d in dialogues:
            d.append({"role": "user", "content": prompts.CECA_SUMMARY_TURN})
        summaries = vlm.converse(images, dialogues)
    else:
        summaries = lm.generate([prompts.CECA_SUMMARY.format(answers=" ".join(answers[q][i] for q in QUESTIONS))
                                 for i in range(len(images))])
    return [{**{q: answers[q][i] for q in QUESTIONS}, "summary": summaries[i].strip()} for i in range(len(images))]


def image_key(path: str, root) -> str:
    """How a summary file names an image: its path relative to the dataset folder."""
    return Path(os.path.relpath(path, root)).as_posix()


def summarize_split(split, vlm, lm, out_file, batch: int = 256, progress: bool = True, summary_by: str = "mllm") -> Path:
    """CAM over every image of ``split`` (a :class:`TPRSplit`), written to ``out_file`` (JSON: image path
    relative to the dataset folder -> its record). Resumable: finished batches are appended to
    ``<out_file>.partial.jsonl`` as they come and skipped on a rerun; the final file is written
    atomically, so it exists only complete."""
    out_file = Path(out_file)
    if out_file.is_file():
        return out_file
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial.jsonl")
    done: dict[str, dict] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: its batch is redone
                break
            done[rec["image"]] = rec
    keys = [image_key(p, split.root) for p in split.image_paths]
    todo = [i for i, k in enumerate(keys) if k not in done]
    starts = range(0, len(todo), batch)
    if progress and todo:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"CAM {split.name}/{split.split}", leave=False, mininterval=2.0)
    with open(partial, "a") as f:
        for s in starts:
            idx = todo[s: s + batch]
            ims = load_images([split.image_paths[i] for i in idx], native_size(split.image_paths[idx[0]]))
            recs = cam([im.permute(1, 2, 0).numpy() for im in ims], vlm, lm, summary_by)
            for i, rec in zip(idx, recs):
                rec = {"image": keys[i], **rec}
                done[keys[i]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
    table = {k: {q: v for q, v in done[k].items() if q != "image"} for k in keys}
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=0))
    tmp.replace(out_file)
    partial.unlink(missing_ok=True)
    return out_file


def _assistant_tag(vlm, lm=None) -> str:
    """Names the assistants in a cache key: a transformers model by name, the mini MLLM by its
    recognizer's weights (retrained weights are another assistant); ``lm`` only where it writes."""
    parts = []
    for a in (vlm, lm) if lm is not None else (vlm,):
        rec = getattr(a, "recognizer", None)
        if rec is not None:
            h = hashlib.sha1()
            for k, v in sorted(rec.net.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().numpy().tobytes())
            parts.append(f"{a.name}:{getattr(a, 'seed', 0)}:{h.hexdigest()[:12]}")
        else:
            parts.append(f"{getattr(a, 'name', type(a).__name__)}:{getattr(a, 'seed', 0)}")
    return "+".join(parts)


def build_summaries(dataset: str, root, scale: str = "small", seed: int = 0, vlm=None, lm=None, llm: str | None = None,
                    vlm_name: str | None = None, progress: bool = True, summary_by: str = "mllm") -> Path:
    """CAM over every split of ``dataset`` (train, val where it has one, test), cached by dataset, its
    annotation file, the assistants, ``summary_by`` and :data:`CAM_VERSION` under ``.cache/ceca/``. ``vlm`` /
    ``lm``: assistant objects (default: :func:`person_retrieval.assistants.load` with ``vlm_name`` and ``llm``;
    ``lm`` is read only with ``summary_by="lm"``). Returns the folder holding ``<split>.json``."""
    if dataset not in TPR_FORMATS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(TPR_FORMATS)}")
    if summary_by not in SUMMARY_BY:
        raise ValueError(f"summary_by must be one of {SUMMARY_BY}, got {summary_by!r}")
    if vlm is None or (lm is None and summary_by == "lm"):
        from ..assistants import load

        v, l_ = load(scale, seed, vlm_name, llm)
        vlm, lm = vlm or v, lm or l_
    writer = lm if summary_by == "lm" else None
    fmt = TPR_FORMATS[dataset]
    ann = hashlib.sha1((Path(root) / fmt.annotation).read_bytes()).hexdigest()[:12]
    tag = config_tag(dataset, _path_key(str(root)), ann, _assistant_tag(vlm, writer), summary_by, CAM_VERSION)
    folder = cache_dir() / "ceca" / f"{dataset}-{scale}-seed{seed}-{tag}"
    for split in fmt.splits:
        summarize_split(load_split(dataset, root, split), vlm, writer, folder / f"{split}.json", progress=progress,
                        summary_by=summary_by)
    return folder


def read_summaries(folder, split: str) -> dict[str, dict]:
    """The CAM records of one split: image path (relative to the dataset folder) -> record."""
    path = Path(folder) / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CECA summaries for split {split!r}; build them with ceca.build_summaries")
    return json.loads(path.read_text())


def _text(x) -> str:
    return x.strip() if isinstance(x, str) else ""


def summary_text(rec: dict) -> str:
    """The text that stands for an image: its summary or, where the summary came back empty, the MLLM's five answers
    joined (what the summary is written from; :func:`cam_counts` counts these). Empty when both are empty."""
    return _text(rec.get("summary")) or " ".join(a for a in (_text(rec.get(q)) for q in QUESTIONS) if a)


def summaries_of(image_paths, root, folder, split: str) -> list[str]:
    """The summary of each image, in order (:func:`summary_text`). An image without a record, or whose summary
    and answers are all empty, is an error that names the image and the file, never a silent empty text."""
    table = read_summaries(folder, split)
    out = []
    for p in image_paths:
        rec = table.get(image_key(p, root))
        text = summary_text(rec) if isinstance(rec, dict) else ""
        if not text:
            what = "has no summary" if rec is None else "has an empty summary and no answers"
            raise KeyError(f"image {image_key(p, root)!r} {what} in {Path(folder) / f'{split}.json'}")
        out.append(text)
    return out


def cam_counts(folder, splits=("train", "val", "test")) -> dict:
    """What the assistants gave, counted over the splits present: images, answers (five per image), answers
    that came back empty, summaries that came back empty (the answers stand in for them, :func:`summary_text`)
    and images left with no text at all. Random or weak models give such answers; the count says how many."""
    recs = [r for s in splits if (Path(folder) / f"{s}.json").is_file() for r in read_summaries(folder, s).values()]
    return {"images": len(recs), "answers": len(recs) * len(QUESTIONS),
            "empty answers": sum(not _text(r.get(q)) for r in recs for q in QUESTIONS),
            "empty summaries (answers used)": sum(not _text(r.get("summary")) and bool(summary_text(r)) for r in recs),
            "images with no text": sum(not summary_text(r) for r in recs)}


def with_summaries(data: RetrievalData, root, folder, split: str, tokenize) -> RetrievalData:
    """``data`` with each gallery image's summary tokenized beside it (:attr:`RetrievalData.image_texts`)."""
    if data.image_paths is None:
        raise ValueError("with_summaries needs RetrievalData built from a split (image_paths)")
    return dataclasses.replace(data, image_texts=tokenize(summaries_of(data.image_paths, root, folder, split)))


# ---------------------------------------------------------------------------------------------
# BCM, as released: each side's token head refines its own tokens with the other side's most attended ones
def top_tokens(tokens: torch.Tensor, score: torch.Tensor, k: int, valid: torch.Tensor | None = None):
    """The ``k`` highest-scoring tokens of each row (``k`` capped at the row count of tokens): ``(selected
    [B, k, D], validity [B, k])``; invalid tokens (``valid`` False: padding) rank last and stay marked."""
    if valid is not None:
        score = score.masked_fill(~valid, float("-inf"))
    k = max(1, min(int(k), tokens.shape[1]))
    top = score.topk(k, dim=1).indices
    sel = tokens.gather(1, top.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    ok = valid.gather(1, top) if valid is not None else torch.ones(top.shape, dtype=torch.bool, device=top.device)
    return sel, ok


def received_attention(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """How much attention each image token receives, averaged over every query ([CLS] and the tokens), our
    stand-in for the release's ``image_topk_from_attn`` (the column mean of the last layer's attention map,
    [CLS] itself excluded). Our backbone returns no attention maps, so the map is the scaled dot-product
    softmax of the output tokens with the pooled feature as [CLS]: ``A = softmax(X X^T / sqrt(D))`` over
    ``X = [pooled; tokens]``, ``score_j = mean_i A_ij`` for the tokens j. [B, N]."""
    x = torch.cat([pooled.unsqueeze(1), tokens], 1)
    a = torch.softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
    return a.mean(1)[:, 1:]


def eos_attention(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """How much a text's end-of-text feature attends to each word, the release's ``text_topk_from_attn``
    and own-token ranking (its [EOS] row): here the dot product with the pooled (end-of-text) feature, the same
    order as RDE's token selection ranks (:class:`tpr.TokenSelection`). [B, L]."""
    return (tokens * pooled.unsqueeze(1)).sum(-1)


class CondRefiner(nn.Module):
    """The release's refiner (``CondRefiner``, ChatCrossEmbeddingLayer.py): over a side's selected tokens
    ``x`` (L2-normalised), self-attention on ``LN_q(x)``, cross-attention from ``LN_c(x)`` to the other side's
    tokens as they come (no norm), an MLP over the sum, a gated residual:
    ``out = x + sigmoid(g) MLP(SA(LN_q x) + CA(LN_c x, cond))``, ``g`` from ``gate_init`` (-3: 0.047). Without
    ``cond`` (a caption, or a gallery read without summaries): ``x + sigmoid(g) MLP(SA(LN_q x))``. Padding is
    masked (the release's self-attention also reads the 77-token context's padding; ours is trimmed per
    batch, so masked to keep an embedding independent of its batch)."""

    def __init__(self, dim: int, heads: int = 8, gate_init: float = -3.0, mlp_ratio: int = 2):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.ln_q, self.ln_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.sa = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ca = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x, cond=None, x_valid=None, cond_valid=None):
        q = self.ln_q(x)
        y = self.sa(q, q, q, key_padding_mask=_padding(x_valid), need_weights=False)[0]
        if cond is not None:
            y = y + self.ca(self.ln_c(x), cond, cond, key_padding_mask=_padding(cond_valid), need_weights=False)[0]
        return x + torch.sigmoid(self.gate) * self.mlp(y)


def _padding(valid):
    """A key padding mask from validity (a row with no valid token attends to all, never to none: NaN)."""
    return None if valid is None else ~(valid | ~valid.any(1, keepdim=True))


class RefinedTokenSelection(TokenSelection):
    """A side's token head as the release's CECA has it (``VisualEmbeddingLayer`` / ``TexualEmbeddingLayer``,
    built with ``ratio=1.0``): its own tokens ranked ([CLS] / [EOS] attention: :func:`eos_attention`) and the
    top ``ratio`` kept (1.0: all of them; the words for a text), L2-normalised, refined by the
    :class:`CondRefiner` (reading ``cond``, the other side's selected tokens, when given), then RDE's
    embedding and max-pool (:class:`tpr.TokenSelection`'s MLP and projection)."""

    def __init__(self, dim: int, ratio: float = 1.0, heads: int = 8, gate_init: float = -3.0):
        super().__init__(dim, ratio)
        self.refiner = CondRefiner(dim, heads, gate_init)

    def forward(self, tokens, pooled, valid=None, cond=None, cond_valid=None):
        sel, ok = select_tokens(tokens, eos_attention(tokens, pooled), self.ratio, valid)
        x = self.refiner(F.normalize(sel, dim=-1), cond, ok if valid is not None else None, cond_valid)
        x = x + self.mlp(x)
        return self.proj(x.masked_fill(~ok.unsqueeze(-1), -1e4).max(1).values)


def bcm_contexts(img_tok, img_pooled, sum_tok, sum_pooled, sum_valid, cond_ratio: float = 0.3, context_length: int = 77):
    """What each side of the released BCM attends to: ``(summary words for the image side, their validity,
    image tokens for the summary side)``. The summary's words ranked by its [EOS] attention
    (:func:`eos_attention`), the top ``int((context_length - 2) cond_ratio)`` (22 of CLIP's 77 at 0.3;
    ``text_topk_from_attn``), a summary with fewer words giving all of its words (the release caps K at the
    batch's shortest summary instead); the image's tokens ranked by the attention they receive
    (:func:`received_attention`), the top ``int(N cond_ratio)`` of its N patch tokens (``image_topk_from_attn``)."""
    k_text = max(1, int((context_length - 2) * cond_ratio))
    s_ctx, s_ok = top_tokens(sum_tok, eos_attention(sum_tok, sum_pooled), k_text, sum_valid)
    i_ctx, _ = top_tokens(img_tok, received_attention(img_tok, img_pooled), max(1, int(img_tok.shape[1] * cond_ratio)))
    return s_ctx, s_ok, i_ctx


# BCM before issue 44 (the named option bcm="mixer"): one mixer over all tokens, ahead of RDE's token heads
class MixerBlock(nn.Module):
    """One direction of the mixer: ``x`` reads itself (self-attention) and the context (cross-attention)
    from the same normalised input; an MLP mixes their sum, and a gated residual adds it,
    out = x + sigmoid(g) * MLP(SA(x) + CA(x, ctx)), with g = ``gate_init`` (-3: the gate starts at 0.047)."""

    def __init__(self, dim: int, heads: int = 8, gate_init: float = -3.0):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm_x, self.norm_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x, ctx, x_valid=None, ctx_valid=None):
        h, c = self.norm_x(x), self.norm_c(ctx)
        sa = self.self_attn(h, h, h, key_padding_mask=None if x_valid is None else ~x_valid, need_weights=False)[0]
        ca = self.cross_attn(h, c, c, key_padding_mask=None if ctx_valid is None else ~ctx_valid, need_weights=False)[0]
        return x + torch.sigmoid(self.gate) * self.mlp(sa + ca)  # x + sigmoid(g) * y


class BidirectionalMixer(nn.Module):
    """The named option ``bcm="mixer"`` (this project's BCM before issue 44): image tokens query the summary's
    ``cond_ratio`` most attended tokens, summary tokens query the image's, every token of both sides mixed
    before RDE's token heads select 30% of each; a token's "attention" is its dot product with its own side's
    global feature (:func:`select_tokens`)."""

    def __init__(self, dim: int, heads: int = 8, cond_ratio: float = 0.3, gate_init: float = -3.0):
        super().__init__()
        self.cond_ratio = cond_ratio
        self.image_side = MixerBlock(dim, heads, gate_init)
        self.summary_side = MixerBlock(dim, heads, gate_init)

    def forward(self, img_tok, img_pooled, sum_tok, sum_pooled, sum_valid):
        s_sel, s_ok = select_tokens(sum_tok, (sum_tok * sum_pooled.unsqueeze(1)).sum(-1), self.cond_ratio, sum_valid)
        i_sel, _ = select_tokens(img_tok, (img_tok * img_pooled.unsqueeze(1)).sum(-1), self.cond_ratio)
        return self.image_side(img_tok, s_sel, ctx_valid=s_ok), self.summary_side(sum_tok, i_sel, x_valid=sum_valid)


#: BCM as released (CECATask's and CECAModel's defaults, in every run's cache key): the refiner inside each side's
#: token head, each head keeping all of its own tokens (``ratio=1.0``, build.py), the other side's top 30% as context.
#: ``{"bcm": "mixer", "own_ratio": 0.3}`` is this project's BCM before issue 44 (:class:`BidirectionalMixer`).
RELEASE_BCM = {"bcm": "released", "own_ratio": 1.0}
BCM_MODES = ("released", "mixer")


#: The release's weights (CECATask's and CECAModel's defaults): the summary's share in the gallery's features in
#: training (``mix_train``, build.py L91/L96: ``0.3*c_feats+0.7*i_feats``, ``0.3*c_tse_f+0.7*i_tse_f``) and at test
#: (``mix_test``, metrics.py L87/L118 at d257075: ``0.7*img_feat+0.3*chat_feat``), and the similarity fusion
#: weight omega (metrics.py L138: ``(sims_bse+sims_tse)/2``). They enter every run's cache key (:func:`fit_ceca`):
#: ``mix_test`` and omega through the validation that selects the epoch.
RELEASE_FUSION = {"mix_train": 0.3, "mix_test": 0.3, "omega": 0.5}
#: ``mix_test`` in the release's first commit (0af8faa, metrics.py L88 and L119): ``0.9*img_feat+0.1*chat_feat``.
FIRST_COMMIT_MIX_TEST = 0.1


def mix_features(image: torch.Tensor, summary: torch.Tensor, weight: float) -> torch.Tensor:
    """The release's mix of an image feature and its summary's: ``(1 - weight) image + weight summary`` on the
    features as they come, *unnormalised* (the similarity and the loss normalise the result); a summary
    feature of larger norm so weighs more than ``weight`` says."""
    return (1 - weight) * image + weight * summary


def msum(metrics: dict) -> float:
    """The supplement's Msum (Figure 4), the release's rSum: R1 + R5 + R10."""
    return float(metrics["R1"] + metrics["R5"] + metrics["R10"])


def with_msum(metrics: dict) -> dict:
    """``metrics`` with its ``Msum`` (:func:`msum`) added."""
    return {**metrics, "Msum": msum(metrics)}


class CECAModel(RDEModel):
    """The RDE-style model with summaries on the gallery side, as released:

    * global: the caption's pooled feature against ``mix_features(image, summary, w)``;
    * token level: the caption's token-selection embedding against ``mix_features(image TSE, summary TSE, w)``.
      With ``bcm="released"`` (the default, :data:`RELEASE_BCM`) each side's head is a
      :class:`RefinedTokenSelection` keeping ``own_ratio`` of its own tokens (1.0: all, as the release builds
      CECA): the image's head refines its tokens reading the summary's top words, the summary's (the text
      side's head: the release reads captions and summaries with its one textual embedding layer) its
      words reading the image's top tokens (:func:`bcm_contexts`); a caption, and a gallery read without
      summaries, pass the same heads with self-attention only. ``bcm="mixer"`` (an option: this project's
      BCM before issue 44) mixes every token of both sides first (:class:`BidirectionalMixer`), then RDE's
      plain heads select; ``use_bcm=False``: RDE's plain heads, no refiner, no cross-attention;
    * ``w`` is ``mix_train`` in training mode, ``mix_test`` in eval mode (0.3 and 0.3, the release's: build.py
      L91/L96, metrics.py L87/L118);
    * the similarity is ``(1 - omega) global + omega token-level`` (the supplement's omega; 0.5: RDE's and the
      release's mean). An image given no summary is embedded as RDE would: its own global feature and its
      own tokens (the "without summaries at test time" ablation)."""

    def __init__(self, backbone, ratio: float | None = None, cond_ratio: float = 0.3, gate_init: float = -3.0, heads: int = 8,
                 omega: float = RELEASE_FUSION["omega"], use_bcm: bool = True, mix_train: float = RELEASE_FUSION["mix_train"],
                 mix_test: float = RELEASE_FUSION["mix_test"], bcm: str = RELEASE_BCM["bcm"]):
        if bcm not in BCM_MODES:
            raise ValueError(f"bcm must be one of {BCM_MODES}, got {bcm!r}")
        refined = use_bcm and bcm == "released"
        if ratio is None:  # the own-token share: all tokens as the release's CECA, RDE's 30% under the old mixer
            ratio = RELEASE_BCM["own_ratio"] if bcm == "released" else 0.3
        super().__init__(backbone, ratio)  # RDE's token-selection heads, tse_img and tse_txt
        if refined:
            self.tse_img = RefinedTokenSelection(backbone.embed_dim, ratio, heads, gate_init)
            self.tse_txt = RefinedTokenSelection(backbone.embed_dim, ratio, heads, gate_init)
        self.bcm = BidirectionalMixer(backbone.embed_dim, heads, cond_ratio, gate_init) if use_bcm and bcm == "mixer" else None
        self.refined, self.cond_ratio = refined, cond_ratio
        self.context_length = int(getattr(backbone, "context_length", 77))
        self.omega, self.mix_train, self.mix_test = omega, mix_train, mix_test

    def embed_images(self, x, summary_ids=None, mix: float | None = None):
        """The gallery's embeddings: ``global`` and ``tse`` (what the similarity reads), ``image`` and, with a
        summary, ``summary`` (the pooled features CAWL reads). ``mix``: the summary's share (default:
        ``mix_train`` or ``mix_test`` by the module's mode)."""
        pooled, tokens = self.backbone.encode_image(x)
        if summary_ids is None:
            return {"global": pooled, "tse": self.tse_img(tokens, pooled), "image": pooled}
        s_pooled, s_tok = self.backbone.encode_text(summary_ids)
        s_valid = word_mask(summary_ids, s_tok.shape[1])
        if self.refined:  # each side refined separately, reading the other side's top tokens (the release)
            s_ctx, s_ok, i_ctx = bcm_contexts(tokens, pooled, s_tok, s_pooled, s_valid, self.cond_ratio, self.context_length)
            i_tse = self.tse_img(tokens, pooled, cond=s_ctx, cond_valid=s_ok)
            c_tse = self.tse_txt(s_tok, s_pooled, s_valid, cond=i_ctx)
        else:
            if self.bcm is not None:
                tokens, s_tok = self.bcm(tokens, pooled, s_tok, s_pooled, s_valid)
            i_tse, c_tse = self.tse_img(tokens, pooled), self.tse_txt(s_tok, s_pooled, s_valid)
        w = (self.mix_train if self.training else self.mix_test) if mix is None else mix
        return {"global": mix_features(pooled, s_pooled, w), "tse": mix_features(i_tse, c_tse, w), "image": pooled,
                "summary": s_pooled}

    @staticmethod
    def similarities(txt, img) -> tuple[torch.Tensor, torch.Tensor]:
        """The global and the token-level cosine similarities, ``(queries, gallery)`` each."""
        return tuple(F.normalize(txt[k], dim=-1) @ F.normalize(img[k], dim=-1).T for k in ("global", "tse"))

    @staticmethod
    def fuse_similarities(s_global: torch.Tensor, s_tokens: torch.Tensor, omega: float) -> torch.Tensor:
        """The supplement's fusion: ``(1 - omega) global + omega token-level`` (the refined similarity)."""
        return (1 - omega) * s_global + omega * s_tokens

    def similarity(self, txt, img):
        return self.fuse_similarities(*self.similarities(txt, img), self.omega)

    def forward(self, images, ids, summary_ids=None):
        return self.embed_images(images, summary_ids), self.embed_texts(ids)


# ---------------------------------------------------------------------------------------------
#: The loss as the release has it (CECATask's defaults): TAL summed over the batch (``compute_rbs``), CAWL
#: averaged with 1 - w as it comes, its cross-entropies at logit scale 50. They enter every run's cache key
#: (:func:`fit_ceca`), so a run trained under another loss is never read back as this one.
RELEASE_LOSS = {"cawl": "released", "cawl_scale": 50.0, "tal_reduction": "sum"}


class CECATask(RDETask):
    """CECA on one TPR dataset: TAL on the global features (0.7 image + 0.3 summary, unnormalised, against the
    caption), TAL on the token-level features (0.7 image TSE + 0.3 summary TSE), plus CAWL, with weights 1, 1, 1
    as the release adds them:
    L = sum_i TAL_global(i) + sum_i TAL_tokens(i) + 1/B sum_i CAWL(i). ``summaries``: the folder
    :func:`build_summaries` wrote.

    ``cawl``: "released" (the default, :func:`losses.cawl_loss` as released: 1 - w may go negative),
    "clipped" (max(1 - w, 0): ``clip_one_minus_w``) or None (CAWL left out: TAL only). ``cawl_scale``: the
    inverse temperature of CAWL's cross-entropies, 50 as released. ``tal_reduction``: "sum" as released, or
    "mean" (each TAL averaged over the batch; CAWL then weighs about B times more against TAL). The supplement
    says only that the objective adds the global and local TAL and CAWL; where it is silent, the release's
    reading is followed. (Before the balance matched the release, with both averaged and a soft-target
    cross-entropy, validation at small had preferred a CAWL scale of 1/0.07 over 50; that choice predates
    this loss.)

    ``mix_train`` / ``mix_test`` / ``omega``: :data:`RELEASE_FUSION` (:class:`CECAModel`); validation, which picks
    the epoch, reads the gallery at ``mix_test`` and scores at ``omega``. ``bcm`` / ``own_ratio``:
    :data:`RELEASE_BCM` (the share of its own tokens each head keeps; RDE's ``ratio`` is not read)."""

    def __init__(self, *a, summaries: str, cawl: str | None = RELEASE_LOSS["cawl"], use_bcm: bool = True,
                 omega: float = RELEASE_FUSION["omega"], mix_train: float = RELEASE_FUSION["mix_train"],
                 mix_test: float = RELEASE_FUSION["mix_test"], cond_ratio: float = 0.3, gate_init: float = -3.0,
                 cawl_scale: float = RELEASE_LOSS["cawl_scale"], tal_reduction: str = RELEASE_LOSS["tal_reduction"],
                 bcm: str = RELEASE_BCM["bcm"], own_ratio: float = RELEASE_BCM["own_ratio"], **kw):
        if bcm not in BCM_MODES:
            raise ValueError(f"bcm must be one of {BCM_MODES}, got {bcm!r}")
        if cawl not in ("released", "clipped", None):
            raise ValueError(f"cawl must be 'released', 'clipped' or None, got {cawl!r}")
        if tal_reduction not in ("sum", "mean"):
            raise ValueError(f"tal_reduction must be 'sum' or 'mean', got {tal_reduction!r}")
        super().__init__(*a, **kw)
        self.summaries, self.cawl, self.use_bcm = summaries, cawl, use_bcm
        self.omega, self.cond_ratio, self.gate_init, self.cawl_scale = omega, cond_ratio, gate_init, cawl_scale
        self.tal_reduction, self.mix_train, self.mix_test = tal_reduction, mix_train, mix_test
        self.bcm, self.own_ratio = bcm, own_ratio

    def build(self) -> CECAModel:
        return CECAModel(fixed_temperature(self.backbone), self.own_ratio, self.cond_ratio, self.gate_init,
                         omega=self.omega, use_bcm=self.use_bcm, mix_train=self.mix_train, mix_test=self.mix_test, bcm=self.bcm)

    @cached_property
    def _splits(self):
        train, val = super()._splits
        tok = self.backbone.tokenize
        val_split = "val" if "val" in TPR_FORMATS[self.dataset].splits else "train"
        return (with_summaries(train, self.root, self.summaries, "train", tok),
                with_summaries(val, self.root, self.summaries, val_split, tok))

    def loss(self, model, batch, gather):
        img, txt = model(batch["image"], batch["ids"], batch["image_text"])
        pid = gather(batch["pid"])
        n = lambda k, d: F.normalize(gather(d[k]), dim=-1)  # noqa: E731
        parts = {k: losses.tal_loss(n(k, img), n(k, txt), pid, tau=self.tau, margin=self.margin, reduction=self.tal_reduction)
                 for k in ("global", "tse")}
        total = parts["global"] + parts["tse"]
        logs = {"tal_global": parts["global"].detach(), "tal_tokens": parts["tse"].detach()}
        if self.cawl is not None:
            c = losses.cawl_loss(n("summary", img), n("global", txt), n("image", img), pid, logit_scale=self.cawl_scale,
                                 clip_one_minus_w=self.cawl == "clipped")
            total = total + c
            logs["cawl"] = c.detach()
        return total, logs


#: The variants the notebook trains: the method and its ablations.
VARIANTS = {
    "CECA": {},
    "CECA without BCM": {"use_bcm": False},
    "CECA without CAWL (TAL only)": {"cawl": None},
    "CECA, CAWL with 1 - w clipped at 0": {"cawl": "clipped"},
}
NEW_LAYERS = ["tse_img", "tse_txt", "bcm"]


def fit_ceca(dataset: str, root, summaries, scale: str = "small", seed: int = 0, gpus: int = 0, init: str | None = None,
             weights: str | None = None, variant: str = "CECA", cond_ratio: float = 0.3, gate_init: float = -3.0,
             progress: bool = True, task_kw: dict | None = None, **overrides):
    """Fine-tune CECA (or one of :data:`VARIANTS`) on one dataset with notebook 01's schedule, cached as
    the baselines' runs are; the key carries :data:`RELEASE_LOSS`, :data:`RELEASE_FUSION` and :data:`RELEASE_BCM`
    (or what ``task_kw`` sets in their place)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    kw = {"summaries": str(summaries), "cond_ratio": cond_ratio, "gate_init": gate_init, **RELEASE_LOSS, **RELEASE_FUSION,
          **RELEASE_BCM, **VARIANTS[variant], **(task_kw or {})}
    return fit_tpr("ceca", "person_retrieval.papers.ceca:CECATask", NEW_LAYERS, dataset, root, scale=scale, seed=seed,
                   gpus=gpus, init=init, weights=weights, progress=progress, task_kw=kw, **overrides)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
def without_summaries(data: RetrievalData) -> RetrievalData:
    """The same split with the gallery's summaries dropped."""
    return dataclasses.replace(data, image_texts=None)


@torch.no_grad()
def evaluate_settings(model: CECAModel, data: RetrievalData, omegas=(), without: bool = True, batch: int = 256) -> dict:
    """Test metrics (with :func:`msum`) and similarities of one CECA model in several settings, the queries
    encoded once: ``"omega=w"`` for each fusion weight in ``omegas`` (the supplement's omega: the global and
    the token-level similarity of the gallery read with summaries, at the model's ``mix_test``, fused as
    ``(1 - w) global + w token-level``; the gallery is encoded once) and, with ``without``, ``"without
    summaries"`` (the gallery read as RDE reads it, fused at the model's omega). Returns ``{setting: (metrics,
    similarity)}``."""
    from ..datasets.torch_data import to_float, trim_tokens
    from ..metrics import retrieval_metrics

    model.eval()
    dev = next(model.parameters()).device
    cat = lambda parts: {k: torch.cat([p[k].float().cpu() for p in parts]) for k in parts[0]}  # noqa: E731
    txt = cat([model.embed_texts(trim_tokens(data.tokens[s: s + batch]).to(dev)) for s in range(0, len(data.tokens), batch)])
    out = {}

    def score(name, sim):
        out[name] = (with_msum(retrieval_metrics(sim, data.caption_pids, data.image_pids)), sim)

    chunks = range(0, len(data.images), batch)
    if omegas and data.image_texts is not None:
        gallery = cat([model.embed_images(to_float(data.images[s: s + batch].to(dev)), trim_tokens(data.image_texts[s: s + batch]).to(dev))
                       for s in chunks])
        s_global, s_tokens = model.similarities(txt, gallery)
        for w in omegas:
            score(f"omega={float(w):g}", model.fuse_similarities(s_global, s_tokens, float(w)))
    if without:
        gallery = cat([model.embed_images(to_float(data.images[s: s + batch].to(dev))) for s in chunks])
        score("without summaries", model.similarity(txt, gallery))
    return out


def identity_spread(sim: torch.Tensor, data: RetrievalData) -> dict:
    """How far apart one identity's gallery images score for a query: per query, the standard deviation of
    its scores over the true person's gallery images (queries whose person has at least two), averaged;
    also relative to the standard deviation over the whole gallery (so that two scorings compare)."""
    sim = sim.float()
    same = data.caption_pids.view(-1, 1) == data.image_pids.view(1, -1)
    n = same.sum(1)
    keep = n >= 2
    s, m = sim[keep], same[keep].float()
    mean = (s * m).sum(1) / m.sum(1)
    sd_same = (((s - mean.unsqueeze(1)) ** 2 * m).sum(1) / (m.sum(1) - 1)).sqrt()
    sd_all = s.std(1)
    return {"same-identity spread": float(sd_same.mean()), "relative spread": float((sd_same / sd_all).mean()),
            "queries": int(keep.sum())}


def summary_errors(records: list[dict], people: list[dict]) -> list[list[str]]:
    """For each CAM record, the attribute claims of its summary that the true person contradicts, as
    "slot: said (true)" (world datasets only: ``people`` from :func:`person_retrieval.analysis.world_people`)."""
    from ..assistants import grammar

    out = []
    for rec, person in zip(records, people):
        claims = grammar.parse_claims(rec["summary"])
        out.append([f"{s}: {v} (true: {person[s]})" for s, v in claims.items() if s in person and person[s] != v])
    return out


def paired_claim(a: pd.DataFrame, b: pd.DataFrame, metric: str, not_hurt: bool = False) -> tuple[float, float, str]:
    """(mean, spread, verdict) of the per-seed difference ``a - b`` of ``metric`` (both with a ``seed``
    column). "holds" when the mean is positive, "clearly" when it also exceeds twice the spread; with
    ``not_hurt`` it holds when the mean is not below minus twice the spread."""
    from ..reports import verdict

    d = a.set_index("seed")[metric].sub(b.set_index("seed")[metric]).dropna()
    return verdict(d, not_hurt=not_hurt)


__all__ = ["cam", "summarize_split", "build_summaries", "read_summaries", "summaries_of", "summary_text", "cam_counts", "with_summaries", "image_key",
           "CondRefiner", "RefinedTokenSelection", "bcm_contexts", "top_tokens", "received_attention", "eos_attention",
           "RELEASE_BCM", "SUMMARY_BY", "MixerBlock", "BidirectionalMixer", "CECAModel", "CECATask", "RELEASE_LOSS", "RELEASE_FUSION",
           "FIRST_COMMIT_MIX_TEST", "mix_features", "msum", "with_msum", "VARIANTS", "fit_ceca", "without_summaries",
           "evaluate_settings", "identity_spread", "summary_errors", "paired_claim"]
