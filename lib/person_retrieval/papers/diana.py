"""DiaNA / ChatPR: chat-based person retrieval (notebook 06).

"Chat-based Person Retrieval via Dialogue-Refined Cross-Modal Alignment", CVPR 2025 (ChatPR, ChatPedes,
DiaNA). This module holds both halves of the paper's work:

* **ChatPedes construction** (:func:`build_chatpedes`): dialogues about the CUHK-PEDES-style images from two
  generators with different question policies and error profiles, each round categorised Matched /
  Contradictory / Hallucinatory / Repeated by three evaluators, and cleaned by vote. The world knows what
  each image shows, so every round also gets its *true* category (:func:`true_categories`), and each
  evaluator's precision and recall can be measured, which no study on real data can do;
* **DiaNA** (:class:`DiaNAModel`, :class:`DiaNATask`): a dialogue encoder, adaptive attribute refiners and
  their losses, trained in two stages.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from ..assistants import grammar, prompts
from ..assistants.base import categorize_dialogue
from ..assistants.mini import ITEM_SLOTS, MiniLM, MiniVLM, Noise, item_rng
from ..config import cache_dir, config_tag
from ..datasets import load_split, write_json_atomic
from ..world import language, read_world_meta

CATEGORIES = prompts.DIANA_CATEGORIES  # Matched, Contradictory, Hallucinatory, Repeated


# ---------------------------------------------------------------------------------------------
# Generation
@dataclass(frozen=True)
class DialogueGenerator:
    """One of ChatPedes' two dialogue generators. ``policy``: "fresh" asks first about what the dialogue
    has not covered (a careful questioner), "any" picks any attribute group, so it repeats itself;
    ``noise``: how often its answers contradict the image, add something that is not there, or repeat."""

    name: str
    role: str  # the paper's generator it stands in for
    policy: str
    noise: Noise = field(default_factory=Noise)


#: The paper's two generators, by profile: its Llama 3 dialogues kept 88.6% of their rounds after
#: cleaning, its InternVL dialogues 79.3% (more hallucination). The mini stand-ins differ the same way: a
#: careful questioner with few answer errors, and a careless one with more, hallucinations above all.
GENERATORS = (
    DialogueGenerator("A", "Llama 3", "fresh", Noise(contradiction=0.04, hallucination=0.04, repetition=0.02)),
    DialogueGenerator("B", "InternVL", "any", Noise(contradiction=0.05, hallucination=0.12, repetition=0.02)),
)
ASKABLE = list(language.QUESTIONS)  # upper, lower, shoes, hair, hat, bag, held, accessory


def _question(group: str, rng: np.random.Generator) -> str:
    t = language.QUESTIONS[group][int(rng.integers(len(language.QUESTIONS[group])))]
    return t.format(pron="the person", pos="their", obj="them")


def next_question(policy: str, said: set, asked: set, rng: np.random.Generator) -> str:
    """A questioner's next question: ``policy`` "fresh" asks about an attribute group the dialogue has not
    covered (``said``: groups the answers mentioned; ``asked``: groups asked about, updated here), then
    about one not asked yet; "any" about any group."""
    if policy == "fresh":
        fresh = [g for g in ASKABLE if g not in said | asked]
        pool = fresh or [g for g in ASKABLE if g not in asked] or ASKABLE
    else:
        pool = ASKABLE
    g = pool[int(rng.integers(len(pool)))]
    asked.add(g)
    return _question(g, rng)


def generate_dialogues(images, keys: Sequence[str], gen: DialogueGenerator, vlm: MiniVLM, rounds: int = 6, seed: int = 0):
    """One dialogue of ``rounds`` rounds per image, from ``gen``: an opening request answered by the MLLM's
    description, then questions chosen by ``gen.policy`` and answered by ``vlm`` from the image, with
    ``gen.noise`` (a mini MLLM: its noise is set per generator; another MLLM answers as it answers).
    ``keys`` name the images in the random streams (a dialogue depends on nothing else). Returns a list of
    dialogues, each a list of ``(question, answer)``."""
    if isinstance(vlm, MiniVLM):
        vlm = MiniVLM(vlm.recognizer, noise=gen.noise, seed=vlm.seed)
    rngs = [item_rng(seed, "chatpedes", gen.name, k) for k in keys]
    openings = [language.OPENING_QUESTIONS[int(r.integers(len(language.OPENING_QUESTIONS)))] for r in rngs]
    dialogues = [[(q, a)] for q, a in zip(openings, vlm.describe(images, openings))]
    said = [grammar.claimed_groups(grammar.parse_claims(d[0][1])) for d in dialogues]
    asked: list[set] = [set() for _ in dialogues]
    for _ in range(rounds - 1):
        qs = []
        for i, rng in enumerate(rngs):
            qs.append(next_question(gen.policy, said[i], asked[i], rng))
        answers = vlm.answer(images, qs)
        for i, (q, a) in enumerate(zip(qs, answers)):
            dialogues[i].append((q, a))
            said[i] |= grammar.claimed_groups(grammar.parse_claims(a))
    return dialogues


def true_categories(person: dict, rounds: Sequence[tuple[str, str]]) -> list[str]:
    """Each round's category against what the image truly shows (the world's record of the person), with
    the evaluators' precedence (Contradictory, Repeated, Hallucinatory, Matched): an item claimed that the
    person does not have is hallucinated; any other claimed value the person does not have contradicts."""
    said: set = set()
    last = None
    out = []
    for q, a in rounds:
        claims = grammar.parse_claims(a)
        groups = grammar.claimed_groups(claims) or set(grammar.question_groups(q)) - {"describe"}
        invented = [s for s in ITEM_SLOTS if claims.get(s, "none") != "none" and person.get(s) == "none"]
        colour_of_invented = {f"{s}_color" for s in invented}
        wrong = [s for s, v in claims.items() if s in person and s not in invented and s not in colour_of_invented and person[s] != v]
        if wrong:
            out.append("Contradictory")
        elif (groups and groups <= said) or a == last:
            out.append("Repeated")
        elif invented:
            out.append("Hallucinatory")
        else:
            out.append("Matched")
        said |= groups
        last = a
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation and cleaning
class CaptionEvaluator:
    """An LLM that categorises each round against the image's two captions, with the supplement's
    instruction (Fig. 1a), one call per dialogue."""

    def __init__(self, lm, role: str):
        self.lm, self.role = lm, role
        self.name = getattr(lm, "name", type(lm).__name__)

    def __call__(self, dialogues, captions, images=None) -> list[list[str] | None]:
        return [categorize_dialogue(self.lm, caps, d) for d, caps in zip(dialogues, captions)]


class ImageEvaluator:
    """An MLLM that checks each answer against the image itself (ours: the supplement's evaluators, InternVL
    included, read the captions; ``default_evaluators(..., image_evaluator=True)``), with
    the caption readers' precedence: an answer the MLLM does not confirm is Contradictory, or Hallucinatory
    when it claims an item; a round whose groups were covered before is Repeated."""

    def __init__(self, vlm, role: str):
        self.vlm, self.role = vlm, role
        self.name = getattr(vlm, "name", type(vlm).__name__)

    def __call__(self, dialogues, captions=None, images=None) -> list[list[str] | None]:
        n = max(len(d) for d in dialogues)
        confirmed = {}
        for r in range(n):
            idx = [i for i, d in enumerate(dialogues) if len(d) > r]
            oks = self.vlm.judge([images[i] for i in idx], [dialogues[i][r][1] for i in idx])
            confirmed.update({(i, r): ok for i, ok in zip(idx, oks)})
        out = []
        for i, d in enumerate(dialogues):
            said: set = set()
            cats = []
            for r, (q, a) in enumerate(d):
                claims = grammar.parse_claims(a)
                groups = grammar.claimed_groups(claims) or set(grammar.question_groups(q)) - {"describe"}
                item = any(claims.get(s, "none") != "none" for s in ITEM_SLOTS)
                if not confirmed[i, r] and not item:
                    cats.append("Contradictory")
                elif groups and groups <= said:
                    cats.append("Repeated")
                elif not confirmed[i, r]:
                    cats.append("Hallucinatory")
                else:
                    cats.append("Matched")
                said |= groups
            out.append(cats)
        return out


class CaptionReaderVLM:
    """An MLLM as a caption reader: the categorisation prompt alone, no image (the supplement's InternVL
    evaluator reads what the other two read, the captions). A transformers MLLM gets the prompt as a
    text-only chat turn; any object with ``generate`` (an LLM) is used as it is."""

    def __init__(self, vlm):
        from ..assistants.base import Usage

        self.vlm, self.usage = vlm, Usage()
        self.name = getattr(vlm, "name", type(vlm).__name__)

    def generate(self, texts, max_new_tokens: int = 128) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if hasattr(self.vlm, "generate"):
            return self.vlm.generate(texts, max_new_tokens)
        from ..assistants.hf import _generate

        v = self.vlm
        prompt = [v.proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}], add_generation_prompt=True,
                                             tokenize=False) for t in texts]
        enc = v.proc.tokenizer(prompt, return_tensors="pt", padding=True, add_special_tokens=False).to(v.model.device)
        self.usage.calls["generate"] += 1
        self.usage.items["generate"] += len(texts)
        return _generate(v.model, v.proc.tokenizer, dict(enc), max_new_tokens, v.temperature, v.seed)


def default_evaluators(vlm, llm=None, seed: int = 0, image_evaluator: bool = False) -> list:
    """The three evaluators of the supplement (C, Table 2), each reading the image's two captions with Fig. 1a's
    instruction: Qwen 2.5 (on the mini world a strict caption reader), Llama 3 (a lenient one: only invented
    items are hallucinated) and InternVL (a reader that judges each round against the captions alone, never
    against the earlier rounds: Table 2's InternVL calls 0.2% and 1.7% of the rounds Repeated, the others 3-5%).
    ``llm``: a transformers LLM for the first two, and then ``vlm`` reads the captions as InternVL does.
    ``image_evaluator=True`` (ours, an extension): InternVL's role is the MLLM checking each answer against the
    image itself (:class:`ImageEvaluator`), which the mini world can measure but the paper did not do."""
    strict = MiniLM(seed) if llm is None else llm
    lenient = MiniLM(seed, lenient=True) if llm is None else llm
    if image_evaluator:
        third = ImageEvaluator(vlm, "InternVL")
    else:
        third = CaptionEvaluator(MiniLM(seed, repeats=False) if llm is None else CaptionReaderVLM(vlm), "InternVL")
    return [CaptionEvaluator(strict, "Qwen 2.5"), CaptionEvaluator(lenient, "Llama 3"), third]


def vote(labels: Sequence[Sequence[str] | None], n_rounds: int | None = None) -> tuple[list, list[bool]]:
    """The vote over evaluators for each round of one dialogue: its category (the most common label; a tie
    goes to the category listed first, Matched before the others) and whether it is kept (a majority of
    the evaluators that answered say Matched). An evaluator whose answer did not parse abstains; when all
    abstain, each of the dialogue's ``n_rounds`` rounds has no category (None) and is not kept (None: an error)."""
    votes = [v for v in labels if v is not None]
    if not votes:
        if n_rounds is None:
            raise ValueError("no evaluator categorised this dialogue")
        return [None] * n_rounds, [False] * n_rounds
    cats, keep = [], []
    for r in range(len(votes[0])):
        c = Counter(v[r] for v in votes)
        cats.append(max(CATEGORIES, key=lambda k: (c[k], -CATEGORIES.index(k))))
        keep.append(c["Matched"] * 2 > len(votes))
    return cats, keep


# ---------------------------------------------------------------------------------------------
# The pipeline
@dataclass(frozen=True)
class ChatPedesConfig:
    rounds: int = 6
    generators: tuple = GENERATORS
    batch: int = 512

    def tag(self) -> str:
        return config_tag([(g.name, g.role, g.policy, g.noise.contradiction, g.noise.hallucination, g.noise.repetition)
                           for g in self.generators], self.rounds)


def _records(root, split: str, limit: int | None = None) -> tuple[list[str], list[list[str]], list[dict | None], list[int]]:
    """Image paths, their captions, the true person (None outside the mini world: no ``world_meta.json``) and
    the ChatPedes id (the released CUHK-PEDES person id) of every image of a CUHK-PEDES-style split, or of its
    first ``limit`` images."""
    s = load_split("cuhk_pedes", root, split)
    n = len(s.image_paths) if limit is None else min(limit, len(s.image_paths))
    caps: list[list[str]] = [[] for _ in range(n)]
    for c, i in zip(s.captions, s.caption_image_ids):
        if i < n:
            caps[i].append(c)
    paths = list(s.image_paths[:n])
    if (Path(root) / "world_meta.json").is_file():
        meta = read_world_meta(root)
        by_path = {rec["path"]: meta["people"][str(rec["person"])] for rec in meta["images"]}
        base = Path(root) / "imgs"
        people = [by_path[str(Path(p).relative_to(base))] for p in paths]
        ids = [int(p["pid"]) + 1 for p in people]
    else:
        people, ids = [None] * n, [int(p) + 1 for p in s.image_pids[:n]]  # CUHK-PEDES ids as released (the reader subtracts 1)
    return paths, caps, people, ids


def construct_split(root, split: str, vlm, evaluators, config: ChatPedesConfig = ChatPedesConfig(), seed: int = 0,
                    progress: bool = True, limit: int | None = None) -> list[dict]:
    """Every image of ``split`` (or its first ``limit``) gets one dialogue per generator; each dialogue's rounds
    are categorised by every evaluator, voted on and given their true category (``truth``: None on real data,
    where no one knows it). One record per dialogue."""
    from ..datasets.torch_data import load_images, native_size

    paths, caps, people, ids = _records(root, split, limit)
    rel = [Path(os.path.relpath(p, Path(root) / "imgs")).as_posix() for p in paths]
    out = []
    starts = range(0, len(paths), config.batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"ChatPedes {split}", leave=False, mininterval=2.0)
    for s in starts:
        sl = slice(s, s + config.batch)
        ims = [im.permute(1, 2, 0).numpy() for im in load_images(paths[sl], native_size(paths[s]))]
        for gen in config.generators:
            dias = generate_dialogues(ims, rel[sl], gen, vlm, config.rounds, seed)
            labels = [ev(dias, caps[sl], ims) for ev in evaluators]
            for k, d in enumerate(dias):
                i = s + k
                cats, keep = vote([lab[k] for lab in labels], len(d))
                out.append({"split": split, "file_path": rel[i], "id": ids[i], "generator": gen.name,
                            "rounds": [list(r) for r in d], "truth": None if people[i] is None else true_categories(people[i], d),
                            "labels": {ev.role: lab[k] for ev, lab in zip(evaluators, labels)}, "vote": cats, "kept": keep})
    return out


def _released(records: list[dict], clean: bool) -> list[dict]:
    """ChatPedes entries as released: one per image, ``chats`` its dialogues (one per generator), each a
    list of rounds ``[{"from": "gpt", ...}, {"from": "user", ...}]``; ``clean`` drops the rounds the vote did
    not keep (and a dialogue left with none)."""
    by_image: dict[str, dict] = {}
    for rec in records:
        e = by_image.setdefault(rec["file_path"], {"id": rec["id"], "file_path": rec["file_path"], "chats": []})
        rounds = [r for r, k in zip(rec["rounds"], rec["kept"]) if k or not clean]
        if rounds:
            e["chats"].append([[{"from": "gpt", "value": q}, {"from": "user", "value": a}] for q, a in rounds])
    return [e for e in by_image.values() if e["chats"]]


def link_images(target, link) -> None:
    """``link`` -> ``target``, relative, so that a cache folder can move (or be copied to another machine)
    with the images it links to; a link left dangling by an earlier move is made again."""
    link, target = Path(link), Path(target).resolve()
    if (link.exists() and not link.is_symlink()) or (link.is_symlink() and link.exists() and link.resolve() == target):
        return  # a real folder of images, or the right link already
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent.resolve()), target_is_directory=True)


