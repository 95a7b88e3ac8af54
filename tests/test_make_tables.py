"""make tables' provenance: each notebook's tables are recorded with the hash of the inputs that made them, and
--check names the notebooks whose tables today's code would not reproduce."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import nbrun  # noqa: E402


def test_provenance_round_trip_and_what_makes_a_notebook_stale(tmp_path):
    nbs = nbrun.notebooks(["00", "07"])
    params = {"scale": "small", "seed": 0}
    prov = tmp_path / "provenance.json"
    assert [n for n, _ in nbrun.stale(nbs, params, prov)] == ["00_world_and_backbone", "07_ctgi"]  # nothing recorded
    nbrun.record_provenance(prov, "00_world_and_backbone", nbrun.inputs_hash(nbs[0], params), 12.3, params)
    out = nbrun.stale(nbs, params, prov)
    assert [n for n, _ in out] == ["07_ctgi"] and "no make tables run recorded" in out[0][1]
    assert nbrun.read_provenance(prov)["00_world_and_backbone"]["seconds"] == 12.3
    assert "other parameters" in nbrun.stale(nbs[:1], {"scale": "small", "seed": 1}, prov)[0][1]
    nbrun.record_provenance(prov, "00_world_and_backbone", "an older library's hash", 1.0, params)
    assert "changed since its run of" in nbrun.stale(nbs[:1], params, prov)[0][1]


def test_the_inputs_cover_the_library_and_the_pins():
    files = {p.relative_to(ROOT).as_posix() for p in nbrun.library_files()}
    assert {"pyproject.toml", "constraints.txt", "lib/person_retrieval/train.py"} <= files


def test_check_runs_nothing_and_fails_when_a_notebook_is_out_of_date(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebooks.py"), "--check", "--scale", "tiny", "--only", "07"],
                       capture_output=True, text=True, cwd=tmp_path)
    recorded = nbrun.read_provenance(nbrun.provenance_file("tiny")).get("07_ctgi")
    expect_stale = recorded is None or recorded["inputs"] != nbrun.inputs_hash(nbrun.notebooks(["07"])[0], {"scale": "tiny", "seed": 0})
    assert r.returncode == (1 if expect_stale else 0), r.stdout + r.stderr
    assert ("07_ctgi: out of date" in r.stdout) == expect_stale and "notebooks' tables match the code" in r.stdout
