"""Readers and writers of the public datasets' on-disk formats, with their field names as released.

| dataset    | annotation file                    | image folder | fields |
|------------|------------------------------------|--------------|--------|
| CUHK-PEDES | ``reid_raw.json``                  | ``imgs/``    | split, captions, file_path, id (from 1); processed_tokens (not read) |
| ICFG-PEDES | ``ICFG-PEDES.json``                | ``imgs/``    | split (train/test), captions, file_path, id |
| RSTPReid   | ``data_captions.json``             | ``imgs/``    | split (train/val/test), captions, img_path, id |
| ITCPR      | ``query.json``, ``gallery.json``   | root         | file_path, datasets, person_id, instance_id, caption (query only) |
| SynCPR     | ``SynCPR.json``                    | root         | reference_caption, target_caption, reference_image_path, target_image_path, edit_caption, cpr_id |
| ChatPedes  | ``train_reid.json``/``test_reid.json`` | ``imgs/`` | id, file_path, chats (dialogues of rounds [{"from": "gpt", ...}, {"from": "user", ...}]) |

Every reader validates the whole file before returning anything: a malformed or truncated file, a
missing field, an unknown split or a missing image raises :class:`DatasetFormatError` naming the file,
the entry and what was expected.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "DatasetFormatError", "TPRSplit", "TPR_FORMATS", "load_split", "read_tpr_annotations", "write_tpr_annotations",
    "read_itcpr", "write_itcpr", "read_syncpr", "write_syncpr", "read_chatpedes", "write_chatpedes",
    "split_statistics", "write_json_atomic", "validate", "validate_annotations",
]


class DatasetFormatError(ValueError):
    """An annotation file or dataset folder does not match its documented format."""


@dataclass(frozen=True)
class TPRFormat:
    title: str
    annotation: str
    path_key: str
    splits: tuple[str, ...]
    image_dir: str = "imgs"
    pid_offset: int = 0  # IRRA subtracts 1 from CUHK-PEDES ids
    required: tuple[str, ...] = ("id", "captions", "split")


TPR_FORMATS: dict[str, TPRFormat] = {
    # The release also carries processed_tokens; IRRA's loader never reads it, so neither do we (a file
    # without it is accepted, and the world writes it).
    "cuhk_pedes": TPRFormat("CUHK-PEDES", "reid_raw.json", "file_path", ("train", "val", "test"), pid_offset=-1),
    "icfg_pedes": TPRFormat("ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test")),
    "rstpreid": TPRFormat("RSTPReid", "data_captions.json", "img_path", ("train", "val", "test")),
}


# ---------------------------------------------------------------------------------------------
def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# What :func:`validate` parsed, kept for the next reader of the same unchanged file (and handed over once,
# so nothing shared is ever mutated twice): a notebook's first cell validates, its next cells read, and
# each file is parsed once.
_PARSED: dict[Path, tuple[tuple, list]] = {}
_KEEP = False


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_json_list(path: Path, what: str, expected: str) -> list:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found; expected the {what} annotation file ({expected})")
    key = path.resolve()
    kept = _PARSED.pop(key, None)
    if kept is not None and kept[0] == _file_key(path):
        if _KEEP:  # validated again: keep it for the reader still
            _PARSED[key] = kept
        return kept[1]
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file may be truncated "
            f"or corrupted. Expected a JSON list of {expected}"
        ) from None
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of {expected}, found a {type(data).__name__}")
    if _KEEP:
        _PARSED[key] = (_file_key(path), data)
    return data


def _check_entry(path: Path, i: int, entry: Any, fields: dict[str, type | tuple]) -> None:
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{path}: entry {i} is a {type(entry).__name__}; expected an object with fields {sorted(fields)}")
    for name, typ in fields.items():
        if name not in entry:
            raise DatasetFormatError(f"{path}: entry {i} has no field {name!r}; expected fields {sorted(fields)} (found {sorted(entry)})")
        if not isinstance(entry[name], typ) or (typ is int and isinstance(entry[name], bool)):
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise DatasetFormatError(f"{path}: entry {i} field {name!r} is {entry[name]!r}; expected {want}")


def _check_captions(path: Path, i: int, caps: list) -> None:
    if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise DatasetFormatError(f"{path}: entry {i} field 'captions' must be a non-empty list of non-empty strings")


# ---------------------------------------------------------------------------------------------
@dataclass
class TPRSplit:
    """One split of a text-based person retrieval dataset, with IRRA's field names.

    ``caption_image_ids[j]`` is the index in ``image_paths`` of the image caption ``j`` describes.
    Person ids are as the dataset stores them (CUHK-PEDES: minus 1, as IRRA does).
    """

    name: str
    root: Path
    split: str
    image_paths: list[str] = field(default_factory=list)
    image_pids: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_pids: list[int] = field(default_factory=list)
    caption_image_ids: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"TPRSplit({self.name}/{self.split}: {len(set(self.image_pids))} identities, "
                f"{len(self.image_paths)} images, {len(self.captions)} captions)")


def read_tpr_annotations(name: str, root: str | Path) -> list[dict]:
    """The validated annotation list of a TPR dataset folder (all splits)."""
    if name not in TPR_FORMATS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(TPR_FORMATS)}")
    fmt = TPR_FORMATS[name]
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: dataset folder not found; expected a {fmt.title} folder holding {fmt.annotation} and {fmt.image_dir}/")
    path = root / fmt.annotation
    data = _read_json_list(path, fmt.title, f"objects with fields {sorted(set(fmt.required) | {fmt.path_key})}")
    spec: dict = {k: {"id": int, "captions": list, "split": str, "processed_tokens": list}[k] for k in fmt.required}
    spec[fmt.path_key] = str
    for i, e in enumerate(data):
        _check_entry(path, i, e, spec)
        _check_captions(path, i, e["captions"])
        if e["split"] not in fmt.splits:
            raise DatasetFormatError(f"{path}: entry {i} has split {e['split']!r}; {fmt.title} splits are {list(fmt.splits)}")
    return data


def load_split(name: str, root: str | Path, split: str, check_images: bool = True) -> TPRSplit:
    """Read one split of ``cuhk_pedes``, ``icfg_pedes`` or ``rstpreid`` from the dataset's own folder."""
    if name not in TPR_FORMATS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(TPR_FORMATS)}")
    fmt = TPR_FORMATS[name]
    if split not in fmt.splits:
        extra = " (ICFG-PEDES has no validation split: hold out training identities instead)" if name == "icfg_pedes" and split == "val" else ""
        raise ValueError(f"unknown split {split!r} for {fmt.title}; expected one of {list(fmt.splits)}{extra}")
    root = Path(root)
    data = read_tpr_annotations(name, root)
    out = TPRSplit(name=name, root=root, split=split)
    img_dir = root / fmt.image_dir
    for i, e in enumerate(data):
        if e["split"] != split:
            continue
        p = img_dir / e[fmt.path_key]
        if check_images and not p.is_file():
            raise DatasetFormatError(f"{root / fmt.annotation}: entry {i} names image {e[fmt.path_key]!r}, but {p} does not exist")
        img_id = len(out.image_paths)
        pid = int(e["id"]) + fmt.pid_offset
        out.image_paths.append(str(p))
        out.image_pids.append(pid)
        for c in e["captions"]:
            out.captions.append(c)
            out.caption_pids.append(pid)
            out.caption_image_ids.append(img_id)
    if not out.image_paths:
        raise DatasetFormatError(f"{root / fmt.annotation}: no entries in split {split!r}")
    return out


