"""The two assistant roles every pipeline uses, whatever the backend.

* :class:`LanguageModel`: ``generate(prompts)``, a prompt string or chat messages each, batched.
* :class:`VisionLanguageModel`: ``answer``, ``describe``, ``judge`` (yes/no) and ``score`` (1-10), batched.

Every call is recorded in :attr:`Assistant.usage` (calls, items, seconds per method), so a notebook can say
what a method costs in assistant calls. Answers of real models are parsed strictly
(:func:`parse_yes_no`, :func:`parse_score`): one that does not parse is counted in ``usage`` and treated
as a rejection (``False`` / score 0), never a crash.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Sequence, Union

import numpy as np

Messages = list  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
PromptLike = Union[str, Messages]


class Usage:
    """Per-method counters: calls, items (a batched call of 8 counts 8), seconds, unparsed answers."""

    def __init__(self):
        self.calls: dict[str, int] = defaultdict(int)
        self.items: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.unparsed: dict[str, int] = defaultdict(int)

    def table(self):
        import pandas as pd

        names = sorted(set(self.calls) | set(self.unparsed))
        return pd.DataFrame({"calls": [self.calls[n] for n in names], "items": [self.items[n] for n in names],
                             "seconds": [round(self.seconds[n], 3) for n in names],
                             "items_per_s": [self.items[n] / self.seconds[n] if self.seconds[n] else float("nan") for n in names],
                             "unparsed": [self.unparsed[n] for n in names]}, index=names)

    def total_items(self) -> int:
        return int(sum(self.items.values()))

    def reset(self) -> None:
        self.__init__()


class Assistant:
    """Common base: call recording."""

    name = "assistant"

    def __init__(self):
        self.usage = Usage()

    @contextmanager
    def _record(self, method: str, n: int):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.usage.calls[method] += 1
            self.usage.items[method] += n
            self.usage.seconds[method] += time.perf_counter() - t


def _as_list(x, n: int | None = None) -> list:
    if isinstance(x, (str, dict)) or (isinstance(x, list) and x and isinstance(x[0], dict)):
        x = [x]
    x = list(x)
    if n is not None and len(x) == 1 and n > 1:
        x = x * n
    return x


class LanguageModel(Assistant):
    """Text in, text out. ``generate`` takes one prompt or a batch: each a string or a list of chat
    messages; it returns one string per prompt."""

    def generate(self, prompts: PromptLike | Sequence[PromptLike], max_new_tokens: int = 128) -> list[str]:
        batch = _as_list(prompts)
        with self._record("generate", len(batch)):
            return self._generate(batch, max_new_tokens)

    def _generate(self, batch: list, max_new_tokens: int) -> list[str]:
        raise NotImplementedError


class VisionLanguageModel(Assistant):
    """An image (uint8 HxWx3 array, CxHxW tensor or PIL image) and text in, text out; batched: lists of
    images with one text each (or one text for all)."""

    def answer(self, images, questions: str | Sequence[str]) -> list[str]:
        imgs = _images(images)
        qs = _as_list(questions, len(imgs))
        _same_length(imgs, qs, "questions")
        with self._record("answer", len(imgs)):
            return self._answer(imgs, qs)

    def describe(self, images, instruction: str | Sequence[str] | None = None) -> list[str]:
        from . import prompts

        imgs = _images(images)
        ins = _as_list(instruction if instruction is not None else prompts.CTGI_INITIAL, len(imgs))
        _same_length(imgs, ins, "instructions")
        with self._record("describe", len(imgs)):
            return self._describe(imgs, ins)

    def judge(self, images, texts: str | Sequence[str]) -> list[bool]:
        """Does each image show a person matching its text? (unparsable answers count as "no")"""
        imgs = _images(images)
        ts = _as_list(texts, len(imgs))
        _same_length(imgs, ts, "texts")
        with self._record("judge", len(imgs)):
            return self._judge(imgs, ts)

    def score(self, images, criterion: str, texts: str | Sequence[str] | None = None, references=None) -> list[int]:
        """A 1-10 score per image on ``criterion`` (a prompt name from :mod:`.prompts`, such as
        ``"tips_quality"``, or a free criterion); ``texts`` for alignment criteria, ``references`` (one
        image each) for consistency criteria. 0 means the answer did not parse (a rejection)."""
        imgs = _images(images)
        ts = _as_list(texts, len(imgs)) if texts is not None else [None] * len(imgs)
        refs = _images(references) if references is not None else [None] * len(imgs)
        _same_length(imgs, ts, "texts")
        _same_length(imgs, refs, "references")
        with self._record("score", len(imgs)):
            return self._score(imgs, criterion, ts, refs)

    def converse(self, images, dialogues) -> list[str]:
        """The next reply in a conversation about each image (CECA's CAM): ``dialogues[i]`` is chat messages,
        ``[{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, ..., {"role": "user",
        "content": qk}]``, the image going with the first user turn; every earlier turn is in the context the
        model reads. One dialogue per image."""
        imgs = _images(images)
        ds = [list(d) for d in dialogues]
        _same_length(imgs, ds, "dialogues")
        for d in ds:
            roles = [m.get("role") for m in d]
            if not d or roles[0] != "user" or roles[-1] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
                raise ValueError(f"a dialogue alternates user and assistant turns, from a user turn to a user turn; got roles {roles}")
        with self._record("converse", len(imgs)):
            return self._converse(imgs, ds)

    def _answer(self, images, questions): raise NotImplementedError
    def _converse(self, images, dialogues): raise NotImplementedError
    def _describe(self, images, instructions): raise NotImplementedError
    def _judge(self, images, texts): raise NotImplementedError
    def _score(self, images, criterion, texts, references): raise NotImplementedError


def _same_length(a, b, what):
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} images but {len(b)} {what}; give one per image (or a single one for all)")


def _images(images) -> list[np.ndarray]:
    """Normalise to a list of uint8 HxWx3 arrays."""
    import torch

    if images is None:
        raise ValueError("no images given")
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images.unsqueeze(0)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    out = []
    for im in (images if not hasattr(images, "convert") else [images]):
        if hasattr(im, "convert"):  # PIL
            im = np.asarray(im.convert("RGB"))
        elif isinstance(im, torch.Tensor):
            im = im.detach().cpu()
            if im.ndim == 3 and im.shape[0] == 3 and im.shape[-1] != 3:
                im = im.permute(1, 2, 0)
            im = im.numpy()
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"expected an RGB image (H x W x 3 or 3 x H x W), got shape {im.shape}")
        if im.dtype != np.uint8:
            im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8) if im.max() <= 1.0 else im.clip(0, 255).astype(np.uint8)
        out.append(im)
    if not out:
        raise ValueError("no images given")
    return out


# ---------------------------------------------------------------------------------------------
_YES = re.compile(r"^\W*(yes|yeah|yep|true|correct)\b", re.I)
_NO = re.compile(r"^\W*(no|nope|false|incorrect)\b", re.I)


def parse_yes_no(text: str) -> bool | None:
    """Strict: the answer must begin with yes or no (after punctuation); anything else is None."""
    if _YES.match(text or ""):
        return True
    if _NO.match(text or ""):
        return False
    return None


_SCORE = re.compile(r"^\D*?(\d{1,2})(?:\s*(?:/|out of)\s*10)?\b")


def parse_score(text: str) -> int | None:
    """Strict: the first number in the answer, which must be an integer in 1..10; else None."""
    m = _SCORE.match(text or "")
    if not m:
        return None
    v = int(m.group(1))
    return v if 1 <= v <= 10 else None


def parse_scores(text: str, names: Sequence[str]) -> dict[str, int] | None:
    """Named scores ("naturalness: 9, identity: 8, ...") as SynCPR's filter asks; None unless every name
    has an integer in 1..10."""
    out = {}
    for n in names:
        m = re.search(rf"{re.escape(n)}\s*[:=]\s*(\d{{1,2}})\b", text or "", re.I)
        if not m or not 1 <= int(m.group(1)) <= 10:
            return None
        out[n] = int(m.group(1))
    return out


def parse_categories(text: str, n_rounds: int, categories: Sequence[str]) -> list[str] | None:
    """DiaNA's output: one category per round, comma separated, on the answer's first line; None unless
    exactly ``n_rounds`` parse there."""
    first = (text or "").strip().split("\n", 1)[0]
    found = re.findall("|".join(categories), first, re.I)
    canon = {c.lower(): c for c in categories}
    found = [canon[f.lower()] for f in found]
    return found if len(found) == n_rounds else None


def categorize_dialogue(lm: LanguageModel, captions: Sequence[str], rounds: Sequence[tuple[str, str]], per_round: bool = False) -> list[str] | None:
    """DiaNA's categorisation of each (question, answer) round against two captions, by ``lm``.

    ``per_round=False`` sends the paper's instruction once; ``per_round=True`` asks one round per call
    (``diana_categorize_last``), for small models. An answer that does not parse makes the result None
    (counted in ``lm.usage.unparsed``): the round cannot be cleaned by this evaluator."""
    from . import prompts

    caps = "[" + ", ".join(f'"{c}"' for c in captions) + "]"

    def dialogue(k: int) -> str:
        return "\n".join(f"Assistant: {q}\nUser: {a}" for q, a in rounds[:k])

    if not per_round:
        out = parse_categories(lm.generate(prompts.DIANA_CATEGORIZE.format(captions=caps, dialogue=dialogue(len(rounds))))[0],
                               len(rounds), prompts.DIANA_CATEGORIES)
    else:
        answers = lm.generate([prompts.DIANA_CATEGORIZE_LAST.format(captions=caps, dialogue=dialogue(k + 1)) for k in range(len(rounds))],
                              max_new_tokens=8)
        parsed = [parse_categories(a, 1, prompts.DIANA_CATEGORIES) for a in answers]
        out = None if any(p is None for p in parsed) else [p[0] for p in parsed]
    if out is None:
        lm.usage.unparsed["generate"] += 1
    return out
