"""Notebooks 00 and 01 on a researcher's data (issue 41): the first cell validates every annotation file
through the readers, naming file and cause; at scale="paper" real CLIP weights are required (the mini CLIP
is never trained there); --help-notebook describes every parameter."""
import json
from pathlib import Path

import pytest

from person_retrieval import datasets
from person_retrieval.datasets import DatasetFormatError, validate_annotations

ROOT = Path(__file__).resolve().parents[1]
NB = {stem: ROOT / "notebooks" / f"{stem}.ipynb" for stem in ("00_world_and_backbone", "01_tpr_baselines")}


def write_root(base: Path) -> Path:
    """A data_root of six datasets in their released layouts, one or two entries each (no images: the
    first cell's validation reads annotations only)."""
    tpr = {"cuhk_pedes": dict(split="train", captions=["a man in a red coat."], file_path="CUHK01/0001.png", id=1),
           "icfg_pedes": dict(split="test", captions=["a woman in black."], file_path="test/0002/a.jpg", id=2),
           "rstpreid": dict(split="val", captions=["he walks left."], img_path="0003_c1.jpg", id=3)}
    for name, entry in tpr.items():
        (base / datasets.REAL_FOLDERS[name]).mkdir(parents=True)
        datasets.write_tpr_annotations(name, base / datasets.REAL_FOLDERS[name], [entry])
    q = dict(file_path="query/1.jpg", datasets="x", person_id=1, instance_id=5, caption="now in a red coat")
    datasets.write_itcpr(base / "ITCPR", [q], [{**q, "file_path": "gallery/1.jpg"}])
    datasets.write_syncpr(base / "SynCPR", [dict(reference_caption="a", target_caption="b", reference_image_path="r.png",
                                                 target_image_path="t.png", edit_caption="c", cpr_id=0)])
    rnd = [{"from": "gpt", "value": "What does the person wear?"}, {"from": "user", "value": "A red coat."}]
    datasets.write_chatpedes(base / "ChatPedes", "test", [dict(id=1, file_path="CUHK01/0001.png", chats=[[rnd]])])
    return base


def test_validate_annotations_reads_every_file_and_names_a_bad_one(tmp_path):
    root = write_root(tmp_path / "data")
    got = validate_annotations(root, datasets.REAL_FOLDERS)
    assert got == {"cuhk_pedes": {"reid_raw.json": 1}, "icfg_pedes": {"ICFG-PEDES.json": 1}, "rstpreid": {"data_captions.json": 1},
                   "itcpr": {"query.json": 1, "gallery.json": 1}, "syncpr": {"SynCPR.json": 1}, "chatpedes": {"test_reid.json": 1}}
    ann = root / "CUHK-PEDES" / "reid_raw.json"
    ann.write_text(ann.read_text()[:-20])  # truncated
    with pytest.raises(DatasetFormatError, match=r"reid_raw\.json: not valid JSON .* truncated"):
        validate_annotations(root, ["cuhk_pedes"])
    assert validate_annotations(root, ["rstpreid"]) == {"rstpreid": {"data_captions.json": 1}}  # only the named ones
    sp = root / "SynCPR" / "SynCPR.json"
    sp.write_text(json.dumps([{"reference_caption": "a"}]))
    with pytest.raises(DatasetFormatError, match=r"SynCPR\.json: entry 0 has no field"):
        validate_annotations(root, ["syncpr"])
    (root / "ChatPedes" / "test_reid.json").unlink()
    with pytest.raises(DatasetFormatError, match="neither train_reid.json nor test_reid.json is here"):
        validate_annotations(root, ["chatpedes"])


def _run(stem: str, params: dict, tmp_path: Path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB[stem]), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                            progress_bar=False, cwd=str(tmp_path))
    return e.value


def test_00_truncated_annotation_fails_in_the_first_cell_naming_the_file(tmp_path, monkeypatch):
    """Before: notebook 00's "first entry" cell parsed reid_raw.json itself, a bare JSONDecodeError in section 3."""
    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "cache"))
    root = write_root(tmp_path / "data")
    ann = root / "CUHK-PEDES" / "reid_raw.json"
    ann.write_text(ann.read_text()[:-20])
    err = _run("00_world_and_backbone", {"scale": "tiny", "data_root": str(root)}, tmp_path)
    assert str(ann) in err.evalue and "not valid JSON" in err.evalue and "truncated" in err.evalue, err.evalue
    assert err.exec_count == 3, f"failed in cell {err.exec_count}, not the first code cell"


def test_01_at_paper_needs_real_clip_weights(tmp_path, monkeypatch):
    """Before: at paper with weights=None notebook 01 trained the mini CLIP (and its 60 epochs had no knob)."""
    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "cache"))
    root = write_root(tmp_path / "data")
    err = _run("01_tpr_baselines", {"scale": "paper", "data_root": str(root), "max_steps": 2}, tmp_path)
    assert "scale='paper' needs real CLIP weights: set parameter 'weights'" in err.evalue, err.evalue
    assert err.exec_count == 3 and not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize("stem", sorted(NB))
def test_help_describes_every_parameter(stem):
    """--help-notebook: every parameter has a description (papermill drops a parameter whose comment holds '=')."""
    import papermill as pm

    inferred = pm.inspect_notebook(str(NB[stem]))
    assert {"seed", "epochs", "max_steps", "batch_size"} <= set(inferred), sorted(inferred)
    assert all(v["help"] for v in inferred.values()), [n for n, v in inferred.items() if not v["help"]]
    assert "0 or more" in inferred["seed"]["help"]
    if stem == "01_tpr_baselines":
        assert '"irra", "rde"' in inferred["methods"]["help"] and '"rstpreid"' in inferred["datasets"]["help"]
