"""Where a generator's released weights are: the FLUX.1-dev folder a user puts on disk.

Kept apart from :mod:`.flux` (which reaches the mini generator's few-shot selection) so that parameter checks
can find the folder without importing the training code.
"""
from __future__ import annotations

import os
from pathlib import Path


def resolve_flux(weights: str | os.PathLike) -> Path:
    """A FLUX.1-dev folder (diffusers layout: ``model_index.json``, ``transformer/``, ``vae/``, ...): a path,
    or a name looked up under ``PR_WEIGHTS_DIR`` (default ``.cache/weights``)."""
    from ..models.backbone import weights_dir

    p = Path(weights)
    if not p.is_dir():
        p = weights_dir() / str(weights)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no FLUX.1-dev folder at {weights!r} (looked for {p / 'model_index.json'}). Nothing is downloaded here: "
            f"put the diffusers-format FLUX.1-dev folder (black-forest-labs/FLUX.1-dev) at {weights_dir() / 'FLUX.1-dev'} "
            "or pass its path.")
    return p