def write_tpr_annotations(name: str, root: str | Path, entries: Iterable[dict]) -> Path:
    """Write a TPR annotation file (entries already carry the dataset's own field names)."""
    fmt = TPR_FORMATS[name]
    path = Path(root) / fmt.annotation
    write_json_atomic(path, list(entries))
    return path


def tokenize(text: str) -> list[str]:
    """CUHK-PEDES-style ``processed_tokens``: lower-cased words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def split_statistics(split: TPRSplit) -> dict:
    """Dataset statistics in the papers' terms."""
    toks = [tokenize(c) for c in split.captions]
    vocab = {t for ts in toks for t in ts}
    return {
        "identities": len(set(split.image_pids)),
        "images": len(split.image_paths),
        "captions": len(split.captions),
        "mean caption length": sum(map(len, toks)) / max(1, len(toks)),
        "vocabulary": len(vocab),
    }


# ---------------------------------------------------------------------------------------------
ITCPR_QUERY_FIELDS = {"file_path": str, "datasets": str, "person_id": int, "instance_id": int, "caption": str}
ITCPR_GALLERY_FIELDS = {"file_path": str, "datasets": str, "person_id": int, "instance_id": int}


@dataclass
class ITCPR:
    """The ITCPR benchmark: queries (reference image + relative caption) and a gallery.
    A gallery item is a ground truth of a query when their ``instance_id`` agree; -1 marks distractors."""

    root: Path
    queries: list[dict]
    gallery: list[dict]

    def query_paths(self) -> list[str]:
        return [str(self.root / q["file_path"]) for q in self.queries]

    def gallery_paths(self) -> list[str]:
        return [str(self.root / g["file_path"]) for g in self.gallery]


