"""The one check of notebook parameters: each kind of bad value fails with a message naming the parameter."""
import json

import pytest

from person_retrieval import params

BASE = dict(scale="tiny", gpus=0, seed=0, data_root=None, weights=None)


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
    ({"weights": "/no/such/model.safetensors"}, "parameter 'weights': weights file /no/such/model.safetensors does not exist"),
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
    for bad, msg in (("[", "must be a non-empty list from"), ("irra", "must be a non-empty list from"), ("[]", "non-empty list"),
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
    for bad, msg in (("zero", "must be a list"), ("[0, x]", "must be a list"), ([], "non-empty list"), ([0, -1], "non-negative"),
                     ([0, 0], "repeats a seed"), ([True], "non-negative integers"), (1, "must be a list")):
        with pytest.raises(ValueError, match=f"parameter 'seeds' .*{msg}"):
            params.seeds("seeds", bad)


def test_data_root_names_every_missing_dataset(tmp_path):
    (tmp_path / "CUHK-PEDES").mkdir()
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps([]))
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
