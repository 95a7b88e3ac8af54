"""Running notebooks through papermill, for tools/run_notebooks.py (make tables) and tools/check_determinism.py.

A run is skipped when its inputs are those of its last successful run: the notebook itself, the library's
modules it imports (directly or through other modules, function-level imports and "person_retrieval.x:Task"
strings included), every file of the library that is not Python (the reported tables), pyproject.toml,
constraints.txt and the parameters. So a change to CECA's module leaves notebook 01's tables up to date, and a
change to the training loop makes every notebook that trains out of date. The stamp of a successful run is kept
beside its executed copy.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def notebooks(only: list[str] | None = None) -> list[Path]:
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        nbs = [p for p in nbs if any(p.name.startswith(o) for o in only)]
    return nbs


LIB = ROOT / "lib"
PACKAGE = "person_retrieval"
_TASK_STRING = re.compile(r"^(person_retrieval(?:\.\w+)+)(?::\w+)?$")


def _modules() -> dict[str, Path]:
    """Every module of the library by dotted name (a package by its ``__init__``)."""
    out = {}
    for p in (LIB / PACKAGE).rglob("*.py"):
        parts = list(p.relative_to(LIB).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imported(code: str, package: str, modules: dict[str, Path]) -> set[str]:
    """The library modules ``code`` imports (anywhere in it, relative imports resolved against ``package``),
    each with the packages above it (their ``__init__`` runs too)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # "from .papers import tpr" names a module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _TASK_STRING.match(node.value):
            names.add(_TASK_STRING.match(node.value).group(1))  # TaskSpec("person_retrieval.models.pretrain:...")
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        parts = name.split(".") if name else []
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    return found


def notebook_code(nb: Path) -> str:
    """A notebook's code cells as one Python text (IPython's magics and shell lines left out)."""
    cells = json.loads(nb.read_text())["cells"]
    lines = [ln for c in cells if c["cell_type"] == "code"
             for ln in "".join(c["source"]).splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def library_files(nb: Path | None = None) -> list[Path]:
    """The files of the library ``nb``'s results depend on (every file when ``nb`` is None): the modules it
    imports, transitively, and every non-Python file; with pyproject.toml and constraints.txt."""
    lib = LIB / PACKAGE
    data = [p for p in lib.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")]
    modules = _modules()
    if nb is None:
        code = list(modules.values())
    else:
        seen, todo = set(), list(_imported(notebook_code(nb), "", modules))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                p = modules[m]
                todo += _imported(p.read_text(), m if p.name == "__init__.py" else m.rpartition(".")[0], modules)
        code = [modules[m] for m in seen]
    pins = [f for f in (ROOT / "pyproject.toml", ROOT / "constraints.txt") if f.is_file()]
    return sorted(set(code) | set(data)) + pins


def inputs_hash(nb: Path, parameters: dict) -> str:
    """What a notebook's results depend on that git can see: its source, the library modules it imports
    (:func:`library_files`), the pins, the parameters."""
    h = hashlib.sha256()
    for p in [nb, *library_files(nb)]:
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
