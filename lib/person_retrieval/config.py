"""Scales, paths and seeding (a notebook's parameters are checked by :mod:`person_retrieval.params`).

Scales (see DESIGN.md): ``tiny`` runs every code path in seconds (CI), ``small`` is the classroom scale
(a CUHK-PEDES-shaped test split of 1,000 identities, each notebook at most 10 minutes on 2 CPU cores),
``paper`` means real data under ``data_root`` and real weights.
"""
from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCALE_NAMES = ("tiny", "small", "paper")


@dataclass(frozen=True)
class WorldSize:
    """How big one world dataset is at a scale: identities per split and images per identity."""

    ids: dict
    images_per_id: tuple[int, int]  # inclusive range
    captions_per_image: int


@dataclass(frozen=True)
class Scale:
    name: str
    image_height: int  # crops are image_height x image_height // 2
    tpr: dict = field(default_factory=dict)  # style -> WorldSize
    cpr_train_triplets: int = 0  # SynCPR-shaped training triplets
    cpr_queries: int = 0  # ITCPR-shaped test queries
    cpr_gallery: int = 0  # ITCPR gallery size (targets + distractors)
    chat_ids: dict = field(default_factory=dict)  # ChatPedes split -> identities
    chat_rounds: int = 6


SCALES = {
    "tiny": Scale(
        name="tiny", image_height=64,
        tpr={
            "cuhk_pedes": WorldSize({"train": 48, "val": 12, "test": 16}, (2, 4), 2),
            "icfg_pedes": WorldSize({"train": 48, "test": 16}, (3, 5), 1),
            "rstpreid": WorldSize({"train": 48, "val": 12, "test": 12}, (5, 5), 2),
        },
        cpr_train_triplets=120, cpr_queries=24, cpr_gallery=120,
        chat_ids={"train": 40, "test": 16}, chat_rounds=6,
    ),
    "small": Scale(
        name="small", image_height=128,
        tpr={
            # Training splits are smaller than the real ones so that each notebook fits its 10-minute
            # budget on a 2-core CPU; the CUHK-PEDES-shaped test split keeps its 1,000 identities.
            "cuhk_pedes": WorldSize({"train": 1000, "val": 200, "test": 1000}, (2, 4), 2),
            "icfg_pedes": WorldSize({"train": 1000, "test": 1000}, (2, 5), 1),
            "rstpreid": WorldSize({"train": 600, "val": 200, "test": 200}, (5, 5), 2),
        },
        cpr_train_triplets=6000, cpr_queries=1000, cpr_gallery=10000,
        chat_ids={"train": 2000, "test": 1000}, chat_rounds=6,
    ),
    # Real data: sizes come from the files under data_root.
    "paper": Scale(name="paper", image_height=384),
}


def get_scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALE_NAMES}, got {scale!r}")
    return SCALES[scale]


# ---------------------------------------------------------------------------------------------
def repo_root() -> Path:
    """The checkout this package lives in (lib/person_retrieval -> repo), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def cache_dir() -> Path:
    """Where built worlds and trained mini models are cached (``PR_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("PR_CACHE_DIR") or repo_root() / ".cache")


def results_dirs(scale: str) -> tuple[Path, Path]:
    """``(tables, figures)`` for a run at ``scale``.

    The committed results are the ``small`` ones, in ``tables/`` and ``figures/``. Other scales write
    to ``tables/<scale>/`` and ``figures/<scale>/`` so a quick tiny run never overwrites them.
    ``PR_RESULTS_DIR`` moves both (the tests use it).
    """
    base = Path(os.environ.get("PR_RESULTS_DIR") or repo_root())
    sub = "" if scale == "small" else scale
    t, f = base / "tables" / sub, base / "figures" / sub
    t.mkdir(parents=True, exist_ok=True)
    f.mkdir(parents=True, exist_ok=True)
    return t, f


# ---------------------------------------------------------------------------------------------
def stable_hash(*parts) -> int:
    """A hash of strings/ints that is the same in every process (unlike ``hash``)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def config_tag(*parts) -> str:
    """A short, stable hash of a run's configuration (JSON-serialisable parts): the cache key of trained models."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def cached_tensors(name: str, compute, *key) -> tuple:
    """Tensors computed once and kept under ``.cache/tensors/`` by ``name`` and a hash of ``key``
    (safetensors, written atomically), so that every process of a run, and every later run, loads them
    instead of recomputing: ``compute()`` returns a tuple of tensors."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / "tensors" / f"{name}-{config_tag(*key)}.safetensors"
    if path.is_file():
        got = load_file(str(path))
        return tuple(got[str(i)] for i in range(len(got)))
    out = tuple(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file({str(i): t.contiguous() for i, t in enumerate(out)}, str(tmp))
    os.replace(tmp, path)
    return out


def rng_for(seed: int, *purpose) -> np.random.Generator:
    """An independent random stream for one purpose: ``rng_for(seed, "cuhk_pedes", "people")``."""
    return np.random.default_rng([int(seed), stable_hash(*purpose)])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass
