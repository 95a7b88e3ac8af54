"""Paper-vs-this-run tables and figures.

Every table carries a ``source`` column saying which scale, seed and data produced each row, beside
the rows transcribed from the papers (``lib/person_retrieval/reported/*.csv``). Tables are written as
CSV (for machines) and Markdown (for people); figures as PNG.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pandas as pd

from .config import results_dirs


def reported(name: str) -> pd.DataFrame:
    """A table of the papers' reported numbers, e.g. ``reported("dataset_statistics")``."""
    ref = resources.files("person_retrieval") / "reported" / f"{name}.csv"
    if not ref.is_file():
        known = sorted(p.name[:-4] for p in (resources.files("person_retrieval") / "reported").iterdir() if p.name.endswith(".csv"))
        raise FileNotFoundError(f"no reported table {name!r}; known: {known}")
    with ref.open() as f:
        return pd.read_csv(f)


def run_source(scale: str, seed: int, data: str) -> str:
    """The provenance label of a row produced here, e.g. 'this run: mini world, scale=small, seed=0'."""
    return f"this run: {data}, scale={scale}, seed={seed}"


#: Column names that hold wall-clock figures (seconds, ms per query, samples per second). They change from
#: run to run on the same seed, so they live in timing tables (``timing=True``) and never in a result table:
#: a result table changes only when a result changes.
TIMING_COLUMN = re.compile(r"(^|[\s_(])(seconds?|secs?|s|ms|minutes?|min|wall|elapsed|time)([\s_)/]|$)|per[ _]s(ec)?$|/ ?s$|_per_s$", re.I)


def timing_columns(df: pd.DataFrame) -> list[str]:
    """The columns of ``df`` that hold wall-clock figures (:data:`TIMING_COLUMN`)."""
    return [c for c in df.columns if TIMING_COLUMN.search(str(c))]


def save_table(df: pd.DataFrame, name: str, scale: str, title: str = "", notes: str = "", timing: bool = False) -> Path:
    """Write ``tables/<name>.csv`` and ``.md`` (under ``tables/<scale>/`` for scales other than small).

    ``timing=True`` writes a timing table to ``tables/timing/`` instead: wall-clock figures go there, and a
    result table with a wall-clock column is refused (same seed, same result tables)."""
    if "source" not in df.columns:
        raise ValueError(f"table {name!r} needs a 'source' column saying which scale, seed and data produced each row")
    wall = timing_columns(df)
    if wall and not timing:
        raise ValueError(f"table {name!r} has wall-clock columns {wall}: save them in a timing table "
                         "(save_table(..., timing=True)), so that result tables change only when a result does")
    tdir, _ = results_dirs(scale)
    if timing:
        tdir = tdir / "timing"
        tdir.mkdir(parents=True, exist_ok=True)
    csv = tdir / f"{name}.csv"
    df.to_csv(csv, index=False, float_format="%.2f")
    md = [f"# {title or name}", ""]
    if notes:
        md += [notes, ""]
    md.append(_markdown(df))
    (tdir / f"{name}.md").write_text("\n".join(md) + "\n")
    return csv


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:,.2f}".rstrip("0").rstrip(".")
        return str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def save_figure(fig, name: str, scale: str, dpi: int = 120) -> Path:
    """Save a matplotlib figure to ``figures/<name>.png`` (under ``figures/<scale>/`` for other scales)."""
    _, fdir = results_dirs(scale)
    path = fdir / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def seed_summary(df: pd.DataFrame, by: list[str], metrics=("R1", "R5", "R10", "mAP")) -> pd.DataFrame:
    """Mean and spread over the ``seed`` column: one row per ``by`` group with ``<metric>`` (the mean),
    ``<metric>_sd`` (the sample standard deviation; empty with one seed) and ``seeds`` (how many)."""
    if "seed" not in df.columns:
        raise ValueError("seed_summary needs a 'seed' column")
    g = df.groupby(by, sort=False, dropna=False)
    out = g[list(metrics)].mean()
    sd = g[list(metrics)].std(ddof=1).add_suffix("_sd")
    cols = [c for m in metrics for c in (m, f"{m}_sd")]
    return out.join(sd)[cols].assign(seeds=g.seed.nunique()).reset_index()


def verdict(delta, not_hurt: bool = False) -> tuple[float, float, str]:
    """(mean, spread, verdict) of a claim's per-repeat differences ``delta`` (setting minus reference).

    "holds" when the mean difference is positive, "holds clearly" when it also exceeds twice the spread
    (the sample standard deviation of the differences); with ``not_hurt`` the claim is "does not hurt" and
    holds when the mean is not below minus twice the spread. One repeat has no spread to judge by."""
    import numpy as np

    d = np.asarray(list(delta), dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), "no paired repeats"
    one = d.size < 2
    m, sd = float(d.mean()), (0.0 if one else float(d.std(ddof=1)))
    ok = (m >= -2 * sd if not one else m >= 0) if not_hurt else m > 0
    if not ok:
        return m, sd, "DOES NOT HOLD"
    if one:
        return m, sd, "holds (one repeat)"
    return m, sd, "holds clearly" if not not_hurt and m > 2 * sd else "holds"
