"""SynCPR and ITCPR (notebook 03): "Automatic Synthetic Data and Fine-grained Adaptive Feature Alignment for
Composed Person Retrieval" (Liu et al.; arXiv:2311.16515), part 1: the data.

SynCPR's pipeline, one function per stage, each called by a cell of the notebook:

1. :func:`make_quadruples`: a language model writes (reference text, target text, forward difference,
   reverse difference) from :data:`~person_retrieval.assistants.prompts.SYNCPR_QUADRUPLE`, one hint per
   quadruple (:func:`quadruple_hints`) so that identities vary;
2. :func:`dual_pairs`: one two-panel image per quadruple and panel from the generators' dual adapter,
   cropped into (reference, target), the LoRA strength ``beta`` drawn per sample (dynamic beta);
3. :func:`filter_scores`: the MLLM's four 1-10 scores (naturalness, identity, alignment, relevance);
   :func:`kept` keeps a triplet when their mean reaches 8.5; :func:`rejection_table` says why the others went;
4. :func:`synthesize` writes it all in shards (``shard=i, num_shards=n``: n processes split one run), each
   finished shard atomically, so that a killed run resumes where it stopped; :func:`assemble` writes the
   manifest and ``SynCPR.json`` in the released format; :func:`statistics` counts it as the slides do.

Each quadruple gives ``panels`` image pairs and each pair two candidate triplets, reference -> target with the
forward caption and target -> reference with the reverse one (the release: 10 pairs, 20 candidates per quadruple;
:data:`SCALE_PANELS`, :func:`candidates_table`). ``cpr_id`` groups one direction of one quadruple: its
targets all show one person in one outfit, so FAFA (notebook 04) treats equal ``cpr_id`` as positives.

ITCPR's evaluation is here too (:func:`evaluate_itcpr`): a gallery row matches a query when its
``instance_id`` equals the query's; the same person in another image is a miss. :func:`itcpr_statistics` counts it
per source as the slides do.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..assistants import LanguageModel, VisionLanguageModel, grammar, parse_scores, prompts
from .. import shards
from ..config import cache_dir, rng_for
from ..datasets import ITCPR, write_json_atomic, write_syncpr
from ..metrics import retrieval_metrics

#: The filter's four dimensions, in the order of every score array here.
DIMENSIONS = ("naturalness", "identity", "alignment", "relevance")
KEEP_MEAN = prompts.SYNCPR_KEEP_MEAN  # 8.5, the paper's

#: SynCPR as the slides give it: 1.15 M triplets from 140.5 K quadruples, 177.5 K group ids, relative
#: captions of 13.3 words on average, a vocabulary of 4,370 words, 51.2% male.
REPORTED = {"triplets": 1_150_000, "quadruples": 140_500, "group ids": 177_500, "mean caption words": 13.3,
            "vocabulary": 4_370, "male (%)": 51.2}
#: The release's generation before the filter (its README, "Construction Pipeline"): 2.81 M triplets drawn from
#: 140,500 quadruples, 20 candidate triplets per quadruple (10 image pairs, each in both directions), of which the
#: filter kept 1.15 M (40.9%).
RELEASE_CANDIDATES = 2_810_000
RELEASE_PANELS = RELEASE_CANDIDATES // (2 * REPORTED["quadruples"])  # 10 pairs per quadruple


@dataclass(frozen=True)
class SynthesisConfig:
    """What one synthesis is; a folder holds one, and resuming checks it is the same."""

    n_quadruples: int
    panels: int = 10  # image pairs per quadruple, 2 candidate triplets each (the release: 2.81 M candidates / 140.5 K quadruples = 20)
    beta_range: tuple = (0.5, 1.0)  # dynamic beta: the LoRA strength, uniform in this range per pair (ours: the slides give none)
    shard_size: int = 32  # quadruples per shard
    seed: int = 0
    models: tuple = ()  # names (and cache keys) of the language model, generator and MLLM

    def __post_init__(self):
        lo, hi = self.beta_range
        if not (self.n_quadruples >= 1 and self.panels >= 1 and self.shard_size >= 1 and 0 <= lo <= hi):
            raise ValueError(f"bad synthesis configuration {self}: counts must be >= 1 and beta_range a (low, high) pair, 0 <= low <= high")

    @property
    def n_shards(self) -> int:
        return -(-self.n_quadruples // self.shard_size)

    def as_json(self) -> dict:
        d = asdict(self)
        d["beta_range"], d["models"] = list(self.beta_range), list(self.models)
        return d


#: Defaults per scale: at small, 1,024 quadruples (8,192 candidate triplets) for at least 3,000 kept. Image pairs per
#: quadruple: the release's 10 (20 candidate triplets) at paper; what the budget allows on the mini pipeline (4 at
#: small: 8 candidates, the synthesis about a quarter of an hour on 2 CPU cores; 10 would draw and score 2.5 times as many).
SCALE_QUADRUPLES = {"tiny": 8, "small": 1024}
SCALE_PANELS = {"tiny": 2, "small": 4, "paper": RELEASE_PANELS}
SCALE_SHARD = {"tiny": 4, "small": 32}


# ---------------------------------------------------------------------------------------------
# 1. Quadruples
@dataclass(frozen=True)
class Quadruple:
    reference: str
    target: str
    forward: str
    reverse: str


_LINE = {k: re.compile(rf"^\s*\**{k}\**\s*[:：]\s*(.+?)\s*$", re.I | re.M) for k in ("Reference", "Target", "Forward", "Reverse")}


def parse_quadruple(text: str) -> Quadruple | None:
    """The four lines of a quadruple answer, or None when any is missing or empty."""
    got = {}
    for k, rx in _LINE.items():
        m = rx.search(text or "")
        if not m or not m.group(1).strip("<> "):
            return None
        got[k.lower()] = m.group(1).strip()
    return Quadruple(**got)


def quadruple_hints(indices: Sequence[int], seed: int = 0) -> list[str]:
    """One hint per quadruple index (who to invent), so that identities vary over the set: gender, age and
    hair drawn per index (a real LLM left alone repeats itself)."""
    from ..world.attributes import sample_person

    out = []
    for i in indices:
        p = sample_person(rng_for(seed, "syncpr-hint", int(i)), int(i))
        hair = "bald" if p.hair_style == "bald" else f"{p.hair_style} {p.hair_color} hair" if p.hair_style != "ponytail" else f"{p.hair_color} hair in a ponytail"
        age = {"adult": "middle-aged"}.get(p.age, p.age)
        out.append(f"The person: {'an' if age[0] in 'aeiou' else 'a'} {age} {p.gender}" + (", bald." if hair == "bald" else f" with {hair}."))
    return out


def make_quadruples(lm: LanguageModel, indices: Sequence[int], seed: int = 0, answers: bool = False):
    """Ask ``lm`` for one quadruple per index (None where its answer does not parse); with ``answers``,
    ``(quadruples, the LLM's answers)``."""
    asks = [prompts.SYNCPR_QUADRUPLE.format(hint=h) for h in quadruple_hints(indices, seed)]
    texts = list(lm.generate(asks, max_new_tokens=160))
    quads = [parse_quadruple(t) for t in texts]
    return (quads, texts) if answers else quads


def parse_summary(quads: Sequence[Quadruple | None], answers: Sequence[str] | None = None, width: int = 200) -> str:
    """"k of N quadruples parsed", and when some did not, what the LLM wrote for the first of them (an answer
    needs the four lines Reference:, Target:, Forward:, Reverse:)."""
    n, k = len(quads), sum(q is not None for q in quads)
    msg = f"{k} of {n} quadruples parsed"
    bad = [i for i, q in enumerate(quads) if q is None]
    if bad and answers is not None:
        said = " ".join(str(answers[bad[0]]).split())
        msg += (f"; an answer needs the four lines 'Reference:', 'Target:', 'Forward:', 'Reverse:'. For quadruple {bad[0]} the LLM "
                f"wrote: {said[:width]!r}" + ("..." if len(said) > width else ""))
    return msg


# ---------------------------------------------------------------------------------------------
# 2. Identity-consistent pairs from one canvas
def draw_betas(n: int, beta_range: Sequence[float], rng: np.random.Generator) -> list[float]:
    """Dynamic beta: one LoRA strength per pair, uniform in ``beta_range``, rounded to 0.05 (so that
    pairs share adapter passes: the generator runs one pass per distinct value)."""
    lo, hi = float(beta_range[0]), float(beta_range[1])
    return [round(round(float(b) / 0.05) * 0.05, 2) for b in rng.uniform(lo, hi, n)]


def dual_pairs(gen, left: Sequence[str], right: Sequence[str], betas: Sequence[float], seed: int = 0):
    """``(references, targets)``, uint8 ``[N, 3, H, W]`` each: the left and right halves of one two-panel
    canvas per pair, prompted with the reference and the target text. No pairs: two empty tensors."""
    if len(left) != len(right) or len(left) != len(betas):
        raise ValueError(f"dual_pairs: {len(left)} reference texts, {len(right)} target texts and {len(betas)} betas")
    if not len(left):
        empty = torch.zeros(0, 3, *gen.image_size, dtype=torch.uint8)
        return empty, empty.clone()
    return gen.dual(list(left), list(right), seed=seed, beta=list(betas))


# ---------------------------------------------------------------------------------------------
# 3. The MLLM filter
def filter_scores(vlm: VisionLanguageModel, references, targets, target_texts: Sequence[str], edits: Sequence[str]) -> np.ndarray:
    """``[N, 4]`` scores (naturalness, identity, alignment, relevance) of each triplet: the reference and
    the target image, the target's text and the relative caption. A transformers MLLM gets the slides'
    four-dimension prompt with both images (an answer that does not parse scores 0 on all four, a
    rejection); the mini MLLM scores one dimension per call. Naturalness is the lower of the two images'."""
    n = len(target_texts)
    if len(references) != n or len(targets) != n or len(edits) != n:
        raise ValueError(f"filter_scores: {len(references)} references, {len(targets)} targets, {n} texts and {len(edits)} edits")
    if hasattr(vlm, "ask"):  # a transformers MLLM: the one prompt of the slides
        from ..assistants.base import _images

        refs, tgts = _images(references), _images(targets)
        asks = [prompts.SYNCPR_FILTER.format(edit=e, target=t) for e, t in zip(edits, target_texts)]
        out = np.zeros((n, 4), dtype=np.int64)
        for i, r in enumerate(vlm.ask([[a, b] for a, b in zip(refs, tgts)], asks, max_new_tokens=40)):
            got = parse_scores(r, DIMENSIONS)
            if got is None:
                vlm.usage.unparsed["syncpr_filter"] += 1
            else:
                out[i] = [got[d] for d in DIMENSIONS]
        return out
    c = prompts.SYNCPR_CRITERIA
    nat = np.minimum(vlm.score(targets, c["naturalness"]), vlm.score(references, c["naturalness"]))
    ide = np.asarray(vlm.score(targets, c["identity"], references=references))
    ali = np.asarray(vlm.score(targets, c["alignment"], texts=list(target_texts)))
    rel = np.asarray(vlm.score(targets, c["relevance"], texts=list(edits), references=references))
    return np.stack([nat, ide, ali, rel], 1).astype(np.int64)


def kept(scores: np.ndarray, keep_mean: float = KEEP_MEAN) -> np.ndarray:
    """SynCPR's rule: keep a triplet when the mean of its four scores is at least ``keep_mean``."""
    return np.asarray(scores, dtype=float).reshape(-1, 4).mean(1) >= keep_mean


def rejection_table(scores: np.ndarray, keep_mean: float = KEEP_MEAN) -> pd.DataFrame:
    """Why triplets were rejected: per dimension, the share of all triplets rejected with that dimension
    below ``keep_mean`` (a rejected triplet may count under several), and the share whose lowest dimension
    it is (ties: the first)."""
    s = np.asarray(scores, dtype=float).reshape(-1, 4)
    rej = ~kept(s, keep_mean)
    n = max(len(s), 1)
    rows = []
    for j, d in enumerate(DIMENSIONS):
        low = rej & (s[:, j] < keep_mean)
        rows.append({"reason": d, "rejected with it below the bar (%)": 100 * low.sum() / n,
                     "rejected, lowest score (%)": 100 * (rej & (s.argmin(1) == j)).sum() / n,
                     "mean score": float(s[:, j].mean()) if len(s) else float("nan")})
    rows.append({"reason": "any (rejected)", "rejected with it below the bar (%)": 100 * rej.sum() / n,
                 "rejected, lowest score (%)": 100 * rej.sum() / n, "mean score": float(s.mean()) if len(s) else float("nan")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 4. Shards, resume, assembly
def synthesize_shard(root: Path, u: int, cfg: SynthesisConfig, lm: LanguageModel, gen, vlm: VisionLanguageModel) -> dict:
    """Quadruples, pairs and scores of shard ``u``, its images written all at once
    (:func:`person_retrieval.shards.image_folder`); returns its record. Everything in it depends on
    ``(cfg, u)`` alone, so a shard redone gives the same result."""
    from PIL import Image

    idx = list(range(u * cfg.shard_size, min((u + 1) * cfg.shard_size, cfg.n_quadruples)))
    quads = make_quadruples(lm, idx, cfg.seed)
    good = [(i, q) for i, q in zip(idx, quads) if q is not None]
    pairs = [(i, q, k) for i, q in good for k in range(cfg.panels)]
    rng = rng_for(cfg.seed, "syncpr-beta", u)
    betas = draw_betas(len(pairs), cfg.beta_range, rng)
    records = []
    with shards.image_folder(root / "images" / f"shard_{u:05d}") as tmp:
        if pairs:
            refs, tgts = dual_pairs(gen, [q.reference for _, q, _ in pairs], [q.target for _, q, _ in pairs], betas, seed=cfg.seed * 7919 + u)
            # both directions of each pair: reference -> target (forward caption) and back (reverse caption)
            a_img, b_img = torch.cat([refs, tgts]), torch.cat([tgts, refs])
            b_text = [q.target for _, q, _ in pairs] + [q.reference for _, q, _ in pairs]
            edits = [q.forward for _, q, _ in pairs] + [q.reverse for _, q, _ in pairs]
            scores = filter_scores(vlm, a_img, b_img, b_text, edits)
            for j, (i, q, k) in enumerate(pairs):
                for side, im in (("ref", refs[j]), ("tgt", tgts[j])):
                    Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp / f"q{i:06d}_{k}_{side}.jpg", quality=95)
            rel = f"images/shard_{u:05d}"
            npairs = len(pairs)
            for d in range(2):
                for j, (i, q, k) in enumerate(pairs):
                    src, dst = ("ref", "tgt") if d == 0 else ("tgt", "ref")
                    records.append({
                        "reference_caption": q.reference if d == 0 else q.target, "target_caption": q.target if d == 0 else q.reference,
                        "reference_image_path": f"{rel}/q{i:06d}_{k}_{src}.jpg", "target_image_path": f"{rel}/q{i:06d}_{k}_{dst}.jpg",
                        "edit_caption": q.forward if d == 0 else q.reverse, "cpr_id": 2 * i + 1 + d,
                        "quadruple": i, "panel": k, "beta": betas[j], "scores": [int(v) for v in scores[d * npairs + j]]})
    return {"shard": u, "quadruples": len(idx), "parsed": len(good), "triplets": records,
            "unparsed_quadruples": [i for i, q in zip(idx, quads) if q is None]}


def synthesize(root: str | Path, cfg: SynthesisConfig, lm: LanguageModel, gen, vlm: VisionLanguageModel, shard: int = 0,
               num_shards: int = 1, progress: bool = True) -> list[dict]:
    """Synthesize this process's share of ``cfg`` into ``root``: shards ``u`` with ``u % num_shards == shard``
    (torchrun rank and world size, or n processes by hand). Finished shards are skipped, so a killed run
    resumes; a folder holding another configuration is refused. Returns what was done now (shard, seconds)."""
    root = Path(root)
    return shards.run(root, cfg.as_json(), cfg.n_shards, lambda u: synthesize_shard(root, u, cfg, lm, gen, vlm), shard, num_shards,
                      progress, desc=f"SynCPR shards ({cfg.shard_size} quadruples each)")


def missing_shards(root: str | Path) -> list[int]:
    cfg = json.loads((Path(root) / "synthesis.json").read_text())
    return shards.missing(root, -(-cfg["n_quadruples"] // cfg["shard_size"]))


def assemble(root: str | Path, keep_mean: float = KEEP_MEAN) -> dict:
    """Once every shard is done: ``manifest.json`` (the configuration, and per shard its counts and a hash of
    its record; no timings, so an interrupted and resumed run writes the same manifest as an unbroken one),
    ``SynCPR.json`` (the kept triplets, in SynCPR's released fields, paths relative to ``root``) and
    ``scores.json`` (every triplet's four scores). Returns the manifest."""
    root = Path(root)
    cfg = json.loads((root / "synthesis.json").read_text())
    shards.require_all(root, -(-cfg["n_quadruples"] // cfg["shard_size"]))
    recs = shards.read(root)
    triplets = [t for s in recs for t in s["triplets"]]
    scores = np.array([t["scores"] for t in triplets], dtype=float).reshape(-1, 4)
    keep = kept(scores, keep_mean)
    fields = ("reference_caption", "target_caption", "reference_image_path", "target_image_path", "edit_caption", "cpr_id")
    write_syncpr(root, [{f: t[f] for f in fields} for t, k in zip(triplets, keep) if k])
    write_json_atomic(root / "scores.json", [{"reference_image_path": t["reference_image_path"], "target_image_path": t["target_image_path"],
                                              "scores": dict(zip(DIMENSIONS, t["scores"])), "kept": bool(k)} for t, k in zip(triplets, keep)])
    manifest = {"config": cfg, "keep_mean": float(keep_mean),
                "shards": [{"shard": s["shard"], "quadruples": s["quadruples"], "parsed": s["parsed"], "triplets": len(s["triplets"]),
                            "sha1": shards.digest(root, s["shard"])} for s in recs],
                "triplets": len(triplets), "kept": int(keep.sum())}
    write_json_atomic(root / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
def statistics(triplets: list[dict], quadruples: int | None = None) -> dict:
    """SynCPR's summary numbers of a set of triplets (released fields): triplets, quadruples (given, or
    counted as distinct reference-target caption pairs), group ids, mean relative-caption length in words,
    vocabulary of the relative captions, and the share of men (read from the reference captions)."""
    from ..datasets.formats import tokenize

    edits = [t["edit_caption"] for t in triplets]
    words = [tokenize(e) for e in edits]
    genders = [grammar.parse_claims(t["reference_caption"]).get("gender") for t in triplets]
    known = [g for g in genders if g is not None]
    if quadruples is None:
        quadruples = len({frozenset((t["reference_caption"], t["target_caption"])) for t in triplets})
    return {"triplets": len(triplets), "quadruples": quadruples, "group ids": len({t["cpr_id"] for t in triplets}),
            "mean caption words": float(np.mean([len(w) for w in words])) if words else float("nan"),
            "vocabulary": len({x for w in words for x in w}),
            "male (%)": 100 * sum(g == "man" for g in known) / len(known) if known else float("nan")}


def quadruple_count(triplets: list[dict]) -> int:
    """Distinct quadruples behind triplets whose ``cpr_id`` is ``2 q + 1`` (forward) or ``2 q + 2`` (reverse),
    as this pipeline and the world number them."""
    return len({(int(t["cpr_id"]) - 1) // 2 for t in triplets})


def statistics_table(sets: dict[str, dict]) -> pd.DataFrame:
    """The statistics of several sets side by side with SynCPR's reported figures."""
    rows = {"SynCPR (reported)": REPORTED, **sets}
    return pd.DataFrame(rows).T.reset_index(names="set")


# ---------------------------------------------------------------------------------------------
def _cache_key(scale: str, cfg: SynthesisConfig) -> str:
    return hashlib.blake2b(json.dumps([scale, cfg.as_json(), SYNCPR_VERSION], sort_keys=True).encode(), digest_size=4).hexdigest()


#: Bump when the pipeline changes, so cached syntheses are rebuilt.
SYNCPR_VERSION = 1


def _worker(rank: int, world: int, root: str, cfg_json: dict, scale: str, seed: int, threads: int):
    """One process of a sharded synthesis (spawned processes import this, not notebook code)."""
    torch.set_num_threads(max(1, threads))
    cfg = SynthesisConfig(**{**cfg_json, "beta_range": tuple(cfg_json["beta_range"]), "models": tuple(cfg_json["models"])})
    lm, gen, vlm = mini_models(scale, seed, progress=False)[:3]
    synthesize(root, cfg, lm, gen, vlm, shard=rank, num_shards=world, progress=rank == 0)


def mini_models(scale: str, seed: int = 0, gpus: int = 0, progress: bool = True):
    """``(lm, gen, vlm, names)``: the mini LM, the mini generator (its dual adapter) and the mini MLLM for
    ``(scale, seed)``, and their names with cache keys (part of a synthesis's configuration)."""
    from ..assistants import MiniLM, mini_vlm
    from ..generators.mini import mini_generators

    gen, report = mini_generators(scale, seed, gpus=gpus, progress=progress)
    vlm = mini_vlm(scale, seed, progress=progress)
    return MiniLM(seed), gen, vlm, ("mini-lm", f"mini-generator:{Path(report['dir']).name}", f"{vlm.name}:{scale}-seed{seed}")


def load_models(scale: str, seed: int = 0, gpus: int = 0, weights=None, llm=None, vlm=None, rank: int | None = None,
                dataset: str = "cuhk_pedes", progress: bool = True, adapters: Sequence[str] = ("dual",), data_root=None,
                log=print):
    """``(lm, gen, vlm, names)`` for a synthesis: each the mini one unless named. ``weights``: FLUX.1-dev
    (a name or a diffusers folder) with the LoRA ``adapters`` notebook 02_generators trained on ``dataset``
    (SynCPR: the dual panel; TIPS: ``("spg", "idpg")``), found where it saves them whatever their rank
    (``rank`` None; the rank is read from the files); when they are missing and ``data_root`` holds the
    dataset, they are trained now by the call 02_generators makes (:func:`~person_retrieval.generators.flux.flux_loras`,
    TIPS's 20,000 steps capped by ``max_steps``), saying so; ``llm`` / ``vlm``: transformers models (names or
    folders). Nothing is downloaded."""
    mini = mini_models(scale if scale != "paper" else "small", seed, gpus, progress) if None in (weights, llm, vlm) else (None,) * 4
    dev = "cuda" if gpus else "cpu"
    names = list(mini[3] or ("", "", ""))
    lm_, gen, vlm_ = mini[0], mini[1], mini[2]
    if llm is not None:
        from ..assistants.hf import TransformersLM

        lm_, names[0] = TransformersLM.load(llm, device=dev, seed=seed), f"llm:{llm}"
    if vlm is not None:
        from ..assistants.hf import TransformersVLM

        vlm_, names[2] = TransformersVLM.load(vlm, device=dev, seed=seed), f"vlm:{vlm}"
    if weights is not None:
        from ..datasets.formats import REAL_FOLDERS
        from ..generators import flux

        if flux.find_lora_folder(dataset, seed, adapters, rank=rank) is None and data_root is None:
            where = flux.lora_folder(dataset, seed, rank or flux.TIPS_DEFAULTS["rank"])
            raise FileNotFoundError(f"{where}: no {', '.join(adapters)} LoRA for FLUX.1-dev; run notebook 02_generators with "
                                    f"weights={weights!r} (it trains and saves them there), or pass data_root to train them here")
        pipe = flux.load_flux(weights, device=dev if gpus else None)
        gen = flux.flux_generator(pipe)
        root = Path(data_root) / REAL_FOLDERS[dataset] if data_root is not None else None
        folder, _ = flux.flux_loras(pipe, gen, dataset, root, seed, adapters, rank=rank, progress=progress, log=log)
        names[1] = f"flux:{weights}:{folder.name}"
    return lm_, gen, vlm_, tuple(names)


def syncpr_dataset(scale: str = "small", seed: int = 0, gpus: int = 0, n_quadruples: int | None = None, panels: int | None = None,
                   beta_range: Sequence[float] = (0.5, 1.0), keep_mean: float = KEEP_MEAN, shard_size: int | None = None,
                   progress: bool = True) -> tuple[Path, dict]:
    """The mini pipeline's SynCPR for ``(scale, seed)``, synthesized once and cached (with a progress bar);
    ``gpus`` > 1 splits the shards over that many processes. Returns ``(folder, manifest)``; the folder
    reads with :func:`person_retrieval.datasets.read_syncpr`. ``keep_mean`` only re-assembles."""
    names = mini_models(scale, seed, gpus, progress)[3]
    cfg = mini_config(scale, seed, names, n_quadruples, panels, beta_range, shard_size)
    root = synthesis_folder(scale, cfg)
    t0 = time.time()
    if not (root / "manifest.json").is_file() or missing_shards(root):
        if gpus > 1:
            root.mkdir(parents=True, exist_ok=True)
            shards.check_config(root, cfg.as_json())
            shards.spawn(_worker, gpus, (str(root), cfg.as_json(), scale, seed, shards.threads_per_process(gpus)))
        else:
            lm, gen, vlm, _ = mini_models(scale, seed, gpus, progress=False)
            synthesize(root, cfg, lm, gen, vlm, progress=progress)
        record_timing(root, time.time() - t0, max(1, gpus))
    manifest = assemble(root, keep_mean)
    return root, manifest


def mini_config(scale: str, seed: int, names: Sequence[str], n_quadruples: int | None = None, panels: int | None = None,
                beta_range: Sequence[float] = (0.5, 1.0), shard_size: int | None = None) -> SynthesisConfig:
    """The mini pipeline's synthesis for ``scale`` (counts by scale unless given), as notebook 03 runs it."""
    return SynthesisConfig(n_quadruples=n_quadruples or SCALE_QUADRUPLES[scale], panels=panels or SCALE_PANELS[scale],
                           beta_range=tuple(float(b) for b in beta_range), shard_size=shard_size or SCALE_SHARD[scale], seed=seed,
                           models=tuple(names))


def record_timing(root: Path, seconds: float, processes: int) -> None:
    """``timing.json``: how long the synthesis took, over how many processes (not part of the manifest)."""
    n = sum(len(r["triplets"]) for r in shards.read(root))
    write_json_atomic(Path(root) / "timing.json", {"seconds": round(seconds, 1), "processes": processes, "candidate_triplets": n,
                                                   "triplets_per_s": round(n / max(seconds, 1e-9), 2)})


def paper_config(n_quadruples: int | None, beta_range: Sequence[float], seed: int, models: Sequence[str], scale: str = "paper",
                 panels: int | None = None) -> SynthesisConfig:
    """A synthesis with the user's models: ``n_quadruples`` (None: by scale; at paper SynCPR's 140.5 K),
    ``panels`` image pairs per quadruple (None: by scale; at paper the release's 10, 20 candidate triplets),
    shards of 256 (or fewer when the run is smaller)."""
    n_q = int(n_quadruples or SCALE_QUADRUPLES.get(scale, REPORTED["quadruples"]))
    return SynthesisConfig(n_quadruples=n_q, panels=int(panels or SCALE_PANELS.get(scale, RELEASE_PANELS)),
                           beta_range=tuple(float(b) for b in beta_range),
                           shard_size=min(n_q, SCALE_SHARD.get(scale, 256)), seed=seed, models=tuple(models))


def synthesis_summary(manifest: dict) -> str:
    """"k of N quadruples parsed; T candidate triplets, K kept (p%)" from an assembled folder's manifest."""
    n = sum(s["quadruples"] for s in manifest["shards"])
    k = sum(s["parsed"] for s in manifest["shards"])
    t, kept_ = manifest["triplets"], manifest["kept"]
    msg = f"{k} of {n} quadruples parsed; {t} candidate triplets, {kept_} kept ({100 * kept_ / max(1, t):.1f}%)"
    if not k:
        msg += " (the language model's answers did not parse: nothing was drawn; see the quadruples' cell)"
    elif not kept_:
        msg += " (the filter kept none)"
    return msg


def candidates_table(manifest: dict, label: str = "this run") -> pd.DataFrame:
    """Candidate triplets per quadruple, this synthesis (an assembled folder's ``manifest``) beside the release's:
    image pairs per quadruple, the candidates that gives (2 per pair, both directions), the candidates drawn
    per parsed quadruple, and the triplets kept per quadruple written."""
    panels = int(manifest["config"]["panels"])
    n = sum(s["quadruples"] for s in manifest["shards"])
    k = sum(s["parsed"] for s in manifest["shards"])
    rows = [{"set": label, "quadruples": n, "pairs per quadruple": panels, "candidates per quadruple": 2 * panels,
             "candidate triplets": manifest["triplets"], "candidates per parsed quadruple": manifest["triplets"] / k if k else float("nan"),
             "kept": manifest["kept"], "kept per quadruple": manifest["kept"] / n if n else float("nan")},
            {"set": "SynCPR release", "quadruples": REPORTED["quadruples"], "pairs per quadruple": RELEASE_PANELS,
             "candidates per quadruple": 2 * RELEASE_PANELS, "candidate triplets": RELEASE_CANDIDATES,
             "candidates per parsed quadruple": RELEASE_CANDIDATES / REPORTED["quadruples"], "kept": REPORTED["triplets"],
             "kept per quadruple": REPORTED["triplets"] / REPORTED["quadruples"]}]
    return pd.DataFrame(rows)


def synthesis_folder(scale: str, cfg: SynthesisConfig) -> Path:
    """Where a synthesis of ``cfg`` is cached: by scale, seed, and a hash of its configuration."""
    return cache_dir() / "syncpr" / f"{scale}-seed{cfg.seed}-{_cache_key(scale, cfg)}"


def read_timing(root: str | Path) -> dict:
    """How long the synthesis in ``root`` took when it ran (``timing.json``; empty when not recorded)."""
    p = Path(root) / "timing.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def read_scores(root: str | Path) -> np.ndarray:
    """Every candidate triplet's four filter scores, ``[N, 4]`` (``scores.json`` of an assembled folder)."""
    rows = json.loads((Path(root) / "scores.json").read_text())
    return np.array([[r["scores"][d] for d in DIMENSIONS] for r in rows], dtype=np.int64).reshape(-1, 4)


def _load(root: Path, rel: str) -> np.ndarray:
    from ..viz import load_image

    return load_image(root / rel)


def score_triplets(vlm: VisionLanguageModel, triplets: list[dict], root: str | Path, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """The filter's scores of triplets in the released format (images under ``root``), for ``limit`` of them
    drawn at random (all when None)."""
    root = Path(root)
    idx = np.arange(len(triplets))
    if limit is not None and limit < len(triplets):
        idx = np.sort(rng_for(seed, "syncpr-score-sample").choice(len(triplets), limit, replace=False))
    ts = [triplets[i] for i in idx]
    return filter_scores(vlm, [_load(root, t["reference_image_path"]) for t in ts], [_load(root, t["target_image_path"]) for t in ts],
                         [t["target_caption"] for t in ts], [t["edit_caption"] for t in ts])


#: The purpose-made faults of :func:`fault_examples`, each with the dimension it should fail.
FAULTS = {"noise image": "naturalness", "another person": "identity", "wrong target text": "alignment", "wrong relative caption": "relevance"}


def fault_examples(triplets: list[dict], root: str | Path, n: int = 4, seed: int = 0) -> dict:
    """Good triplets from a world folder and purpose-made bad copies of them, one fault each
    (:data:`FAULTS`): the target replaced by noise; the target drawn again as another person (other
    gender, age, skin and hair) in the same outfit and state; another triplet's target text; another
    triplet's relative caption. Returns lists ``labels, references, targets, target_texts, edits``."""
    from ..world.attributes import AGES, GENDERS, HAIR_STYLES, Person
    from ..world.build import read_world_meta
    from ..world.render import State, render

    root = Path(root)
    rng = rng_for(seed, "syncpr-faults")
    pick = rng.choice(len(triplets), 2 * n, replace=False)
    good, other = [triplets[i] for i in pick[:n]], [triplets[i] for i in pick[n:]]
    meta = read_world_meta(root)
    by_path = {im["path"]: im for im in meta["images"]}
    out = {k: [] for k in ("labels", "references", "targets", "target_texts", "edits")}

    def add(label, t, ref, tgt, text, edit):
        for k, v in zip(out, (label, ref, tgt, text, edit)):
            out[k].append(v)

    for t, o in zip(good, other):
        ref, tgt = _load(root, t["reference_image_path"]), _load(root, t["target_image_path"])
        add("good", t, ref, tgt, t["target_caption"], t["edit_caption"])
        add("noise image", t, ref, rng.integers(0, 256, tgt.shape, dtype=np.uint8), t["target_caption"], t["edit_caption"])
        im = by_path[t["target_image_path"]]
        p = Person(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["people"][str(im["person"])].items()})
        swap = p.replace(gender=str(rng.choice([g for g in GENDERS if g != p.gender])), age=str(rng.choice([a for a in AGES if a != p.age])),
                         skin={"light": "dark", "medium": "light", "dark": "medium"}.get(p.skin, p.skin),
                         hair_style=str(rng.choice([h for h in HAIR_STYLES if h not in (p.hair_style, "bald")])),
                         lower_type="trousers" if p.lower_type == "skirt" else p.lower_type)
        state = State(**{k: tuple(v) if isinstance(v, list) else v for k, v in im["state"].items()})
        add("another person", t, ref, render(swap, state, tgt.shape[0]), t["target_caption"], t["edit_caption"])
        add("wrong target text", t, ref, tgt, o["target_caption"], t["edit_caption"])
        add("wrong relative caption", t, ref, tgt, t["target_caption"], o["edit_caption"])
    return out


def fault_check(table: pd.DataFrame, keep_mean: float = KEEP_MEAN) -> pd.DataFrame:
    """For each fault of :data:`FAULTS` in a scored :func:`fault_examples` table (columns ``example``, the
    four dimensions, ``kept``): the mean score of its dimension on good and faulty triplets, and how many
    faulty ones were rejected with that dimension below the bar."""
    good = table[table["example"] == "good"]
    rows = []
    for fault, dim in FAULTS.items():
        bad = table[table["example"] == fault]
        rows.append({"fault": fault, "dimension": dim, "good mean": float(good[dim].mean()), "faulty mean": float(bad[dim].mean()),
                     "faulty rejected for it": int(((~bad["kept"]) & (bad[dim] < keep_mean)).sum()), "faulty": len(bad)})
    return pd.DataFrame(rows)


def ranking_rows(similarity: torch.Tensor, bench: ITCPR, queries: Sequence[int], k: int = 5) -> list[dict]:
    """Rows for :func:`person_retrieval.viz.ranking_rows`: each query's reference image, its top ``k``
    gallery images, and which of them are ground truths."""
    q_ids, g_ids = itcpr_ids(bench)
    rows = []
    for i in queries:
        top = torch.topk(similarity[i], k).indices.tolist()
        rows.append({"label": f"query {i}", "query": bench.queries[i]["caption"], "true": bench.query_paths()[i],
                     "ranked": [bench.gallery_paths()[j] for j in top], "correct": [bool(g_ids[j] == q_ids[i]) for j in top]})
    return rows


# ---------------------------------------------------------------------------------------------
def itcpr_ids(bench: ITCPR) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query ids, gallery ids)`` for ITCPR's matching rule: a gallery row is a ground truth of a query
    when their ``instance_id`` agree (distractors carry -1, which no query has)."""
    return (torch.tensor([q["instance_id"] for q in bench.queries]), torch.tensor([g["instance_id"] for g in bench.gallery]))


def itcpr_statistics(bench: ITCPR) -> pd.DataFrame:
    """ITCPR's summary as the slides give it, per source (the ``datasets`` field: Celeb-reID, PRCC and LAST in the
    release) and over all (``subset`` "all"): queries (the slides' "images": 1,151 + 146 + 905 = its 2,202 unique
    queries), identities (distinct ``person_id`` among the queries: the slides' "IDs"), gallery rows, ground truths
    (gallery rows holding a query's ``instance_id``), gallery rows per query, and the relative captions' length in words
    (as the datasets' tokenizer splits them, punctuation dropped): mean, shortest, longest."""
    from ..datasets.formats import tokenize

    qids = {q["instance_id"] for q in bench.queries}

    def row(name, qs, gs):
        words = [len(tokenize(q["caption"])) for q in qs]
        return {"subset": name, "queries": len(qs), "identities": len({q["person_id"] for q in qs}), "gallery": len(gs),
                "ground truths": sum(g["instance_id"] in qids for g in gs), "gallery per query": len(gs) / len(qs) if qs else float("nan"),
                "mean caption words": float(np.mean(words)) if words else float("nan"),
                "shortest caption words": min(words, default=float("nan")), "longest caption words": max(words, default=float("nan"))}

    names = list(dict.fromkeys([q["datasets"] for q in bench.queries] + [g["datasets"] for g in bench.gallery]))
    rows = [row(n, [q for q in bench.queries if q["datasets"] == n], [g for g in bench.gallery if g["datasets"] == n]) for n in names]
    return pd.DataFrame(rows + [row("all", bench.queries, bench.gallery)])


def evaluate_itcpr(similarity, bench: ITCPR) -> dict[str, float]:
    """R1/R5/R10/mAP/mINP of a ``(queries, gallery)`` similarity on ITCPR."""
    q, g = itcpr_ids(bench)
    return retrieval_metrics(similarity, q, g)



@torch.no_grad()
def pooled_image_features(backbone, paths: list[str], batch: int = 256) -> torch.Tensor:
    """``[N, D]``: the normalised pooled image features of the images at ``paths``."""
    from ..datasets.torch_data import load_images, to_float

    x = load_images(paths, backbone.image_size)
    return torch.cat([torch.nn.functional.normalize(backbone.encode_image(to_float(x[s: s + batch]))[0].float(), dim=-1)
                      for s in range(0, len(x), batch)])


@torch.no_grad()
def zero_shot_composition(backbone, bench: ITCPR, batch: int = 256) -> torch.Tensor:
    """A composition with no CPR training: the query is the sum of the normalised image feature of the
    reference and text feature of the relative caption, the gallery the image features; cosine
    similarities ``[queries, gallery]``."""
    backbone.eval()
    norm = torch.nn.functional.normalize
    caps = [q["caption"] for q in bench.queries]
    txt = torch.cat([norm(backbone.encode_text(backbone.tokenize(caps[s: s + batch]))[0].float(), dim=-1) for s in range(0, len(caps), batch)])
    query = norm(pooled_image_features(backbone, bench.query_paths(), batch) + txt, dim=-1)
    return query @ pooled_image_features(backbone, bench.gallery_paths(), batch).T


# ---------------------------------------------------------------------------------------------
# From a shell: one process, n processes by hand, or torchrun's ranks
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m person_retrieval.papers.syncpr``: synthesize SynCPR into the folder notebook 03 reads (or
    ``--out``), then assemble it. Under torchrun each rank takes the shards ``u % WORLD_SIZE == RANK`` and
    rank 0 assembles; by hand, ``--shard i --num-shards n`` in n processes."""
    ap = shards.command_line("python -m person_retrieval.papers.syncpr",
                             "Synthesize SynCPR (the mini pipeline by default; real models with --weights, --llm, --vlm) in "
                             "resumable shards, then assemble SynCPR.json.",
                             {"weights": "notebook 02_generators' dual LoRA", "llm": "the quadruples", "vlm": "the filter"})
    ap.add_argument("--n-quadruples", type=int, help="quadruples to write (default: by scale; paper: SynCPR's 140.5 K)")
    ap.add_argument("--panels", type=int, help="image pairs per quadruple, 2 candidate triplets each (default: by scale; paper: the release's 10)")
    ap.add_argument("--beta-range", type=float, nargs=2, default=(0.5, 1.0), metavar=("LO", "HI"), help="dynamic LoRA strength")
    ap.add_argument("--keep-mean", type=float, default=KEEP_MEAN, help=f"the filter's bar on the mean score (default {KEEP_MEAN})")
    ap.add_argument("--shard-size", type=int, help="quadruples per shard (default: by scale)")
    ap.add_argument("--out", help="the synthesis folder (default: the cache folder notebook 03 reads)")
    ap.add_argument("--data-root", help="the folder holding CUHK-PEDES/ (trains a missing LoRA)")
    args, real = shards.parse(ap, argv)
    if real and args.shard_size is not None:
        ap.error("--shard-size sets the mini pipeline's synthesis; with real models shards of 256 are used")

    def prepare(lead: bool):
        if real:
            dev_gpus = 1 if torch.cuda.is_available() else 0
            lm, gen, vlm, names = load_models(args.scale, args.seed, dev_gpus, weights=args.weights, llm=args.llm, vlm=args.vlm,
                                              data_root=args.data_root, progress=lead)
            cfg = paper_config(args.n_quadruples, args.beta_range, args.seed, names, args.scale, args.panels)
        else:
            lm, gen, vlm, names = mini_models(args.scale, args.seed, args.gpus, progress=lead)
            cfg = mini_config(args.scale, args.seed, names, args.n_quadruples, args.panels, args.beta_range, args.shard_size)
        root = Path(args.out) if args.out else synthesis_folder(args.scale, cfg)
        return {"models": (lm, gen, vlm), **shards.open_folder(root, cfg, lead, "quadruples")}

    def work(st, shard: int, num_shards: int):
        st["processes"] = num_shards
        return synthesize(st["root"], st["cfg"], *st["models"], shard=shard, num_shards=num_shards, progress=shard == 0)

    def finish(st):
        manifest = assemble(st["root"], args.keep_mean)
        if st["fresh"]:
            record_timing(st["root"], time.time() - st["t0"], st["processes"])
        print(f"{synthesis_summary(manifest)}; SynCPR.json in {st['root']}", flush=True)
        return manifest

    shards.distributed_run(prepare, work, finish, args.shard, args.num_shards, args.timeout_hours)
    shards.end_group()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
