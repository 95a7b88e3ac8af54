"""The one check of notebook parameters: each kind of bad value fails with a message naming the parameter."""
import json

import pytest

from person_retrieval import params

BASE = dict(scale="tiny", gpus=0, seed=0, data_root=None, weights=None)
CUHK_ENTRY = {"split": "test", "captions": ["A man in a red coat."], "file_path": "CUHK01/a.png", "id": 1}


@pytest.mark.parametrize("kw, msg", [
    ({"scale": "huge"}, "parameter 'scale' must be one of"),
    ({"gpus": "two"}, r"parameter 'gpus' must be a non-negative integer.*'two' \(str\)"),
    ({"gpus": -1}, "parameter 'gpus'"),
    ({"gpus": True}, "parameter 'gpus'"),
    ({"seed": 1.5}, "parameter 'seed' must be a non-negative integer"),
    ({"data_root": "/no/such/folder"}, "parameter 'data_root'.*does not exist"),
    ({"data_root": 3}, "parameter 'data_root' must be None"),
    ({"weights": 3}, "parameter 'weights' must be None"),
    ({"weights": "ViT-B-16"}, "parameter 'weights': no local weights for 'ViT-B-16': put the open_clip checkpoint at"),
    ({"weights": "/no/such/model.safetensors"}, "parameter 'weights': '/no/such/model.safetensors' does not exist"),
    ({"scale": "paper"}, "scale='paper' needs real data"),
])
def test_bad_common_parameters_name_themselves(kw, msg):
    with pytest.raises(ValueError, match=msg):
        params.check({**BASE, **kw})


def test_good_parameters_pass_and_come_back_checked(tmp_path):
    out = params.check(dict(scale="tiny", gpus=0, seed=3, data_root=str(tmp_path), weights=None, seeds="[0, 1]",
                            lam="0.25", methods='["irra"]'), lam=params.number(0, 1), methods=params.choices(["irra", "rde"]))
    assert out == dict(scale="tiny", gpus=0, seed=3, data_root=tmp_path, weights=None, seeds=[0, 1], lam=0.25, methods=["irra"])
    assert list(out) == ["scale", "gpus", "seed", "data_root", "weights", "seeds", "lam", "methods"]  # the notebook's order


def test_a_parameter_without_a_rule_is_an_error():
    with pytest.raises(TypeError, match="no rule for parameter 'mask_ratio'"):
        params.check({**BASE, "mask_ratio": 0.15})


@pytest.mark.parametrize("value, cuda, cores, msg", [
    (1, 0, 2, "parameter 'gpus'=1 asks for a GPU, but this machine has none: use 0"),
    (64, 0, 2, "parameter 'gpus'=64 would start 64 CPU processes .* but it has 2 cores"),
    (3, 2, 16, "parameter 'gpus' asks for 3 GPUs, but this machine has 2"),
])
def test_gpus_against_the_machine(value, cuda, cores, msg):
    with pytest.raises(ValueError, match=msg):
        params.check_gpus(value, cuda=cuda, cores=cores)


def test_gpus_that_the_machine_has_pass():
    assert params.check_gpus(0, cuda=0, cores=2) == 0
    assert params.check_gpus(2, cuda=0, cores=2) == 2  # two gloo processes on a 2-core CPU (the notebook tests)
    assert params.check_gpus(8, cuda=8, cores=16) == 8
    assert params.check_gpus("2", cuda=0, cores=2) == 2  # papermill -p text


def test_lists_from_papermill_text_are_json():
    rule = params.choices(["irra", "rde"])
    assert rule("methods", '["irra","rde"]') == ["irra", "rde"] and rule("methods", ("rde",)) == ["rde"]
    for bad, msg in (("[", "must be a non-empty list from"), ("irra", "must be a non-empty list from"), ("[]", "is an empty list"),
                     ('["irra", "clip"]', r"unknown: \['clip'\]"), ('["irra", "irra"]', "repeats an item"), (3, "non-empty list")):
        with pytest.raises(ValueError, match=f"parameter 'methods' .*{msg}"):
            rule("methods", bad)


