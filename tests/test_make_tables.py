"""make tables' provenance: each notebook's tables are recorded with the hash of the inputs that made them, and
--check names the notebooks whose tables today's code would not reproduce."""
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


def test_check_runs_nothing_and_names_what_is_out_of_date(tmp_path, monkeypatch, capsys):
    import run_notebooks

    prov = tmp_path / "provenance.json"
    monkeypatch.setattr(run_notebooks, "provenance_file", lambda scale: prov)
    monkeypatch.setattr(run_notebooks, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("--check ran a notebook")))
    params = {"scale": "small", "seed": 0}
    nb = nbrun.notebooks(["07"])[0]
    assert run_notebooks.main(["--check", "--only", "07"]) == 1
    assert "07_ctgi: out of date (no make tables run recorded)" in capsys.readouterr().out
    nbrun.record_provenance(prov, "07_ctgi", nbrun.inputs_hash(nb, params), 1.0, params)
    assert run_notebooks.main(["--check", "--only", "07"]) == 0
    assert "1 of 1 notebooks' tables match the code" in capsys.readouterr().out


def test_a_successful_run_records_its_inputs_and_a_failed_one_does_not(tmp_path, monkeypatch):
    import run_notebooks

    prov = tmp_path / "provenance.json"
    monkeypatch.setattr(run_notebooks, "provenance_file", lambda scale: prov)
    outcome = {"07_ctgi": "ran", "06_diana": "failed"}
    monkeypatch.setattr(run_notebooks, "run", lambda nb, out_dir, params, **k: nbrun.Outcome(
        nb.stem, outcome[nb.stem], 3.0, 3.0, nbrun.ROOT / ".cache" / "executed" / "small" / nb.name, inputs=f"hash of {nb.stem}", finished="2026-12-07 12:00:00"))
    assert run_notebooks.main(["--only", "07"]) == 0
    assert nbrun.read_provenance(prov)["07_ctgi"] == {"inputs": "hash of 07_ctgi", "parameters": {"scale": "small", "seed": 0},
                                                      "seconds": 3.0, "finished": "2026-12-07 12:00:00"}
    assert run_notebooks.main(["--only", "06"]) == 1
    assert "06_diana" not in nbrun.read_provenance(prov)


def test_a_notebook_depends_on_the_modules_it_imports_and_no_others():
    nb01 = nbrun.notebooks(["01"])[0]
    files = {p.relative_to(ROOT).as_posix() for p in nbrun.library_files(nb01)}
    lib = "lib/person_retrieval/"
    assert {lib + "papers/tpr.py", lib + "train.py", lib + "models/pretrain.py", "constraints.txt"} <= files
    assert lib + "papers/ceca.py" not in files and lib + "papers/fafa.py" not in files  # other papers' modules
    assert any(f.startswith(lib + "reported/") for f in files)  # data files count for every notebook
    assert files < {p.relative_to(ROOT).as_posix() for p in nbrun.library_files()}


def test_imports_are_found_wherever_they_are_written():
    mods = {m: ROOT for m in ["person_retrieval", "person_retrieval.papers", "person_retrieval.papers.tpr",
                              "person_retrieval.models", "person_retrieval.models.pretrain", "person_retrieval.losses"]}
    code = ("def f():\n    from ..losses import tal_loss\n"
            "spec = 'person_retrieval.models.pretrain:ClipPretrainTask'\n"
            "from . import tpr\n")
    assert nbrun._imported(code, "person_retrieval.papers", mods) == {
        "person_retrieval", "person_retrieval.losses", "person_retrieval.models", "person_retrieval.models.pretrain",
        "person_retrieval.papers", "person_retrieval.papers.tpr"}
