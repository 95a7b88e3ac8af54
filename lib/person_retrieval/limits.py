"""One way to shrink any run, the same in every notebook.

The notebook's ``epochs``, ``max_steps`` and ``batch_size`` parameters (:func:`params.check` sets them) apply to
every training run of the process, LoRA training included: :func:`train.fit` applies them through
``train.apply_limits`` and the LoRA loop reads :func:`limits`. This module imports nothing from the package, so
any module may read the limits without an import circle.
"""
from __future__ import annotations

_LIMITS: dict = {"epochs": None, "max_steps": None, "batch_size": None}


def set_limits(epochs: int | None = None, max_steps: int | None = None, batch_size: int | None = None) -> None:
    """Every later training run in this process trains ``epochs`` epochs (None: its own schedule), stops
    after ``max_steps`` optimizer steps (None: no cap) and, with ``batch_size``, takes global batches of
    that size (None: its own; a smoke run of a real-size model on a laptop needs a small one)."""
    for k, v in (("epochs", epochs), ("max_steps", max_steps), ("batch_size", batch_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{k} must be a positive integer or None, got {v!r}")
    _LIMITS.update(epochs=epochs, max_steps=max_steps, batch_size=batch_size)


def limits() -> dict:
    """The limits :func:`set_limits` set: ``{"epochs": ..., "max_steps": ...}``."""
    return dict(_LIMITS)


def limit_tag() -> str:
    """A suffix for a cached run's folder when limits are set ("" when not), so a shortened run never
    stands in for, or resumes into, a full one."""
    e, m, b = _LIMITS["epochs"], _LIMITS["max_steps"], _LIMITS["batch_size"]
    return "".join(f"-{k}{v}" for k, v in (("ep", e), ("steps", m), ("bs", b)) if v is not None)
