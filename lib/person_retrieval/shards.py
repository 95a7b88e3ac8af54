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


# ---------------------------------------------------------------------------------------------
# One synthesis over many processes: torchrun's ranks, or processes started by hand
def share_from(launch, shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's ``(shard, num_shards)``: the launcher's ``(RANK, WORLD_SIZE)`` when there is one (a
    share given besides must agree with it), else the one given (by default the whole run)."""
    if launch is None:
        s, n = (0 if shard is None else shard), (1 if num_shards is None else num_shards)
        check_share(s, n)
        return s, n
    for name, given, env, var in (("shard", shard, launch.rank, "RANK"), ("num_shards", num_shards, launch.world, "WORLD_SIZE")):
        if given is not None and given != env:
            raise ValueError(f"{name}={given}, but the launcher set {var}={env}: under torchrun leave the share out "
                             "(each rank takes shards u with u % WORLD_SIZE == RANK)")
    return launch.rank, launch.world


def distributed_run(prepare: Callable[[bool], object], work: Callable[[object, int, int], list],
                    finish: Callable[[object], object], shard: int | None = None, num_shards: int | None = None,
                    timeout_hours: float = 48.0, log=None):
    """A sharded synthesis as one of many processes; returns ``finish``'s result where this process ran it,
    else None.

    * ``prepare(lead)`` loads the models and names the folder (``lead``: this process builds what is missing
      from the caches); ``work(state, shard, num_shards)`` synthesizes this process's share and returns what
      :func:`run` did; ``finish(state)`` merges the finished shards (assembles the dataset) once all are done.
    * Under torchrun (:func:`person_retrieval.train.launched`) the share is ``(RANK, WORLD_SIZE)``; global
      rank 0 prepares first while the others wait (so one process builds a missing cache), then every rank
      works, and rank 0 merges after all have finished (gloo barriers, each allowed ``timeout_hours``). Each
      rank takes ``cuda:LOCAL_RANK`` where the node has that GPU, and its share of the node's cores. The
      folder must be one every node sees. The process group stays up to the end of the process.
    * By hand (``shard=i, num_shards=n`` in n processes with no launcher): each works its share, and whichever
      finds every shard done when it ends merges, under a lock (another merging at that moment is left to
      it). Build the model caches first (the notebook, or one run of the command): processes started by hand
      do not wait for one another.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from .train import launched

    launch = launched()
    s, n = share_from(launch, shard, num_shards)
    log = log or (lambda msg: print(msg, flush=True))

    def say(done):
        log(f"share {s} of {n}: {len(done)} shard(s) synthesized now {[d['shard'] for d in done]}")

    if launch is None or launch.world == 1:
        state = prepare(True)
        say(work(state, s, n))
        if n > 1 and missing_count(state) > 0:
            log(f"share {s} of {n} is done; the process that finishes last assembles")
            return None
        return merge_once(state, finish) if n > 1 else finish(state)
    if torch.cuda.is_available() and launch.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(launch.local_rank)
    torch.set_num_threads(threads_per_process(launch.local_world))  # torchrun's OMP_NUM_THREADS=1 would leave cores idle
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    lead = launch.rank == 0
    state = prepare(True) if lead else None
    dist.barrier()
    if not lead:
        state = prepare(False)
    say(work(state, s, n))
    dist.barrier()
    return finish(state) if lead else None


def open_folder(root: Path, cfg, lead: bool, unit: str) -> dict:
    """A command line's synthesis state for ``cfg`` (with ``as_json``, ``n_shards``, ``shard_size``) in ``root``: the
    lead process makes the folder, checks its configuration and says where it is; ``fresh`` says whether any
    shard was still missing (a finished set found again keeps its timing)."""
    root = Path(root)
    if lead:
        root.mkdir(parents=True, exist_ok=True)
        check_config(root, cfg.as_json())
        print(f"synthesis folder: {root} ({cfg.n_shards} shards of {cfg.shard_size} {unit})", flush=True)
    fresh = not (root / "manifest.json").is_file() or bool(missing(root, cfg.n_shards))
    return {"cfg": cfg, "root": root, "t0": time.time(), "fresh": fresh}


def missing_count(state) -> int:
    """Shards of ``state``'s synthesis (its ``root`` and ``cfg``) not on disk yet."""
    return len(missing(state["root"], state["cfg"].n_shards))


def merge_once(state, finish: Callable[[object], object]):
    """``finish(state)`` under a lock file in the synthesis folder: of processes finishing together, one merges."""
    import os

    lock = Path(state["root"]) / ".assembling"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    try:
        os.close(fd)
        return finish(state)
    finally:
        lock.unlink(missing_ok=True)


def end_group() -> None:
    """End a launcher's process group at the end of a command (the group lives as long as the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def command_line(prog: str, description: str, uses: dict[str, str]):
    """The options every synthesis's command line shares: ``--scale``, ``--seed``, the real models (``uses``:
    what each of ``weights``, ``llm``, ``vlm`` is for) and the share (``--shard``, ``--num-shards``,
    ``--timeout-hours``). Returns the parser; the caller adds its own options and checks with :func:`parse`."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=description + " Under torchrun, each rank synthesizes its share "
                                 "(shards u with u % WORLD_SIZE == RANK) and rank 0 assembles.")
    ap.add_argument("--scale", default="small", choices=["tiny", "small", "paper"], help="counts by scale (default small)")
    ap.add_argument("--seed", type=int, default=0, help="the world, the mini models and the synthesis (the notebook's seed)")
    ap.add_argument("--gpus", type=int, default=0, help="the gpus the notebook runs with (default 0): it names the cached mini models "
                    "on a GPU machine, so the notebook finds this synthesis; with N > 1 build those models first (the notebook)")
    ap.add_argument("--weights", help=f"FLUX.1-dev (a name or a diffusers folder) with {uses['weights']}")
    ap.add_argument("--llm", help=f"a transformers chat model (name or folder) for {uses['llm']}")
    ap.add_argument("--vlm", help=f"a transformers vision-language model for {uses['vlm']}")
    ap.add_argument("--shard", type=int, help="this process's share (by hand; torchrun sets it from RANK)")
    ap.add_argument("--num-shards", type=int, help="how many processes share the run (by hand; torchrun: WORLD_SIZE)")
    ap.add_argument("--timeout-hours", type=float, default=48.0, help="how long a rank waits for the others (torchrun)")
    return ap


def parse(ap, argv=None):
    """``(args, real)``: the parsed options and whether any real model is named; ``--scale paper`` needs one,
    a half-set launcher environment is refused in one line, and ``--data-root`` is read as the notebooks read it."""
    from .params import ParameterError, check_data_root
    from .train import launched

    args = ap.parse_args(argv)
    real = any(v is not None for v in (args.weights, args.llm, args.vlm))
    if args.scale == "paper" and not real:
        ap.error("--scale paper needs real models: --weights, --llm and/or --vlm")
    try:
        share_from(launched(), args.shard, args.num_shards)
        if getattr(args, "data_root", None) is not None:
            args.data_root = check_data_root(args.data_root, [getattr(args, "dataset", "cuhk_pedes")], "--data-root")
    except (RuntimeError, ValueError, ParameterError) as e:
        ap.error(str(e))
    return args, real
