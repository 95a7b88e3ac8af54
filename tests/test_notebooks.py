"""Every notebook runs end to end through papermill at scale="tiny", and bad parameters fail early
with a message naming the parameter."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


def test_notebooks_match_their_sources():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_notebooks.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_notebooks_have_no_outputs_and_a_parameters_cell():
    import nbformat

    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), p.name
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), p.name


# Extra parameters per notebook: notebook 01 runs its training through DistributedDataParallel over two
# gloo processes, as `papermill notebooks/01_tpr_baselines.ipynb out.ipynb -p scale tiny -p gpus 2` does.
# Notebook 07 repeats its experiment over two seeds (the spread needs more than one).
EXTRA = {"01_tpr_baselines": {"gpus": 2}, "07_ctgi": {"seeds": [0, 1]}}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_tiny(nb, tmp_path):
    import papermill as pm

    params = {"scale": "tiny", "seed": 0, **EXTRA.get(nb.stem, {})}
    pm.execute_notebook(str(nb), str(tmp_path / nb.name), parameters=params, kernel_name="python3", cwd=str(tmp_path),
                        progress_bar=False)


def test_bad_parameter_type_through_papermill_names_it(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="parameter 'gpus' must be a non-negative integer"):
        pm.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "bad.ipynb"), parameters={"scale": "tiny", "gpus": "two"},
                            kernel_name="python3", progress_bar=False)


def test_bad_seeds_through_papermill_names_it(tmp_path):
    import papermill as pm

    nb = next(p for p in NOTEBOOKS if p.stem == "07_ctgi")
    with pytest.raises(pm.PapermillExecutionError, match="parameter 'seeds' must be a list"):
        pm.execute_notebook(str(nb), str(tmp_path / "bad.ipynb"), parameters={"scale": "tiny", "seeds": "zero"},
                            kernel_name="python3", progress_bar=False)
