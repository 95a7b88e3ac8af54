import json
import shutil

import pytest

from person_retrieval.datasets import (
    DatasetFormatError, load_split, read_chatpedes, read_itcpr, read_syncpr, read_tpr_annotations, split_statistics,
    write_tpr_annotations,
)
from person_retrieval.world import caption_coverage, world_dataset


@pytest.mark.parametrize("name, splits", [("cuhk_pedes", ("train", "val", "test")), ("icfg_pedes", ("train", "test")),
                                          ("rstpreid", ("train", "val", "test"))])
def test_world_tpr_folders_read_back(tiny_world, name, splits):
    pids = {}
    for sp in splits:
        s = load_split(name, tiny_world[name], sp)
        assert len(s.captions) == len(s.caption_pids) == len(s.caption_image_ids)
        assert all(s.caption_pids[j] == s.image_pids[s.caption_image_ids[j]] for j in range(len(s.captions)))
        pids[sp] = set(s.image_pids)
    assert not pids["train"] & pids["test"]  # identities do not cross splits
    assert 0 < caption_coverage(tiny_world[name]) < 1


def test_real_field_names(tiny_world):
    cuhk = json.loads((tiny_world["cuhk_pedes"] / "reid_raw.json").read_text())
    assert set(cuhk[0]) == {"split", "captions", "file_path", "processed_tokens", "id"}
    assert min(e["id"] for e in cuhk) == 1
    rstp = json.loads((tiny_world["rstpreid"] / "data_captions.json").read_text())
    assert set(rstp[0]) == {"id", "img_path", "captions", "split"}
    icfg = json.loads((tiny_world["icfg_pedes"] / "ICFG-PEDES.json").read_text())
    assert {e["split"] for e in icfg} == {"train", "test"}
    it = read_itcpr(tiny_world["itcpr"])
    assert set(it.queries[0]) == {"file_path", "datasets", "person_id", "instance_id", "caption"}
    assert any(g["instance_id"] == -1 for g in it.gallery)
    syn = read_syncpr(tiny_world["syncpr"])
    assert set(syn[0]) == {"reference_caption", "target_caption", "reference_image_path", "target_image_path", "edit_caption", "cpr_id"}
    chat = read_chatpedes(tiny_world["chatpedes"], "test")
    assert len(chat[0]["chats"]) == 2 and [t["from"] for t in chat[0]["chats"][0][0]] == ["gpt", "user"]  # dialogues of rounds


def test_cuhk_pids_follow_irra(tiny_world):
    raw = json.loads((tiny_world["cuhk_pedes"] / "reid_raw.json").read_text())
    s = load_split("cuhk_pedes", tiny_world["cuhk_pedes"], "train")
    assert s.image_pids[0] == raw[0]["id"] - 1


def test_world_cache_is_reused_and_deterministic(tiny_world, tmp_path):
    again = world_dataset("rstpreid", "tiny", seed=0, progress=False)
    assert again == tiny_world["rstpreid"]
    from person_retrieval.world import build_dataset

    other = build_dataset("rstpreid", tmp_path / "r", "tiny", seed=0, progress=False)
    a = (tiny_world["rstpreid"] / "data_captions.json").read_text()
    assert (other / "data_captions.json").read_text() == a
    assert (other / "imgs" / json.loads(a)[0]["img_path"]).read_bytes() == \
        (tiny_world["rstpreid"] / "imgs" / json.loads(a)[0]["img_path"]).read_bytes()


# --- hand-written fixtures in the real formats ------------------------------------------------
@pytest.fixture
def cuhk_fixture(tmp_path):
    root = tmp_path / "CUHK-PEDES"
    (root / "imgs" / "CUHK01").mkdir(parents=True)
    for n in ("a.png", "b.png", "c.png"):
        (root / "imgs" / "CUHK01" / n).write_bytes(b"")
    entries = [
        {"split": "test", "captions": ["A man in a red coat.", "Red coat, black shoes."], "file_path": "CUHK01/a.png",
         "processed_tokens": [["a", "man", "in", "a", "red", "coat"], ["red", "coat", "black", "shoes"]], "id": 5},
        {"split": "test", "captions": ["A woman with a bag."], "file_path": "CUHK01/b.png",
         "processed_tokens": [["a", "woman", "with", "a", "bag"]], "id": 6},
        {"split": "train", "captions": ["Someone."], "file_path": "CUHK01/c.png", "processed_tokens": [["someone"]], "id": 1},
    ]
    write_tpr_annotations("cuhk_pedes", root, entries)
    return root, entries


