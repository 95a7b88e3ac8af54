"""Regenerate every table and figure: run each notebook through papermill.

    python tools/run_notebooks.py --scale small --seed 0 [--only 00 01]

Executed copies go to .cache/executed/<scale>/ (the committed notebooks stay output-free); tables and
figures go where the notebooks write them (tables/ and figures/ at scale small).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 00 07")
    args = ap.parse_args()

    import papermill as pm

    out_dir = ROOT / ".cache" / "executed" / args.scale
    out_dir.mkdir(parents=True, exist_ok=True)
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        nbs = [p for p in nbs if any(p.name.startswith(o) for o in args.only)]
    if not nbs:
        print("no notebooks matched", file=sys.stderr)
        return 2
    for nb in nbs:
        out = out_dir / nb.name
        t = time.time()
        print(f"== {nb.name} (scale={args.scale}, seed={args.seed})", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out), parameters={"scale": args.scale, "seed": args.seed},
                                kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
        except pm.PapermillExecutionError as e:
            print(f"!! {nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n   executed copy: {out}", file=sys.stderr)
            return 1
        print(f"   done in {time.time() - t:.0f} s -> {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
