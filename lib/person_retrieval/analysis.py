"""Why retrieval fails: look-alike people, and captions that leave out the telling detail.

Only the world can answer this exactly, because it knows every person's attributes and which slots each
caption mentions (``world_meta.json``). For a query whose top-1 image shows someone else:

* **caption leaves out the telling detail**: the wrong person agrees with the true one on every slot
  the caption mentions, so no model could tell them apart from this text alone;
* **look-alike**: otherwise, but the two differ in at most ``alike`` outfit slots;
* **model error**: the caption names a slot on which they differ, and they are not close look-alikes.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .datasets.torch_data import RetrievalData
from .world import OUTFIT_SLOTS, read_world_meta

COMPARED = ["gender"] + OUTFIT_SLOTS


def _world_records(data: RetrievalData, world_root: str | Path) -> tuple[list[dict], list[dict]]:
    """The world's record (state, caption mentions) and person attributes behind each gallery image."""
    if data.image_paths is None:
        raise ValueError("needs RetrievalData with image_paths (build it with RetrievalData.from_split)")
    meta = read_world_meta(world_root)
    by_path = {rec["path"]: rec for rec in meta["images"]}
    base = Path(world_root) / "imgs"
    recs = [by_path[str(Path(p).relative_to(base))] for p in data.image_paths]
    return recs, [meta["people"][str(r["person"])] for r in recs]


def world_people(data: RetrievalData, world_root: str | Path) -> list[dict]:
    """The true attributes of the person in each gallery image (world datasets only)."""
    return _world_records(data, world_root)[1]


def failure_causes(sim: torch.Tensor, data: RetrievalData, world_root: str | Path, alike: int = 2) -> pd.DataFrame:
    """One row per failed query (top-1 shows another person), with the differing slots and the cause."""
    recs, people = _world_records(data, world_root)
    seen: dict[int, int] = {}
    rows = []
    top1 = sim.argmax(1)
    for j in range(len(data.captions)):
        i_true = int(data.caption_image_ids[j])
        k = seen.get(i_true, 0)
        seen[i_true] = k + 1
        i_top = int(top1[j])
        if int(data.image_pids[i_top]) == int(data.caption_pids[j]):
            continue
        a, b = people[i_true], people[i_top]
        diff = [s for s in COMPARED if a[s] != b[s]]
        mentioned = set(recs[i_true]["captions"][k]["slots"])
        if not (set(diff) & mentioned):
            cause = "caption leaves out the telling detail"
        elif len(diff) <= alike:
            cause = "look-alike"
        else:
            cause = "model error"
        rows.append({"query": j, "caption": data.captions[j], "true_image": i_true, "top1_image": i_top,
                     "differing slots": ", ".join(diff), "mentioned": ", ".join(sorted(mentioned)), "cause": cause})
    return pd.DataFrame(rows)


def attribute_oracle_r1(data: RetrievalData, world_root: str | Path) -> float:
    """Expected R1 (percent) of an oracle that reads every image's true attributes and ranks images by how
    many of the slots a caption mentions they match (ties broken at random). It is the ceiling that the
    captions' sparsity and the look-alikes leave to any text-to-image model on this split."""
    import numpy as np

    recs, people = _world_records(data, world_root)
    table = {s: np.array([p[s] for p in people]) for s in COMPARED}
    gpids = data.image_pids.numpy()
    seen: dict[int, int] = {}
    hits = []
    for j in range(len(data.captions)):
        i = int(data.caption_image_ids[j])
        k = seen.get(i, 0)
        seen[i] = k + 1
        slots = [s for s in recs[i]["captions"][k]["slots"] if s in table]
        score = sum((table[s] == people[i][s]).astype(int) for s in slots)
        top = score == score.max()
        hits.append((gpids[top] == int(data.caption_pids[j])).sum() / top.sum())
    return 100.0 * float(np.mean(hits))



def rerendered(data: RetrievalData, world_root: str | Path, res_factor: int) -> RetrievalData:
    """``data`` with every gallery image rendered again from its world record (same person, pose, view,
    scene, light and jitter), but taken by a camera ``res_factor`` times coarser (1: sharp), and stored as
    the world stores images (JPEG, quality 92). The queries do not change."""
    import io
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from .world import Person, State, render

    recs, people = _world_records(data, world_root)
    h = int(data.images.shape[-2])
    out = []
    for rec, person in zip(recs, people):
        st = State(**{**rec["state"], "cast": tuple(rec["state"]["cast"]), "res_factor": int(res_factor)})
        p = Person(**{**person, "shade": tuple(person["shade"])})
        buf = io.BytesIO()
        Image.fromarray(render(p, st, h)).save(buf, format="JPEG", quality=92)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    images = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    if tuple(images.shape[-2:]) != tuple(data.images.shape[-2:]):
        raise ValueError(f"re-rendered images are {tuple(images.shape[-2:])}, the split's are {tuple(data.images.shape[-2:])}")
    return replace(data, images=images)


RESOLUTIONS = {"full": 1, "half": 2, "quarter": 4}


def r1_by_resolution(model, data: RetrievalData, world_root: str | Path) -> pd.DataFrame:
    """Retrieval with the whole gallery re-rendered at each camera resolution (:func:`rerendered`): the
    same people, poses and captions, only the camera changes. A model that reads only coarse colours scores
    alike on all three; one that reads detail (stripes, logos, glasses, a watch) loses it on coarse ones."""
    from .models.retrieval import evaluate_retrieval

    rows = []
    for name, r in RESOLUTIONS.items():
        m = evaluate_retrieval(model, rerendered(data, world_root, r))
        rows.append({"capture": name, "res_factor": r, "R1": m["R1"], "mAP": m["mAP"]})
    return pd.DataFrame(rows)


def ranking_rows(sim: torch.Tensor, data: RetrievalData, queries, k: int = 5, label: str = "") -> list[dict]:
    """Rows for :func:`person_retrieval.viz.ranking_rows`: for each query (a caption index), the image it
    was written from, the top ``k`` gallery images of ``sim`` and which of them show the same person."""
    def im(i):
        return data.images[int(i)].permute(1, 2, 0).numpy()

    rows = []
    for j in queries:
        top = torch.topk(sim[j].float(), k).indices.tolist()
        rows.append({"label": f"{label} query {j}".strip(), "query": data.captions[j], "true": im(data.caption_image_ids[j]),
                     "ranked": [im(i) for i in top],
                     "correct": [bool(data.image_pids[i] == data.caption_pids[j]) for i in top]})
    return rows