def test_fixture_known_statistics(cuhk_fixture):
    root, _ = cuhk_fixture
    s = load_split("cuhk_pedes", root, "test")
    assert s.image_pids == [4, 5] and s.caption_pids == [4, 4, 5] and s.caption_image_ids == [0, 0, 1]
    st = split_statistics(s)
    assert st["identities"] == 2 and st["images"] == 2 and st["captions"] == 3
    assert st["mean caption length"] == pytest.approx((6 + 4 + 5) / 3)
    assert st["vocabulary"] == len({"a", "man", "in", "red", "coat", "black", "shoes", "woman", "with", "bag"})


def test_cuhk_pedes_without_processed_tokens_reads(cuhk_fixture):
    """IRRA's loader reads split, captions, file_path and id only; a file without processed_tokens is valid."""
    root, entries = cuhk_fixture
    write_tpr_annotations("cuhk_pedes", root, [{k: v for k, v in e.items() if k != "processed_tokens"} for e in entries])
    s = load_split("cuhk_pedes", root, "test")
    assert s.captions == ["A man in a red coat.", "Red coat, black shoes.", "A woman with a bag."] and s.image_pids == [4, 5]
    write_tpr_annotations("cuhk_pedes", root, [{k: v for k, v in e.items() if k != "captions"} for e in entries])
    with pytest.raises(DatasetFormatError, match="reid_raw.json.*captions"):
        load_split("cuhk_pedes", root, "test")


def test_round_trip(cuhk_fixture):
    root, entries = cuhk_fixture
    assert read_tpr_annotations("cuhk_pedes", root) == entries


def test_truncated_file_names_the_file(cuhk_fixture):
    root, _ = cuhk_fixture
    p = root / "reid_raw.json"
    p.write_text(p.read_text()[:-40])
    with pytest.raises(DatasetFormatError, match=r"reid_raw.json: not valid JSON .*truncated"):
        load_split("cuhk_pedes", root, "test")


def test_missing_field_names_entry_and_field(cuhk_fixture):
    root, entries = cuhk_fixture
    del entries[1]["file_path"]
    write_tpr_annotations("cuhk_pedes", root, entries)
    with pytest.raises(DatasetFormatError, match=r"entry 1 has no field 'file_path'"):
        load_split("cuhk_pedes", root, "test")


def test_wrong_type_and_bad_split_value(cuhk_fixture):
    root, entries = cuhk_fixture
    entries[0]["id"] = "5"
    write_tpr_annotations("cuhk_pedes", root, entries)
    with pytest.raises(DatasetFormatError, match=r"entry 0 field 'id' is '5'; expected int"):
        load_split("cuhk_pedes", root, "test")
    entries[0]["id"] = 5
    entries[2]["split"] = "testing"
    write_tpr_annotations("cuhk_pedes", root, entries)
    with pytest.raises(DatasetFormatError, match=r"entry 2 has split 'testing'"):
        load_split("cuhk_pedes", root, "test")


def test_missing_image_names_entry(cuhk_fixture):
    root, _ = cuhk_fixture
    (root / "imgs" / "CUHK01" / "b.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"entry 1 names image 'CUHK01/b.png'"):
        load_split("cuhk_pedes", root, "test")


def test_unknown_split_and_dataset(tmp_path):
    with pytest.raises(ValueError, match="ICFG-PEDES has no validation split"):
        load_split("icfg_pedes", tmp_path, "val")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split("rstpreid", tmp_path, "dev")
    with pytest.raises(ValueError, match="unknown dataset 'market'"):
        load_split("market", tmp_path, "test")


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="dataset folder not found"):
        load_split("rstpreid", tmp_path / "nope", "test")
    with pytest.raises(DatasetFormatError, match="data_captions.json: file not found"):
        load_split("rstpreid", tmp_path, "test")


def test_itcpr_errors(tiny_world, tmp_path):
    root = tmp_path / "itcpr"
    shutil.copytree(tiny_world["itcpr"], root)
    q = json.loads((root / "query.json").read_text())
    q[3]["instance_id"] = 10**6
    (root / "query.json").write_text(json.dumps(q))
    with pytest.raises(DatasetFormatError, match="entry 3 .* has no ground truth"):
        read_itcpr(root)
    del q[3]["caption"]
    (root / "query.json").write_text(json.dumps(q))
    with pytest.raises(DatasetFormatError, match="entry 3 has no field 'caption'"):
        read_itcpr(root)


def test_chatpedes_turn_order_is_checked(tiny_world, tmp_path):
    root = tmp_path / "chat"
    shutil.copytree(tiny_world["chatpedes"], root)
    d = json.loads((root / "test_reid.json").read_text())
    d[2]["chats"][1][3][1]["from"] = "gpt"
    (root / "test_reid.json").write_text(json.dumps(d))
    with pytest.raises(DatasetFormatError, match=r"test_reid.json: entry 2 dialogue 1 round 3 turn 1 .* expected \{'from': 'user'"):
        read_chatpedes(root, "test")


