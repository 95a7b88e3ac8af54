import pytest

from person_retrieval.config import get_scale, rng_for


def test_scales_and_streams():
    assert get_scale("small").tpr["cuhk_pedes"].ids["test"] == 1000
    with pytest.raises(ValueError, match="scale must be one of"):
        get_scale("medium")
    a, b = rng_for(0, "x").random(3), rng_for(0, "x").random(3)
    assert (a == b).all() and not (a == rng_for(0, "y").random(3)).all()