def test_numbers_integers_and_choices():
    assert params.number(0, 1)("lam", 0.5) == 0.5 and params.integer(1)("top_k", "20") == 20
    assert params.integer(1, allow_none=True)("rank", None) is None and params.choice(["a"])("x", "a") == "a"
    for rule, value, msg in ((params.number(0, 1), 2.0, r"parameter 'lam' must lie in \[0, 1\], got 2.0"),
                             (params.number(0, 1), "half", "parameter 'lam' must be a number, got 'half'"),
                             (params.integer(1), 2.5, "parameter 'lam' must be an integer, got 2.5"),
                             (params.integer(1), 0, r"parameter 'lam' must lie in \[1, inf\]"),
                             (params.choice(["cuhk_pedes"]), "cuhk", "parameter 'lam' must be one of \\['cuhk_pedes'\\]")):
        with pytest.raises(ValueError, match=msg):
            rule("lam", value)


def test_seeds():
    assert params.seeds("seeds", [0, 1, 2]) == [0, 1, 2] and params.seeds("seeds", (3,)) == [3]
    assert params.seeds("seeds", "[0, 1]") == params.seeds("seeds", "0,1") == params.seeds("seeds", "0 1") == [0, 1]
    for bad, msg in (("zero", "must be a list"), ("[0, x]", "must be a list"), ([], "is an empty list"), ([0, -1], "non-negative"),
                     ([0, 0], "repeats a seed"), ([True], "non-negative integers"), (1, "must be a list")):
        with pytest.raises(ValueError, match=f"parameter 'seeds' .*{msg}"):
            params.seeds("seeds", bad)


def test_data_root_names_every_missing_dataset(tmp_path):
    (tmp_path / "CUHK-PEDES").mkdir()
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps([CUHK_ENTRY]))
    (tmp_path / "RSTPReid").mkdir()  # the folder without its annotation file
    assert params.check_data_root(tmp_path, ["cuhk_pedes"]) == tmp_path
    with pytest.raises(ValueError) as e:
        params.check_data_root(str(tmp_path), ["cuhk_pedes", "icfg_pedes", "rstpreid", "itcpr"])
    msg = str(e.value)
    assert msg.startswith("parameter 'data_root'") and "cuhk_pedes" not in msg
    assert "icfg_pedes (expected" in msg and "RSTPReid/data_captions.json" in msg and "itcpr (expected" in msg


