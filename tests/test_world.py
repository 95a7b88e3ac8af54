import re
from collections import Counter

import numpy as np
import pytest

from person_retrieval.config import rng_for
from person_retrieval.world import (
    OUTFIT_SLOTS, SLOT_VALUES, State, caption, coverage, dialogue, edit_person, render, sample_people,
    sample_state, visible_slots,
)
from person_retrieval.world.language import COLOR_WORDS, LEXICON, STYLES


@pytest.fixture(scope="module")
def people():
    return sample_people(rng_for(0, "test-people"), 3000)


def test_people_are_seeded(people):
    again = sample_people(rng_for(0, "test-people"), 3000)
    assert people == again
    assert people != sample_people(rng_for(1, "test-people"), 3000)


def test_outfit_has_at_least_eight_slots_with_valid_values(people):
    assert len(OUTFIT_SLOTS) >= 8
    for p in people[:200]:
        for s in OUTFIT_SLOTS:
            assert getattr(p, s) in SLOT_VALUES[s], s


def test_palette_is_skewed_so_look_alikes_are_common(people):
    c = Counter(p.upper_color for p in people)
    assert c.most_common(1)[0][0] == "black"
    assert c["black"] > 5 * c["purple"]
    outfits = Counter((p.gender, p.upper_type, p.upper_color, p.lower_type, p.lower_color) for p in people)
    # many people share their coarse outfit with someone else
    shared = sum(n for n in outfits.values() if n > 1)
    assert shared / len(people) > 0.3


def test_co_occurrence_rules(people):
    assert not any(p.gender == "man" and p.lower_type == "skirt" for p in people)
    shorts = [p for p in people if p.lower_type == "shorts"]
    assert all(p.shoes_type != "boots" for p in shorts)
    old = [p for p in people if p.age == "elderly"]
    young = [p for p in people if p.age == "young"]
    assert np.mean([p.hair_color == "gray" for p in old]) > 5 * np.mean([p.hair_color == "gray" for p in young])


def test_render_shape_determinism_and_aspect(people):
    s = sample_state(rng_for(0, "s"))
    a, b = render(people[0], s, 128), render(people[0], s, 128)
    assert a.shape == (128, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert render(people[0], s, 64).shape == (64, 32, 3)


def test_back_view_hides_the_face_and_shows_the_backpack(people):
    p = people[0].replace(bag="backpack", bag_color="yellow", upper_color="navy", accessory="glasses", hat="none")
    assert "accessory" in visible_slots(p, "front") and "accessory" not in visible_slots(p, "back")
    front = render(p, State(view="front"), 128).astype(int)
    back = render(p, State(view="back"), 128).astype(int)
    no_bag = render(p.replace(bag="none"), State(view="back"), 128).astype(int)
    torso = (slice(30, 55), slice(24, 40))
    assert np.abs(back[torso] - no_bag[torso]).mean() > 10  # the backpack covers the back
    face = (slice(13, 17), slice(26, 38))
    assert np.abs(front[face] - back[face]).mean() > 10  # face vs back of the head


def _high_freq(img):
    g = img.astype(float).mean(-1)
    return np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()


def test_low_camera_resolution_blurs(people):
    p = people[1]
    e = [_high_freq(render(p, State(res_factor=r), 128)) for r in (1, 2, 4)]
    assert e[0] > e[1] > e[2]


def test_camera_resolution_retakes_a_sharp_render_as_the_coarser_camera_would(people):
    from person_retrieval.world.render import camera_resolution

    p = people[1]
    sharp, coarse = render(p, State(res_factor=1), 128), render(p, State(res_factor=2), 128)
    again = np.clip(camera_resolution(sharp.astype(np.float32) / 255, 2), 0, 1) * 255
    assert np.abs(again - coarse.astype(np.float32)).mean() < 2.0  # only rounding and clipping differ
    assert np.array_equal(camera_resolution(sharp.astype(np.float32), 1), sharp.astype(np.float32))
    with pytest.raises(ValueError, match="must divide"):
        camera_resolution(sharp.astype(np.float32), 3)


def test_captions_mention_a_subset_and_name_what_they_mention(people):
    rng = rng_for(0, "cap")
    for style in STYLES:
        covs = []
        for p in people[:300]:
            s = sample_state(rng)
            text, slots = caption(p, s, style, rng)
            covs.append(coverage(slots, p, s.view))
            assert slots <= set(visible_slots(p, s.view)) | {"gender"}
            low = text.lower()
            if "upper_color" in slots:
                assert any(w in low for w in COLOR_WORDS[p.upper_color])
            if "bag" in slots:
                assert any(w in low for w in LEXICON["bag"][p.bag])
        assert 0.3 < np.mean(covs) < 0.95, style


def test_caption_styles_differ_in_length(people):
    rng = rng_for(0, "len")
    lengths = {st: np.mean([len(caption(p, sample_state(rng), st, rng)[0].split()) for p in people[:300]]) for st in STYLES}
    assert lengths["icfg_pedes"] > lengths["rstpreid"] > lengths["cuhk_pedes"] > 10


def test_dialogue_answers_are_grounded(people):
    rng = rng_for(0, "dlg")
    p = next(p for p in people if p.hat != "none")
    s = State(view="front")
    rounds = dialogue(p, s, rng, rounds=9)
    assert len(rounds) == 9 and all([q["from"], a["from"]] == ["gpt", "user"] for q, a in rounds)  # released: rounds of two turns
    qa = {q["value"]: a["value"] for q, a in rounds[1:]}
    hat_answers = [a for q, a in qa.items() if re.search(r"\b(hat|head)\b", q)]
    assert hat_answers and all(a.startswith("Yes") for a in hat_answers)
    no_hat = dialogue(p.replace(hat="none"), s, rng_for(0, "dlg"), rounds=9)
    assert any(a["value"].startswith("No, ") and "hat" in a["value"] for _, a in no_hat)


def test_edits_change_what_they_say(people):
    rng = rng_for(0, "edit")
    for p in people[:200]:
        q, text = edit_person(p, rng)
        changed = [s for s in OUTFIT_SLOTS if getattr(p, s) != getattr(q, s)]
        assert 1 <= len(changed) <= 3 and text.endswith(".")
        if "upper_color" in changed:
            assert q.upper_color in text
        assert q.pid == p.pid and q.gender == p.gender


def test_web_alt_text_names_a_few_things_and_nothing_it_does_not_show(people):
    from person_retrieval.world.language import GROUP_SLOTS, web_caption

    rng = rng_for(0, "web")
    covs, cuhk, lengths, named = [], [], [], []
    for p in people[:300]:
        s = sample_state(rng)
        text, slots = web_caption(p, s, rng)
        assert slots <= set(visible_slots(p, s.view)) | {"gender"} and "." not in text and text == text.lower()
        groups = {g for g, ss in GROUP_SLOTS.items() if set(ss) & slots}
        assert len(groups) <= 3
        named.append(len(groups))
        if "upper_color" in slots:
            assert any(w in text for w in COLOR_WORDS[p.upper_color])
        covs.append(coverage(slots, p, s.view))
        cuhk.append(coverage(caption(p, s, "cuhk_pedes", rng)[1], p, s.view))
        lengths.append(len(text.split()))
    assert np.mean(covs) < 0.6 * np.mean(cuhk) and np.mean(lengths) < 12
    assert np.mean(np.array(named) >= 1) > 0.8  # some name only who and where ("a woman in a park"), as web text does
