"""Same seed, same tables: regenerate one notebook twice and compare every result table and figure.

    python tools/check_determinism.py [--notebook 07] [--scale tiny]     # what `make check-determinism` runs

Run A is cold (fresh caches), run B is cold in other fresh caches under another PYTHONHASHSEED, and run C
re-runs A with A's caches warm (so a cache that skips work must not change a result). Result tables (not
the wall-clock ones under timing/) and figures must be byte-identical across the three. Exit 1 on a
difference, naming each differing file.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbrun import fmt_seconds, notebooks, run  # noqa: E402


def digests(results: Path) -> dict[str, str]:
    """sha256 of every result file under ``results`` (tables and figures), timing tables left out."""
    out = {}
    for p in sorted(results.rglob("*")):
        rel = p.relative_to(results)
        if p.is_file() and "timing" not in rel.parts:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notebook", default="07", help="notebook number prefix (default 07)")
    ap.add_argument("--scale", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    nbs = notebooks([args.notebook])
    if len(nbs) != 1:
        print(f"--notebook {args.notebook!r} matches {len(nbs)} notebooks", file=sys.stderr)
        return 2
    nb = nbs[0]
    work = Path(tempfile.mkdtemp(prefix="pr-determinism-"))
    runs = [("A (cold)", "a", "1"), ("B (cold, other caches, other hash seed)", "b", "2024"), ("C (A again, caches warm)", "a", "1")]
    seen = []
    for i, (label, cache, hash_seed) in enumerate(runs):
        results = work / f"results-{i}"
        env = {"PR_CACHE_DIR": str(work / f"cache-{cache}"), "PR_RESULTS_DIR": str(results), "PYTHONHASHSEED": hash_seed}
        o = run(nb, work / f"executed-{i}", {"scale": args.scale, "seed": args.seed}, label=f"run {label}", force=True, env=env)
        if o.status == "failed":
            print(f"!! run {label} failed in {o.error}\n   executed copy: {o.executed}", file=sys.stderr)
            return 1
        print(f"run {label}: {fmt_seconds(o.seconds)}", flush=True)
        seen.append(digests(results))
    files = sorted(set().union(*seen))
    differ = [f for f in files if len({d.get(f) for d in seen}) > 1]
    if differ:
        print(f"{len(differ)} of {len(files)} result files differ between the runs (kept under {work}):")
        for f in differ:
            print("  ", f, " ".join((d.get(f) or "missing")[:10] for d in seen))
        return 1
    print(f"{nb.stem} at scale={args.scale}: all {len(files)} result files identical over the three runs")
    shutil.rmtree(work, ignore_errors=True)  # its two caches hold gigabytes; a failing check keeps them to look at
    return 0


if __name__ == "__main__":
    sys.exit(main())
