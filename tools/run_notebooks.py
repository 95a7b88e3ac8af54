"""Regenerate every table and figure: run each notebook through papermill (what `make tables` runs).

    python tools/run_notebooks.py --scale small --seed 0 [--only 00 07] [--force] [--log-output] [--check]

Each notebook shows "[N/M] name", a progress bar of its cells and the elapsed time. A notebook whose inputs
(its source, the library, the parameters) are those of its last successful run is skipped as up to date,
unless --force. At the end: seconds per notebook and the total, also written to tables/timing/make_tables.md
(at scale small; tables/<scale>/timing/ otherwise). A failed notebook names its cell and keeps its executed
copy under .cache/executed/<scale>/; the committed notebooks stay output-free.

Each successful run records the hash of its inputs and the date in tables/provenance.json (committed with
the tables); --check runs nothing and lists the notebooks whose tables today's code would not reproduce
(exit status 1 when there is one).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbrun import ROOT, fmt_seconds, notebooks, provenance_file, read_provenance, record_provenance, run, stale  # noqa: E402


def write_summary(outcomes, scale: str, seed: int) -> Path:
    """The last successful run's seconds of each notebook, and their total, as a timing table."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "lib"))
    from person_retrieval import reports

    rows = [{"notebook": o.notebook, "seconds": o.last_seconds} for o in outcomes]
    known = [r["seconds"] for r in rows if r["seconds"] is not None]
    rows.append({"notebook": "all (make tables, cold caches where a notebook built them)", "seconds": round(sum(known), 1)})
    df = pd.DataFrame(rows).assign(source=reports.run_source(scale, seed, "mini world") + ", this machine")
    return reports.save_table(df, "make_tables", scale, title="make tables: seconds per notebook (its last successful run)",
                              notes="Wall-clock of each notebook's last successful run through papermill on the machine "
                                    "that regenerated the tables. A notebook that built a shared model (backbone, "
                                    "generators) includes that build; with the caches warm it takes less.", timing=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 00 07")
    ap.add_argument("--force", action="store_true", help="run even the notebooks that are up to date")
    ap.add_argument("--log-output", action="store_true", help="stream each cell's output (training progress) to the log")
    ap.add_argument("--check", action="store_true", help="run nothing: list the notebooks whose recorded tables the code no longer matches")
    args = ap.parse_args(argv)

    nbs = notebooks(args.only)
    if not nbs:
        print("no notebooks matched", file=sys.stderr)
        return 2
    out_dir = ROOT / ".cache" / "executed" / args.scale
    params = {"scale": args.scale, "seed": args.seed}
    prov = provenance_file(args.scale)
    if args.check:
        old = stale(nbs, params, prov)
        for name, why in old:
            print(f"{name}: out of date ({why})")
        print(f"{len(nbs) - len(old)} of {len(nbs)} notebooks' tables match the code ({prov.relative_to(ROOT) if prov.is_relative_to(ROOT) else prov})")
        return 1 if old else 0
    t0, outcomes = time.time(), []
    for i, nb in enumerate(nbs, 1):
        label = f"[{i}/{len(nbs)}] {nb.stem}"
        print(f"== {label} (scale={args.scale}, seed={args.seed}) at {time.strftime('%H:%M:%S')}, "
              f"{fmt_seconds(time.time() - t0)} elapsed", flush=True)
        o = run(nb, out_dir, params, label=label, force=args.force, log_output=args.log_output)
        outcomes.append(o)
        if o.status == "up to date":
            if read_provenance(prov).get(nb.stem, {}).get("inputs") != o.inputs:  # its tables are today's: say so
                record_provenance(prov, nb.stem, o.inputs, o.last_seconds or 0.0, params, o.finished)
            print(f"   up to date (inputs unchanged since its last run, {fmt_seconds(o.last_seconds)}); --force reruns it", flush=True)
        elif o.status == "failed":
            print(f"!! {nb.name} failed in {o.error}\n   executed copy: {o.executed}", file=sys.stderr, flush=True)
            break
        else:
            record_provenance(prov, nb.stem, o.inputs, o.seconds, params, o.finished)
            print(f"   done in {fmt_seconds(o.seconds)} -> {o.executed.relative_to(ROOT)}", flush=True)
    print("\n| notebook | this run | last successful run |\n|---|---|---|")
    for o in outcomes:
        now = {"ran": fmt_seconds(o.seconds), "up to date": "up to date", "failed": f"FAILED after {fmt_seconds(o.seconds)}"}[o.status]
        print(f"| {o.notebook} | {now} | {fmt_seconds(o.last_seconds)} |")
    print(f"| total | {fmt_seconds(time.time() - t0)} | |", flush=True)
    if any(o.status == "failed" for o in outcomes):
        return 1
    if all(o.status == "up to date" for o in outcomes):
        print("every notebook is up to date")
    if not args.only:
        print("summary:", write_summary(outcomes, args.scale, args.seed).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