def _check_images_exist(ann: Path, root: Path, entries: list[dict], keys: Iterable[str]) -> None:
    for i, e in enumerate(entries):
        for k in keys:
            if not (root / e[k]).is_file():
                raise DatasetFormatError(f"{ann}: entry {i} names image {e[k]!r} in {k!r}, but {root / e[k]} does not exist")


def _numeric_ints(entry: dict, names: Iterable[str]) -> dict:
    """``entry`` with integer fields given as numeric strings ("17", "-1") turned into ints, as the public
    code reads them; anything else is left for :func:`_check_entry` to reject."""
    if not isinstance(entry, dict):
        return entry
    out = dict(entry)
    for n in names:
        v = out.get(n)
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            out[n] = int(v)
    return out


def itcpr_folder(root: str | Path) -> Path:
    """Where an ITCPR folder keeps ``query.json`` and ``gallery.json``: ``root`` itself, or ``root/datasets``
    (the layout the authors' loader reads). Image paths are relative to that folder."""
    root = Path(root)
    for d in (root, root / "datasets"):
        if (d / "query.json").is_file():
            return d
    raise DatasetFormatError(f"{root}: no query.json here or in {root / 'datasets'}; expected ITCPR's query.json and gallery.json "
                             "(lists of objects with fields file_path, datasets, person_id, instance_id and, for queries, caption)")


def read_itcpr(root: str | Path, check_images: bool = True) -> ITCPR:
    """ITCPR's ``query.json`` and ``gallery.json`` (in ``root`` or ``root/datasets``). Integer ids may be
    numeric strings; a gallery may list one file twice (the release does); a query may have several
    ground truths (gallery rows with its ``instance_id``)."""
    root = itcpr_folder(root)
    qp, gp = root / "query.json", root / "gallery.json"
    ints = ("person_id", "instance_id")
    queries = _read_json_list(qp, "ITCPR query", f"objects with fields {sorted(ITCPR_QUERY_FIELDS)}")
    gallery = _read_json_list(gp, "ITCPR gallery", f"objects with fields {sorted(ITCPR_GALLERY_FIELDS)}")
    queries = [_numeric_ints(e, ints) for e in queries]
    gallery = [_numeric_ints(e, ints) for e in gallery]
    for i, e in enumerate(queries):
        _check_entry(qp, i, e, ITCPR_QUERY_FIELDS)
        if e["instance_id"] < 0:
            raise DatasetFormatError(f"{qp}: entry {i} has instance_id {e['instance_id']}; a query's instance_id must be >= 0")
    for i, e in enumerate(gallery):
        _check_entry(gp, i, e, ITCPR_GALLERY_FIELDS)
    targets = {g["instance_id"] for g in gallery}
    for i, q in enumerate(queries):
        if q["instance_id"] not in targets:
            raise DatasetFormatError(f"{qp}: entry {i} (instance_id {q['instance_id']}) has no ground truth in {gp}")
    if check_images:
        _check_images_exist(qp, root, queries, ["file_path"])
        _check_images_exist(gp, root, gallery, ["file_path"])
    return ITCPR(root, queries, gallery)


