"""Build notebooks/*.ipynb from their sources in notebooks/src/*.py (jupytext's percent format).

    python tools/build_notebooks.py          # write the notebooks
    python tools/build_notebooks.py --check  # exit 1 if a committed notebook differs from its source

A source is plain Python: ``# %% [markdown]`` starts a prose cell (its lines are ``# ``-prefixed),
``# %%`` starts a code cell and ``# %% tags=["parameters"]`` the papermill parameters cell. Notebooks
are written without outputs, so the committed .ipynb is exactly what the source says.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")


def parse(src: str) -> list[dict]:
    cells, cur = [], None
    for line in src.splitlines():
        m = HEADER.match(line)
        if m:
            cur = {"md": bool(m["md"]), "tags": json.loads(m["tags"]) if m["tags"] else [], "lines": []}
            cells.append(cur)
        elif cur is not None:
            cur["lines"].append(line)
    out = []
    for i, c in enumerate(cells):
        lines = c["lines"]
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if c["md"]:
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        text = "\n".join(lines)
        source = [ln + "\n" for ln in text.split("\n")]
        source[-1] = source[-1].rstrip("\n")
        cell = {"cell_type": "markdown" if c["md"] else "code", "id": f"c{i:03d}", "metadata": {}, "source": source}
        if c["tags"]:
            cell["metadata"]["tags"] = c["tags"]
        if not c["md"]:
            cell["execution_count"] = None
            cell["outputs"] = []
        out.append(cell)
    return out


def build(src_path: Path) -> str:
    nb = {
        "cells": parse(src_path.read_text()),
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for src in sorted((ROOT / "notebooks" / "src").glob("*.py")):
        dst = ROOT / "notebooks" / (src.stem + ".ipynb")
        text = build(src)
        if args.check:
            if not dst.exists() or dst.read_text() != text:
                stale.append(dst.name)
        else:
            dst.write_text(text)
    if stale:
        print("out of date with notebooks/src (run python tools/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