def test_chatpedes_rounds_as_released_and_single_dialogue_entries(tiny_world, tmp_path):
    """The release nests turns in rounds; an entry whose chats is one dialogue (a list of rounds) reads as one."""
    root = tmp_path / "chat"
    shutil.copytree(tiny_world["chatpedes"], root)
    d = json.loads((root / "test_reid.json").read_text())
    first = d[0]["chats"][0]
    d[0]["chats"] = first  # a single dialogue
    (root / "test_reid.json").write_text(json.dumps(d))
    got = read_chatpedes(root, "test")
    assert got[0]["chats"] == [first] and len(got[1]["chats"]) == 2
    flat = [t for rnd in first for t in rnd]  # the old flat list of turns is not the released format
    d[0]["chats"] = [flat]
    (root / "test_reid.json").write_text(json.dumps(d))
    with pytest.raises(DatasetFormatError, match="entry 0 dialogue 0 round 0 is .*expected a list of two turns"):
        read_chatpedes(root, "test")


def test_syncpr_missing_image(tiny_world, tmp_path):
    root = tmp_path / "syn"
    shutil.copytree(tiny_world["syncpr"], root)
    first = read_syncpr(root)[0]
    (root / first["target_image_path"]).unlink()
    with pytest.raises(DatasetFormatError, match="entry 0 names image"):
        read_syncpr(root)


def test_decoded_images_are_reused_until_a_file_changes(tiny_world):
    import os

    import torch

    from person_retrieval.datasets.torch_data import load_images

    split = load_split("rstpreid", tiny_world["rstpreid"], "test")
    paths = split.image_paths[:4]
    a = load_images(paths, (64, 32))
    assert load_images(paths, (64, 32)) is a  # decoded once
    assert load_images(paths, (32, 16)) is not a and load_images(paths, (32, 16)).shape[-2:] == (32, 16)
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the file "changed": decoded again
    b = load_images(paths, (64, 32))
    assert b is not a and torch.equal(b, a)


# --- validate: what every notebook's first cell runs on data_root -------------------------------
def test_validate_reads_every_world_dataset(tiny_world):
    from person_retrieval.datasets import validate

    for name, root in tiny_world.items():
        counts = validate(name, root)
        assert counts and all(n > 0 for n in counts.values()), (name, counts)
    assert set(validate("chatpedes", tiny_world["chatpedes"])) == {"train_reid.json", "test_reid.json"}


@pytest.mark.parametrize("name, file", [("cuhk_pedes", "reid_raw.json"), ("itcpr", "gallery.json"), ("syncpr", "SynCPR.json"),
                                        ("chatpedes", "test_reid.json")])
