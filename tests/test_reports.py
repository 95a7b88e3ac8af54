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


def test_seed_summary_gives_mean_and_spread():
    import pandas as pd

    from person_retrieval.reports import seed_summary

    df = pd.DataFrame({"seed": [0, 1, 2, 0], "setting": ["a", "a", "a", "b"], "R1": [10.0, 12.0, 14.0, 5.0], "mAP": [1.0, 1.0, 1.0, 2.0]})
    s = seed_summary(df, ["setting"], metrics=("R1", "mAP")).set_index("setting")
    assert s.loc["a", "R1"] == 12.0 and s.loc["a", "R1_sd"] == 2.0 and s.loc["a", "seeds"] == 3
    assert s.loc["b", "R1"] == 5.0 and pd.isna(s.loc["b", "R1_sd"]) and s.loc["a", "mAP_sd"] == 0.0
    with pytest.raises(ValueError, match="seed"):
        seed_summary(df.drop(columns="seed"), ["setting"])


def test_ctgi_reported_numbers():
    df = reported("ctgi")
    ours = df[(df.table == 3) & (df.method == "RDE") & (df.captions == "MTG")].iloc[0]
    assert (ours.R1, ours.mAP) == (66.35, 51.51) and ours.MTI and ours.PES
    t4 = df[(df.table == 4) & (df.method == "IRRA")]
    assert len(t4) == 4 and t4.R1.max() == 64.20


def test_wall_clock_columns_go_to_timing_tables_only(tmp_path, monkeypatch):
    import pandas as pd

    from person_retrieval import reports

    monkeypatch.setenv("PR_RESULTS_DIR", str(tmp_path))
    df = pd.DataFrame({"stage": ["base"], "seconds": [12.5], "val_loss": [0.4], "source": ["this run"]})
    assert reports.timing_columns(df) == ["seconds"]
    for cols in (["ms / query"], ["samples_per_s"], ["images/s"], ["train s"], ["time (s)"]):
        assert reports.timing_columns(pd.DataFrame(columns=cols)) == cols
    assert reports.timing_columns(pd.DataFrame(columns=["R1", "mAP", "MLLM calls / query", "refined %", "hf_energy_se", "seeds"])) == []
    with pytest.raises(ValueError, match=r"table 'train' has wall-clock columns \['seconds'\]: save them in a timing table"):
        reports.save_table(df, "train", "tiny")
    path = reports.save_table(df, "train", "tiny", timing=True)
    assert path == tmp_path / "tables" / "tiny" / "timing" / "train.csv" and path.is_file()
    result = reports.save_table(df.drop(columns="seconds"), "train", "tiny")
    assert result.parent == tmp_path / "tables" / "tiny" and "seconds" not in result.read_text()
