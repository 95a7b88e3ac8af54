"""TIPS (notebooks 02_generators and 02_tips): "Text-Image Pairs Synthesis" for text-based person retrieval,
part 2: the synthesis pipeline, its experiments and test-time augmentation. (Part 1, the generators SPG and
IDPG, lives in :mod:`person_retrieval.generators`.)

The pipeline, one function per stage, each called by a cell of notebook 02_tips:

1. :func:`seed_prompts`: the LLM writes one seed-person description per identity, zero-shot from suggested
   attributes (a character, a colour, a garment drawn from lists) and three examples from SPG's training
   captions, or few-shot by recombining the elements of three target-domain captions (TIPS App. A.2);
2. :func:`draw_seeds`: SPG draws each seed at a size condition drawn from the target's size distribution;
   :func:`draw_differences` and :func:`expand`: IDPG draws ``expansions`` new images of each seed's person from
   random difference prompts (new view, pose, scene, lighting, carried item: :data:`DIFFERENCES`);
3. :func:`seed_scores` and :func:`expansion_scores`: the MLLM's filter (seed: prompt alignment and quality,
   1-10, both at least 9; expansion: quality and identity consistency, 1-10, at least 9, and a yes/no on
   variation); rejected images are redrawn until they pass, up to ``max_tries`` draws (:data:`MAX_TRIES`); :func:`captions`: two captions per kept
   image, each from a template drawn from the 120 of :data:`~person_retrieval.assistants.prompts.TIPS_CAPTION_TEMPLATES`;
4. :func:`synthesize` writes it in shards (:mod:`person_retrieval.shards`: n processes or torchrun ranks, a
   killed run resumes) and :func:`assemble` writes a CUHK-PEDES folder (``reid_raw.json`` and ``imgs/``) that
   the TPR code trains on unchanged, plus ``manifest.json`` and ``scores.json``.

``source`` swaps the image stage for the ablation (TIPS Table 5): ``"spg+idpg"`` (the pipeline),
``"spg"`` (one SPG image per prompt), ``"base"`` (the generator without LoRA, one image per prompt) and
``"oracle"``: the world's renderer drawing exactly the prompt's attributes and the difference prompts'
states, the upper bound of a perfect generator (it peeks at nothing but the texts it is given).

:func:`tta_scores` is TIPS's test-time augmentation (Eq. 3): the query's raw feature mixed with the raw
feature of an SPG preview of the query, ``f_q = alpha f_t + (1 - alpha) f_p``, then the cosine to each gallery
image (``mix="similarities"``, :func:`tta_similarity`, mixes the two cosines instead); :func:`choose_alpha`
picks alpha on a validation split.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import shards
from ..assistants import LanguageModel, VisionLanguageModel, grammar, parse_yes_no, prompts
from ..config import cache_dir, rng_for
from ..datasets import TPR_FORMATS, load_split, read_tpr_annotations, write_json_atomic, write_tpr_annotations

SOURCES = ("spg+idpg", "spg", "base", "oracle")
SCENARIOS = ("zero_shot", "few_shot")
#: The paper's filter: 1-10 scores must reach 9; images that fail are regenerated.
KEEP_SCORE = 9
SEED_CRITERIA = ("alignment", "quality")
EXPANSION_CRITERIA = ("quality", "identity", "variation")
CRITERION_PROMPTS = {"alignment": "tips_seed_alignment", "quality": "tips_quality", "identity": "tips_identity_consistency",
                     "variation": "tips_variation"}
#: Seed prompts (identities) per scale: at small, 720 identities x 5 images = 3,600 candidates for >= 3,000 kept.
SCALE_PROMPTS = {"tiny": 24, "small": 720}
SCALE_SHARD = {"tiny": 6, "small": 48}
#: Every n-th identity goes to the synthetic set's val split (model selection on synthetic data only).
SCALE_VAL_EVERY = {"tiny": 3, "small": 20}
#: TTA's weight of the text feature (the paper's alpha, Sec. 4.1).
ALPHA = 0.6
#: The paper regenerates a rejected image "until they pass" (App. A.2); our loop stops after ``MAX_TRIES`` draws
#: of one image and gives it up (the rejection table counts those). At the paper's rejection rates, 5 draws give
#: up 0.196^5 = 0.03% of zero-shot seeds and 0.362^5 = 0.6% of expansions: in effect "until it passes". Uncapped,
#: the mini SPG (whose seeds nearly all fail the filter) would never end.
MAX_TRIES = 5
#: What IDPG's random difference prompts change: the five kinds of difference its training descriptions name
#: (TIPS App. A.1: "lighting, viewpoint, background scene, human status (pose, expression, etc.), and carried
#: items"). ``DIFFERENCES_VIEW_POSE_SCENE`` (ours, what this module drew first) leaves lighting and carried items out.
DIFFERENCES = ("view", "pose", "scene", "lighting", "carried")
DIFFERENCES_VIEW_POSE_SCENE = ("view", "pose", "scene")
#: Bump when the pipeline changes, so cached syntheses are rebuilt.
TIPS_VERSION = 2


@dataclass(frozen=True)
class TIPSConfig:
    """What one synthesis is; a folder holds one, and resuming checks it is the same."""

    n_prompts: int
    scenario: str = "few_shot"
    source: str = "spg+idpg"
    expansions: int = 4  # IDPG images per seed (the paper: 4, five images per identity)
    keep_score: int = KEEP_SCORE
    max_tries: int = MAX_TRIES  # the paper regenerates until an image passes; we give it up after this many draws
    differences: tuple = DIFFERENCES  # what the difference prompts vary (the paper's five; DIFFERENCES_VIEW_POSE_SCENE: ours)
    shard_size: int = 48
    val_every: int = 20  # every n-th identity goes to the validation split (model selection on synthetic data)
    seed: int = 0
    models: tuple = ()  # names (and cache keys) of the LLM, the generator and the MLLM
    examples: str = ""  # a hash of the example captions the prompts draw from

    def __post_init__(self):
        if self.scenario not in SCENARIOS or self.source not in SOURCES:
            raise ValueError(f"scenario must be one of {SCENARIOS} and source one of {SOURCES}; got {self.scenario!r}, {self.source!r}")
        if not (self.n_prompts >= 1 and self.expansions >= 0 and 1 <= self.keep_score <= 10 and self.max_tries >= 1
                and self.shard_size >= 1 and self.val_every >= 2):
            raise ValueError(f"bad TIPS configuration {self}")
        if not self.differences or set(self.differences) - set(DIFFERENCES):
            raise ValueError(f"differences must be a non-empty subset of {DIFFERENCES}, got {self.differences!r}")
        if self.source in ("spg", "base") and self.expansions:
            raise ValueError(f"source {self.source!r} draws one image per prompt: expansions must be 0")

    @property
    def n_shards(self) -> int:
        return -(-self.n_prompts // self.shard_size)

    def as_json(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        d["differences"] = list(self.differences)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TIPSConfig":
        return cls(**{**d, "models": tuple(d.get("models", ())), "differences": tuple(d.get("differences", DIFFERENCES))})


# ---------------------------------------------------------------------------------------------
# 1. Prompts
def attribute_lists() -> dict[str, list[str]]:
    """The zero-shot instruction's three lists (TIPS App. A.2: suggested character, colour and clothing)."""
    from ..world.attributes import AGES, COLORS, GENDERS, LOWER_TYPES, UPPER_TYPES

    age = {"adult": "middle-aged"}
    chars = [f"{'an' if age.get(a, a)[0] in 'aeiou' else 'a'} {age.get(a, a)} {g}" for g in GENDERS for a in AGES]
    return {"character": chars, "color": list(COLORS), "clothing": list(UPPER_TYPES) + list(LOWER_TYPES)}