def test_validate_names_a_truncated_file_and_the_cause(tiny_world, tmp_path, name, file):
    from person_retrieval.datasets import validate

    root = tmp_path / name
    shutil.copytree(tiny_world[name], root, ignore=shutil.ignore_patterns("*.png", "*.jpg"))  # images are not opened
    text = (root / file).read_text()
    (root / file).write_text(text[: len(text) // 2])  # cut mid-file
    with pytest.raises(DatasetFormatError, match=rf"{root / file}: not valid JSON \(.* at line \d+, column \d+\); the file may be truncated"):
        validate(name, root)


def test_validate_names_the_entry_and_the_field(tiny_world, tmp_path):
    from person_retrieval.datasets import validate

    root = tmp_path / "chat"
    shutil.copytree(tiny_world["chatpedes"], root, ignore=shutil.ignore_patterns("*.png", "*.jpg"))
    entries = json.loads((root / "train_reid.json").read_text())
    del entries[3]["file_path"]
    (root / "train_reid.json").write_text(json.dumps(entries))
    with pytest.raises(DatasetFormatError, match=r"train_reid.json: entry 3 has no field 'file_path'"):
        validate("chatpedes", root)
    (root / "train_reid.json").unlink()  # a test-only copy is enough
    assert list(validate("chatpedes", root)) == ["test_reid.json"]
    (root / "test_reid.json").unlink()
    with pytest.raises(DatasetFormatError, match="neither train_reid.json nor test_reid.json is here"):
        validate("chatpedes", root)
    with pytest.raises(ValueError, match="unknown dataset 'market'"):
        validate("market", root)


def test_random_crop_with_padding_keeps_the_shape_and_moves_content_by_at_most_the_padding():
    import torch

    from person_retrieval.datasets.torch_data import random_crop_with_padding

    pad, n = 3, 400
    img = torch.zeros((n, 3, 16, 8), dtype=torch.uint8)
    img[:, :, 7, 4] = 255  # one bright pixel, more than ``pad`` from every border
    torch.manual_seed(0)
    out = random_crop_with_padding(img, pad)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert torch.equal(img[:, :, 7, 4], torch.full((n, 3), 255, dtype=torch.uint8))  # the input is left alone
    where = out[:, 0].flatten(1).argmax(1)
    assert torch.equal((out == 255).flatten(1).sum(1), torch.full((n,), 3))  # the pixel stays, once, in every channel
    dy, dx = where // 8 - 7, where % 8 - 4
    assert dy.abs().max() == pad and dx.abs().max() == pad  # every shift up to the padding, never beyond
    assert set(dy.tolist()) == set(range(-pad, pad + 1)) and set(dx.tolist()) == set(range(-pad, pad + 1))
    flat = random_crop_with_padding(torch.full((n, 3, 16, 8), 9, dtype=torch.uint8), pad)
    inside = flat[:, 0] == 9  # what the crop shows of the image is a rectangle; the rest is the zero padding
    rows, cols = inside.any(2).sum(1), inside.any(1).sum(1)
    assert torch.equal(inside.sum((1, 2)), rows * cols) and rows.min() >= 16 - pad and cols.min() >= 8 - pad
    assert set(flat.unique().tolist()) == {0, 9}
    assert random_crop_with_padding(img, 0) is img


def test_random_erasing_changes_one_rectangle_within_the_bounds_and_leaves_the_rest():
    import torch

    from person_retrieval.datasets.torch_data import random_erasing

    h, w, n, scale, ratio = 32, 16, 300, (0.02, 0.4), (0.3, 3.3)
    img = torch.full((n, 3, h, w), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    out = random_erasing(img, 1.0, scale, ratio, value=(1, 2, 3))
    assert out.shape == img.shape and torch.equal(img, torch.full_like(img, 100))  # a new tensor
    changed = out[:, 0] != 100
    assert torch.equal(changed, out[:, 1] != 100) and torch.equal(changed, out[:, 2] != 100)
    assert (out[:, 0][changed] == 1).all() and (out[:, 1][changed] == 2).all() and (out[:, 2][changed] == 3).all()
    erased = changed.any(2).any(1)
    assert erased.float().mean() > 0.95  # an image whose ten tries all miss stays as it is (torchvision's rule)
    for m in changed[erased]:
        eh, ew = int(m.any(1).sum()), int(m.any(0).sum())
        r, c = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        assert int(m.sum()) == eh * ew and r[-1] - r[0] + 1 == eh and c[-1] - c[0] + 1 == ew  # one whole rectangle
        assert eh < h and ew < w  # strictly inside the image, as torchvision's tries require
        slack = (eh + ew) / 2 + 0.25  # h and w are rounded from the drawn area and aspect ratio
        assert scale[0] * h * w - slack <= eh * ew <= scale[1] * h * w + slack
        assert (eh - 0.5) / (ew + 0.5) <= ratio[1] and (eh + 0.5) / (ew - 0.5) >= ratio[0]
    assert torch.equal(random_erasing(img, 0.0, scale, ratio, value=0), img)  # probability 0: unchanged
    never = random_erasing(torch.zeros((5, 3, 10, 10)), 1.0, (0.99, 0.99), (1.0, 1.0), value=7.0)
    assert (never == 0).all()  # a 10 x 10 box never fits strictly inside a 10 x 10 image
    with pytest.raises(ValueError, match="one per channel"):
        random_erasing(img, 1.0, value=(1, 2))


def test_random_erasing_draws_areas_as_torchvision_does():
    import torch
    from torchvision.transforms import RandomErasing

    from person_retrieval.datasets.torch_data import random_erasing

    n, h, w = 3000, 128, 64
    torch.manual_seed(0)
    ours = (random_erasing(torch.zeros((n, 1, h, w)), 0.5, (0.02, 0.4), (0.3, 3.3), value=1.0) == 1).float().mean((1, 2, 3))
    tv = RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=1.0)
    theirs = torch.stack([(tv(torch.zeros((1, h, w))) == 1).float().mean() for _ in range(n)])
    assert abs(float((ours > 0).float().mean() - (theirs > 0).float().mean())) < 0.04  # p, and the tries that miss
    assert abs(float(ours.mean() - theirs.mean())) < 0.01  # the erased share of the image


def test_batch_augmentations_are_deterministic_under_the_global_seed():
    import torch

    from person_retrieval.datasets.torch_data import random_crop_with_padding, random_erasing

    img = torch.randint(0, 256, (16, 3, 24, 12), dtype=torch.uint8)

    def run(seed):
        torch.manual_seed(seed)
        return random_erasing(random_crop_with_padding(img, 2), 0.5, value=(0, 0, 0))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = run(0)
    torch.set_rng_state(state)  # a resumed run: the same state gives the same draws
    b = random_erasing(random_crop_with_padding(img, 2), 0.5, value=(0, 0, 0))
    assert torch.equal(a, b)
