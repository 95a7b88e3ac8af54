"""The paper path: every notebook through papermill at ``scale="paper"`` on stand-ins of the released files
(``person_retrieval.standins``: the six datasets in their released layouts, an open_clip state dict in
safetensors under PR_WEIGHTS_DIR, FLUX.1-dev / BLIP-2 / Qwen2-VL / Llama folders written by
``save_pretrained`` under PR_WEIGHTS_DIR and PR_MODELS_DIR), every training run capped at ``max_steps``.

Each notebook gets a cache of its own, so the test sees what it built: at paper no mini world and no mini
model is trained (unless a paper step needs one, listed in ALLOWED with the reason). Its tables land in
``tables/paper/`` with a source column naming the data, beside the paper's rows.

The CLIP here is ViT-B/16's layout at a tiny width (``standins.TINY_VIT``) so the suite fits CI; the full-size
ViT-B/16 walk is ``tools/paper_smoke.py`` (timed in the README).
"""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    from person_retrieval import standins as S

    return S.write_all(tmp_path_factory.mktemp("standins"), tiny_clip=True)


def paper_parameters(stem: str, s: dict) -> dict:
    """The parameters a researcher would pass: their data, their weights, one repeat, two steps."""
    from person_retrieval.standins import smoke_parameters

    return smoke_parameters(stem, s, max_steps=2, batch_size=4)


#: Cache entries a notebook may build at paper, with the paper step that needs them (none so far).
ALLOWED: dict = {}
#: What a mini model or the mini world leaves in the cache (``.cache/...``).
MINI = ("world", "models/image_tower-", "models/mini_clip-", "models/recognizer-", "models/generators-", "models/qformer-")


def built_mini(cache: Path, stem: str) -> list[str]:
    found = []
    for entry in MINI:
        folder, _, prefix = entry.partition("/")
        d = cache / folder
        if not d.is_dir():
            continue
        hits = [p for p in d.iterdir() if p.name.startswith(prefix)] if prefix else [d]
        found += [str(p.relative_to(cache)) for p in hits if not any(str(p.relative_to(cache)).startswith(a) for a in ALLOWED.get(stem, ()))]
    return found


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_paper_on_standins(nb, standins, tmp_path, monkeypatch):
    import papermill as pm

    cache, results = tmp_path / "cache", tmp_path / "results"
    monkeypatch.setenv("PR_CACHE_DIR", str(cache))
    monkeypatch.setenv("PR_RESULTS_DIR", str(results))
    monkeypatch.setenv("PR_WEIGHTS_DIR", str(standins["weights_dir"]))
    monkeypatch.setenv("PR_MODELS_DIR", str(standins["models_dir"]))
    params = paper_parameters(nb.stem, standins)
    pm.execute_notebook(str(nb), str(tmp_path / nb.name), parameters=params, kernel_name="python3", cwd=str(tmp_path),
                        progress_bar=False)
    assert built_mini(cache, nb.stem) == [], f"{nb.stem} built mini models or the mini world at scale='paper'"
    tables = sorted((results / "tables" / "paper").glob("*.md"))
    assert tables, f"{nb.stem} wrote no table under tables/paper/"
    data = str(standins["data_root"])
    csvs = sorted((results / "tables" / "paper").glob("*.csv"))
    ours = []
    for f in csvs:
        df = pd.read_csv(f)
        if "source" in df.columns:
            ours += [s for s in df.source.astype(str) if data in s or "stand-in" in s or "real data" in s]
    assert ours, f"{nb.stem}: no table row names the data it ran on ({[f.name for f in csvs]})"


def test_max_steps_caps_every_training_run(tmp_path):
    """A training run under set_limits(max_steps=N) takes N optimizer steps, whatever its epochs; its cached
    folder is apart from the full run's."""
    from person_retrieval import train

    spec = train.TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", {"scale": "tiny", "seed": 0, "n_ids": 40})
    try:
        train.set_limits(max_steps=3)
        res = train.fit(spec, train.TrainConfig(epochs=5, batch_size=8, out_dir=str(tmp_path / "run"), progress=False))
    finally:
        train.set_limits()
    assert res.history[-1]["step"] == 3 and len(res.history) == 1
    assert res.out_dir.endswith("-steps3") and not (tmp_path / "run").exists()
    json.loads((Path(res.out_dir) / "metrics.jsonl").read_text().splitlines()[-1])


def test_limits_are_checked_parameters():
    from person_retrieval import params, train

    try:
        assert params.check(dict(max_steps="2", epochs=None, batch_size=None))["max_steps"] == 2
        assert train.limits() == {"epochs": None, "max_steps": 2, "batch_size": None}
        with pytest.raises(ValueError, match="parameter 'max_steps'"):
            params.check(dict(max_steps=0))
    finally:
        train.set_limits()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
