"""Build the world's datasets on disk, in the real formats, and cache them by scale and seed.

``world_dataset("cuhk_pedes", scale="small", seed=0)`` returns a folder that
:func:`person_retrieval.datasets.load_split` reads exactly as it reads a user's real CUHK-PEDES folder.
Each folder also holds ``world_meta.json`` (not part of the real format): the person and image state
behind every image and the slots each caption mentions, for analysis and for training recognizers.

Builds are atomic: everything is written to ``<folder>.partial`` and renamed at the end, so an
interrupted build is never mistaken for a finished one.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Scale, cache_dir, get_scale, rng_for
from ..datasets import formats
from .attributes import Person, sample_person
from .language import caption, coverage, dialogue, edit_person, relative_caption, tokenize
from .render import CameraProfile, State, render, sample_state

BUILD_VERSION = 4  # bump when the world changes, so caches are rebuilt
#: Datasets changed since: bumping one rebuilds it alone (and leaves the others, and what was trained on them).
DATASET_VERSIONS = {"itcpr": 5, "syncpr": 5, "chatpedes": 6}  # chatpedes 6: nested rounds, as released

ALL_SCENES = ("street", "campus", "mall", "park", "station", "parking")
#: Each dataset style is its own domain: different people, cameras, places and light.
PROFILES = {
    "cuhk_pedes": CameraProfile(scenes=ALL_SCENES, view_p=(0.45, 0.35, 0.20), res_p=(0.40, 0.35, 0.25)),
    "icfg_pedes": CameraProfile(scenes=("mall", "station", "campus", "street"), view_p=(0.4, 0.4, 0.2),
                                res_p=(0.70, 0.30, 0.0), brightness=(0.85, 1.15)),
    "rstpreid": CameraProfile(scenes=("street", "park", "parking", "campus"), view_p=(0.35, 0.35, 0.30),
                              res_p=(0.45, 0.40, 0.15), brightness=(0.6, 1.3), cast_sd=0.08),
    "syncpr": CameraProfile(scenes=ALL_SCENES, res_p=(0.8, 0.2, 0.0)),
    "itcpr": CameraProfile(scenes=ALL_SCENES, res_p=(0.5, 0.35, 0.15)),
}
RARE_BOOST = {"cuhk_pedes": 1.0, "icfg_pedes": 1.5, "rstpreid": 1.0, "syncpr": 2.0, "itcpr": 1.0, "chatpedes": 1.0}
FORMAT_NAMES = ("cuhk_pedes", "icfg_pedes", "rstpreid", "itcpr", "syncpr", "chatpedes")


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


class _Writer:
    """Renders images and records their provenance into ``world_meta.json``."""

    def __init__(self, root: Path, height: int):
        self.root, self.height = root, height
        self.people: dict[int, dict] = {}
        self.images: list[dict] = []

    def image(self, rel: str, person: Person, state: State, person_key: int, captions=(), split: str | None = None) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(person, state, self.height)).save(path, quality=92)
        self.people.setdefault(person_key, person.as_dict())
        rec = {"path": rel, "person": person_key, "state": state.as_dict(), "captions": list(captions)}
        if split is not None:
            rec["split"] = split
        self.images.append(rec)
        return rel

    def finish(self, dataset_root: Path, manifest: dict) -> None:
        """Write the provenance sidecar and the manifest (which marks the build complete) at the dataset root."""
        formats.write_json_atomic(dataset_root / "world_meta.json", {"people": self.people, "images": self.images})
        formats.write_json_atomic(dataset_root / "world.json", manifest)


def _caption_record(person, state, style, rng):
    text, slots = caption(person, state, style, rng)
    return text, {"text": text, "slots": sorted(slots), "coverage": coverage(slots, person, state.view)}


# ---------------------------------------------------------------------------------------------
def _build_tpr(style: str, root: Path, scale: Scale, seed: int, progress: bool) -> dict:
    fmt = formats.TPR_FORMATS[style]
    size = scale.tpr[style]
    w = _Writer(root / fmt.image_dir, scale.image_height)
    entries: list[dict] = []
    pid = 0
    lo, hi = size.images_per_id
    total = sum(size.ids.values())
    it = ((split, k) for split in fmt.splits for k in range(size.ids.get(split, 0)))
    for split, _ in _progress(it, total, f"world {style}", progress):
        rng = rng_for(seed, style, "person", pid)
        person = sample_person(rng, pid, RARE_BOOST[style])
        real_id = pid + 1 if style == "cuhk_pedes" else pid
        n = int(rng.integers(lo, hi + 1))
        for k in range(n):
            state = sample_state(rng, PROFILES[style])
            if style == "cuhk_pedes":
                rel = f"{split}_query/p{real_id}_s{k}.jpg"
            elif style == "icfg_pedes":
                rel = f"{split}/{real_id:04d}/{real_id:04d}_{k:03d}.jpg"
            else:
                rel = f"{real_id:04d}_c{int(rng.integers(1, 16))}_{k:04d}.jpg"
            caps = [_caption_record(person, state, style, rng) for _ in range(size.captions_per_image)]
            w.image(rel, person, state, pid, [c[1] for c in caps], split=split)
            e = {"id": real_id, fmt.path_key: rel, "captions": [c[0] for c in caps], "split": split}
            if style == "cuhk_pedes":
                e["processed_tokens"] = [tokenize(c[0]) for c in caps]
            entries.append(e)
        pid += 1
    formats.write_tpr_annotations(style, root, entries)
    return {"w": w, "counts": {"images": len(entries), "identities": pid}}


def _build_syncpr(root: Path, scale: Scale, seed: int, progress: bool) -> dict:
    """The world's own triplets, SynCPR-shaped: per quadruple (a person in two outfits) two renders of each
    state, each a triplet both ways (reference -> target and back); ``cpr_id`` groups one direction's
    triplets, whose targets all show the person in the same outfit. What a perfect generator would give."""
    w = _Writer(root, scale.image_height)
    triplets = []
    nq = scale.cpr_train_triplets // 4
    for i in _progress(range(nq), nq, "world syncpr", progress):
        rng = rng_for(seed, "syncpr", i)
        ref = sample_person(rng, i, RARE_BOOST["syncpr"])
        tgt, _ = edit_person(ref, rng)
        fwd, rev = relative_caption(ref, tgt, rng), relative_caption(tgt, ref, rng)
        for k in range(2):
            s_ref, s_tgt = sample_state(rng, PROFILES["syncpr"]), sample_state(rng, PROFILES["syncpr"])
            rc, rrec = _caption_record(ref, s_ref, "cuhk_pedes", rng)
            tc, trec = _caption_record(tgt, s_tgt, "cuhk_pedes", rng)
            a = w.image(f"images/{i:06d}_{k}_ref.jpg", ref, s_ref, 2 * i, [rrec])
            b = w.image(f"images/{i:06d}_{k}_tgt.jpg", tgt, s_tgt, 2 * i + 1, [trec])
            triplets.append({"reference_caption": rc, "target_caption": tc, "reference_image_path": a,
                             "target_image_path": b, "edit_caption": fwd, "cpr_id": 2 * i + 1})
            triplets.append({"reference_caption": tc, "target_caption": rc, "reference_image_path": b,
                             "target_image_path": a, "edit_caption": rev, "cpr_id": 2 * i + 2})
    formats.write_syncpr(root, triplets)
    return {"w": w, "counts": {"triplets": len(triplets), "quadruples": nq}}


#: ITCPR: 2,225 ground truths for 2,202 queries: about one query in 96 has a second one.
TWO_TRUTHS_EVERY = 96


def _build_itcpr(root: Path, scale: Scale, seed: int, progress: bool) -> dict:
    """Queries: a reference image and a relative caption; the ground truth is the same person after the
    edit (for one query in :data:`TWO_TRUTHS_EVERY`, two images of it). The gallery also holds that person in
    the original outfit (a hard distractor: the same person, but not the target, is a miss) and others.
    Ids count from 1, as in the release."""
    w = _Writer(root, scale.image_height)
    prof = PROFILES["itcpr"]
    queries, gallery = [], []
    nq = scale.cpr_queries
    for i in _progress(range(nq), nq, "world itcpr", progress):
        rng = rng_for(seed, "itcpr", "query", i)
        ref = sample_person(rng, i, RARE_BOOST["itcpr"])
        tgt, _ = edit_person(ref, rng)
        edit = relative_caption(ref, tgt, rng)
        pid = iid = i + 1
        q = w.image(f"query/{pid:05d}.jpg", ref, sample_state(rng, prof), 2 * i)
        queries.append({"file_path": q, "datasets": "world", "person_id": pid, "instance_id": iid, "caption": edit})
        for k in range(2 if i % TWO_TRUTHS_EVERY == 0 else 1):
            t = w.image(f"gallery/{pid:05d}_target{k}.jpg", tgt, sample_state(rng, prof), 2 * i + 1)
            gallery.append({"file_path": t, "datasets": "world", "person_id": pid, "instance_id": iid})
        d = w.image(f"gallery/{pid:05d}_orig.jpg", ref, sample_state(rng, prof), 2 * i)
        gallery.append({"file_path": d, "datasets": "world", "person_id": pid, "instance_id": -1})
    n_extra = max(0, scale.cpr_gallery - len(gallery))
    for j in _progress(range(n_extra), n_extra, "world itcpr distractors", progress):
        rng = rng_for(seed, "itcpr", "distractor", j)
        pid = nq + j + 1
        p = sample_person(rng, pid, RARE_BOOST["itcpr"])
        g = w.image(f"gallery/d{j:06d}.jpg", p, sample_state(rng, prof), 2 * nq + j)
        gallery.append({"file_path": g, "datasets": "world", "person_id": pid, "instance_id": -1})
    formats.write_itcpr(root, queries, gallery)
    return {"w": w, "counts": {"queries": len(queries), "gallery": len(gallery),
                               "ground_truths": sum(g["instance_id"] > 0 for g in gallery)}}


def _build_chatpedes(root: Path, scale: Scale, seed: int, progress: bool) -> dict:
    """Two dialogues per image, as ChatPedes pairs a Llama-3 and an InternVL dialogue with each image;
    ours differ in the style of the opening description."""
    w = _Writer(root / "imgs", scale.image_height)
    counts = {}
    pid = 0
    for split in ("train", "test"):
        entries = []
        n_ids = scale.chat_ids.get(split, 0)
        for _ in _progress(range(n_ids), n_ids, f"world chatpedes {split}", progress):
            rng = rng_for(seed, "chatpedes", "person", pid)
            person = sample_person(rng, pid, RARE_BOOST["chatpedes"])
            for k in range(int(rng.integers(2, 4))):
                state = sample_state(rng, PROFILES["cuhk_pedes"])
                chats = [dialogue(person, state, rng, scale.chat_rounds, style) for style in ("cuhk_pedes", "rstpreid")]
                rel = w.image(f"{split}/p{pid + 1}_s{k}.jpg", person, state, pid, split=split)
                entries.append({"id": pid + 1, "file_path": rel, "chats": chats})
            pid += 1
        formats.write_chatpedes(root, split, entries)
        counts[split] = len(entries)
    return {"w": w, "counts": counts}


_BUILDERS = {"syncpr": _build_syncpr, "itcpr": _build_itcpr, "chatpedes": _build_chatpedes}


def build_dataset(name: str, root: str | Path, scale: str | Scale = "small", seed: int = 0, progress: bool = True) -> Path:
    """Write world dataset ``name`` (one of :data:`FORMAT_NAMES`) to ``root`` (replaced if present)."""
    if name not in FORMAT_NAMES:
        raise ValueError(f"unknown world dataset {name!r}; expected one of {FORMAT_NAMES}")
    sc = get_scale(scale)
    if sc.name == "paper":
        raise ValueError("the mini world has no 'paper' scale: use real data through data_root")
    root = Path(root)
    part = root.with_name(root.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    if name in formats.TPR_FORMATS:
        res = _build_tpr(name, part, sc, seed, progress)
    else:
        res = _BUILDERS[name](part, sc, seed, progress)
    manifest = {"dataset": name, "scale": sc.name, "seed": seed, "version": DATASET_VERSIONS.get(name, BUILD_VERSION),
                "image_size": [sc.image_height, sc.image_height // 2], "counts": res["counts"],
                "config": json.loads(json.dumps(asdict(sc), default=str))}
    res["w"].finish(part, manifest)
    shutil.rmtree(root, ignore_errors=True)
    part.rename(root)
    return root


def world_dataset(name: str, scale: str | Scale = "small", seed: int = 0, progress: bool = True) -> Path:
    """The cached world dataset folder for ``(name, scale, seed)``, built on the spot when missing or stale."""
    sc = get_scale(scale)
    root = cache_dir() / "world" / f"{sc.name}-seed{seed}" / name
    man = root / "world.json"
    if man.is_file():
        try:
            m = json.loads(man.read_text())
            if m.get("version") == DATASET_VERSIONS.get(name, BUILD_VERSION) and m.get("seed") == seed and m.get("scale") == sc.name:
                return root
        except json.JSONDecodeError:
            pass
    return build_dataset(name, root, sc, seed, progress)


def read_world_meta(root: str | Path) -> dict:
    """The provenance sidecar of a world dataset (people, image states, caption mentions)."""
    p = Path(root) / "world_meta.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: world_meta.json exists only in folders the mini world wrote")
    return json.loads(p.read_text())


def caption_coverage(root: str | Path, split: str | None = None) -> float:
    """Mean fraction of visible slots mentioned per caption, over a world TPR dataset (or one split)."""
    meta = read_world_meta(root)
    cov = [c["coverage"] for im in meta["images"] if split is None or im.get("split") == split for c in im["captions"]]
    return float(np.mean(cov)) if cov else float("nan")


def dataset_root(name: str, data_root: str | Path | None = None, scale: str = "small", seed: int = 0,
                 progress: bool = True) -> Path:
    """The folder of dataset ``name``: ``data_root/<real folder name>`` when ``data_root`` is given
    (e.g. ``data_root/CUHK-PEDES``), else the mini world's folder for ``(scale, seed)``, built if missing."""
    if name not in formats.REAL_FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(formats.REAL_FOLDERS)}")
    if data_root is not None:
        p = Path(data_root) / formats.REAL_FOLDERS[name]
        if not p.is_dir():
            raise formats.DatasetFormatError(f"{p}: folder not found; put the {formats.REAL_FOLDERS[name]} dataset there (data_root={data_root})")
        return p
    return world_dataset(name, scale, seed, progress)