def build_chatpedes(scale: str = "small", seed: int = 0, vlm=None, llm=None, config: ChatPedesConfig = ChatPedesConfig(),
                    progress: bool = True, root=None, limit: int | None = None, image_evaluator: bool = False) -> Path:
    """ChatPedes from the CUHK-PEDES-style images (train and test), cached by scale, seed, the assistants,
    ``config``, the annotations and ``limit``: ``records.json`` (every dialogue, its labels, votes and truth) and
    two release-format folders, ``raw/`` (every round) and ``clean/`` (the rounds the vote kept), each with
    ``train_reid.json``, ``test_reid.json`` and ``imgs/`` (a link to the CUHK-PEDES-style images).

    ``root``: a CUHK-PEDES folder (the user's, at paper; then ``vlm`` must be given, and the rounds have no true
    category); None: the mini world's. ``limit``: the first ``limit`` images of each split only (None: all).
    ``image_evaluator``: InternVL's role checks the image (ours; :func:`default_evaluators`)."""
    from .. import assistants as A
    from ..world import world_dataset

    if root is None:
        root = world_dataset("cuhk_pedes", scale, seed, progress=progress)
    elif vlm is None:
        raise ValueError("build_chatpedes on a real CUHK-PEDES folder needs vlm, a transformers MLLM (the mini one knows only the mini world)")
    vlm = vlm or A.mini_vlm(scale, seed, progress=progress)
    evaluators = default_evaluators(vlm, llm, seed, image_evaluator)
    who = [vlm.name] + [f"{e.role}:{type(e).__name__}:{e.name}" for e in evaluators]
    who.append(hashlib.sha1(prompts.DIANA_CATEGORIZE.template.encode()).hexdigest()[:8])  # the instruction the readers get
    ann = hashlib.sha1((Path(root) / "reid_raw.json").read_bytes()).hexdigest()[:12]
    extra = [] if limit is None else [f"first{limit}"]
    folder = cache_dir() / "chatpedes" / f"{scale}-seed{seed}-{config_tag(config.tag(), who, ann, seed, *extra)}"
    if (folder / "records.json").is_file():
        for kind in ("raw", "clean"):
            link_images(Path(root) / "imgs", folder / kind / "imgs")
        return folder
    records = [r for split in ("train", "test") for r in construct_split(root, split, vlm, evaluators, config, seed, progress, limit)]
    for kind, clean in (("raw", False), ("clean", True)):
        d = folder / kind
        d.mkdir(parents=True, exist_ok=True)
        link_images(Path(root) / "imgs", d / "imgs")
        for split, fname in (("train", "train_reid.json"), ("test", "test_reid.json")):
            write_json_atomic(d / fname, _released([r for r in records if r["split"] == split], clean))
    write_json_atomic(folder / "records.json", records)  # last: its presence says the folder is complete
    return folder


