"""Running notebooks through papermill, for tools/run_notebooks.py (make tables) and tools/check_determinism.py.

A run is skipped when its inputs are those of its last successful run: the notebook itself, every file of
the library (lib/person_retrieval, the reported tables included), pyproject.toml and the parameters. The
stamp of a successful run is kept beside its executed copy.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def notebooks(only: list[str] | None = None) -> list[Path]:
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        nbs = [p for p in nbs if any(p.name.startswith(o) for o in only)]
    return nbs


def library_files() -> list[Path]:
    lib = ROOT / "lib" / "person_retrieval"
    files = [p for p in lib.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return sorted(files + [f for f in (ROOT / "pyproject.toml", ROOT / "constraints.txt") if f.is_file()])


def inputs_hash(nb: Path, parameters: dict) -> str:
    """What a notebook's results depend on that git can see: its source, the library, the parameters."""
    h = hashlib.sha256()
    for p in [nb, *library_files()]:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(json.dumps(parameters, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Outcome:
    notebook: str
    status: str  # "ran", "up to date" or "failed"
    seconds: float  # this run's (0 when skipped)
    last_seconds: float | None  # the last successful run's
    executed: Path
    error: str = ""
    inputs: str = ""  # the hash of the inputs it ran (or was up to date) with
    finished: str = ""  # when its tables were written


def run(nb: Path, out_dir: Path, parameters: dict, label: str = "", force: bool = False, env: dict | None = None,
        log_output: bool = False) -> Outcome:
    """Execute ``nb`` into ``out_dir/<name>`` with a progress bar of its cells (unless its inputs are
    unchanged since its last successful run and not ``force``). A failure names the cell and keeps the
    executed copy."""
    import os

    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb.name
    stamp = out.with_suffix(".inputs.json")
    digest = inputs_hash(nb, parameters)
    last = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if not force and last.get("inputs") == digest and out.is_file():
        return Outcome(nb.stem, "up to date", 0.0, last.get("seconds"), out, inputs=digest, finished=last.get("finished", ""))
    stamp.unlink(missing_ok=True)  # a run that fails leaves no stamp: the next one reruns
    old_env = dict(os.environ)
    os.environ.update(env or {})
    t = time.time()
    try:
        pm.execute_notebook(str(nb), str(out), parameters=parameters, kernel_name="python3", cwd=str(ROOT / "notebooks"),
                            progress_bar={"desc": label or nb.stem, "leave": True}, log_output=log_output)
    except pm.PapermillExecutionError as e:
        return Outcome(nb.stem, "failed", time.time() - t, last.get("seconds"), out,
                       f"cell {e.exec_count}: {e.ename}: {e.evalue}")
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    seconds, finished = time.time() - t, time.strftime("%Y-%m-%d %H:%M:%S")
    stamp.write_text(json.dumps({"inputs": digest, "seconds": round(seconds, 1), "finished": finished}))
    return Outcome(nb.stem, "ran", seconds, round(seconds, 1), out, inputs=digest, finished=finished)


# ---------------------------------------------------------------------------------------------
# Provenance: which inputs produced the committed tables. make tables records, per notebook, the hash of
# its inputs and when it ran (tables/provenance.json at small, tables/<scale>/provenance.json otherwise);
# --check recomputes the hashes and names the notebooks whose tables the code no longer matches.
def provenance_file(scale: str, root: Path = ROOT) -> Path:
    return root / "tables" / ("" if scale == "small" else scale) / "provenance.json"


def read_provenance(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def record_provenance(path: Path, notebook: str, inputs: str, seconds: float, parameters: dict, finished: str = "") -> None:
    """Note that ``notebook``'s tables under ``path``'s folder were written from ``inputs`` at ``finished``
    (default: now), atomically."""
    data = read_provenance(path)
    data[notebook] = {"inputs": inputs, "parameters": parameters, "seconds": round(seconds, 1),
                      "finished": finished or time.strftime("%Y-%m-%d %H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    tmp.replace(path)


def stale(nbs: list[Path], parameters: dict, path: Path) -> list[tuple[str, str]]:
    """``(notebook, why)`` for each notebook whose recorded tables were not made from today's inputs."""
    data, out = read_provenance(path), []
    for nb in nbs:
        rec = data.get(nb.stem)
        if rec is None:
            out.append((nb.stem, "no make tables run recorded"))
        elif rec.get("parameters", parameters) != parameters:
            out.append((nb.stem, f"recorded with other parameters {rec['parameters']}"))
        elif rec["inputs"] != inputs_hash(nb, parameters):
            out.append((nb.stem, f"its source, the library or the pins changed since its run of {rec['finished']}"))
    return out


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"
