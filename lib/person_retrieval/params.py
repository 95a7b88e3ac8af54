"""The one check of a notebook's parameters, called by every notebook's first code cell.

    P = params.check(dict(scale=scale, gpus=gpus, seed=seed, data_root=data_root, weights=weights, lam=lam),
                     needs=["cuhk_pedes"], lam=params.number(0, 1))

Every bad value fails there, before any work, with a :class:`ParameterError` (a ``ValueError``) that names
the parameter, what it accepts and, for files, where to put them; in a notebook it shows as that one line
and a hint, not as a traceback:

* the common parameters are known by name: ``scale``, ``gpus`` (against the GPUs present, or for CPU
  processes against the cores), ``seed``, ``seeds``, ``data_root`` (each dataset the notebook needs must be
  there: every missing one is named, and each one's annotation files are parsed and their fields checked,
  :func:`person_retrieval.datasets.validate`), ``weights`` (real CLIP weights resolved to a file on disk), ``vlm``
  and ``llm`` (model folders on disk);
* a notebook's own knobs get a rule each: :func:`number`, :func:`integer`, :func:`choice`, :func:`choices`;
* lists and numbers given as text, as ``papermill -p methods '["irra"]'`` passes them, are read as JSON.

:func:`check` returns the checked values (lists as lists, ``data_root`` as a ``Path``) in a dict.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import SCALE_NAMES

Rule = Callable[[str, Any], Any]


class ParameterError(ValueError):
    """A notebook parameter's bad value. IPython shows an exception's ``_render_traceback_()`` in place of its
    traceback: here the one-line message and a hint, since the stack (the checks inside this module) says
    nothing the message does not. papermill still reports the message (its ``evalue`` and traceback)."""

    HINT = ("(the notebook's first cell checks its parameters: change the value in the parameters cell, "
            "or pass another with papermill -p NAME VALUE, and run again)")

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}", self.HINT]


def _kind(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _from_text(value):
    """``papermill -p name '[1, 2]'`` hands the notebook a string: read JSON text as the value it spells."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Rules for a notebook's own knobs: each takes (name, value) and returns the checked value.
def number(lo: float | None = None, hi: float | None = None) -> Rule:
    """A real number in ``[lo, hi]`` (either bound may be open-ended: None)."""
    def rule(name, value):
        value = _from_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"parameter {name!r} must be a number, got {_kind(value)}")
        _bounds(name, value, lo, hi)
        return value
    return rule


def integer(lo: int | None = None, hi: int | None = None, allow_none: bool = False) -> Rule:
    """A whole number in ``[lo, hi]`` (or None, with ``allow_none``: "chosen by scale")."""
    def rule(name, value):
        value = _from_text(value)
        if value is None and allow_none:
            return None
        if not _is_int(value):
            raise ParameterError(f"parameter {name!r} must be an integer, got {_kind(value)}")
        _bounds(name, value, lo, hi)
        return value
    return rule


def number_range(lo: float | None = None, hi: float | None = None) -> Rule:
    """A pair ``[low, high]`` of numbers with ``lo <= low <= high <= hi`` (a range to draw from)."""
    def rule(name, value):
        value = _from_text(value)
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) != 2 or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise ParameterError(f"parameter {name!r} must be a pair of numbers [low, high] (with papermill: -p {name} '[0.5, 1.0]'), "
                             f"got {_kind(value)}")
        for v in value:
            _bounds(name, v, lo, hi)
        if value[0] > value[1]:
            raise ParameterError(f"parameter {name!r} must be [low, high] with low <= high, got {list(value)!r}")
        return [float(v) for v in value]
    return rule


def _bounds(name, value, lo, hi):
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ParameterError(f"parameter {name!r} must lie in {span}, got {value!r}")


def choice(options: Iterable, allow_none: bool = False) -> Rule:
    """One of ``options`` (or None, with ``allow_none``)."""
    options = list(options)

    def rule(name, value):
        if value is None and allow_none:
            return None
        if value not in options:
            raise ParameterError(f"parameter {name!r} must be one of {options}, got {_kind(value)}")
        return value
    return rule