def prompt_asks(indices: Sequence[int], scenario: str, examples: Sequence[str], seed: int = 0) -> list[str]:
    """The LLM's instruction for each identity index: zero-shot (suggested attributes plus three examples) or
    few-shot (three target captions to recombine), each drawn per index."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    if len(examples) < 3:
        raise ValueError(f"the seed prompts need at least 3 example captions, got {len(examples)}")
    lists = attribute_lists()
    out = []
    for i in indices:
        rng = rng_for(seed, "tips-prompt", scenario, int(i))
        ex = "\n".join(examples[int(j)] for j in rng.choice(len(examples), 3, replace=False))
        if scenario == "zero_shot":
            pick = {k: v[int(rng.integers(len(v)))] for k, v in lists.items()}
            out.append(prompts.TIPS_SEED_PROMPT_ZERO_SHOT.format(examples=ex, **pick))
        else:
            out.append(prompts.TIPS_SEED_PROMPT_FEW_SHOT.format(examples=ex))
    return out


def seed_prompts(lm: LanguageModel, indices: Sequence[int], scenario: str, examples: Sequence[str], seed: int = 0) -> list[str]:
    """One seed-person description per index (the first non-empty line of the LLM's answer; '' if none)."""
    answers = lm.generate(prompt_asks(indices, scenario, examples, seed), max_new_tokens=96)
    return [next((line.strip().strip('"') for line in (a or "").splitlines() if line.strip()), "") for a in answers]


# ---------------------------------------------------------------------------------------------
# 2. Images
def draw_sizes(sizes: Sequence[tuple[int, int]], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """SPG's size conditions: ``n`` draws from the target's own sizes (its empirical distribution; the
    paper samples from the sizes SPG was trained on)."""
    if not sizes:
        raise ValueError("no target sizes to draw SPG's size condition from")
    return [tuple(int(v) for v in sizes[int(j)]) for j in rng.integers(len(sizes), size=n)]


_VIEWS = {"front": "facing the camera", "back": "seen from the back", "side": "seen from the side"}
#: The difference prompts' lighting phrases and the brightness the oracle renders each at (the world's cameras
#: span 0.75 to 1.2).
LIGHTING = {"in dim light": 0.78, "in bright light": 1.18}
#: How often each kind of difference is asked for (redrawn until at least one is).
_DIFF_P = {"view": 0.7, "pose": 0.5, "scene": 0.6, "lighting": 0.4, "carried": 0.3}


def carried_text(item: str) -> str:
    """The difference prompt's words for a held item (the world's ``held`` values)."""
    return "with empty hands" if item == "none" else f"now holding {'an' if item[0] in 'aeiou' else 'a'} {item}"


def draw_differences(n: int, rng: np.random.Generator, kinds: Sequence[str] = DIFFERENCES) -> list[tuple[str, dict]]:
    """``n`` random difference prompts in IDPG's wording (TIPS: drawn from predefined lists), each with what it
    asks for (at least one change): ``view``, ``pose``, ``scene`` and ``brightness`` (the lighting) are render
    states, ``held`` (a carried item) the person's. ``kinds``: which of :data:`DIFFERENCES` may change (the
    paper's five by default)."""
    from ..generators.mini import difference_text
    from ..world.attributes import HELD
    from ..world.render import POSES, SCENES, State

    bad = set(kinds) - set(DIFFERENCES)
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {DIFFERENCES}, got {list(kinds)}")
    lights = list(LIGHTING)
    out = []
    for _ in range(n):
        want, extra = {}, []
        while not want:
            extra = []
            for k in DIFFERENCES:
                if k not in kinds or rng.random() >= _DIFF_P[k]:
                    continue
                if k == "view":
                    want["view"] = list(_VIEWS)[int(rng.integers(3))]
                elif k == "pose":
                    want["pose"] = POSES[int(rng.integers(len(POSES)))]
                elif k == "scene":
                    want["scene"] = SCENES[int(rng.integers(len(SCENES)))]
                elif k == "lighting":
                    light = lights[int(rng.integers(len(lights)))]
                    want["brightness"] = LIGHTING[light]
                    extra.append(light)
                else:
                    want["held"] = HELD[int(rng.integers(len(HELD)))]
                    extra.append(carried_text(want["held"]))
        # difference_text (the mini IDPG's training wording) says what changes from a state that differs in every asked slot
        st = {k: want[k] for k in ("view", "pose", "scene") if k in want}
        none = {"view": "none", "pose": "none", "scene": "none"}
        said = [difference_text(State(**none), State(**{**none, **st})).split(", ", 1)[1]] if st else []
        out.append((prompts.TIPS_DIFFERENCE_TEXT.format(differences=", ".join(said + extra)), want))
    return out


def oracle_expansion_person(person, want: dict | None):
    """The oracle's person for an expansion: the seed's, carrying what the difference prompt asks for."""
    return person.replace(held=want["held"]) if want and "held" in want else person


def oracle_person(prompt: str, rng: np.random.Generator, pid: int):
    """The world's person for a prompt: every attribute the prompt states, the rest drawn."""
    from ..world.attributes import sample_person

    person = sample_person(rng, pid)
    claims = grammar.parse_claims(prompt)
    return person.replace(**{k: v for k, v in claims.items() if hasattr(person, k)})


def _oracle_state(rng, profile, size, top, want=None):
    from dataclasses import replace as dc_replace

    from ..world.render import RES_FACTORS, State, sample_state

    s = sample_state(rng, profile)
    if size is not None:
        ratio = max(1.0, top[0] / max(1, size[0]))
        s = dc_replace(s, res_factor=min(RES_FACTORS, key=lambda f: abs(np.log(f / ratio))))
    return dc_replace(s, **{k: v for k, v in (want or {}).items() if k in State.__dataclass_fields__})


def _render_all(people, states, height: int) -> torch.Tensor:
    from ..world.render import render

    return torch.from_numpy(np.stack([render(p, s, height) for p, s in zip(people, states)])).permute(0, 3, 1, 2).contiguous()


def draw_seeds(gen, source: str, prompts_: Sequence[str], sizes: Sequence[tuple[int, int]], seed: int, oracle: dict | None = None) -> torch.Tensor:
    """Seed images, uint8 ``[N, 3, H, W]``: SPG at each size condition (``spg+idpg``, ``spg``), the base
    generator (``base``: no adapter, no size) or the world's renderer (``oracle``; ``oracle`` holds its
    people, states and the target's camera profile)."""
    if source == "oracle":
        return _render_all(oracle["people"], oracle["states"], gen.image_size[0])
    if source == "base":
        return gen.generate(list(prompts_), seed=seed)
    return gen.spg(list(prompts_), list(sizes), seed=seed)


def expand(gen, source: str, seeds: torch.Tensor, differences: Sequence[str], seed: int, oracle: dict | None = None) -> torch.Tensor:
    """IDPG's new images of each seed's person (one per difference prompt), or the oracle's renders."""
    if source == "oracle":
        return _render_all(oracle["people"], oracle["states"], gen.image_size[0])
    return gen.idpg(seeds, list(differences), seed=seed)


# ---------------------------------------------------------------------------------------------
# 3. The MLLM filter and the captions
def _variation(vlm: VisionLanguageModel, images, references) -> np.ndarray:
    """The yes/no variation check: a transformers MLLM answers the prompt with both images; the mini MLLM's
    variation score (1-10) counts as yes from 6."""
    if hasattr(vlm, "ask"):
        from ..assistants.base import _images

        ans = vlm.ask([[r, i] for r, i in zip(_images(references), _images(images))], [prompts.TIPS_VARIATION.template] * len(images),
                      max_new_tokens=4)
        got = [parse_yes_no(a) for a in ans]
        vlm.usage.unparsed["tips_variation"] += sum(g is None for g in got)
        return np.array([bool(g) for g in got])
    return np.asarray(vlm.score(images, CRITERION_PROMPTS["variation"], references=references)) >= 6


def seed_scores(vlm: VisionLanguageModel, images, texts: Sequence[str]) -> np.ndarray:
    """``[N, 2]``: alignment with the prompt and quality, 1-10 each (0: the answer did not parse)."""
    ali = vlm.score(images, CRITERION_PROMPTS["alignment"], texts=list(texts))
    qua = vlm.score(images, CRITERION_PROMPTS["quality"])
    return np.stack([ali, qua], 1).astype(np.int64)


def expansion_scores(vlm: VisionLanguageModel, images, references) -> np.ndarray:
    """``[N, 3]``: quality and identity consistency with the seed (1-10) and variation (1 yes, 0 no)."""
    qua = vlm.score(images, CRITERION_PROMPTS["quality"])
    ide = vlm.score(images, CRITERION_PROMPTS["identity"], references=references)
    var = _variation(vlm, images, references)
    return np.stack([qua, ide, var.astype(np.int64)], 1).astype(np.int64)


def passes(scores: np.ndarray, keep_score: int = KEEP_SCORE) -> np.ndarray:
    """The paper's rule: every 1-10 score at least ``keep_score``; a binary column (expansions' last) must be 1."""
    s = np.asarray(scores).reshape(len(scores), -1)
    ok = s[:, :2] >= keep_score
    if s.shape[1] == 3:
        ok = np.concatenate([ok, s[:, 2:] >= 1], 1)
    return ok.all(1)


def captions(vlm: VisionLanguageModel, images, rng: np.random.Generator) -> list[list[str]]:
    """Two captions per image, each from its own template (two different of the 120, drawn per image)."""
    T = prompts.TIPS_CAPTION_TEMPLATES
    picks = [rng.choice(len(T), 2, replace=False) for _ in range(len(images))]
    outs = [vlm.describe(images, [prompts.TIPS_CAPTION.format(template=T[int(p[k])]) for p in picks]) for k in range(2)]
    return [[a.strip(), b.strip()] for a, b in zip(*outs)]


# ---------------------------------------------------------------------------------------------
# 4. Shards, resume, assembly
def _redraw(draw, score, n: int, keep_score: int, max_tries: int):
    """Draw ``n`` images and redraw each rejected one until it passes (the paper's "regenerated until they
    pass"), giving it up after ``max_tries`` draws in all (our cap: :data:`MAX_TRIES`). Returns the final
    images, their scores, whether each passed, and every draw's scores (for the rejection rates)."""
    images, scores = None, None
    ok = np.zeros(n, dtype=bool)
    every = []
    for t in range(max_tries):
        todo = np.flatnonzero(~ok)
        if not len(todo):
            break
        im = draw(todo, t)
        sc = score(todo, im)
        every.append(sc)
        if images is None:
            images, scores = im.clone(), sc.copy()
        else:
            images[todo], scores[todo] = im, sc
        ok[todo] = passes(sc, keep_score)
    return images, scores, ok, np.concatenate(every) if every else np.zeros((0, 2), dtype=np.int64)


def synthesize_shard(root: Path, u: int, cfg: TIPSConfig, lm: LanguageModel, gen, vlm: VisionLanguageModel, examples: Sequence[str],
                     sizes: Sequence[tuple[int, int]], profile) -> dict:
    """Prompts, seeds, expansions, filter and captions of shard ``u``; its kept images written at once.
    Everything depends on ``(cfg, u)`` alone, so a shard redone gives the same record."""
    from PIL import Image

    idx = list(range(u * cfg.shard_size, min((u + 1) * cfg.shard_size, cfg.n_prompts)))
    texts = seed_prompts(lm, idx, cfg.scenario, examples, cfg.seed)
    rng = rng_for(cfg.seed, "tips-shard", u)
    size_c = draw_sizes(sizes, len(idx), rng)
    top = max(sizes)
    people = [oracle_person(t, rng_for(cfg.seed, "tips-oracle", i), i) for t, i in zip(texts, idx)] if cfg.source == "oracle" else None

    def draw_seed(todo, t):
        ora = None
        if people is not None:
            r = rng_for(cfg.seed, "tips-oracle-seed", u, t)
            ora = {"people": [people[j] for j in todo], "states": [_oracle_state(r, profile, size_c[j], top) for j in todo]}
        return draw_seeds(gen, cfg.source, [texts[j] for j in todo], [size_c[j] for j in todo], cfg.seed * 7919 + u * 31 + t, ora)

    seeds, s_scores, s_ok, s_all = _redraw(draw_seed, lambda todo, im: seed_scores(vlm, im, [texts[j] for j in todo]),
                                           len(idx), cfg.keep_score, cfg.max_tries)
    # expansions of the kept seeds
    kept_seeds = np.flatnonzero(s_ok)
    diffs = draw_differences(len(kept_seeds) * cfg.expansions, rng, cfg.differences)
    owner = np.repeat(kept_seeds, cfg.expansions)
    e_ok, e_scores, e_all, exp = np.zeros(0, dtype=bool), np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3), dtype=np.int64), None
    if len(owner):
        def draw_exp(todo, t):
            ora = None
            if people is not None:
                r = rng_for(cfg.seed, "tips-oracle-exp", u, t)
                ora = {"people": [oracle_expansion_person(people[owner[j]], diffs[j][1]) for j in todo],
                       "states": [_oracle_state(r, profile, size_c[owner[j]], top, diffs[j][1]) for j in todo]}
            return expand(gen, cfg.source, seeds[owner[todo]], [diffs[j][0] for j in todo], cfg.seed * 7919 + u * 31 + 1000 + t, ora)

        exp, e_scores, e_ok, e_all = _redraw(draw_exp, lambda todo, im: expansion_scores(vlm, im, seeds[owner[todo]]),
                                             len(owner), cfg.keep_score, cfg.max_tries)
    # the kept images of each identity, their captions, written all at once
    items = [(int(j), "seed", seeds[j]) for j in kept_seeds]
    items += [(int(owner[k]), f"x{k % cfg.expansions}", exp[k]) for k in np.flatnonzero(e_ok)]
    items.sort(key=lambda x: (x[0], x[1] != "seed", x[1]))
    caps = captions(vlm, torch.stack([im for _, _, im in items]), rng) if items else []
    rel = f"shard_{u:05d}"
    images = []
    with shards.image_folder(root / "imgs" / rel) as tmp:
        for (j, kind, im), cap in zip(items, caps):
            name = f"p{idx[j]:06d}_{kind}.png"
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp / name)
            images.append({"identity": idx[j], "file_path": f"{rel}/{name}", "kind": kind, "captions": cap})
    return {"shard": u, "prompts": texts, "sizes": [list(s) for s in size_c],
            "seed_scores": s_scores.tolist(), "seed_kept": s_ok.tolist(), "seed_draws": s_all.tolist(),
            "differences": [d for d, _ in diffs], "expansion_scores": e_scores.tolist(), "expansion_kept": e_ok.tolist(),
            "expansion_draws": e_all.tolist(), "images": images}


