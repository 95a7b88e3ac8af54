"""Walk every notebook's paper path (``scale="paper"``) on stand-ins of the released files, the way a researcher
with those files would, and time each: the issue's "every notebook runs to its end at paper" check.

    python tools/paper_smoke.py [--only 00 04] [--full-clip] [--max-steps 2] [--batch-size 4] [--gpus 0]

The stand-ins (``person_retrieval.standins``): the six datasets in their released layouts and tiny FLUX.1-dev,
BLIP-2, Qwen2-VL and Llama folders written by ``save_pretrained``; the CLIP is a full-size ViT-B/16 state dict
(random weights) with ``--full-clip``, else ViT-B/16's layout at a tiny width. Each notebook runs in a cache of its
own (so nothing a previous notebook built is reused) and writes its executed copy and tables under ``--out``.
A table of wall times, what each read and wrote, goes to ``<out>/paper_smoke.md`` (and, with ``--record``, to
``tables/timing/paper_smoke.md``); with ``--only`` it updates those notebooks' rows of the last walk in ``--out``. On a GPU machine, ``--gpus 1`` also records steps/s and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="notebook prefixes (default: all)")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "paper_smoke"), help="stand-ins, caches and executed copies")
    ap.add_argument("--full-clip", action="store_true", help="a full-size ViT-B/16 state dict (572 MB) instead of the tiny one")
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per notebook")
    ap.add_argument("--record", action="store_true", help="also write tables/timing/paper_smoke.md")
    a = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import papermill as pm

    from person_retrieval import standins

    out = Path(a.out)
    t = time.time()
    paths = standins.write_all(out / "standins", tiny_clip=not a.full_clip)
    print(f"stand-ins ready in {time.time() - t:.0f} s under {out / 'standins'}", flush=True)
    os.environ["PR_WEIGHTS_DIR"], os.environ["PR_MODELS_DIR"] = str(paths["weights_dir"]), str(paths["models_dir"])
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if a.only:
        nbs = [p for p in nbs if any(p.name.startswith(o) for o in a.only)]
    rows = []
    for nb in nbs:
        run = out / "runs" / nb.stem
        run.mkdir(parents=True, exist_ok=True)
        os.environ["PR_CACHE_DIR"], os.environ["PR_RESULTS_DIR"] = str(run / "cache"), str(run / "results")
        params = standins.smoke_parameters(nb.stem, paths, max_steps=a.max_steps, batch_size=a.batch_size)
        params["gpus"] = a.gpus
        t0, err = time.time(), ""
        try:
            pm.execute_notebook(str(nb), str(run / nb.name), parameters=params, kernel_name="python3", cwd=str(run),
                                progress_bar=False, execution_timeout=a.timeout)
        except Exception as e:  # noqa: BLE001 - recorded, the walk goes on
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
        secs = time.time() - t0
        tables = sorted(p.name for p in (run / "results" / "tables" / "paper").glob("*.md"))
        reads = [k for k in ("weights", "clip_weights", "vlm", "llm") if params.get(k)]
        rows.append({"notebook": nb.stem, "seconds": round(secs, 1), "ok": not err, "error": err,
                     "reads": "data_root; " + ", ".join(f"{k}={Path(str(params[k])).name}" for k in reads),
                     "tables written": ", ".join(tables)})
        print(f"{nb.stem}: {'ok' if not err else err} in {secs:.0f} s; tables: {', '.join(tables) or 'none'}", flush=True)
    import pandas as pd

    from person_retrieval.reports import _markdown

    earlier = out / "paper_smoke.json"
    if a.only and earlier.is_file():  # a partial walk updates its notebooks' rows of the last whole one
        ran = {r["notebook"] for r in rows}
        rows = sorted([r for r in json.loads(earlier.read_text()) if r["notebook"] not in ran] + rows, key=lambda r: r["notebook"])
    for r in rows:  # what each left on disk (checkpoints, cached features, synthesized sets)
        cache = out / "runs" / r["notebook"] / "cache"
        files = {(st.st_dev, st.st_ino): st.st_size for st in (f.stat() for f in cache.rglob("*") if f.is_file())} if cache.is_dir() else {}
        size = sum(files.values())  # a hard-linked checkpoint counted once
        r["cache written (MB)"] = round(size / 2**20)
    df = pd.DataFrame(rows)
    clip = "full-size ViT-B/16" if a.full_clip else "ViT-B/16 layout at a tiny width"
    head = (f"# Paper path on stand-ins: wall time per notebook\n\nCLIP: {clip}; max_steps {a.max_steps}, batch_size "
            f"{a.batch_size}, gpus {a.gpus}; one repeat; each notebook in an empty cache.\n\n")
    text = head + _markdown(df) + f"\n\nTotal: {df.seconds.sum():.0f} s.\n"
    (out / "paper_smoke.md").write_text(text)
    (out / "paper_smoke.json").write_text(json.dumps(rows, indent=1))
    if a.record:
        (ROOT / "tables" / "timing").mkdir(parents=True, exist_ok=True)
        (ROOT / "tables" / "timing" / "paper_smoke.md").write_text(text)
    print(text)
    return 0 if df.ok.all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
