"""Pseudo-caption files: captions written by a model for the images of a dataset (CTGI's MTG, and later
the other papers' MLLM captions), stored beside a dataset without changing it.

The file is JSON: ``{image path relative to its dataset root: {"initial": T_s, "caption": T_e, "qa": [[q, a], ...]}}``.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from .formats import write_json_atomic


def read_pseudo_captions(path) -> dict:
    """A pseudo-caption file: ``{image path relative to its dataset root: {"initial", "caption", "qa"}}``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pseudo-caption file {p} does not exist (write it with person_retrieval.papers.ctgi.mtg_split)")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or any(not isinstance(v, dict) or "caption" not in v or "initial" not in v for v in data.values()):
        raise ValueError(f"{p}: expected an object mapping image paths to {{'initial', 'caption', 'qa'}} records")
    return data


def write_pseudo_captions(path, captions: dict) -> Path:
    """Write a pseudo-caption file atomically (no half-written file on a crash)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, captions)
    return p


def with_pseudo_captions(split, captions: dict, field: str = "caption"):
    """A copy of ``split`` whose captions are the pseudo-captions (one per image, ``field`` "caption" for
    MTG's T_e or "initial" for the single-turn T_s) instead of the manual ones."""
    if field not in ("caption", "initial"):
        raise ValueError(f"field must be 'caption' (MTG) or 'initial' (single-turn), got {field!r}")
    texts = []
    for p in split.image_paths:
        key = os.path.relpath(p, split.root)
        if key not in captions:
            raise KeyError(f"no pseudo-caption for image {key!r} of {split.name}/{split.split}; regenerate the caption file")
        texts.append(captions[key][field])
    n = len(split.image_paths)
    return replace(split, captions=texts, caption_pids=list(split.image_pids), caption_image_ids=list(range(n)))