def synthesize(root: str | Path, cfg: TIPSConfig, lm: LanguageModel, gen, vlm: VisionLanguageModel, examples: Sequence[str],
               sizes: Sequence[tuple[int, int]], profile=None, shard: int = 0, num_shards: int = 1, progress: bool = True) -> list[dict]:
    """Synthesize this process's share of ``cfg`` into ``root`` (shards ``u`` with ``u % num_shards == shard``);
    finished shards are skipped, so a killed run resumes; a folder with another configuration is refused."""
    from ..world.render import CameraProfile

    root = Path(root)
    profile = profile or CameraProfile()
    return shards.run(root, cfg.as_json(), cfg.n_shards,
                      lambda u: synthesize_shard(root, u, cfg, lm, gen, vlm, examples, sizes, profile), shard, num_shards, progress,
                      desc=f"TIPS shards ({cfg.shard_size} identities each)")


def _n_shards(root: Path) -> int:
    c = json.loads((root / "synthesis.json").read_text())
    return -(-c["n_prompts"] // c["shard_size"])


def missing_shards(root: str | Path) -> list[int]:
    return shards.missing(root, _n_shards(Path(root)))


def assemble(root: str | Path) -> dict:
    """Once every shard is done: ``reid_raw.json`` (CUHK-PEDES's format: every kept image with its two
    captions; every ``val_every``-th identity in the val split, the rest in train), ``scores.json`` and
    ``manifest.json`` (the configuration and a hash of each shard's record, no timings: a resumed run writes
    the same manifest as an unbroken one). Returns the manifest. A set whose filter kept nothing is written
    empty (its manifest says so: :func:`trainable`)."""
    root = Path(root)
    cfg = json.loads((root / "synthesis.json").read_text())
    shards.require_all(root, _n_shards(root))
    recs = shards.read(root)
    entries = []
    for r in recs:
        for im in r["images"]:
            entries.append({"id": im["identity"] + 1, "file_path": im["file_path"], "captions": im["captions"],
                            "split": "val" if im["identity"] % cfg["val_every"] == cfg["val_every"] - 1 else "train"})
    write_tpr_annotations("cuhk_pedes", root, entries)
    write_json_atomic(root / "scores.json", {k: [v for r in recs for v in r[k]] for k in
                                             ("seed_draws", "expansion_draws", "seed_kept", "expansion_kept")})
    ids = {e["id"] for e in entries}
    manifest = {"config": cfg, "shards": [{"shard": r["shard"], "images": len(r["images"]), "sha1": shards.digest(root, r["shard"])}
                                          for r in recs],
                "identities": len(ids), "images": len(entries), "pairs": sum(len(e["captions"]) for e in entries),
                "train_images": sum(e["split"] == "train" for e in entries), "val_images": sum(e["split"] == "val" for e in entries)}
    write_json_atomic(root / "manifest.json", manifest)
    return manifest


def trainable(manifest: dict) -> bool:
    """Whether a set holds images in both its train and its val split (what training and selection need)."""
    return manifest["train_images"] > 0 and manifest["val_images"] > 0


def rejection_table(root: str | Path) -> pd.DataFrame:
    """Per criterion, the share of all draws (first draws and redraws) that failed it, for seeds and for
    expansions, and the share of images given up after every draw failed (the paper: 19.6% of seeds rejected
    zero-shot, 17.5% few-shot, 14.6% in the generalization scenario; 36.2% of expansions on average: the
    ``"any (draw rejected)"`` rows; :func:`reported_rejections`). ``max draws`` is the cap of the redraws."""
    s = json.loads((Path(root) / "scores.json").read_text())
    conf = json.loads((Path(root) / "synthesis.json").read_text())
    keep = conf["keep_score"]
    rows = []
    for kind, crits, draws, final in (("seed", SEED_CRITERIA, s["seed_draws"], s["seed_kept"]),
                                      ("expansion", EXPANSION_CRITERIA, s["expansion_draws"], s["expansion_kept"])):
        d = np.asarray(draws, dtype=float).reshape(-1, len(crits))
        n = max(len(d), 1)
        for j, c in enumerate(crits):
            bad = d[:, j] < (1 if c == "variation" else keep)
            rows.append({"images": kind, "criterion": c, "draws": len(d), "failed (%)": 100 * bad.sum() / n})
        rows.append({"images": kind, "criterion": "any (draw rejected)", "draws": len(d), "failed (%)": 100 * (~passes(d, keep)).sum() / n if len(d) else float("nan")})
        rows.append({"images": kind, "criterion": "given up after every draw", "draws": len(final),
                     "failed (%)": 100 * (1 - np.mean(final)) if final else float("nan")})
    return pd.DataFrame(rows).assign(**{"max draws": conf.get("max_tries")})


def reported_rejections() -> pd.DataFrame:
    """The paper's rejection rates (TIPS App. A.2), in :func:`rejection_table`'s columns: seeds 19.6%
    zero-shot, 17.5% few-shot and 14.6% in the generalization scenario; expansions 36.2% on average."""
    from ..reports import reported

    return reported("tips_rejections")


# ---------------------------------------------------------------------------------------------
# The mini pipeline's cached synthesis
def _worker(rank: int, world: int, root: str, cfg_json: dict, scale: str, seed: int, dataset: str, data_root, few_shot_root,
            threads: int):
    """One process of a sharded synthesis (spawned processes import this, not notebook code)."""
    torch.set_num_threads(max(1, threads))
    cfg = TIPSConfig.from_json(cfg_json)
    lm, gen, vlm, _ = mini_models(scale, seed, dataset, data_root, progress=False)
    ex, sizes, profile = domain(scale, seed, dataset, data_root, cfg.scenario, gen, few_shot_root)
    synthesize(root, cfg, lm, gen, vlm, ex, sizes, profile, shard=rank, num_shards=world, progress=rank == 0)


def mini_models(scale: str, seed: int = 0, dataset: str = "cuhk_pedes", data_root=None, gpus: int = 0, progress: bool = True):
    """``(lm, gen, vlm, names)``: the mini LM, the mini generator (SPG and IDPG adapters) and the mini MLLM."""
    from ..assistants import MiniLM, mini_vlm
    from ..generators.mini import mini_generators

    gen, report = mini_generators(scale, seed, dataset=dataset, data_root=data_root, gpus=gpus, progress=progress)
    vlm = mini_vlm(scale, seed, progress=progress)
    return MiniLM(seed), gen, vlm, ("mini-lm", f"mini-generator:{Path(report['dir']).name}", f"{vlm.name}:{scale}-seed{seed}")


def domain(scale: str, seed: int, dataset: str, data_root, scenario: str, gen=None, few_shot_root=None):
    """What the prompts and the sizes draw from: ``(examples, sizes, camera profile)``. Zero-shot examples
    are SPG's training captions (its few-shot target set); few-shot ones the few-shot split's captions (at
    ``few_shot_root``). Sizes: the target set's capture sizes. The profile: the world's camera of the
    dataset's style (the oracle's; a real folder gets the world's CUHK-PEDES camera). At ``scale="paper"`` the
    target set is the FLUX.1-dev LoRAs' few-shot set (:func:`~person_retrieval.generators.flux.few_shot_target`)."""
    from ..generators.mini import mini_config, target_set
    from ..world import PROFILES, dataset_root

    root = dataset_root(dataset, data_root, scale, seed)
    if scale == "paper":
        from ..generators.flux import TIPS_DEFAULTS, few_shot_target

        size = gen.image_size if gen is not None else (TIPS_DEFAULTS["height"], TIPS_DEFAULTS["width"])
        ts = few_shot_target(dataset, root, size, seed)
    else:
        ts = target_set(dataset, root, mini_config(scale), seed)
    if scenario == "zero_shot":
        examples = sorted({c for caps in ts.captions for c in caps if c})
    else:
        if few_shot_root is None:
            raise ValueError("the few-shot prompts need the few-shot split's folder (few_shot_root)")
        examples = list(load_split(dataset, few_shot_root, "train").captions)
    return examples, list(ts.sizes), PROFILES.get(dataset, PROFILES["cuhk_pedes"])


def tips_dataset(scale: str = "small", seed: int = 0, gpus: int = 0, dataset: str = "cuhk_pedes", data_root=None,
                 scenario: str = "few_shot", source: str = "spg+idpg", n_prompts: int | None = None, few_shot_root=None,
                 models=None, progress: bool = True, **cfg_kw) -> tuple[Path, dict]:
    """The synthetic set for ``(scale, seed, dataset, scenario, source)``, synthesized once and cached (with a
    progress bar; ``gpus`` > 1 splits the shards over that many processes). ``n_prompts`` counts identities
    for ``spg+idpg`` and ``oracle``; ``spg`` and ``base`` draw ``(1 + expansions)`` times as many prompts, one
    image each, so every source offers the same number of images. ``models``: ``(lm, gen, vlm, names)``
    to use instead of the mini ones (then ``gpus`` > 1 is not used). Returns ``(folder, manifest)``; the
    folder is a CUHK-PEDES folder (``load_split("cuhk_pedes", folder, "train")``)."""
    plan = tips_plan(scale, seed, gpus, dataset, data_root, scenario, source, n_prompts, few_shot_root, models, progress, **cfg_kw)
    root, cfg = plan["root"], plan["cfg"]
    t0 = time.time()
    if not (root / "manifest.json").is_file() or missing_shards(root):
        if gpus > 1 and models is None:
            root.mkdir(parents=True, exist_ok=True)
            shards.check_config(root, cfg.as_json())
            shards.spawn(_worker, gpus, (str(root), cfg.as_json(), scale, seed, dataset, data_root,
                                         few_shot_root and str(few_shot_root), shards.threads_per_process(gpus)))
        else:
            synthesize(root, cfg, *plan["models"], *plan["domain"], progress=progress)
        record_timing(root, time.time() - t0, max(1, gpus) if models is None else 1)
    return root, assemble(root)


def tips_plan(scale: str = "small", seed: int = 0, gpus: int = 0, dataset: str = "cuhk_pedes", data_root=None,
              scenario: str = "few_shot", source: str = "spg+idpg", n_prompts: int | None = None, few_shot_root=None,
              models=None, progress: bool = True, **cfg_kw) -> dict:
    """What :func:`tips_dataset` synthesizes, without synthesizing: ``{"cfg", "root", "models": (lm, gen, vlm),
    "domain": (examples, sizes, profile)}`` (the models loaded, or built when missing)."""
    n = int(n_prompts or SCALE_PROMPTS.get(scale, 40_000))  # the paper: 40k identities per scenario
    exp = int(cfg_kw.pop("expansions", 4))
    if source in ("spg", "base"):
        n, exp = n * (1 + exp), 0
    lm, gen, vlm, names = models or mini_models(scale, seed, dataset, data_root, gpus, progress)
    examples, sizes, profile = domain(scale, seed, dataset, data_root, scenario, gen, few_shot_root)
    ex_key = hashlib.sha1("\n".join(examples).encode()).hexdigest()[:12]
    cfg = TIPSConfig(n_prompts=n, scenario=scenario, source=source, expansions=exp, seed=seed, models=tuple(names), examples=ex_key,
                     shard_size=cfg_kw.pop("shard_size", min(n, SCALE_SHARD.get(scale, 256))),
                     val_every=cfg_kw.pop("val_every", SCALE_VAL_EVERY.get(scale, 20)),
                     **cfg_kw)
    key = hashlib.blake2b(json.dumps([scale, dataset, str(data_root), cfg.as_json(), TIPS_VERSION], sort_keys=True).encode(),
                          digest_size=4).hexdigest()
    root = cache_dir() / "tips" / f"{dataset}-{scale}-seed{seed}-{scenario}-{source.replace('+', '_')}-{key}"
    return {"cfg": cfg, "root": root, "models": (lm, gen, vlm), "domain": (examples, sizes, profile)}


def record_timing(root: Path, seconds: float, processes: int) -> None:
    """``timing.json``: how long the synthesis took, over how many processes (not part of the manifest)."""
    recs = shards.read(root)
    n_img = sum(len(r["images"]) for r in recs)
    draws = sum(len(r["seed_draws"]) + len(r["expansion_draws"]) for r in recs)
    write_json_atomic(Path(root) / "timing.json", {"seconds": round(seconds, 1), "processes": processes, "kept_images": n_img,
                                                   "drawn_images": draws, "kept_pairs_per_s": round(2 * n_img / max(seconds, 1e-9), 3),
                                                   "drawn_images_per_s": round(draws / max(seconds, 1e-9), 3)})


def read_timing(root: str | Path) -> dict:
    p = Path(root) / "timing.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Other training sets: the few-shot split and the "web" corpus (MALS's role)
def identity_subset(dataset: str, root, keep_train: set, name: str, note: dict | None = None, keep_val: set | None = None) -> Path:
    """A folder of ``dataset``'s format whose train split holds only the identities ``keep_train`` (ids as in
    its annotation file), whose val split holds only ``keep_val`` (None: all of it), and every other split
    as it is; its images are the original folder's (a link). Written once, under ``.cache/tips/subsets/<name>``."""
    fmt = TPR_FORMATS[dataset]
    root = Path(root)
    out = cache_dir() / "tips" / "subsets" / name
    if not (out / fmt.annotation).is_file():
        data = read_tpr_annotations(dataset, root)
        out.mkdir(parents=True, exist_ok=True)
        link = out / fmt.image_dir
        if not link.exists():
            os.symlink((root / fmt.image_dir).resolve(), link, target_is_directory=True)
        extra = {} if keep_val is None else {"val_identities": sorted(int(i) for i in keep_val)}
        write_json_atomic(out / "subset.json", {"source": str(root.resolve()), "train_identities": sorted(int(i) for i in keep_train),
                                                **extra, **(note or {})})
        write_tpr_annotations(dataset, out, [e for e in data if (e["split"] != "train" or e["id"] in keep_train)
                                             and (keep_val is None or e["split"] != "val" or e["id"] in keep_val)])
    return out


def split_identities(dataset: str, root, split: str) -> list[int]:
    """The identities (ids as in the annotation file) of one split of ``dataset`` at ``root``."""
    return sorted({e["id"] for e in read_tpr_annotations(dataset, root) if e["split"] == split})


def train_identities(dataset: str, root) -> list[int]:
    return split_identities(dataset, root, "train")


#: The few-shot split's validation identities: ``"budget"``, the same share of the labelled val identities as
#: of the training ones (drawn by the seed: model selection spends the same 1% budget as training);
#: ``"full"`` (ours, what this module did first): the whole labelled val split (at CUHK-PEDES, 1,000 val
#: identities against 110 for training).
FEW_SHOT_VALS = ("budget", "full")


def few_shot_split(dataset: str, root, share: float, seed: int = 0, val: str = "budget") -> Path:
    """``dataset`` with ``share`` of its training identities (at least 2), drawn with the seed (every method
    of one seed trains on the same identities), its test split as it is, and (``val="budget"``, the default)
    the same ``share`` of its val identities (at least 2, drawn with the seed), or (``val="full"``) its whole
    val split. A dataset without a val split (ICFG-PEDES) has its val identities held out of the few-shot
    training ones by the training code, as for the full set."""
    if not 0 < share <= 1:
        raise ValueError(f"few_shot_share must be in (0, 1], got {share}")
    if val not in FEW_SHOT_VALS:
        raise ValueError(f"val must be one of {FEW_SHOT_VALS}, got {val!r}")
    ids = train_identities(dataset, root)
    k = min(len(ids), max(2, int(round(share * len(ids)))))
    chosen = set(rng_for(seed, "tips-few-shot", dataset).choice(ids, size=k, replace=False).tolist())
    note = {"share": share, "seed": seed, "of": len(ids)}
    key = [str(Path(root).resolve()), share, seed]
    keep_val = None
    vids = split_identities(dataset, root, "val")
    if val == "budget" and vids:
        kv = min(len(vids), max(2, int(round(share * len(vids)))))
        keep_val = set(rng_for(seed, "tips-few-shot-val", dataset).choice(vids, size=kv, replace=False).tolist())
        note.update(val="budget", val_of=len(vids))
        key.append("val-budget")  # the "full" folder keeps its first name (and its cached runs)
    tag = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]
    return identity_subset(dataset, root, chosen, f"few_shot-{dataset}-{tag}", note, keep_val=keep_val)


def web_corpus(scale: str, seed: int, n_pairs: int, height: int = 64) -> Path:
    """A CUHK-PEDES folder of the world's generic "web" pairs (the pretraining corpus's kind: alt-text lines,
    two images per person, people in no dataset and not the backbone's own pretraining people), with
    ``n_pairs`` image-text pairs: the role MALS plays in TIPS Table 1, at the size of a TIPS set."""
    from PIL import Image

    from ..models.pretrain import pretrain_corpus

    # the folder's name says everything its content depends on: training runs are cached by their data's path
    out = cache_dir() / "tips" / "web" / f"{scale}-seed{seed}-n{n_pairs}-h{height}-v{TIPS_VERSION}"
    if (out / "reid_raw.json").is_file():
        return out
    n_ids = max(2, -(-n_pairs // 2))
    images, caps, pids = pretrain_corpus(scale, seed + 104729, n_ids=n_ids, height=height)
    entries = []
    k = max(2, min(20, n_ids // 5))  # every k-th person to the val split (every 20th once there are 100)
    with shards.image_folder(out / "imgs") as tmp:
        for i, (im, c, p) in enumerate(zip(images[:n_pairs], caps, pids.tolist())):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp / f"{i:06d}.png")
            entries.append({"id": int(p) + 1, "file_path": f"{i:06d}.png", "captions": [c], "split": "val" if p % k == k - 1 else "train"})
    write_tpr_annotations("cuhk_pedes", out, entries)
    return out


# ---------------------------------------------------------------------------------------------
# Training: pretrain on a synthetic set, then fine-tune (the few-shot protocol)
def pretrain(method: str, root, scale: str, seed: int, gpus: int = 0, init=None, progress: bool = False, weights=None):
    """Phase 1: train ``method`` on a CUHK-PEDES-format set (synthetic or web) with the baselines' schedule,
    selected on that set's own val split, from ``init`` (a mini CLIP file) or real CLIP ``weights``. Returns ``(run, backbone weights file)``: the file holds the
    trained backbone alone (the identity classifier is left behind, as TIPS does for IRRA in phase 2)."""
    from safetensors.torch import save_model

    from . import tpr

    run = tpr.fit_baseline(method, "cuhk_pedes", root, scale=scale, seed=seed, gpus=gpus, init=init, weights=weights, progress=progress,
                           **_small_set_batch("cuhk_pedes", root, "paper" if weights else scale, gpus))
    path = Path(run.out_dir) / "backbone.safetensors"
    if not path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        save_model(run.model.backbone, str(tmp))
        tmp.replace(path)
    return run, path


#: Fine-tuning schedules: ``"halved"``, half the baselines' epochs and learning rate (TIPS Sec. 4.1, the
#: few-shot scenario's phase 2); ``"full"``, the baselines' own (Table 3: the Raw and the TIPS runs on the same
#: schedule, so that only the pretraining differs).
SCHEDULES = ("halved", "full")


def fine_tune(method: str, dataset: str, root, scale: str, seed: int, gpus: int = 0, init=None, pretrained: bool = False,
              progress: bool = False, weights=None, schedule: str | None = None):
    """Phase 2 (or the only phase): ``method`` on ``dataset`` at ``root`` from ``init`` (a weights file: the
    mini CLIP's, or a phase-1 backbone) on the real CLIP ``weights``' architecture when given. ``schedule``
    (:data:`SCHEDULES`): None gives the few-shot protocol, ``"halved"`` after pretraining
    (``pretrained=True``: epochs and learning rate halved, TIPS Sec. 4.1) and ``"full"`` without."""
    from . import tpr

    schedule = schedule or ("halved" if pretrained else "full")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    base = tpr.BASELINE_CONFIG["paper" if weights else scale]
    over = dict(epochs=max(1, base["epochs"] // 2), lr=base["lr"] / 2) if schedule == "halved" else {}
    return tpr.fit_baseline(method, dataset, root, scale=scale, seed=seed, gpus=gpus, init=init, weights=weights, progress=progress, **over,
                            **_small_set_batch(dataset, root, "paper" if weights else scale, gpus))


def _small_set_batch(dataset: str, root, scale: str, gpus: int) -> dict:
    """A batch that fits a small training set: the baselines' batch, or, for a set with fewer training pairs
    (a 1% few-shot split, a small synthetic set), the largest power of two that gives at least two steps an
    epoch (``batch_size`` is the global batch: at least 2 per process, and a multiple of the process count)."""
    from . import tpr

    split = load_split(dataset, root, "train", check_images=False)
    n = len(split.captions)
    if not n:
        return {}
    if dataset == "icfg_pedes":  # 10% of its identities are held out for validation
        n = int(n * 0.9)
    want = tpr.BASELINE_CONFIG[scale]["batch_size"]
    procs = max(1, gpus)
    if n >= 2 * want:
        return {}
    b = max(2 * procs, 2 ** int(np.floor(np.log2(max(2, n // 2)))))
    return {"batch_size": int(b - b % procs)}


# ---------------------------------------------------------------------------------------------
# Test-time augmentation
def query_subset(data, n: int | None):
    """``data`` (a :class:`~person_retrieval.datasets.torch_data.RetrievalData`) with ``n`` of its queries,
    evenly spaced, and the whole gallery (None: all of them): TTA's previews for a smoke run."""
    from dataclasses import replace

    if n is None or n >= len(data.captions):
        return data
    idx = torch.from_numpy(np.unique(np.linspace(0, len(data.captions) - 1, int(n)).round().astype(np.int64)))
    return replace(data, tokens=data.tokens[idx], caption_pids=data.caption_pids[idx], caption_image_ids=data.caption_image_ids[idx],
                   captions=[data.captions[int(i)] for i in idx])


def preview_sizes(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The size condition of the previews: the target's most common capture size."""
    vals, counts = np.unique(np.asarray(sizes), axis=0, return_counts=True)
    return tuple(int(v) for v in vals[int(counts.argmax())])


def previews(gen, texts: Sequence[str], size: tuple[int, int], seed: int = 0, cache: str | Path | None = None,
             batch: int = 256, progress: bool = False) -> tuple[torch.Tensor, float]:
    """One SPG preview per query text, uint8 ``[N, 3, H, W]`` (TTA phase 1), and the seconds per preview it
    took to draw them. Cached in ``cache`` (a safetensors file keyed by the caller, the seconds in its
    metadata) since they depend on the generator and the texts alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if cache is not None and Path(cache).is_file():
        with safe_open(str(cache), "pt") as f:
            got, meta = f.get_tensor("previews"), f.metadata() or {}
        if len(got) == len(texts) and meta.get("texts") == hashlib.sha1("\n".join(texts).encode()).hexdigest():
            return got, float(meta.get("seconds_per_preview", "nan"))
    t0 = time.time()
    parts = []
    it = range(0, len(texts), batch)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="TTA previews", leave=False)
    for s in it:
        parts.append(gen.spg(list(texts[s: s + batch]), tuple(size), seed=seed * 7919 + s))
    out = torch.cat(parts) if parts else torch.zeros(0, 3, *gen.image_size, dtype=torch.uint8)
    per = (time.time() - t0) / max(1, len(texts))
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache) + ".tmp")
        save_file({"previews": out.contiguous()}, str(tmp),
                  metadata={"seconds_per_preview": repr(per), "texts": hashlib.sha1("\n".join(texts).encode()).hexdigest()})
        tmp.replace(cache)
    return out, per


@torch.no_grad()
def preview_features(model, images: torch.Tensor, image_size: tuple[int, int]) -> dict:
    """The previews' image features ``f_p`` (TTA phase 2) as ``model.embed_images`` returns them (raw: not
    normalised), on the CPU, images brought to the model's size."""
    from ..models.retrieval import _cat
    from ..datasets.torch_data import to_float

    model.eval()
    dev = next(model.parameters()).device
    feats = []
    for s in range(0, len(images), 256):
        x = images[s: s + 256].float()
        if tuple(x.shape[-2:]) != tuple(image_size):
            x = F.interpolate(x, size=tuple(image_size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
        feats.append(model.embed_images(to_float(x.round().to(torch.uint8).to(dev))))
    return _cat(feats)


@torch.no_grad()
def preview_similarity(model, images: torch.Tensor, gallery: dict, image_size: tuple[int, int]) -> torch.Tensor:
    """``[N_query, N_gallery]``: each preview's image feature against the gallery's (TTA phase 2), through the
    model's own similarity (RDE's averages its two embeddings), images brought to the model's size."""
    return model.similarity(preview_features(model, images, image_size), gallery)


#: How TTA mixes text and preview: ``"features"``, Eq. 3 as printed (mix the raw features, then the cosine);
#: ``"similarities"``, the mix of the two cosines (what this module did first; the same ranking only for
#: unit-norm features).
TTA_MIXES = ("features", "similarities")
#: The alphas :func:`choose_alpha` tries by default: 0 (the preview alone) to 1 (the text alone) in steps of 0.1.
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def tta_query(text_feats: dict, preview_feats: dict, alpha: float = ALPHA) -> dict:
    """TIPS Eq. 3 as printed, ``f_q^g = alpha f_t^g + (1 - alpha) f_p^g``: the hybrid query, key by key of the
    text's feature dict (``global``; RDE's ``tse`` and DIANA's ``refined`` too; image-only keys of the preview's
    are left out), from the features as the model outputs them. Our models' ``embed_texts`` and ``embed_images`` return **unnormalised** features (the
    cosine's normalisation is inside ``model.similarity``), so the mix is of raw features: each side's weight
    is in effect ``alpha |f_t|`` against ``(1 - alpha) |f_p|``."""
    _check_alpha(alpha)
    missing = sorted(set(text_feats) - set(preview_feats))
    if missing:
        raise ValueError(f"the preview features lack the text's {missing} (text: {sorted(text_feats)}, preview: {sorted(preview_feats)})")
    return {k: alpha * text_feats[k] + (1 - alpha) * preview_feats[k] for k in text_feats}


def tta_similarity(text_sim: torch.Tensor, preview_sim: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """TTA's ``mix="similarities"`` form, **not** Eq. 3 as printed: ``alpha s_t(g) + (1 - alpha) s_p(g)``, the
    mix of the text's and the preview's cosines to gallery image ``g``. For unit-norm ``f_t`` and ``f_p`` it is
    Eq. 3's cosine times ``|f_q|`` (the same for every ``g``: the same ranking); for raw features, whose norms
    differ, it is not (:func:`tta_scores` with ``mix="features"`` is Eq. 3)."""
    _check_alpha(alpha)
    return alpha * text_sim + (1 - alpha) * preview_sim


def tta_scores(similarity, text_feats: dict, preview_feats: dict, gallery: dict, alpha: float = ALPHA,
               mix: str = "features") -> torch.Tensor:
    """``[N_query, N_gallery]`` TTA scores through ``similarity`` (the model's, e.g. ``model.similarity``:
    a cosine per key). ``mix="features"``: Eq. 3 as printed, the cosine of the hybrid query
    :func:`tta_query` of the raw features (TIPS phase 3, "recompute similarities using f_q^g");
    ``mix="similarities"``: :func:`tta_similarity` of the two similarities. ``alpha=1`` is the text alone."""
    if mix == "features":
        return similarity(tta_query(text_feats, preview_feats, alpha), gallery)
    if mix == "similarities":
        return tta_similarity(similarity(text_feats, gallery), similarity(preview_feats, gallery), alpha)
    raise ValueError(f"mix must be one of {TTA_MIXES}, got {mix!r}")


@torch.no_grad()
def evaluate_tta(model, data, preview_images: torch.Tensor, alphas: Sequence[float], mix: str = "features") -> tuple[list[dict], float]:
    """Retrieval metrics of ``model`` on ``data`` for each alpha (1.0: TTA off), the scores of :func:`tta_scores`
    (``mix="features"``: Eq. 3 as printed), with the seconds spent on the previews' features and one fused
    scoring (timing, not results)."""
    from ..metrics import retrieval_metrics
    from ..models.retrieval import encode

    if mix not in TTA_MIXES:
        raise ValueError(f"mix must be one of {TTA_MIXES}, got {mix!r}")
    img, txt = encode(model, data)
    t0 = time.time()
    f_p = preview_features(model, preview_images, tuple(data.images.shape[-2:]))
    extra = time.time() - t0
    rows, fuse = [], []
    for a in alphas:
        t0 = time.time()
        sim = tta_scores(model.similarity, txt, f_p, img, float(a), mix)
        fuse.append(time.time() - t0)
        rows.append({"alpha": float(a), **retrieval_metrics(sim, data.caption_pids, data.image_pids)})
    return rows, extra + (float(np.mean(fuse)) if fuse else 0.0)  # the previews' features and one fused scoring


def best_alpha(curve: Sequence[dict], metric: str = "R1") -> float:
    """The alpha of ``curve`` (rows with ``alpha`` and metrics) with the highest ``metric``; ties go to the
    higher mAP, then to the alpha nearest the paper's :data:`ALPHA` (a flat curve keeps the paper's 0.6)."""
    if not curve:
        raise ValueError("an empty alpha curve")
    top = max(curve, key=lambda r: (r[metric], r.get("mAP", 0.0), -abs(r["alpha"] - ALPHA)))
    return float(top["alpha"])


@torch.no_grad()
def choose_alpha(model, val_data, val_previews: torch.Tensor, alphas: Sequence[float] = ALPHA_GRID, mix: str = "features",
                 metric: str = "R1") -> tuple[float, list[dict]]:
    """TTA's alpha chosen on a **validation** split (never the test split): ``val_data`` (a
    :class:`~person_retrieval.datasets.torch_data.RetrievalData` of the val split, or a :func:`query_subset` of
    it) with ``val_previews`` (one SPG preview per val query, :func:`previews`), the grid ``alphas`` scored as
    :func:`evaluate_tta` does, the best by ``metric`` (:func:`best_alpha`). Returns ``(alpha, curve)``, the
    curve one row per alpha (the validation metrics). TIPS App. C: "the optimal value of alpha can be rapidly
    determined through a grid search on a validation set" (the paper's few-shot setting uses 0.6)."""
    curve, _ = evaluate_tta(model, val_data, val_previews, alphas, mix)
    return best_alpha(curve, metric), curve


# ---------------------------------------------------------------------------------------------
# From a shell: one process, n processes by hand, or torchrun's ranks
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m person_retrieval.papers.tips``: synthesize one TIPS set into the folder notebook 02_tips
    reads, then assemble it. Under torchrun each rank takes the shards ``u % WORLD_SIZE == RANK`` and rank 0
    assembles; by hand, ``--shard i --num-shards n`` in n processes."""
    from ..world import dataset_root

    ap = shards.command_line("python -m person_retrieval.papers.tips",
                             "Synthesize one TIPS set (the mini pipeline by default; real models with --weights, --llm, --vlm) "
                             "in resumable shards, then assemble it as a CUHK-PEDES folder.",
                             {"weights": "notebook 02_generators' SPG and IDPG LoRAs", "llm": "the prompts",
                              "vlm": "the filter and the captions"})
    ap.add_argument("--dataset", default="cuhk_pedes", help="the target domain (SPG's; default cuhk_pedes)")
    ap.add_argument("--data-root", help="the folder holding CUHK-PEDES/ (default: the mini world)")
    ap.add_argument("--scenario", default="few_shot", choices=list(SCENARIOS))
    ap.add_argument("--source", default="spg+idpg", choices=list(SOURCES))
    ap.add_argument("--n-prompts", type=int, help="identities (default: by scale; the paper: 40,000)")
    ap.add_argument("--few-shot-share", type=float, default=0.01, help="the few-shot split's share of identities (the paper: 1%%)")
    ap.add_argument("--few-shot-seed", type=int, default=0, help="which few-shot split gives the examples (notebook: seeds[0])")
    ap.add_argument("--keep-score", type=int, default=KEEP_SCORE, help=f"the filter's bar on every score (default {KEEP_SCORE})")
    ap.add_argument("--max-tries", type=int, default=MAX_TRIES,
                    help=f"the paper redraws a rejected image until it passes; the cap: draws per image before it is given up (default {MAX_TRIES})")
    ap.add_argument("--differences", default=",".join(DIFFERENCES),
                    help=f"what the difference prompts vary, comma-separated (default: the paper's {','.join(DIFFERENCES)})")
    ap.add_argument("--few-shot-val", default="budget", choices=list(FEW_SHOT_VALS),
                    help="the few-shot split's val identities: the same share as training (budget) or all (full)")
    ap.add_argument("--shard-size", type=int, help="identities per shard (default: by scale, as the notebook's)")
    args, real = shards.parse(ap, argv)
    if args.scale == "paper" and args.data_root is None:
        ap.error("--scale paper needs --data-root (the target's folder: its few-shot split and capture sizes)")
    if args.source == "oracle" and args.scale == "paper":
        ap.error("--source oracle is the mini world's renderer: not at --scale paper")

    def prepare(lead: bool):
        models = None
        if real:
            from .syncpr import load_models

            models = load_models(args.scale, args.seed, 1 if torch.cuda.is_available() else 0, weights=args.weights, llm=args.llm,
                                 vlm=args.vlm, dataset=args.dataset, adapters=("spg", "idpg"), data_root=args.data_root, progress=lead)
        root = dataset_root(args.dataset, args.data_root, args.scale, args.seed)
        few = (few_shot_split(args.dataset, root, args.few_shot_share, args.few_shot_seed, args.few_shot_val) if args.scenario == "few_shot"
               else None)
        plan = tips_plan(args.scale, args.seed, args.gpus, args.dataset, args.data_root, args.scenario, args.source, args.n_prompts, few, models,
                         lead, keep_score=args.keep_score, max_tries=args.max_tries, differences=tuple(args.differences.split(",")),
                         **({} if args.shard_size is None else {"shard_size": args.shard_size}))
        return {**plan, **shards.open_folder(plan["root"], plan["cfg"], lead, "identities")}

    def work(st, shard: int, num_shards: int):
        st["processes"] = num_shards
        return synthesize(st["root"], st["cfg"], *st["models"], *st["domain"], shard=shard, num_shards=num_shards, progress=shard == 0)

    def finish(st):
        man = assemble(st["root"])
        if st["fresh"]:
            record_timing(st["root"], time.time() - st["t0"], st["processes"])
        print(f"{man['identities']} identities, {man['images']} images, {man['pairs']} pairs kept; a CUHK-PEDES folder in {st['root']}",
              flush=True)
        return man

    shards.distributed_run(prepare, work, finish, args.shard, args.num_shards, args.timeout_hours)
    shards.end_group()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
