"""CTGI's two assistant-driven stages.

* :func:`mtg_captions` (training time, eqs. 1-3): an initial caption ``T_s = MLLM(I, P_init)``, then
  ``rounds`` question-answer rounds from the attribute question pool, skipping questions about what is
  already said (redundant) and answers that say nothing (low relevance), then the reconstructor's
  rephrasing of the answers with ``T_s``: ``T_e = LLM(T_e | T_s, p)``. No manual caption is read.
* :func:`mti_rerank` (inference, eqs. 5-7): the MLLM confirms the top-``K`` candidates in rank order; the
  first "yes" is the anchor (none: no refinement). Diagnostic questions ask the anchor about what the
  query leaves out, the answers and the query are merged into a refined query ``q_hat``, and the scores
  become ``S = lambda * S_q + (1 - lambda) * S_q_hat`` with the anchor's set to 1. When the top-1 score
  already passes ``xi`` and the MLLM confirms it, the query exits early, unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..assistants import LanguageModel, VisionLanguageModel, grammar, prompts


@dataclass
class MTGResult:
    initial: str  # T_s
    qa: list = field(default_factory=list)  # [(question, answer)] kept
    caption: str = ""  # the reconstructed T_e


def mtg_captions(images, vlm: VisionLanguageModel, lm: LanguageModel, rounds: int = 6,
                 pool: Sequence[str] = tuple(prompts.CTGI_QUESTION_POOL), seed: int = 0, batch: int = 256,
                 progress: bool = False) -> list[MTGResult]:
    """MTG pseudo-captions for ``images`` (a list of uint8 HxWx3 arrays), batched."""
    rng = np.random.default_rng(seed)
    out: list[MTGResult] = []
    starts = range(0, len(images), batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="MTG captions", leave=False)
    for s in starts:
        ims = list(images[s: s + batch])
        initial = vlm.describe(ims, prompts.CTGI_INITIAL)
        res = [MTGResult(t) for t in initial]
        covered = [grammar.claimed_groups(grammar.parse_claims(t)) for t in initial]
        queues = [list(rng.permutation(len(pool))) for _ in ims]
        for _ in range(rounds):
            ask_idx, ask_q = [], []
            for i, q in enumerate(queues):
                while q:  # the next question not about something already said
                    cand = pool[q.pop(0)]
                    groups = set(grammar.question_groups(cand))
                    if groups and not groups <= covered[i]:
                        ask_idx.append(i)
                        ask_q.append(cand)
                        break
            if not ask_idx:
                break
            answers = vlm.answer([ims[i] for i in ask_idx], ask_q)
            for i, q, a in zip(ask_idx, ask_q, answers):
                said = grammar.claimed_groups(grammar.parse_claims(a))
                if not said:  # low relevance: the answer claims nothing
                    continue
                res[i].qa.append((q, a))
                covered[i] |= said | set(grammar.question_groups(q))
        jobs = [prompts.CTGI_RECONSTRUCT.format(initial=r.initial, answers=" ".join(a for _, a in r.qa)) for r in res]
        for r, cap in zip(res, lm.generate(jobs)):
            r.caption = cap
        out += res
    return out


@dataclass
class MTIResult:
    scores: torch.Tensor  # the re-ranked scores over the gallery
    anchor: int | None  # gallery index of the anchor (None: no refinement)
    refined: str | None  # q_hat
    early_exit: bool
    vlm_calls: int
    llm_calls: int
    seconds: float


def mti_rerank(query: str, scores: torch.Tensor, gallery_images, vlm: VisionLanguageModel, lm: LanguageModel,
               text_scores: Callable[[str], torch.Tensor], top_k: int = 20, lam: float = 0.5, xi: float = 0.85) -> MTIResult:
    """Re-rank one query's gallery ``scores`` (cosine similarities) with MTI.

    ``text_scores(text)`` gives a text's similarities to the same gallery (the retrieval model's text
    encoder against the cached gallery embeddings)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    t = time.perf_counter()
    v0, l0 = vlm.usage.total_items(), lm.usage.total_items()
    order = scores.argsort(descending=True)[:top_k].tolist()

    def done(new, anchor=None, refined=None, early=False):
        return MTIResult(new, anchor, refined, early, vlm.usage.total_items() - v0, lm.usage.total_items() - l0,
                         time.perf_counter() - t)

    if float(scores[order[0]]) > xi and vlm.judge([gallery_images[order[0]]], query)[0]:
        return done(scores.clone(), order[0], None, True)
    anchor = None
    for k in order:  # the MLLM confirms candidates in rank order; the first yes is the anchor
        if vlm.judge([gallery_images[k]], query)[0]:
            anchor = k
            break
    if anchor is None:
        return done(scores.clone())
    said = grammar.claimed_groups(grammar.parse_claims(query))
    missing = [g for g in prompts.CTGI_DIAGNOSTIC if g not in said]
    answers = vlm.answer([gallery_images[anchor]] * len(missing), [prompts.CTGI_DIAGNOSTIC[g] for g in missing]) if missing else []
    refined = lm.generate(prompts.CTGI_AGGREGATE.format(query=query, answers=" ".join(answers)))[0]
    new = lam * scores + (1 - lam) * text_scores(refined).to(scores.dtype)
    new[anchor] = 1.0
    return done(new, anchor, refined)
