import pandas as pd
import pytest

from person_retrieval.reports import reported, save_table


def test_reported_tables_load():
    df = reported("dataset_statistics")
    row = df[(df.dataset == "cuhk_pedes") & (df.split == "test")].iloc[0]
    assert (row.identities, row.images, row.captions) == (1000, 3074, 6156)
    with pytest.raises(FileNotFoundError, match="no reported table"):
        reported("nope")


def test_save_table_requires_provenance_and_writes_both_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("PR_RESULTS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="'source' column"):
        save_table(pd.DataFrame({"R1": [1.0]}), "t", "tiny")
    p = save_table(pd.DataFrame({"source": ["this run"], "R1": [12.345]}), "t", "tiny", title="T")
    assert p == tmp_path / "tables" / "tiny" / "t.csv"
    assert "| this run | 12.35 |" in (p.parent / "t.md").read_text()
    # small is the committed scale: no sub-folder
    assert save_table(pd.DataFrame({"source": ["x"]}), "t", "small").parent == tmp_path / "tables"
