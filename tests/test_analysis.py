import torch

from person_retrieval.analysis import attribute_oracle_r1, failure_causes
from person_retrieval.datasets import load_split
from person_retrieval.datasets.torch_data import RetrievalData
from person_retrieval.world import read_world_meta


def _data(root):
    split = load_split("cuhk_pedes", root, "test")
    return RetrievalData.from_split(split, lambda caps: torch.zeros(len(caps), 4, dtype=torch.long), (64, 32))


def test_perfect_similarity_has_no_failures(tiny_world):
    data = _data(tiny_world["cuhk_pedes"])
    perfect = (data.caption_pids.view(-1, 1) == data.image_pids.view(1, -1)).float()
    assert len(failure_causes(perfect, data, tiny_world["cuhk_pedes"])) == 0


def test_failure_causes_agree_with_the_world(tiny_world):
    root = tiny_world["cuhk_pedes"]
    data = _data(root)
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(len(data.captions), len(data.image_pids), generator=g)
    fails = failure_causes(sim, data, root)
    wrong = (data.image_pids[sim.argmax(1)] != data.caption_pids).sum().item()
    assert len(fails) == wrong > 0
    assert set(fails.cause) <= {"caption leaves out the telling detail", "look-alike", "model error"}
    meta = read_world_meta(root)
    people = meta["people"]
    by_path = {r["path"]: r for r in meta["images"]}
    for _, f in fails.head(5).iterrows():
        a = people[str(by_path[data.image_paths[f.true_image].split("imgs/")[1]]["person"])]
        b = people[str(by_path[data.image_paths[f.top1_image].split("imgs/")[1]]["person"])]
        diff = {s.strip() for s in f["differing slots"].split(",") if s.strip()}
        assert all(a[s] != b[s] for s in diff)
        if f.cause == "caption leaves out the telling detail":
            assert not diff & set(f.mentioned.split(", "))


def test_oracle_is_a_probability_and_beats_chance(tiny_world):
    data = _data(tiny_world["cuhk_pedes"])
    r1 = attribute_oracle_r1(data, tiny_world["cuhk_pedes"])
    chance = 100.0 * 3 / len(data.image_pids)  # about three images per person
    assert chance < r1 <= 100.0



def test_rerendering_reproduces_the_stored_images_and_only_changes_the_camera(tiny_world):
    from person_retrieval.analysis import rerendered

    root = tiny_world["cuhk_pedes"]
    data = _data(root)
    by_path = {r["path"]: r for r in read_world_meta(root)["images"]}
    res = torch.tensor([by_path[p.split("imgs/")[1]]["state"]["res_factor"] for p in data.image_paths])
    sharp = rerendered(data, root, 1)
    assert sharp.captions == data.captions and torch.equal(sharp.tokens, data.tokens)
    assert torch.equal(sharp.images[res == 1], data.images[res == 1])  # the world's own image, byte for byte
    coarse = rerendered(data, root, 4)
    assert torch.equal(coarse.images[res == 4], data.images[res == 4])

    def detail(x):  # energy of horizontal pixel differences
        return (x.float()[..., 1:] - x.float()[..., :-1]).abs().mean()

    assert detail(coarse.images) < 0.8 * detail(sharp.images)


def test_r1_by_resolution_has_a_row_per_camera(tiny_world):
    from person_retrieval.analysis import r1_by_resolution
    from person_retrieval.models import DualEncoder, build_backbone, split_data

    root = tiny_world["cuhk_pedes"]
    bb = build_backbone(None, "tiny")
    table = r1_by_resolution(DualEncoder(bb).eval(), split_data("cuhk_pedes", root, "test", bb), root)
    assert list(table.capture) == ["full", "half", "quarter"] and table.R1.between(0, 100).all()


def test_the_backbones_spread_summary_known_answer():
    """Mean, standard deviation (n - 1), lowest, highest and range of R1 over backbone seeds, per dataset and stage."""
    import pandas as pd

    from person_retrieval.papers.tpr import spread_summary

    runs = pd.DataFrame({"backbone_seed": [0, 1, 2, 0, 1, 2], "dataset": ["cuhk_pedes"] * 6,
                         "stage": ["zero-shot"] * 3 + ["IRRA"] * 3, "R1": [20.0, 22.0, 27.0, 50.0, 51.0, 52.0]})
    s = spread_summary(runs).set_index("stage")
    assert list(s.index) == ["zero-shot", "IRRA"]  # in the order the runs came
    assert s.loc["zero-shot", "mean"] == 23.0 and s.loc["zero-shot", "range"] == 7.0 and s.loc["zero-shot", "seeds"] == 3
    assert abs(s.loc["zero-shot", "std"] - (((3 ** 2 + 1 ** 2 + 4 ** 2) / 2) ** 0.5)) < 1e-12
    assert s.loc["IRRA", "lowest"] == 50.0 and s.loc["IRRA", "highest"] == 52.0 and s.loc["IRRA", "std"] == 1.0