def write_itcpr(root: str | Path, queries: list[dict], gallery: list[dict]) -> None:
    write_json_atomic(Path(root) / "query.json", queries)
    write_json_atomic(Path(root) / "gallery.json", gallery)


SYNCPR_FIELDS = {"reference_caption": str, "target_caption": str, "reference_image_path": str,
                 "target_image_path": str, "edit_caption": str, "cpr_id": (int, str)}


def read_syncpr(root: str | Path, check_images: bool = True) -> list[dict]:
    root = Path(root)
    path = root / "SynCPR.json"
    data = _read_json_list(path, "SynCPR", f"objects with fields {sorted(SYNCPR_FIELDS)}")
    for i, e in enumerate(data):
        _check_entry(path, i, e, SYNCPR_FIELDS)
    if check_images:
        _check_images_exist(path, root, data, ["reference_image_path", "target_image_path"])
    return data


def write_syncpr(root: str | Path, triplets: list[dict]) -> None:
    write_json_atomic(Path(root) / "SynCPR.json", triplets)


CHATPEDES_FIELDS = {"id": int, "file_path": str, "chats": list}
CHATPEDES_SPLITS = {"train": "train_reid.json", "test": "test_reid.json"}


def read_chatpedes(root: str | Path, split: str, image_root: str | Path | None = None, check_images: bool = True) -> list[dict]:
    """ChatPedes entries as released: ``chats`` is a list of dialogues, each a list of rounds, each round
    ``[{"from": "gpt", "value": question}, {"from": "user", "value": answer}]``. An entry whose ``chats`` holds
    a single dialogue (a list of rounds) is read as one dialogue, so every entry comes back nested the same
    way. ``image_root`` defaults to ``root/imgs`` (ChatPedes reuses CUHK-PEDES images)."""
    if split not in CHATPEDES_SPLITS:
        raise ValueError(f"unknown split {split!r} for ChatPedes; expected one of {list(CHATPEDES_SPLITS)}")
    root = Path(root)
    path = root / CHATPEDES_SPLITS[split]
    data = _read_json_list(path, "ChatPedes", 'objects with fields id, file_path and chats (dialogues: lists of rounds, '
                                               'each [{"from": "gpt", "value": ...}, {"from": "user", "value": ...}])')
    for i, e in enumerate(data):
        _check_entry(path, i, e, CHATPEDES_FIELDS)
        chats = e["chats"]
        if not chats:
            raise DatasetFormatError(f"{path}: entry {i} has no dialogues in 'chats'")
        if isinstance(chats[0], list) and chats[0] and isinstance(chats[0][0], dict):
            chats = e["chats"] = [chats]  # a single dialogue: a list of rounds
        for d, chat in enumerate(chats):
            if not isinstance(chat, list) or not chat:
                raise DatasetFormatError(f"{path}: entry {i} dialogue {d} must be a non-empty list of rounds")
            for r, rnd in enumerate(chat):
                if not isinstance(rnd, list) or len(rnd) != 2:
                    raise DatasetFormatError(f"{path}: entry {i} dialogue {d} round {r} is {rnd!r}; expected a list of two turns, "
                                             '[{"from": "gpt", "value": <question>}, {"from": "user", "value": <answer>}]')
                for t, (turn, want) in enumerate(zip(rnd, ("gpt", "user"))):
                    if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
                        raise DatasetFormatError(
                            f"{path}: entry {i} dialogue {d} round {r} turn {t} is {turn!r}; expected {{'from': '{want}', "
                            "'value': <text>}} (the question from 'gpt', then the answer from 'user')")
    if check_images:
        base = Path(image_root) if image_root is not None else root / "imgs"
        for i, e in enumerate(data):
            if not (base / e["file_path"]).is_file():
                raise DatasetFormatError(f"{path}: entry {i} names image {e['file_path']!r}, but {base / e['file_path']} does not exist")
    return data