def check_paper_models(scale: str, data_root, weights, vlm, n_dialogues: int | None = None, n_live: int | None = None) -> None:
    """Notebook 06's checks across parameters, in its first cell: at ``scale="paper"`` DiaNA starts from real CLIP
    weights (None would train the mini CLIP); on real data (``data_root``) building ChatPedes (``n_dialogues``)
    and the live simulated user (``n_live``) need the user's MLLM (``vlm``): the mini one knows only the mini world."""
    if scale == "paper" and weights is None:
        raise ValueError("parameter 'weights': scale='paper' trains DiaNA from real CLIP weights (e.g. 'ViT-B-16' under PR_WEIGHTS_DIR); "
                         "None would train the mini CLIP")
    if data_root is not None and vlm is None:
        for name, v in (("n_dialogues", n_dialogues), ("n_live", n_live)):
            if v is not None:
                raise ValueError(f"parameter {name!r}: on real data (data_root) your MLLM writes and answers the dialogues: set parameter 'vlm'")


def vision_parameter(name: str, value):
    """Notebook 06's ``vision`` rule: None (at paper the paper's Swin V2-B, :data:`SWIN_NAME`), "clip" or a folder."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"parameter {name!r} must be None (the paper's Swin V2-B), 'clip' or a Swinv2 folder, got {type(value).__name__}")
    return value


def resolve_vision(scale: str, vision) -> str | None:
    """DiaNA's image encoder for a run: a Swin V2 folder, or None for the backbone's (CLIP's) image tower. On the
    mini world always the mini CLIP's; at ``scale="paper"`` ``vision`` None is the paper's Swin Transformer V2-B
    (:data:`SWIN_NAME` under PR_MODELS_DIR), "clip" CLIP's tower, anything else a Swinv2 folder."""
    if scale != "paper" or vision == "clip":
        return None
    from ..assistants.hf import resolve_model

    try:
        return resolve_model(SWIN_NAME if vision is None else vision)
    except FileNotFoundError as e:
        raise ValueError(f"parameter 'vision': {e} (vision='clip' uses CLIP's image tower instead)") from None


def read_records(folder) -> list[dict]:
    return json.loads((Path(folder) / "records.json").read_text())


# ---------------------------------------------------------------------------------------------
# Table 2 and the evaluators' quality
def cleaning_table(records: list[dict]) -> pd.DataFrame:
    """The supplement's Table 2: per generator and evaluator, the rounds in each category (count and share of
    the generator's rounds), the rounds whose answer did not parse (the evaluator abstained), the total and the
    rounds the vote retained."""
    rows = []
    gens = sorted({r["generator"] for r in records})
    roles = list(records[0]["labels"]) if records else []
    for g in gens:
        recs = [r for r in records if r["generator"] == g]
        total = sum(len(r["rounds"]) for r in recs)
        kept = sum(sum(r["kept"]) for r in recs)
        for role in roles:
            c = Counter(x for r in recs for x in (r["labels"][role] or ["(unparsed)"] * len(r["rounds"])))
            row = {"generator": g, "evaluator": role}
            for cat in CATEGORIES:
                row[cat] = c[cat]
                row[f"{cat} %"] = 100.0 * c[cat] / total if total else float("nan")
            row["unparsed"] = c["(unparsed)"]
            row.update({"total": total, "retained": kept, "retained %": 100.0 * kept / total if total else float("nan")})
            rows.append(row)
    return pd.DataFrame(rows)


def evaluator_quality(records: list[dict]) -> pd.DataFrame:
    """Each evaluator's (and the vote's) precision and recall per category against the rounds' true
    categories, and the vote's cleaning: of the rounds kept, the share truly matched (precision of
    "kept"), and of the truly matched rounds, the share kept. Needs the true categories (the mini world's)."""
    if any(r["truth"] is None for r in records):
        raise ValueError("evaluator_quality needs each round's true category, which only the mini world knows")
    truth = [t for r in records for t in r["truth"]]
    judges = {role: [x for r in records for x in (r["labels"][role] or [None] * len(r["rounds"]))] for role in records[0]["labels"]}
    judges["vote"] = [x for r in records for x in r["vote"]]
    rows = []
    for name, pred in judges.items():
        for cat in CATEGORIES:
            tp = sum(p == cat and t == cat for p, t in zip(pred, truth))
            npred = sum(p == cat for p in pred)
            ntrue = sum(t == cat for t in truth)
            rows.append({"judge": name, "category": cat, "true rounds": ntrue, "precision": 100.0 * tp / npred if npred else float("nan"),
                         "recall": 100.0 * tp / ntrue if ntrue else float("nan")})
    kept = [k for r in records for k in r["kept"]]
    tp = sum(k and t == "Matched" for k, t in zip(kept, truth))
    rows.append({"judge": "vote (kept)", "category": "Matched", "true rounds": sum(t == "Matched" for t in truth),
                 "precision": 100.0 * tp / max(1, sum(kept)), "recall": 100.0 * tp / max(1, sum(t == "Matched" for t in truth))})
    return pd.DataFrame(rows)


# =============================================================================================
# DiaNA: the model


def dialogue_text(rounds: Sequence[tuple[str, str]], system: str = prompts.DIANA_SYSTEM) -> str:
    """The dialogue encoder's input (supplement B.2, Vicuna's format): the system message, then
    "ASSISTANT: question\\nUSER: answer" per round."""
    return system + "\n" + "\n".join(f"ASSISTANT: {q}\nUSER: {a}" for q, a in rounds)


def rounds_of(chat: list) -> list[tuple[str, str]]:
    """A released dialogue (rounds of two turns) as (question, answer) pairs."""
    return [(q["value"], a["value"]) for q, a in chat]


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x * sigmoid(1.702 x), as the release's refiner blocks use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefinerBlock(nn.Module):
    """One block of the release's refiner (``modeling_refiner.ResidualAttentionBlock``, CLIP's): pre-LN
    self-attention and a 4x MLP with QuickGELU, each added to its input."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, 4 * dim)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * dim, dim))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class AttributeRefiner(nn.Module):
    """DiaNA's adaptive attribute refiner as the release computes it (``modeling_refiner.Refiner.forward_train``):
    ``k`` learnable queries (N(0, 0.02)) read the tokens through one cross-attention (padding masked; no norm
    before it, no residual around it: its output is the queries' new state), then ``depth`` CLIP blocks
    (:class:`RefinerBlock`). ``heads``: None, the release's ``dim // 64`` (at least 1). The release's
    initialisation: attention in-projections N(0, dim^-1/2), out-projections and the MLP's second layer
    N(0, dim^-1/2 (2 depth)^-1/2), the MLP's first N(0, (2 dim)^-1/2). Out: [B, k, D]."""

    def __init__(self, dim: int, k: int = 16, heads: int | None = None, depth: int = 2):
        super().__init__()
        heads = max(1, dim // 64) if heads is None else heads
        heads = heads if dim % heads == 0 else 1
        self.queries = nn.Parameter(torch.randn(k, dim) * 0.02)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.blocks = nn.ModuleList(RefinerBlock(dim, heads) for _ in range(depth))
        attn_std = dim ** -0.5
        proj_std = attn_std * (2 * max(1, depth)) ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.cross.in_proj_weight, std=attn_std)
            nn.init.normal_(self.cross.out_proj.weight, std=proj_std)
            for b in self.blocks:
                nn.init.normal_(b.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(b.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(b.mlp.c_fc.weight, std=(2 * dim) ** -0.5)
                nn.init.normal_(b.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        x = self.cross(q, tokens, tokens, key_padding_mask=None if valid is None else ~valid, need_weights=False)[0]
        for b in self.blocks:
            x = b(x)
        return x


class LlamaDialogueEncoder(nn.Module):
    """The real path's dialogue encoder: a causal LM (Llama 3.2-1B in the paper) from a local folder; the pooled
    feature is the last non-padding token's hidden state, projected; the tokens are every hidden state, projected."""

    def __init__(self, model, tokenizer, dim: int, max_length: int = 400):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        hidden = model.config.hidden_size
        self.proj, self.token_proj = nn.Linear(hidden, dim), nn.Linear(hidden, dim)

    @classmethod
    def load(cls, path, dim: int, max_length: int = 400):
        from transformers import AutoModel, AutoTokenizer

        from ..assistants.hf import resolve_model

        folder = resolve_model(path)
        return cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), dim, max_length)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        ids = enc["input_ids"]
        return ids.masked_fill(enc["attention_mask"] == 0, -1)  # -1 marks padding (a pad id may be a real token)

    def forward(self, ids: torch.Tensor):
        mask = ids >= 0
        h = self.model(input_ids=ids.clamp_min(0), attention_mask=mask.long()).last_hidden_state
        last = (mask.sum(1) - 1).clamp_min(0)
        pooled = h[torch.arange(len(h), device=h.device), last]
        return self.proj(pooled), self.token_proj(h), mask


#: The release's input statistics for ChatPedes (train/configs/dataset_config.yaml), which the Swin encoder reads.
CHATPEDES_MEAN, CHATPEDES_STD = (0.38901278, 0.3651612, 0.34836376), (0.24344306, 0.23738699, 0.23368555)
#: Table 1's image resolution (height, width), at which the release runs Swin V2-B (``--force_image_size 384 192``).
SWIN_IMAGE_SIZE = (384, 192)
#: The Swin V2-B checkpoint the release starts from (train/shell/*.sh), the folder name looked up under PR_MODELS_DIR.
SWIN_NAME = "swinv2-base-patch4-window12-192-22k"


class SwinImageEncoder(nn.Module):
    """The paper's image encoder, Swin Transformer V2-B (transformers' ``Swinv2Model``, from a local folder, as
    the release loads it): its pooled output and its last hidden states, both through one linear projection to
    the joint dimension (the release's ``vision_projection``, truncated-normal 0.02, bias 0). The training loop
    hands CLIP-normalised images; they are re-normalised with the release's ChatPedes statistics."""

    def __init__(self, model, dim: int, image_size=SWIN_IMAGE_SIZE):
        super().__init__()
        self.model, self.image_size = model, tuple(image_size)
        self.proj = nn.Linear(model.num_features, dim)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        from ..datasets.torch_data import CLIP_MEAN, CLIP_STD

        self.register_buffer("clip_mean", CLIP_MEAN.reshape(1, 3, 1, 1).clone().float(), persistent=False)
        self.register_buffer("clip_std", CLIP_STD.reshape(1, 3, 1, 1).clone().float(), persistent=False)
        self.register_buffer("mean", torch.tensor(CHATPEDES_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CHATPEDES_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, path, dim: int, image_size=SWIN_IMAGE_SIZE) -> "SwinImageEncoder":
        from transformers import Swinv2Model

        from ..assistants.hf import resolve_model

        return cls(Swinv2Model.from_pretrained(resolve_model(path), image_size=list(image_size)), dim, image_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ((images * self.clip_std + self.clip_mean) - self.mean) / self.std
        out = self.model(pixel_values=x)
        return self.proj(out.pooler_output), self.proj(out.last_hidden_state)


class DiaNAModel(nn.Module):
    """DiaNA: an image encoder (the backbone's, or ``image_encoder``: the paper's Swin V2, :class:`SwinImageEncoder`),
    a dialogue encoder, and the adaptive attribute refiners (one shared between the modalities, as the released
    code does, or one per modality, as the paper says). The similarity is
    the mean of the global cosine and the refined one (the cosine per attribute query, averaged over K)."""

    def __init__(self, backbone, k: int = 16, shared: bool = True, dialogue_encoder: nn.Module | None = None,
                 image_encoder: nn.Module | None = None):
        super().__init__()
        d = backbone.embed_dim
        self.backbone, self.dialogue_encoder, self.image_encoder = backbone, dialogue_encoder, image_encoder
        self.refiner_img = AttributeRefiner(d, k)
        self.refiner_txt = self.refiner_img if shared else AttributeRefiner(d, k)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(50.0)))  # learnable, starts at 50, capped at 100

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.tokenize(texts) if self.dialogue_encoder is None else self.dialogue_encoder.tokenize(texts)

    def embed_images(self, x):
        pooled, tokens = self.backbone.encode_image(x) if self.image_encoder is None else self.image_encoder(x)
        return {"global": pooled, "refined": self.refiner_img(tokens)}

    def embed_texts(self, ids):
        if self.dialogue_encoder is None:
            from .tpr import word_mask

            pooled, tokens = self.backbone.encode_text(ids, shared_prefix=True)  # the system message once per batch
            pos = torch.arange(tokens.shape[1], device=ids.device).view(1, -1)
            valid = word_mask(ids, tokens.shape[1]) | (pos == ids[:, : tokens.shape[1]].argmax(-1, keepdim=True))  # words and EOT
        else:
            pooled, tokens, valid = self.dialogue_encoder(ids)
        return {"global": pooled, "refined": self.refiner_txt(tokens, valid)}

    def embed_prefixes(self, content: torch.Tensor, ends: torch.Tensor) -> list[dict]:
        """The embeddings of K prefixes of every dialogue from one pass of the mini CLIP's text tower
        (:meth:`Backbone.encode_text_ends`; ``content`` [B, m] the whole dialogue's tokens without its
        end-of-text token, ``ends`` [B, K] the prefixes' lengths): one dict per prefix, as
        :meth:`embed_texts` gives for the dialogue cut there. The refiner reads the same tokens: the
        prefix's words and its own end-of-text token."""
        if self.dialogue_encoder is not None:
            raise NotImplementedError("embed_prefixes reads the mini CLIP's text tower; a causal LM encodes each prefix on its own")
        tokens = self.backbone.encode_text_ends(content, ends)
        B, m = content.shape
        pos = torch.arange(m, device=content.device).view(1, -1)
        out = []
        for k in range(ends.shape[1]):
            words = (pos > 0) & (pos < ends[:, k: k + 1])
            own_end = F.one_hot(torch.full((B,), k, device=content.device), ends.shape[1]).bool()
            out.append({"global": tokens[:, m + k], "refined": self.refiner_txt(tokens, torch.cat([words, own_end], 1))})
        return out

    @staticmethod
    def refined_scores(txt_ref: torch.Tensor, img_ref: torch.Tensor) -> torch.Tensor:
        """[Q, G]: the cosine of attribute query k of a text and of an image, averaged over k."""
        return torch.einsum("qkd,gkd->qg", F.normalize(txt_ref, dim=-1), F.normalize(img_ref, dim=-1)) / txt_ref.shape[1]

    @classmethod
    def similarity(cls, txt, img):
        g = F.normalize(txt["global"], dim=-1) @ F.normalize(img["global"], dim=-1).T
        return (g + cls.refined_scores(txt["refined"], img["refined"])) / 2

    def forward(self, images, ids):
        img, txt = self.embed_images(images), self.embed_texts(ids)
        txt["logit_scale"] = self.logit_scale.exp().clamp(max=100.0)
        return img, txt


#: The release's SDM (``loss.compute_sdm``): KL(p || q) with ``log(q + 1e-6)``, each direction's loss averaged
#: over its rows, and the two directions averaged, ``(t2i + i2t) / 2`` (``modeling_diana.py``,
#: ``modeling_refiner.py``): half of IRRA's SDM, which sums them (:func:`losses.sdm_loss`).
SDM_EPS = 1e-6


def release_sdm(scores: torch.Tensor, pids: torch.Tensor, logit_scale) -> torch.Tensor:
    """DiaNA's SDM as the release computes it: the mean of the two directions (weight 1/2 each), eps 1e-6."""
    return losses.sdm_from_scores(scores, pids, logit_scale, eps=SDM_EPS) / 2


def diana_losses(global_scores: torch.Tensor, refined_scores: torch.Tensor, pids: torch.Tensor, logit_scale, sdm: bool = True) -> dict:
    """DiaNA's loss terms as the release sums them with weight 1 each (``modeling_diana.DiaNAModel.forward``):
    ITC on the global cosines [images, texts], SDM on them (``sdm``: fine-tuning; off while pretraining), and the
    refiner's ITC and SDM on the refined scores. ITC and SDM each average their two directions."""
    parts = {"itc": losses.itc_from_scores(global_scores, pids, logit_scale)}
    if sdm:
        parts["sdm"] = release_sdm(global_scores, pids, logit_scale)
    parts["itc_refined"] = losses.itc_from_scores(refined_scores, pids, logit_scale)
    if sdm:
        parts["sdm_refined"] = release_sdm(refined_scores, pids, logit_scale)
    return parts


def mask_tokens(ids: torch.Tensor, valid: torch.Tensor, prob: float, mask_id: int, vocab: tuple[int, int],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """BERT-style random masking of the dialogue: each valid token is picked with ``prob``; a picked token
    becomes ``mask_id`` (80%), a random id in ``vocab`` = [low, high) (10%), or stays (10%)."""
    if prob <= 0:
        return ids
    r = torch.rand(ids.shape, generator=generator)
    pick = valid & (r < prob)
    how = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[pick & (how < 0.8)] = mask_id
    rand = pick & (how >= 0.8) & (how < 0.9)
    out[rand] = torch.randint(vocab[0], vocab[1], (int(rand.sum()),), generator=generator)
    return out


# =============================================================================================
# DiaNA: data, task, training
def chat_retrieval_data(entries: list[dict], image_root, tokenize, size, n_rounds: int | None = None, keep_pids: set | None = None,
                        text=dialogue_text):
    """A ChatPedes split as a retrieval split: the gallery its images, the queries its dialogues (each cut to
    its first ``n_rounds`` rounds; None: all), read as ``text(rounds)``."""
    from ..datasets.torch_data import RetrievalData, load_images

    keep = [e for e in entries if keep_pids is None or e["id"] in keep_pids]
    paths = [str(Path(image_root) / e["file_path"]) for e in keep]
    texts, cpids, cimg = [], [], []
    for i, e in enumerate(keep):
        for chat in e["chats"]:
            r = rounds_of(chat)
            texts.append(text(r if n_rounds is None else r[:n_rounds]))
            cpids.append(e["id"])
            cimg.append(i)
    return RetrievalData(images=load_images(paths, size), image_pids=torch.tensor([e["id"] for e in keep]), tokens=tokenize(texts),
                         caption_pids=torch.tensor(cpids), caption_image_ids=torch.tensor(cimg), captions=texts, image_paths=paths)


def concatenated(rounds: Sequence[tuple[str, str]]) -> str:
    """A dialogue as one plain text, as a TPR model reads it: the questions and answers in order."""
    return " ".join(f"{q} {a}" for q, a in rounds)


#: The release's image augmentation (train/main/train/dataset.py:99-108, both stages): Resize(384, 192),
#: RandomHorizontalFlip, Pad(10) (zeros: black), RandomCrop(384, 192), ToTensor, Normalize(mean, std), then
#: RandomErasing(scale=(0.02, 0.4), value=mean) with torchvision's p = 0.5 and ratio = (0.3, 3.3).
RELEASE_PAD, RELEASE_HEIGHT = 10, 384
ERASE_PROB, ERASE_SCALE, ERASE_RATIO = 0.5, (0.02, 0.4), (0.3, 3.3)


def erase_fill() -> tuple[int, int, int]:
    """The uint8 pixel the release's erasing writes: it erases after ``Normalize(mean, std)`` with
    ``value=mean``, so an erased pixel's *normalised* value is the mean (not 0, the mean colour). Here the
    training loop normalises with CLIP's mean and std (:func:`to_float`), so the pixel is 255 (mean + mean * std)."""
    from ..datasets.torch_data import CLIP_MEAN, CLIP_STD

    return tuple(int(round(255 * float(m + m * s))) for m, s in zip(CLIP_MEAN.flatten(), CLIP_STD.flatten()))


def crop_padding(height: int, pad: int | None = None) -> int:
    """The crop's padding in pixels: ``pad``, or (None) the release's 10 pixels at its 384-pixel height scaled to
    ``height`` (10 at 384, 3 at the mini world's 128, 2 at 64), so the crop moves the person as far relative to
    the image."""
    return int(round(RELEASE_PAD * height / RELEASE_HEIGHT)) if pad is None else int(pad)


def augment_images(img: torch.Tensor, crop_pad: int, erase_prob: float) -> torch.Tensor:
    """The release's training augmentation on a uint8 batch (B, 3, H, W), in its order: a horizontal flip
    (p 0.5), a random crop with ``crop_pad`` pixels of black padding, random erasing (``erase_prob``, 2-40% of
    the area, aspect 0.3-3.3, :func:`erase_fill`). Erasing a uint8 pixel before the loop normalises it is
    erasing after normalisation as the release does (to the fill's rounding to whole pixel values). All draws
    from torch's global generator; ``img`` is overwritten by the flip (pass a copy)."""
    from ..datasets.torch_data import random_crop_with_padding, random_erasing

    flip = torch.rand(len(img)) < 0.5
    img[flip] = img[flip].flip(-1)
    img = random_crop_with_padding(img, crop_pad)
    return random_erasing(img, erase_prob, ERASE_SCALE, ERASE_RATIO, erase_fill())


class _DialoguePairs:
    """Training pairs (image, dialogue), one per dialogue. Each batch draws, per pair, a random prefix of 1..n
    rounds (``random_prefix``) and masks its tokens (``mask_prob``, BERT-style), and augments its images
    (:func:`augment_images`: flip, crop with ``crop_pad`` pixels of padding, erasing with ``erase_prob``), from
    torch's global generator (checkpointed by the training loop, so a resumed run sees the same draws)."""

    def __init__(self, images, image_ids, prefix_tokens, n_rounds, pids, random_prefix, mask_prob, mask_id, vocab, valid_fn,
                 crop_pad: int = 0, erase_prob: float = 0.0):
        self.images, self.image_ids, self.prefix_tokens, self.n_rounds = images, image_ids, prefix_tokens, n_rounds
        self.random_prefix, self.mask_prob, self.mask_id, self.vocab, self.valid_fn = random_prefix, mask_prob, mask_id, vocab, valid_fn
        self.crop_pad, self.erase_prob = crop_pad, erase_prob
        uniq = torch.unique(pids)
        lut = {int(p): i for i, p in enumerate(uniq.tolist())}
        self.pids = torch.tensor([lut[int(p)] for p in pids])
        self.num_ids = len(uniq)

    def __len__(self):
        return len(self.pids)

    def batch(self, idx: torch.Tensor) -> dict:
        n = self.n_rounds[idx]
        k = (torch.rand(len(idx)) * n).long() + 1 if self.random_prefix else n  # 1..n rounds
        ids = self.prefix_tokens[idx, k - 1].long()
        ids = mask_tokens(ids, self.valid_fn(ids), self.mask_prob, self.mask_id, self.vocab)
        img = augment_images(self.images[self.image_ids[idx]], self.crop_pad, self.erase_prob)  # indexing copies
        return {"image": img, "ids": trim_dialogue(ids), "pid": self.pids[idx]}


def load_stage1(model: DiaNAModel, path) -> list[str]:
    """Load stage-1 weights into ``model``, also where its refiners differ from stage 1's (the ablations
    fine-tune every variant from the one stage 1): with fewer attribute queries the first K are kept, with
    more the stage-1 queries come first and the rest keep their fresh N(0, 0.02) start; separate refiners
    both start from the shared one. Returns the names of the tensors that were adapted, not copied."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stage-1 weights {p} not found")
    saved, adapted = load_file(str(p)), []
    state = model.state_dict()
    for name, own in state.items():
        src = saved.get(name)
        if src is None and name.startswith(("refiner_txt.", "refiner_img.")):  # a shared refiner is stored once
            other = ("refiner_img." if name.startswith("refiner_txt.") else "refiner_txt.") + name.split(".", 1)[1]
            src = saved.get(other)
            adapted += [name] if src is not None and model.refiner_txt is not model.refiner_img else []
        if src is None:
            raise KeyError(f"{p}: no tensor {name!r} in the stage-1 weights")
        if src.shape != own.shape:
            if not name.endswith(".queries"):
                raise ValueError(f"{p}: {name!r} has shape {tuple(src.shape)} there, {tuple(own.shape)} in this model")
            src = torch.cat([src[: len(own)], own[len(src):]])
            adapted.append(name)
        state[name] = src
    model.load_state_dict(state)
    return sorted(set(adapted))


#: Training settings per scale. ``paper``: the supplement's Table 1 (AdamW, cosine decay; pretraining 3 epochs,
#: total batch 512, lr 1e-4, betas (0.9, 0.98), weight decay 0.05, 1,000 warm-up steps; fine-tuning 10 epochs,
#: batch 128, lr 1e-5, betas (0.9, 0.999), weight decay 0.05, 50 warm-up steps), which the release's scripts
#: (train/shell/pretrain.sh, finetune.sh) match; AdamW's eps is the release's (the transformers Trainer's
#: default, 1e-8; the paper gives none). The mini scales learn at the baselines' rates (notebook 01) with the
#: trainer's defaults (weight decay 0.02, betas (0.9, 0.98), warm-up 0.3 epochs: the mini runs are a few hundred
#: steps, fewer than the paper's 1,000 warm-up steps). Fine-tuning at small: 2 epochs, chosen for notebook 06's
#: time budget (14 fine-tuning runs) on validation, where 3 epochs were level with 2 (R1 27.4 against 26.4,
#: mAP 30.5 against 31.1; seed 0, 2026-12-02).
DIANA_CONFIG = {
    "tiny": {"pretrain": dict(epochs=1, batch_size=16, lr=5e-4, warmup_epochs=0.3), "finetune": dict(epochs=1, batch_size=16, lr=5e-4, warmup_epochs=0.3)},
    "small": {"pretrain": dict(epochs=2, batch_size=64, lr=5e-4, warmup_epochs=0.3), "finetune": dict(epochs=2, batch_size=64, lr=5e-4, warmup_epochs=0.3)},
    "paper": {"pretrain": dict(epochs=3, batch_size=512, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), adam_eps=1e-8, warmup_steps=1000),
              "finetune": dict(epochs=10, batch_size=128, lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), adam_eps=1e-8, warmup_steps=50)},
}
#: The LLM dialogue encoder's sequence length per stage, Table 1 (tokens; longer dialogues are truncated).
SEQ_LENGTH = {"pretrain": 100, "finetune": 400}
#: Where the release's scripts differ from Table 1, named options: stage 1 with 56 tokens (pretrain.sh's
#: ``--max_seq_length 56``; ``seq_length=RELEASE_PRETRAIN_SEQ``) and 24 attribute queries (``--num_query 24``;
#: ``num_queries=RELEASE_PRETRAIN_QUERIES``); Table 1 and the text (K = 16) are the defaults.
RELEASE_PRETRAIN_SEQ, RELEASE_PRETRAIN_QUERIES = 56, 24
#: Identities of the pretraining corpus (the world's generic captions as one-round dialogues; MALS in the paper).
PRETRAIN_IDS = {"tiny": 60, "small": 3000}
CONTEXT = {"tiny": 248, "small": 248}  # the mini CLIP's text positions, stretched (CTGI's PES) for dialogues


class DiaNATask:
    """DiaNA through :func:`person_retrieval.train.fit`. ``stage="pretrain"``: single-shot generic captions as
    one-round dialogues (an instruction of the supplement's Fig. 1c, then the caption as the answer), ITC only;
    ``stage="finetune"``: the ChatPedes folder ``chat_root`` (release format), ITC and SDM on the global and
    the refined features, from the stage-1 weights ``stage1``. ``llm``: a local causal LM as the dialogue
    encoder (else the mini CLIP's text tower, positions stretched to 248). Training images are flipped, cropped
    with ``crop_pad`` pixels of padding (None: the release's 10 at 384 pixels high, scaled to the image height,
    :func:`crop_padding`; 0: no crop) and erased with probability ``erase_prob`` (the release's 0.5; 0: none), in
    both stages as the release does. ``seq_length``: the LLM encoder's tokens (None: Table 1's, 100 in stage 1 and
    400 in fine-tuning, :data:`SEQ_LENGTH`); ``vision``: a Swin V2 folder as the image encoder (the paper's; None:
    the backbone's image tower), images then at Table 1's 384x192. Validation: ``val_holdout`` of the training
    identities, held out, at full dialogues."""

    def __init__(self, chat_root: str | None = None, scale: str = "small", seed: int = 0, init: str | None = None,
                 weights: str | None = None, llm: str | None = None, num_queries: int = 16, shared: bool = True,
                 mask_prob: float = 0.15, random_prefix: bool = True, stage: str = "finetune", stage1: str | None = None,
                 val_holdout: float = 0.1, image_root: str | None = None, crop_pad: int | None = None, erase_prob: float = ERASE_PROB,
                 seq_length: int | None = None, vision: str | None = None):
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        if stage == "finetune" and not chat_root:
            raise ValueError("stage='finetune' needs chat_root, a ChatPedes folder")
        self.chat_root, self.scale, self.seed, self.init, self.weights, self.llm = chat_root, scale, seed, init, weights, llm
        self.num_queries, self.shared, self.mask_prob, self.random_prefix = num_queries, shared, mask_prob, random_prefix
        self.stage, self.stage1, self.val_holdout, self.image_root = stage, stage1, val_holdout, image_root
        self.crop_pad, self.erase_prob = crop_pad, erase_prob
        self.seq_length = SEQ_LENGTH[stage] if seq_length is None else int(seq_length)
        self.vision = vision

    @cached_property
    def backbone(self):
        from ..models import build_backbone, stretch_text_encoder
        from ..models.retrieval import fixed_temperature
        from ..train import load_weights

        bb = build_backbone(self.weights, self.scale if self.weights is None else "small")
        if self.init:
            load_weights(bb, self.init)
        if self.weights is None:
            bb.clip.visual.lock()  # the mini CLIP's trunk stays as pretrained (LiT), as in notebook 01
            if self.llm is None and CONTEXT.get(self.scale, 248) > bb.context_length:
                stretch_text_encoder(bb, keep=20, length=CONTEXT.get(self.scale, 248))
        return fixed_temperature(bb)  # DiaNA learns its own scale

    @cached_property
    def dialogue_encoder(self):
        if self.llm is None:
            return None
        return LlamaDialogueEncoder.load(self.llm, self.backbone.embed_dim, self.seq_length)

    @cached_property
    def image_encoder(self):
        """The paper's Swin V2 (``vision``: its folder), or None: the backbone's image tower (CLIP)."""
        if self.vision is None:
            return None
        for p in self.backbone.clip.visual.parameters():  # CLIP's image tower is not used: kept out of training
            p.requires_grad_(False)
        return SwinImageEncoder.load(self.vision, self.backbone.embed_dim)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.backbone.image_size if self.image_encoder is None else self.image_encoder.image_size

    def build(self) -> DiaNAModel:
        m = DiaNAModel(self.backbone, self.num_queries, self.shared, self.dialogue_encoder, self.image_encoder)
        if self.stage1:
            load_stage1(m, self.stage1)
        return m

    def _tokenize(self, texts):
        return (self.backbone.tokenize if self.dialogue_encoder is None else self.dialogue_encoder.tokenize)(texts)

    @cached_property
    def _system_tokens(self) -> int:
        """How many leading tokens the system message takes (the same at the head of every dialogue)."""
        from ..models.backbone import common_prefix

        return common_prefix(self._tokenize([prompts.DIANA_SYSTEM + "\nalpha", prompts.DIANA_SYSTEM + "\nomega"]))

    def _maskable(self, ids):
        """The dialogue's tokens that masking may pick: its words, not padding, not the system message
        (which every dialogue shares, so the text tower reads it once per batch)."""
        if self.dialogue_encoder is not None:
            ok = ids >= 0
        else:
            from .tpr import word_mask

            ok = word_mask(ids, ids.shape[1])
        return ok & (torch.arange(ids.shape[1]) >= self._system_tokens)

    def _mask_spec(self):
        if self.dialogue_encoder is None:
            return int(self.backbone.tokenize(["*"])[0, 1]), (1, 49406)  # CLIP's BPE: no [MASK]; a rare symbol; words only
        tok = self.dialogue_encoder.tokenizer
        return int(tok.unk_token_id if tok.unk_token_id is not None else tok.eos_token_id), (0, len(tok))

    @cached_property
    def _data(self):
        """(train dialogues [(image index, rounds, pid)], images, validation RetrievalData)."""
        from ..datasets import read_chatpedes

        if self.stage == "pretrain":
            from ..models.pretrain import pretrain_corpus

            images, caps, pids = pretrain_corpus(self.scale, self.seed, PRETRAIN_IDS.get(self.scale, 3000))
            rng = np.random.default_rng(self.seed)
            instr = prompts.DIANA_DESCRIPTION_INSTRUCTIONS
            dias = [(i, [(instr[int(rng.integers(len(instr)))], c)], int(p)) for i, (c, p) in enumerate(zip(caps, pids.tolist()))]
        else:
            root = Path(self.chat_root)
            entries = read_chatpedes(root, "train", self.image_root)
            from ..datasets.torch_data import load_images

            base = Path(self.image_root) if self.image_root else root / "imgs"
            images = load_images([str(base / e["file_path"]) for e in entries], self.image_size)
            dias = [(i, rounds_of(c), int(e["id"])) for i, e in enumerate(entries) for c in e["chats"]]
        ids = sorted({p for _, _, p in dias})
        from ..config import rng_for

        held = set(rng_for(self.seed, "diana", "holdout").choice(ids, size=max(2, int(len(ids) * self.val_holdout)), replace=False).tolist())
        train = [d for d in dias if d[2] not in held]
        val = [d for d in dias if d[2] in held]
        return train, images, val

    def train_data(self) -> _DialoguePairs:
        train, images, _ = self._data
        n_max = max(len(r) for _, r, _ in train)
        L = self._tokenize(["x"]).shape[1]
        table = torch.zeros((len(train), n_max, L), dtype=torch.int32)
        texts, where = [], []
        for j, (_, r, _) in enumerate(train):
            for k in range(1, len(r) + 1):
                texts.append(dialogue_text(r[:k]))
                where.append((j, k - 1))
        tok = self._tokenize(texts)
        for (j, k), t in zip(where, tok):
            table[j, k] = t.to(torch.int32)
        mask_id, vocab = self._mask_spec()
        return _DialoguePairs(images, torch.tensor([i for i, _, _ in train]), table, torch.tensor([len(r) for _, r, _ in train]),
                              torch.tensor([p for _, _, p in train]), self.random_prefix, self.mask_prob, mask_id, vocab, self._maskable,
                              crop_padding(images.shape[-2], self.crop_pad), self.erase_prob)

    @cached_property
    def _val(self):
        from ..datasets.torch_data import RetrievalData

        _, images, val = self._data
        img_idx = sorted({i for i, _, _ in val})
        remap = {i: k for k, i in enumerate(img_idx)}
        texts = [dialogue_text(r) for _, r, _ in val]
        pid_of = {i: p for i, _, p in val}
        return RetrievalData(images=images[img_idx], image_pids=torch.tensor([pid_of[i] for i in img_idx]), tokens=self._tokenize(texts),
                             caption_pids=torch.tensor([p for _, _, p in val]), caption_image_ids=torch.tensor([remap[i] for i, _, _ in val]),
                             captions=texts)

    def evaluate(self, model) -> dict:
        from ..models.retrieval import evaluate_retrieval

        return evaluate_retrieval(model, self._val)

    def loss(self, model, batch, gather):
        img, txt = model(batch["image"], batch["ids"])
        scale = txt["logit_scale"]
        pid = gather(batch["pid"])
        gi, gt = F.normalize(gather(img["global"]), dim=-1), F.normalize(gather(txt["global"]), dim=-1)
        refined = DiaNAModel.refined_scores(gather(txt["refined"]), gather(img["refined"])).T  # [images, texts]
        parts = diana_losses(gi @ gt.T, refined, pid, scale, sdm=self.stage == "finetune")  # SDM is off while pretraining
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}


#: Bumped when training changes what a cached run would hold (2: the system message is never masked and is read
#: once per batch; 3: the locked trunk's memo computes in fixed-size chunks; 4: the shared-prefix pass shares its
#: code with the one-pass rounds curve; 5: the release's random crop with padding and random erasing beside the flip;
#: 6: the refiner and SDM as the release computes them, Table 1's optimizer settings at paper).
DIANA_VERSION = 6
NEW_LAYERS = ["refiner_img", "refiner_txt", "dialogue_encoder.proj", "dialogue_encoder.token_proj", "image_encoder.proj"]


def _fit(name: str, task_kw: dict, scale: str, seed: int, gpus: int, stage: str, progress: bool, **overrides):
    from ..train import TaskSpec, TrainConfig, fit, process_tag
    from .tpr import _path_key

    conf = {**DIANA_CONFIG["paper" if task_kw.get("weights") else scale][stage], **overrides}
    conf["lr_mult"] = {n: 5.0 for n in NEW_LAYERS}
    key = {k: (_path_key(v) if k in ("chat_root", "init", "stage1", "image_root", "vision") and v else v) for k, v in task_kw.items()}
    key["version"] = DIANA_VERSION
    out = cache_dir() / "runs" / f"{name}-{scale}-seed{seed}-{config_tag(conf, key, *process_tag(gpus))}"
    return fit(TaskSpec("person_retrieval.papers.diana:DiaNATask", task_kw), TrainConfig(**conf, gpus=gpus, seed=seed, out_dir=str(out), progress=progress))


def pretrained_diana(scale: str = "small", seed: int = 0, gpus: int = 0, init: str | None = None, weights: str | None = None,
                     llm: str | None = None, num_queries: int = 16, shared: bool = True, mask_prob: float = 0.15,
                     crop_pad: int | None = None, erase_prob: float = ERASE_PROB, seq_length: int | None = None, vision: str | None = None,
                     progress: bool = True) -> Path:
    """Stage 1 (cached): DiaNA on the generic captions as one-round dialogues; returns its best weights. ``seq_length``:
    the LLM encoder's tokens (None: Table 1's 100; the release's script: :data:`RELEASE_PRETRAIN_SEQ`); ``vision``:
    a Swin V2 folder as the image encoder (None: the backbone's)."""
    kw = dict(scale=scale, seed=seed, init=init and str(init), weights=weights, llm=llm and str(llm), num_queries=num_queries,
              shared=shared, mask_prob=mask_prob, stage="pretrain", crop_pad=crop_pad, erase_prob=erase_prob, seq_length=seq_length,
              vision=vision and str(vision))
    res = _fit("diana_pretrain", kw, scale, seed, gpus, "pretrain", progress)
    return Path(res.out_dir) / "checkpoints" / "best.safetensors"


def fit_diana(chat_root, scale: str = "small", seed: int = 0, gpus: int = 0, init: str | None = None, weights: str | None = None,
              llm: str | None = None, num_queries: int = 16, shared: bool = True, mask_prob: float = 0.15, random_prefix: bool = True,
              stage1: str | None = None, image_root: str | None = None, crop_pad: int | None = None, erase_prob: float = ERASE_PROB,
              seq_length: int | None = None, vision: str | None = None, progress: bool = True, **overrides):
    """Stage 2 (cached): DiaNA fine-tuned on a ChatPedes folder from the stage-1 weights ``stage1`` (``seq_length``:
    None, Table 1's 400 tokens; ``vision``: a Swin V2 folder as the image encoder, None: the backbone's)."""
    kw = dict(chat_root=str(chat_root), scale=scale, seed=seed, init=init and str(init), weights=weights, llm=llm and str(llm),
              num_queries=num_queries, shared=shared, mask_prob=mask_prob, random_prefix=random_prefix, stage="finetune",
              stage1=stage1 and str(stage1), image_root=image_root and str(image_root), crop_pad=crop_pad, erase_prob=erase_prob,
              seq_length=seq_length, vision=vision and str(vision))
    return _fit("diana", kw, scale, seed, gpus, "finetune", progress, **overrides)


def trim_dialogue(ids: torch.Tensor) -> torch.Tensor:
    """Drop a batch's padding columns: the mini CLIP pads with 0 (:func:`trim_tokens`), a transformers
    tokenizer with -1 (see :class:`LlamaDialogueEncoder`); right padding either way, so this is exact."""
    from ..datasets.torch_data import trim_tokens

    if ids.numel() and ids.min() < 0:
        return ids[:, : max(1, int((ids >= 0).sum(1).max()))]
    return trim_tokens(ids)


@torch.no_grad()
def embed_dialogues(model, ids: torch.Tensor, batch: int = 256) -> dict:
    """Every dialogue's embeddings (``model.embed_texts``), batched by length: the dialogues are sorted by
    their token count, so a batch of one-round dialogues is not padded to the longest six-round one, and
    the result comes back in the input order. About a third faster on the rounds curve than input order."""
    model.eval()
    dev = next(model.parameters()).device
    pad = -1 if ids.numel() and ids.min() < 0 else 0
    order = torch.argsort((ids != pad).sum(1), stable=True)
    parts = [model.embed_texts(trim_dialogue(ids[order[s: s + batch]]).to(dev)) for s in range(0, len(ids), batch)]
    out = {k: torch.empty((len(ids), *parts[0][k].shape[1:]), dtype=torch.float32) for k in parts[0]} if parts else {}
    for k in out:
        out[k][order] = torch.cat([p[k].float().cpu() for p in parts])
    return out


def round_prefixes(tokenize, chats: Sequence[Sequence[tuple[str, str]]], ns: Sequence[int], text=dialogue_text):
    """For :meth:`DiaNAModel.embed_prefixes`: each dialogue's whole tokens without end-of-text (``content``
    [D, m], 0-padded), and ``ends`` [D, len(ns)], where its text cut to ``n`` rounds ends. ``one_pass`` [D]
    says where every cut's tokens really are a prefix of the whole dialogue's (CLIP's tokenizer reads word
    by word, so they are unless a word straddles a cut); where not, that dialogue must be encoded per cut."""
    whole = tokenize([text(r[: max(ns)]) for r in chats])
    ends_whole = whole.argmax(-1)  # CLIP's end-of-text: the largest id
    content = whole.clone()
    content[torch.arange(len(whole)), ends_whole] = 0
    ends = torch.zeros((len(chats), len(ns)), dtype=torch.long)
    one_pass = torch.ones(len(chats), dtype=torch.bool)
    pos = torch.arange(whole.shape[1]).view(1, -1)
    for k, n in enumerate(ns):
        cut = tokenize([text(r[:n]) for r in chats])
        ends[:, k] = cut.argmax(-1)
        before = pos < ends[:, k: k + 1]
        one_pass &= ((cut == content) | ~before).all(1)
    return content[:, : max(1, int(ends_whole.max()))], ends, one_pass


@torch.no_grad()
def embed_rounds(model, tokenize, chats: Sequence[Sequence[tuple[str, str]]], ns: Sequence[int], text=dialogue_text,
                 batch: int = 256) -> list[dict]:
    """The embeddings of every dialogue cut to its first ``n`` rounds, for each ``n`` in ``ns`` (one dict per
    ``n``, in the dialogues' order). A DiaNA model on the mini CLIP reads each dialogue once
    (:meth:`DiaNAModel.embed_prefixes`: a cut dialogue is a prefix of the whole; 2.8 times faster than a pass
    per cut on 40 six-round dialogues at small, equal to float rounding); any other model (a causal LM, a TPR baseline reading
    ``text``) encodes each cut on its own (:func:`embed_dialogues`)."""
    if not isinstance(model, DiaNAModel) or model.dialogue_encoder is not None:
        return [embed_dialogues(model, tokenize([text(r[:n]) for r in chats]), batch) for n in ns]
    model.eval()
    dev = next(model.parameters()).device
    content, ends, one_pass = round_prefixes(tokenize, chats, ns, text)
    order = torch.argsort((content != 0).sum(1), stable=True)
    parts = []
    for s in range(0, len(chats), batch):
        idx = order[s: s + batch]
        c = content[idx, : int((content[idx] != 0).sum(1).max())]  # this batch's padding dropped
        parts.append([{k: v.float().cpu() for k, v in e.items()} for e in model.embed_prefixes(c.to(dev), ends[idx].to(dev))])
    out = []
    for k, n in enumerate(ns):
        e = {key: torch.empty((len(chats), *parts[0][k][key].shape[1:])) for key in parts[0][k]}
        for key in e:
            e[key][order] = torch.cat([p[k][key] for p in parts])
        alone = torch.nonzero(~one_pass).flatten()
        if len(alone):  # a word straddles a cut: these dialogues as :func:`embed_dialogues` reads them
            sub = embed_dialogues(model, tokenize([text(chats[i][:n]) for i in alone.tolist()]), batch)
            for key in e:
                e[key][alone] = sub[key]
        out.append(e)
    return out


@torch.no_grad()
def rounds_curve(model, entries: list[dict], image_root, tokenize, size, max_rounds: int, text=dialogue_text,
                 at: Sequence[int] | None = None) -> pd.DataFrame:
    """R1/R5/R10/mAP/mINP with every test dialogue cut to its first N rounds, for N in ``at`` (default
    1..``max_rounds``). The gallery is encoded once; the dialogues once in all (:func:`embed_rounds`)."""
    from ..metrics import retrieval_metrics
    from ..models.retrieval import encode_images

    data = chat_retrieval_data(entries, image_root, tokenize, size, n_rounds=max_rounds, text=text)
    img = encode_images(model, data)
    chats = [rounds_of(c) for e in entries for c in e["chats"]]
    ns = list(at or range(1, max_rounds + 1))
    return pd.DataFrame([{"rounds": n, **retrieval_metrics(model.similarity(txt, img), data.caption_pids, data.image_pids)}
                         for n, txt in zip(ns, embed_rounds(model, tokenize, chats, ns, text))])


def chat_demo(model, entries: list[dict], image_root, tokenize, size, vlm=None, k: int = 5, start: int = 0, seed: int = 0,
              refine=None):
    """The classroom's chat demo (:class:`person_retrieval.widgets.ChatRetrievalDemo`) for DiaNA on a ChatPedes
    split: its images the gallery, each entry's first round the start, generator A's questioner ("fresh");
    ``refine``: a second re-ranking each round (CTGI's MTI: ``papers.ctgi.mti_refiner``)."""
    from functools import partial

    from ..widgets import ChatRetrievalDemo

    data = chat_retrieval_data(entries, image_root, tokenize, size, n_rounds=1)
    first = [rounds_of(e["chats"][0])[0] for e in entries]
    return ChatRetrievalDemo(model, data, first, tokenize, dialogue_text, partial(next_question, "fresh"), vlm=vlm, k=k, start=start, seed=seed,
                             refine=refine)


def tpr_as_chatpedes(dataset: str, root, out=None, seed: int = 0) -> Path:
    """A TPR dataset written as ChatPedes (release format) with one-round dialogues: an instruction of the
    supplement's Fig. 1c, answered by the caption (how DiaNA reads single-shot texts). ``train_reid.json``
    from the train split, ``test_reid.json`` from test; ``imgs`` links to the dataset's image folder. ``out``:
    the folder (None: in the cache, named by the dataset folder's path and ``seed``)."""
    from ..datasets import TPR_FORMATS

    if out is None:
        where = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
        out = cache_dir() / "chatpedes" / f"{dataset}-as-dialogues-{where}-seed{seed}"
    out = Path(out)
    img_dir = Path(root).resolve() / TPR_FORMATS[dataset].image_dir
    if (out / "test_reid.json").is_file():
        link_images(img_dir, out / "imgs")
        return out
    out.mkdir(parents=True, exist_ok=True)
    link_images(img_dir, out / "imgs")
    instr = prompts.DIANA_DESCRIPTION_INSTRUCTIONS
    for split, fname in (("train", "train_reid.json"), ("test", "test_reid.json")):
        s = load_split(dataset, root, split)
        entries = [{"id": int(pid), "file_path": Path(os.path.relpath(p, img_dir)).as_posix(), "chats": []}
                   for p, pid in zip(s.image_paths, s.image_pids)]
        for c, i in zip(s.captions, s.caption_image_ids):
            q = instr[int(item_rng(seed, "tpr-as-chat", dataset, split, i, c).integers(len(instr)))]
            entries[i]["chats"].append([[{"from": "gpt", "value": q}, {"from": "user", "value": c}]])
        write_json_atomic(out / fname, entries)
    return out


def live_dialogues(images, keys, vlm, rounds: int = 6, seed: int = 0):
    """A live simulated user: a careful questioner (generator A's policy) asks, the MLLM answers from the
    target image with no injected noise (its own recognition errors remain)."""
    return generate_dialogues(images, keys, DialogueGenerator("live", "simulated user", "fresh", Noise()), vlm, rounds, seed)
