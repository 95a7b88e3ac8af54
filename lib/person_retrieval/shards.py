"""Sharded, resumable synthesis: what SynCPR's (notebook 03) and TIPS's (notebook 02_tips) pipelines share.

A synthesis is a folder holding ``synthesis.json`` (its configuration), ``shards/shard_NNNNN.json`` (one
record per finished shard) and the images of each shard in a folder of its own. A shard's images are
written under a temporary name and renamed, then its record is written atomically: a record on disk means a
finished shard, so a killed run resumes where it stopped and a shard is never half-written. Shard ``u`` is
done by the process with ``u % num_shards == shard`` (torchrun rank and world size, or n processes by hand).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .datasets import write_json_atomic


def shard_file(root: str | Path, u: int) -> Path:
    return Path(root) / "shards" / f"shard_{u:05d}.json"


def check_config(root: str | Path, want: dict) -> None:
    """Write ``want`` as the folder's configuration, or refuse a folder that holds another one."""
    p = Path(root) / "synthesis.json"
    if p.is_file():
        have = json.loads(p.read_text())
        if have != want:
            diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
            raise ValueError(f"{p}: this folder holds a synthesis with another configuration ({diff}, as (folder, asked)); "
                             "use another folder, or delete this one to start again")
    else:
        write_json_atomic(p, want)


def check_share(shard, num_shards) -> None:
    if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard, int) and 0 <= shard < num_shards):
        raise ValueError(f"shard={shard!r}, num_shards={num_shards!r}: need integers with 0 <= shard < num_shards")


def run(root: str | Path, config: dict, n_shards: int, work: Callable[[int], dict], shard: int = 0, num_shards: int = 1,
        progress: bool = True, desc: str = "shards") -> list[dict]:
    """Run ``work(u)`` (which returns shard ``u``'s record) for this process's unfinished shards, writing
    each record atomically. Returns what was done now: ``{"shard", "seconds"}`` per shard."""
    check_share(shard, num_shards)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    check_config(root, config)
    todo = [u for u in range(n_shards) if u % num_shards == shard and not shard_file(root, u).is_file()]
    it = todo
    if progress and todo:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=desc, leave=False)
    done = []
    for u in it:
        t0 = time.time()
        write_json_atomic(shard_file(root, u), work(u))
        done.append({"shard": u, "seconds": time.time() - t0})
    return done


def missing(root: str | Path, n_shards: int) -> list[int]:
    return [u for u in range(n_shards) if not shard_file(root, u).is_file()]


def read(root: str | Path) -> list[dict]:
    """Every finished shard's record, in shard order."""
    return [json.loads(p.read_text()) for p in sorted((Path(root) / "shards").glob("shard_*.json"))]


def require_all(root: str | Path, n_shards: int) -> None:
    left = missing(root, n_shards)
    if left:
        raise RuntimeError(f"{root}: shards {left[:10]}{' ...' if len(left) > 10 else ''} are not synthesized yet; "
                           "run the synthesis for them (every shard's process) before assembling")


def digest(root: str | Path, u: int) -> str:
    """A hash of shard ``u``'s record (the manifest lists it: equal manifests mean equal shards)."""
    return hashlib.sha1(shard_file(root, u).read_bytes()).hexdigest()


@contextmanager
def image_folder(final: str | Path):
    """A fresh temporary folder beside ``final``, renamed to ``final`` (replacing it) once the block ends
    without an error: a shard's images appear all at once or not at all."""
    final = Path(final)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def spawn(worker: Callable, nprocs: int, args: tuple) -> None:
    """``worker(rank, nprocs, *args)`` in ``nprocs`` spawned processes (a library function: spawned
    processes cannot import notebook code)."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(nprocs, *args), nprocs=nprocs, start_method="spawn")


def threads_per_process(nprocs: int) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // max(1, nprocs))
