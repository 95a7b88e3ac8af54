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
# Notebooks 02_tips and 03 split their synthesis's shards over two processes (02_tips also trains over two). Notebooks 04, 05
# and 06 train over two gloo processes, as the user's `papermill notebooks/04_fafa.ipynb out.ipynb -p gpus 2` does.
# Notebooks 04-07 repeat over two seeds (the spread needs more than one).
EXTRA = {"01_tpr_baselines": {"gpus": 2, "backbone_seeds": [0, 1]}, "02_tips": {"gpus": 2, "seeds": [0, 1]}, "03_syncpr_itcpr": {"gpus": 2}, "04_fafa": {"gpus": 2, "seeds": [0, 1]},
         "05_ceca": {"gpus": 2, "seeds": [0, 1]},
         "06_diana": {"gpus": 2, "seeds": [0, 1]},
         "07_ctgi": {"seeds": [0, 1]}}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_tiny(nb, tmp_path):
    import papermill as pm

    params = {"scale": "tiny", "seed": 0, **EXTRA.get(nb.stem, {})}
    pm.execute_notebook(str(nb), str(tmp_path / nb.name), parameters=params, kernel_name="python3", cwd=str(tmp_path),
                        progress_bar=False)
    if nb.stem == "01_tpr_baselines":  # the backbone's spread: one verdict per dataset and stage, over two backbone seeds
        out = (tmp_path / nb.name).read_text()
        assert out.count("over 2 backbone seed(s) -> ") == 6 and "under every backbone seed and dataset -> " in out
    if nb.stem == "08_demos":  # at tiny the generation demo says that its generator draws no people
        assert "At scale tiny the generator draws no people" in (tmp_path / nb.name).read_text()


def test_every_parameter_is_typed_and_checked_in_the_first_cell():
    """papermill --help-notebook shows a type for every parameter, and the first code cell after the
    parameters calls the one check (params.check) with every one of them."""
    import nbformat
    import papermill as pm

    for p in NOTEBOOKS:
        inferred = pm.inspect_notebook(str(p))
        assert inferred and all(v["inferred_type_name"] not in ("None", None) for v in inferred.values()), (p.name, inferred)
        cells = [c for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code"]
        first = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
        import re

        declared = re.findall(r"^(\w+)\s*:", cells[first].source, flags=re.M)
        assert sorted(declared) == sorted(inferred), (p.name, "papermill cannot read", sorted(set(declared) - set(inferred)))
        check = cells[first + 1].source
        assert "params.check(" in check, p.name
        assert all(f"{name}={name}" in check for name in inferred), (p.name, [n for n in inferred if f"{n}={n}" not in check])


# One bad value per notebook, each a case a user met: it fails in the first code cell (papermill's
# execution count 3: the parameters cell, the injected parameters, then the check), naming the parameter.
BAD = {
    "00_world_and_backbone": ({"gpus": 64}, "parameter 'gpus'"),
    "01_tpr_baselines": ({"weights": "ViT-B-16"}, "parameter 'weights': no local weights for 'ViT-B-16'"),
    "02_generators": ({"data_root": "EMPTY"}, "parameter 'data_root': .* lacks datasets this notebook needs: cuhk_pedes"),
    "02_tips": ({"alpha": 1.5}, "parameter 'alpha'"),
    "03_syncpr_itcpr": ({"beta_range": "[1.0, 0.5]"}, "parameter 'beta_range' must be \\[low, high\\] with low <= high"),
    "04_fafa": ({"weights": "EMPTY"}, "parameter 'weights': .* holds no Blip2ForImageTextRetrieval weights"),
    "05_ceca": ({"omega": 1.5}, "parameter 'omega'"),
    "06_diana": ({"num_queries": 0}, "parameter 'num_queries'"),
    "07_ctgi": ({"ablation_methods": '["irra", "clip"]'}, "parameter 'ablation_methods'"),
    "08_demos": ({"top_k": 0}, "parameter 'top_k'"),
}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_a_bad_parameter_fails_in_the_first_cell(nb, tmp_path, monkeypatch):
    import papermill as pm

    assert nb.stem in BAD, f"add a bad-parameter case for {nb.stem}"
    change, msg = BAD[nb.stem]
    change = {k: (str(tmp_path) if v == "EMPTY" else v) for k, v in change.items()}
    monkeypatch.setenv("PR_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(pm.PapermillExecutionError, match=msg) as e:
        pm.execute_notebook(str(nb), str(tmp_path / "bad.ipynb"), parameters={"scale": "tiny", **change},
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert e.value.exec_count == 3, f"failed in cell {e.value.exec_count}, not the first code cell"