def write_chatpedes(root: str | Path, split: str, entries: list[dict]) -> None:
    write_json_atomic(Path(root) / CHATPEDES_SPLITS[split], entries)


# ---------------------------------------------------------------------------------------------
#: Folder names under a ``data_root`` holding real datasets (IRRA's layout for the TPR three).
REAL_FOLDERS = {"cuhk_pedes": "CUHK-PEDES", "icfg_pedes": "ICFG-PEDES", "rstpreid": "RSTPReid",
                "itcpr": "ITCPR", "syncpr": "SynCPR", "chatpedes": "ChatPedes"}


def validate_annotations(data_root: str | Path, names: Iterable[str]) -> dict[str, dict[str, int]]:
    """Parse and check the fields of every annotation file of the datasets ``names`` under ``data_root``
    (in their :data:`REAL_FOLDERS`), through the readers above; images are not opened. Returns
    ``{dataset: {file: entries}}``; a truncated or malformed file raises :class:`DatasetFormatError` naming
    the file and the cause. A notebook's first cell calls it, so bad files fail there, not an hour in."""
    root = Path(data_root)
    return {name: validate(name, root / REAL_FOLDERS.get(name, name)) for name in names}


# ---------------------------------------------------------------------------------------------
def validate(name: str, folder: str | Path) -> dict[str, int]:
    """Parse and check every annotation file of dataset ``name`` (a key of :data:`REAL_FOLDERS`) in its
    released layout in ``folder``: valid JSON, every entry with its fields of the right types, known splits
    and, for ChatPedes, well-formed dialogues. Images are not opened. Raises :class:`DatasetFormatError`
    naming the file, the entry and the cause; returns the number of entries per file read.

    ``params.check_data_root`` (every notebook's first cell) calls it for each dataset the notebook needs.
    What it parsed is handed to the next reader of the same unchanged file, so the file is parsed once."""
    global _KEEP
    if name not in REAL_FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(REAL_FOLDERS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"{folder}: dataset folder not found; expected the {REAL_FOLDERS[name]} folder")
    counts: dict[str, int] = {}
    before = set(_PARSED)
    _KEEP = True
    try:
        if name in TPR_FORMATS:
            counts[TPR_FORMATS[name].annotation] = len(read_tpr_annotations(name, folder))
        elif name == "itcpr":
            bench = read_itcpr(folder, check_images=False)
            counts.update({"query.json": len(bench.queries), "gallery.json": len(bench.gallery)})
        elif name == "syncpr":
            counts["SynCPR.json"] = len(read_syncpr(folder, check_images=False))
        else:  # chatpedes: the splits released (a test-only copy is enough to evaluate)
            present = [s for s, f in CHATPEDES_SPLITS.items() if (folder / f).is_file()]
            if not present:
                raise DatasetFormatError(f"{folder}: neither {' nor '.join(CHATPEDES_SPLITS.values())} is here; expected "
                                         "ChatPedes' annotation files (lists of objects with fields id, file_path and chats)")
            for split in present:
                counts[CHATPEDES_SPLITS[split]] = len(read_chatpedes(folder, split, check_images=False))
    except BaseException:
        for k in set(_PARSED) - before:  # keep nothing of a file that failed
            del _PARSED[k]
        raise
    finally:
        _KEEP = False
    for f, n in counts.items():
        if n == 0:
            raise DatasetFormatError(f"{folder / f}: holds no entries (an empty JSON list)")
    return counts