def choices(options: Iterable, unique: bool = True) -> Rule:
    """A non-empty list of items from ``options`` (a JSON list given as text is read as a list)."""
    options = list(options)

    def rule(name, value):
        value = _from_text(value)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ParameterError(f"parameter {name!r} must be a non-empty list from {options} "
                             f"(with papermill: -p {name} '[\"{options[0]}\"]'), got {_kind(value)}")
        if not value:
            raise ParameterError(f"parameter {name!r} is an empty list: give at least one of {options} "
                                 f"(with papermill: -p {name} '[\"{options[0]}\"]')")
        bad = [v for v in value if v not in options]
        if bad:
            raise ParameterError(f"parameter {name!r} must be a non-empty list from {options}, got {value!r}"
                             + (f" (unknown: {bad})" if bad else ""))
        if unique and len(set(value)) != len(value):
            raise ParameterError(f"parameter {name!r} repeats an item: {value!r}")
        return list(value)
    return rule


def seeds(name, value) -> list[int]:
    """A non-empty list of distinct non-negative integers; "[0, 1]", "0,1" and "0 1" are read as lists."""
    import re

    if isinstance(value, str) and re.fullmatch(r"\s*\[?\s*\d+(\s*[, ]\s*\d+)*\s*\]?\s*", value):
        value = [int(v) for v in re.findall(r"\d+", value)]
    elif isinstance(value, str) and re.fullmatch(r"\s*(\[\s*\])?\s*", value):
        value = []  # papermill -p seeds '[]' (or an empty string)
    if isinstance(value, (list, tuple)) and not value:
        raise ParameterError(f"parameter {name!r} is an empty list: give at least one seed (with papermill: -p {name} '[0]')")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ParameterError(f"parameter {name!r} must be a list of non-negative integers, got {_kind(value)}")
    out = list(value)
    if not out or any(not _is_int(v) or v < 0 for v in out):
        raise ParameterError(f"parameter {name!r} must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(out)) != len(out):
        raise ParameterError(f"parameter {name!r} repeats a seed: {value!r}")
    return out


# ---------------------------------------------------------------------------------------------
# The common parameters.
def _scale(name, value):
    if value not in SCALE_NAMES:
        raise ParameterError(f"parameter {name!r} must be one of {SCALE_NAMES}, got {_kind(value)}")
    return value


def _seed(name, value):
    value = _from_text(value)
    if not _is_int(value) or value < 0:
        raise ParameterError(f"parameter {name!r} must be a non-negative integer, got {_kind(value)}")
    return value


def check_gpus(value, name: str = "gpus", cuda: int | None = None, cores: int | None = None) -> int:
    """``gpus`` against this machine: 0 is the CPU; N GPUs must be present; with no GPU, N >= 2 means N CPU
    processes over gloo (DistributedDataParallel's CPU path), at most one per core. ``cuda`` and ``cores``
    default to what torch and the OS report."""
    value = _from_text(value)
    if not _is_int(value) or value < 0:
        raise ParameterError(f"parameter {name!r} must be a non-negative integer (0 = CPU), got {_kind(value)}")
    if value == 0:
        return 0
    if cuda is None:
        import torch

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cuda:
        if value > cuda:
            raise ParameterError(f"parameter {name!r} asks for {value} GPUs, but this machine has {cuda}: use at most {cuda}, or 0 for the CPU")
        return value
    if value == 1:
        raise ParameterError(f"parameter {name!r}=1 asks for a GPU, but this machine has none: use 0 (the CPU), "
                         f"or 2 to {max(2, cores)} for that many CPU processes (DistributedDataParallel over gloo)")
    if value > cores:
        raise ParameterError(f"parameter {name!r}={value} would start {value} CPU processes (this machine has no GPU), "
                         f"but it has {cores} cores: use 0 (the CPU) or at most {cores}")
    return value


def _spelled_path(value) -> Path | None:
    """The path ``value`` spells when it is plainly a path (absolute, or starting with ``~``, ``./``, ``../``),
    else None (a name, such as ``ViT-B-16`` or ``Qwen/Qwen2-VL-7B-Instruct``, looked up elsewhere)."""
    v = str(value).strip()
    p = Path(v).expanduser()
    return p if p.is_absolute() or v.startswith(("~", "./", "../", ".\\", "..\\")) else None


def _no_such_path(name: str, p: Path, none_means: str, what: str) -> ParameterError:
    """"``p`` does not exist", with the nearest folder above it that does."""
    up = p.absolute().parent
    while not up.exists() and up != up.parent:
        up = up.parent
    return ParameterError(f"parameter {name!r}: {str(p)!r} does not exist (no such file or folder; the nearest folder "
                          f"that exists is {str(up)!r}): give {what}, or None ({none_means})")


def _on_disk(name: str, value, none_means: str, what: str, resolve: Callable):
    """``None`` or a name or path that ``resolve`` finds on disk; a path that does not exist says so, and
    ``resolve``'s FileNotFoundError (which says where to put the files) becomes the parameter's error."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ParameterError(f"parameter {name!r} must be None ({none_means}) or {what}, got {_kind(value)}")
    p = _spelled_path(value)
    if p is not None and not p.exists():
        raise _no_such_path(name, p, none_means, what)
    try:
        resolve(str(value))
    except FileNotFoundError as e:
        raise ParameterError(f"parameter {name!r}: {e}") from None
    return str(value)


def check_weights(value, name: str = "weights"):
    """``None`` (the mini CLIP) or real CLIP weights, resolved to a checkpoint on disk now."""
    from .models.backbone import resolve_weights

    p = _spelled_path(value) if isinstance(value, (str, os.PathLike)) and str(value).strip() else None
    if p is not None and p.is_dir():  # a folder, not the checkpoint in it
        found = sorted(str(f) for f in p.glob("*.safetensors"))[:3]
        raise ParameterError(f"parameter {name!r}: {str(p)!r} is a folder; give the checkpoint file in it"
                             + (f" (it holds {', '.join(found)})" if found else " (it holds no .safetensors file)")
                             + ", or set PR_WEIGHTS_DIR to it and give the model's name (e.g. ViT-B-16)")
    return _on_disk(name, value, "the mini backbone", "a model name or checkpoint path", resolve_weights)


def flux_weights(name, value):
    """A rule: ``None`` (the mini generator) or a FLUX.1-dev folder in diffusers' layout, found on disk now."""
    from .generators.weights import resolve_flux

    return _on_disk(name, value, "the mini generator", "a FLUX.1-dev name or folder", resolve_flux)


def blip2_weights(name, value):
    """A rule: ``None`` (the mini Q-Former) or a local folder holding ``Blip2ForImageTextRetrieval`` weights."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ParameterError(f"parameter {name!r} must be None (the mini Q-Former) or a folder path, got {_kind(value)}")
    p = Path(value).expanduser()
    if not p.exists():
        raise _no_such_path(name, p, "the mini Q-Former", "a local folder holding Blip2ForImageTextRetrieval weights "
                            "(e.g. Salesforce/blip2-itm-vit-g)")
    if not (p / "config.json").is_file():
        raise ParameterError(f"parameter {name!r}: {str(p)!r} holds no Blip2ForImageTextRetrieval weights (no config.json); copy a "
                         "local BLIP-2 ITM checkpoint there (e.g. Salesforce/blip2-itm-vit-g), or use None for the mini Q-Former")
    return p


def check_model(value, name: str):
    """``None`` (the mini assistant) or a transformers model (name or folder), found on disk now."""
    from .assistants.hf import resolve_model

    return _on_disk(name, value, "the mini model", "a model name or folder", resolve_model)


def check_data_root(value, datasets: Iterable[str] = (), name: str = "data_root"):
    """``None`` (the mini world) or a folder holding every dataset in ``datasets`` in its real layout
    (``CUHK-PEDES/reid_raw.json``, ...); every missing one is named. Each present one's annotation files are
    then parsed and their fields checked (:func:`person_retrieval.datasets.validate`: a truncated file or a
    missing field fails here, naming the file, the entry and the cause; images are not opened)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ParameterError(f"parameter {name!r} must be None (the mini world) or a folder path, got {_kind(value)}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ParameterError(f"parameter {name!r}: folder {str(root)!r} does not exist (None uses the mini world)")
    from .datasets.formats import REAL_FOLDERS, TPR_FORMATS

    missing = []
    for d in datasets:
        if d not in REAL_FOLDERS:
            raise ParameterError(f"unknown dataset {d!r}; expected one of {sorted(REAL_FOLDERS)}")
        folder = root / REAL_FOLDERS[d]
        need = folder / TPR_FORMATS[d].annotation if d in TPR_FORMATS else folder
        if not need.exists():
            missing.append(f"{d} (expected {need})")
    if missing:
        raise ParameterError(f"parameter {name!r}: {root} lacks datasets this notebook needs: " + "; ".join(missing)
                         + ". Put them there in their released layout, or use data_root=None for the mini world.")
    from .datasets.formats import DatasetFormatError, validate

    for d in datasets:
        try:
            validate(d, root / REAL_FOLDERS[d])
        except DatasetFormatError as e:
            raise ParameterError(f"parameter {name!r}: {REAL_FOLDERS[d]} is not in its released format: {e}") from None
    return root


def check(values: dict, needs: Iterable[str] | str = (), **rules: Rule) -> dict:
    """Check a notebook's parameters (``values``: name -> value) and return them checked.

    Common names are known; every other name needs a rule in ``rules`` (an unknown one is an error, so
    no parameter goes unchecked). ``needs``: the datasets read from ``data_root`` when it is set, or
    the name of the parameter that lists them (or names one), checked first.

    Order: the cheap checks (scale, seeds, gpus, the notebook's own knobs) before those that look at
    files (data_root, weights, vlm, llm)."""
    known: dict[str, Rule] = {
        "scale": _scale, "seed": _seed, "seeds": seeds,
        "gpus": lambda n, v: check_gpus(v, n),
        "weights": lambda n, v: check_weights(v, n),
        "vlm": lambda n, v: check_model(v, n), "llm": lambda n, v: check_model(v, n),
        "epochs": integer(1, None, allow_none=True), "max_steps": integer(1, None, allow_none=True),
        "batch_size": integer(1, None, allow_none=True),
    }
    files = ["data_root", "weights", "vlm", "llm"]
    names = sorted(values, key=lambda n: (n in files and n not in rules, files.index(n) if n in files else 0))
    out = {}
    for n in names:
        if n == "data_root" and n not in rules:
            need = out.get(needs, values.get(needs)) if isinstance(needs, str) else needs
            out[n] = check_data_root(values[n], [need] if isinstance(need, str) else list(need), n)
            continue
        rule = rules.get(n) or known.get(n)
        if rule is None:
            raise TypeError(f"no rule for parameter {n!r}: pass one (params.number(...), params.choice(...), ...)")
        try:
            out[n] = rule(n, values[n])
        except ParameterError:
            raise
        except ValueError as e:  # a notebook's own rule: shown as one line too
            raise ParameterError(str(e) if f"{n!r}" in str(e) else f"parameter {n!r}: {e}") from None
    if out.get("scale") == "paper" and "data_root" in out and out["data_root"] is None:
        raise ParameterError("scale='paper' needs real data: set parameter 'data_root' to the dataset folder")
    if {"epochs", "max_steps", "batch_size"} & set(out):  # one way to shrink every training run of the notebook
        from .limits import set_limits

        set_limits(out.get("epochs"), out.get("max_steps"), out.get("batch_size"))
    return {n: out[n] for n in values}
