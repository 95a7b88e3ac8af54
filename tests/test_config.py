import pytest

from person_retrieval.config import check_number, check_params, get_scale, rng_for


@pytest.mark.parametrize("kw, msg", [
    ({"scale": "huge"}, "parameter 'scale' must be one of"),
    ({"gpus": "two"}, "parameter 'gpus' must be a non-negative integer.*'two' \\(str\\)"),
    ({"gpus": -1}, "parameter 'gpus'"),
    ({"gpus": True}, "parameter 'gpus'"),
    ({"seed": 1.5}, "parameter 'seed'"),
    ({"data_root": "/no/such/folder"}, "parameter 'data_root'.*does not exist"),
    ({"weights": 3}, "parameter 'weights'"),
    ({"scale": "paper", "data_root": None}, "scale='paper' needs real data"),
])
def test_bad_parameters_name_themselves(kw, msg):
    with pytest.raises(ValueError, match=msg):
        check_params(**kw)


def test_good_parameters_pass(tmp_path):
    out = check_params(scale="tiny", gpus=0, seed=3, data_root=str(tmp_path), weights=None)
    assert out["data_root"] == tmp_path


def test_check_number():
    assert check_number("lam", 0.5, 0, 1) == 0.5
    with pytest.raises(ValueError, match="'lam' must lie in"):
        check_number("lam", 2.0, 0, 1)
    with pytest.raises(ValueError, match="'rounds' must be an integer"):
        check_number("rounds", 2.5, integer=True)


def test_scales_and_streams():
    assert get_scale("small").tpr["cuhk_pedes"].ids["test"] == 1000
    with pytest.raises(ValueError, match="scale must be one of"):
        get_scale("medium")
    a, b = rng_for(0, "x").random(3), rng_for(0, "x").random(3)
    assert (a == b).all() and not (a == rng_for(0, "y").random(3)).all()


def test_check_seeds_and_model_names():
    from person_retrieval.config import check_model_name, check_seeds

    assert check_seeds("seeds", [0, 1, 2]) == [0, 1, 2] and check_seeds("seeds", (3,)) == [3]
    assert check_seeds("seeds", "[0, 1]") == check_seeds("seeds", "0,1") == check_seeds("seeds", "0 1") == [0, 1]  # papermill -p
    for bad, msg in (("zero", "must be a list"), ("[0, x]", "must be a list"), ([], "non-empty list"), ([0, -1], "non-negative"), ([0, 0], "repeats a seed"),
                     ([True], "non-negative integers"), (1, "must be a list")):
        with pytest.raises(ValueError, match=msg):
            check_seeds("seeds", bad)
    assert check_model_name("vlm", None) is None and check_model_name("vlm", "Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"
    with pytest.raises(ValueError, match="parameter 'vlm' must be None"):
        check_model_name("vlm", 7)