def test_model_folders_are_found_or_said_where_to_put(tmp_path, monkeypatch):
    monkeypatch.setenv("PR_MODELS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="parameter 'vlm': model 'Qwen/Qwen2-VL-7B-Instruct' is not on disk. Put its folder"):
        params.check({**BASE, "vlm": "Qwen/Qwen2-VL-7B-Instruct"})
    (tmp_path / "Qwen--Qwen2-VL-7B-Instruct").mkdir()
    assert params.check({**BASE, "vlm": "Qwen/Qwen2-VL-7B-Instruct"})["vlm"] == "Qwen/Qwen2-VL-7B-Instruct"
    with pytest.raises(ValueError, match="parameter 'llm' must be None"):
        params.check({**BASE, "llm": 7})
    with pytest.raises(ValueError, match="parameter 'weights': no FLUX.1-dev folder at 'FLUX.1-dev'"):
        params.check({**BASE, "weights": "FLUX.1-dev"}, weights=params.flux_weights)


def test_real_clip_weights_on_disk_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("PR_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "ViT-B-16.safetensors").write_bytes(b"")
    assert params.check({**BASE, "weights": "ViT-B-16"})["weights"] == "ViT-B-16"


def test_an_empty_list_of_seeds_or_choices_says_it_is_empty():
    for value in ("[]", [], " [ ] "):
        with pytest.raises(params.ParameterError, match="parameter 'seeds' is an empty list: give at least one seed"):
            params.check({"seeds": value})
    with pytest.raises(params.ParameterError, match=r"parameter 'methods' is an empty list: give at least one of \['irra'\]"):
        params.check({"methods": "[]"}, methods=params.choices(["irra"]))


@pytest.mark.parametrize("kw, rule", [
    ({"weights": "/no/such/weights"}, None),
    ({"weights": "~/no/such/ViT-B-16.safetensors"}, None),
    ({"vlm": "/no/such/Qwen2-VL-7B-Instruct"}, None),
    ({"llm": "./no/such/Llama-3.2-1B-Instruct"}, None),
    ({"weights": "/no/such/blip2-itm-vit-g"}, params.blip2_weights),
    ({"weights": "/no/such/FLUX.1-dev"}, params.flux_weights),
])
def test_a_model_folder_that_does_not_exist_says_so(kw, rule):
    (name, value), = kw.items()
    with pytest.raises(params.ParameterError) as e:
        params.check(kw, **({name: rule} if rule else {}))
    msg = str(e.value)
    assert msg.startswith(f"parameter {name!r}: ") and "does not exist" in msg and "nearest folder that exists is" in msg, msg
    assert "holds no" not in msg and "config.json" not in msg and "not on disk" not in msg and "no local weights" not in msg, msg


def test_a_weights_folder_names_the_checkpoint_to_give(tmp_path):
    (tmp_path / "ViT-B-16.safetensors").write_bytes(b"")
    with pytest.raises(params.ParameterError, match=r"is a folder; give the checkpoint file in it \(it holds .*ViT-B-16.safetensors\)"):
        params.check({"weights": str(tmp_path)})


def test_a_parameter_error_is_a_value_error_shown_as_one_line():
    with pytest.raises(ValueError) as e:
        params.check({"seed": -1})
    assert isinstance(e.value, params.ParameterError)
    shown = e.value._render_traceback_()
    assert len(shown) <= 3 and "parameter 'seed' must be a non-negative integer" in shown[0] and "-p NAME VALUE" in shown[-1]
    # a notebook's own rule raising a plain ValueError is shown the same way, named
    with pytest.raises(params.ParameterError, match="parameter 'k': too big"):
        params.check({"k": 3}, k=lambda n, v: (_ for _ in ()).throw(ValueError("too big")))


def test_a_parameter_error_in_a_kernel_shows_one_line_not_a_traceback(tmp_path):
    """IPython renders ``_render_traceback_()`` in place of the stack: the cell's error output is the message
    and the hint, and papermill (which reads the same output) still reports the message."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from person_retrieval import params\nP = params.check(dict(seeds='[]', scale='tiny'))")])
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError, match="parameter 'seeds' is an empty list"):
        client.execute()
    err = next(o for o in nb.cells[0].outputs if o.output_type == "error")
    assert err.ename == "ParameterError" and err.evalue.startswith("parameter 'seeds' is an empty list")
    assert len(err.traceback) <= 3 and "parameter 'seeds' is an empty list" in err.traceback[0], err.traceback
    assert not any("File " in line or "Traceback" in line for line in err.traceback), err.traceback


def _cuhk(root, entries):
    (root / "CUHK-PEDES").mkdir(parents=True, exist_ok=True)
    (root / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("text, msg", [
    (json.dumps([CUHK_ENTRY])[:-20], r"reid_raw.json: not valid JSON .*truncated"),
    (json.dumps([{k: v for k, v in CUHK_ENTRY.items() if k != "captions"}]), r"reid_raw.json: entry 0 has no field 'captions'"),
    (json.dumps([]), r"reid_raw.json: holds no entries"),
])
def test_data_root_validates_the_annotation_files_in_the_first_cell(tmp_path, text, msg):
    _cuhk(tmp_path, [CUHK_ENTRY])
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text(text)
    with pytest.raises(params.ParameterError, match="parameter 'data_root': CUHK-PEDES is not in its released format: .*" + msg):
        params.check({"data_root": str(tmp_path), "scale": "paper"}, needs=["cuhk_pedes"])
    assert params.check({"data_root": str(tmp_path)}, needs=[])["data_root"] == tmp_path  # only what is needed is read


def test_data_root_validation_parses_each_file_once(tmp_path, monkeypatch):
    """The first cell's validation hands what it parsed to the notebook's first reader of that file."""
    from person_retrieval.datasets import formats, read_tpr_annotations

    _cuhk(tmp_path, [CUHK_ENTRY, {**CUHK_ENTRY, "id": 2}])
    loads = []
    real = formats.json.load
    monkeypatch.setattr(formats.json, "load", lambda f: loads.append(f.name) or real(f))
    params.check({"data_root": str(tmp_path)}, needs=["cuhk_pedes"])
    params.check({"data_root": str(tmp_path)}, needs=["cuhk_pedes"])  # validated again: still parsed once
    assert len(read_tpr_annotations("cuhk_pedes", tmp_path / "CUHK-PEDES")) == 2 and len(loads) == 1
    read_tpr_annotations("cuhk_pedes", tmp_path / "CUHK-PEDES")  # handed over once: the next read parses
    assert len(loads) == 2
    params.check({"data_root": str(tmp_path)}, needs=["cuhk_pedes"])
    _cuhk(tmp_path, [CUHK_ENTRY])  # the file changed since: read anew
    assert len(read_tpr_annotations("cuhk_pedes", tmp_path / "CUHK-PEDES")) == 1 and len(loads) == 4
