"""The one training loop: ``gpus`` -> CPU, one GPU, or DistributedDataParallel over N processes.

    result = fit(TaskSpec("person_retrieval.papers.tpr:IRRATask", {...}), TrainConfig(epochs=5, gpus=0))

* ``gpus=0`` trains on the CPU; ``gpus=1`` on one CUDA GPU; ``gpus=N`` spawns N processes from
  :func:`_worker` (a library function, so spawned processes can import it) with NCCL on GPUs. On a
  machine with no GPU, ``gpus>=2`` runs the very same DDP path as N CPU processes over gloo (how the
  tests exercise it); asking for more GPUs than the machine has is an error.
* Contrastive losses see the whole global batch: features are gathered across processes with
  gradients kept (:class:`_GatherWithGrad`: all-gather forward, all-reduce and slice backward).
* bf16 autocast on GPU; gradient accumulation; AdamW (fused) with linear warmup and cosine decay, and
  per-module learning-rate multipliers.
* A checkpoint at every epoch: weights as safetensors, optimizer and scheduler state (loaded with
  ``weights_only=True``), RNG states and history as JSON. The data order of an epoch depends only on
  ``(seed, epoch)``, so a run interrupted and resumed ends with the same weights as one that was not.
* Model selection on a validation split (the task's ``evaluate``), never on test.
* A JSON-lines metrics log per run; progress bars that work in Jupyter and in papermill logs.
* ``python -m person_retrieval.train --config run.json`` runs the same thing from a shell. Launched by
  ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` as torchrun does, e.g. torchrun started by SLURM's ``srun``), it spawns nothing:
  every process joins the launcher's world (:func:`launched`, ``fit(..., launch=...)``), on ``cuda:LOCAL_RANK``
  where there are GPUs, and global rank 0 writes the checkpoints (``out_dir`` must be a folder every node sees).

A *task* says what is trained: ``build() -> nn.Module``, ``train_data() -> Dataset`` (items are dicts
of tensors), ``loss(model, batch, gather) -> (loss, logs)`` and ``evaluate(model) -> metrics``. Tasks
are named by a :class:`TaskSpec` (an import path and keyword arguments) so every process can rebuild
the same one.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .limits import limit_tag, limits, set_limits  # noqa: F401  (train.set_limits stays public)

__all__ = ["TaskSpec", "TrainConfig", "FitResult", "Launch", "fit", "launched", "resolve_devices", "build_optimizer",
           "cosine_schedule"]


@dataclass
class TaskSpec:
    """An importable task factory ``"package.module:Name"`` and its keyword arguments."""

    target: str
    kwargs: dict = field(default_factory=dict)

    def build(self):
        mod, _, name = self.target.partition(":")
        return getattr(importlib.import_module(mod), name)(**self.kwargs)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64  # the global batch: N processes take batch_size // N each (it must split evenly)
    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_epochs: float = 0.5
    warmup_steps: int | None = None  # warm-up in optimizer steps (a paper's table gives steps); None: warmup_epochs
    betas: tuple = (0.9, 0.98)  # AdamW's betas
    adam_eps: float = 1e-6
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    lr_mult: dict = field(default_factory=dict)  # parameter-name prefix -> learning-rate multiplier
    gpus: int = 0
    seed: int = 0
    out_dir: str | None = None  # checkpoints and metrics log; None = no checkpoints
    resume: bool = True
    select: str = "R1"  # validation metric for model selection (higher is better)
    stop_after_epochs: int | None = None  # end this call early (as an interruption would), for tests
    progress: bool = True
    bf16: bool = True  # autocast on GPU only
    clip_grad: float | None = 5.0
    threads: int | None = None
    compile: bool = False  # torch.compile the training forward (GPU throughput; first steps compile)
    max_steps: int | None = None  # stop after this many optimizer steps (a smoke run); None: the whole schedule


# One way to shrink any run, the same in every notebook: the limits live in :mod:`.limits` (a leaf module, so
# params and the generators set and read them without importing the trainer); fit applies them here.
def apply_limits(cfg: "TrainConfig") -> "TrainConfig":
    """``cfg`` under the process's limits, its ``out_dir`` suffixed by :func:`limit_tag`."""
    lim = limits()
    e, m, b = lim["epochs"], lim["max_steps"], lim["batch_size"]
    if e is None and m is None and b is None:
        return cfg
    over = {} if b is None else {"batch_size": b}
    if e is not None:
        over["epochs"] = e
    if m is not None:
        over["max_steps"] = m if cfg.max_steps is None else min(m, cfg.max_steps)
    if cfg.out_dir and not str(cfg.out_dir).endswith(limit_tag()):
        over["out_dir"] = str(cfg.out_dir) + limit_tag()
    return TrainConfig(**{**asdict(cfg), **over})


@dataclass
class FitResult:
    model: nn.Module
    history: list
    best: dict
    out_dir: str | None
    seconds: float

    @property
    def train_pairs_per_s(self) -> float:
        rates = [h["pairs_per_s"] for h in self.history if "pairs_per_s" in h]
        return float(np.mean(rates)) if rates else float("nan")


# ---------------------------------------------------------------------------------------------
def resolve_devices(gpus: int) -> tuple[str, str | None]:
    """``(device type, DDP backend)`` for a ``gpus`` request, or a clear error (the checks of
    :func:`person_retrieval.params.check_gpus`: GPUs present, or CPU processes at most one per core)."""
    from .params import check_gpus

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus must be a non-negative integer, got {gpus!r}")
    check_gpus(gpus)
    if gpus == 0:
        return "cpu", None
    if not torch.cuda.is_available():
        return "cpu", "gloo"  # the DDP path, as CPU processes (tests, laptops)
    return "cuda", ("nccl" if gpus > 1 else None)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with CLIP's habit of no weight decay on biases, norms, embeddings and the logit scale,
    and ``cfg.lr_mult`` multipliers by parameter-name prefix (IRRA trains new heads 5x faster)."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0
        for prefix, m in cfg.lr_mult.items():
            if name.startswith(prefix):
                mult = m
        no_decay = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        groups.setdefault((mult, no_decay), []).append(p)
    param_groups = [{"params": ps, "lr": cfg.lr * m, "base_lr": cfg.lr * m, "weight_decay": 0.0 if nd else cfg.weight_decay}
                    for (m, nd), ps in sorted(groups.items())]
    try:
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, fused=True)
    except (RuntimeError, TypeError):  # older torch without fused AdamW on this device
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int, lengths: torch.Tensor | None = None, batch: int = 1,
                bucket: int = 8) -> torch.Tensor:
    """The data order of an epoch: a function of ``(seed, epoch)`` only.

    With ``lengths`` (caption token counts), items are shuffled, then sorted by length within windows of
    ``bucket`` batches, and the batches shuffled again: each batch holds captions of similar length, so
    little compute goes to padding, while every batch still mixes random people.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    if lengths is None or batch <= 1:
        return order
    win = batch * bucket
    parts = [chunk[torch.sort(lengths[chunk], stable=True).indices] for chunk in order.split(win)]
    order = torch.cat(parts)
    nb = n // batch
    batches = order[: nb * batch].view(nb, batch)[torch.randperm(nb, generator=g)]
    return torch.cat([batches.reshape(-1), order[nb * batch:]])


def _to_device(raw: dict, device: torch.device) -> dict:
    """Move a batch to the training device; uint8 images travel as bytes and are normalised there."""
    from .datasets.torch_data import to_float

    pin = device.type == "cuda"
    out = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in raw.items()}
    if "image" in out and out["image"].dtype == torch.uint8:
        out["image"] = to_float(out["image"])
    return out


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to ``path.tmp`` then rename, so a crash never leaves a half-written file under ``path``.
    A failed write on a full disk says so (safetensors' own error does not)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < 256 * 2**20:
            raise OSError(f"could not write {path}: only {free / 2**20:.0f} MiB free on its disk. Free some space, "
                          "or move the caches elsewhere with PR_CACHE_DIR=/some/bigger/disk.") from e
        raise
    os.replace(tmp, path)


def _save_checkpoint(out: Path, model: nn.Module, opt, sched, state: dict, best: bool, rng_states: list, final: bool = False) -> None:
    """The epoch's checkpoint. After the run's last epoch (``final``) only weights stay: the optimizer state
    (twice the model for AdamW) is what resuming needs, and a finished run only loads; when that epoch is also
    the best, ``last`` and ``best`` are one file (a hard link). A ViT-B/16 run keeps 0.6 GB, not 2.4."""
    from safetensors.torch import save_model

    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    _write_atomic(ck / "last.safetensors", lambda p: save_model(model, str(p)))
    if not final:
        _write_atomic(ck / "last_optim.pt", lambda p: torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                                 "torch_rng": rng_states}, p))
    if best:
        def link_or_save(p: Path) -> None:
            try:
                os.link(ck / "last.safetensors", p)
            except OSError:  # a file system without hard links
                save_model(model, str(p))

        _write_atomic(ck / "best.safetensors", link_or_save if final else (lambda p: save_model(model, str(p))))
    # The JSON goes last: it is what marks the epoch as complete (and, with "final", the run as finished).
    _write_atomic(ck / "last_state.json", lambda p: p.write_text(json.dumps({**state, "final": bool(final)})))
    if final:
        (ck / "last_optim.pt").unlink(missing_ok=True)


def _load_checkpoint(out: Path, model: nn.Module, opt, sched, rank: int = 0, epochs: int | None = None) -> dict | None:
    from safetensors.torch import load_model

    ck = out / "checkpoints"
    if not (ck / "last_state.json").is_file():
        return None
    state = json.loads((ck / "last_state.json").read_text())
    load_model(model, str(ck / "last.safetensors"))
    if state.get("final") and not (ck / "last_optim.pt").is_file():  # a finished run keeps weights only: nothing to resume
        if epochs is not None and state["epoch"] + 1 < epochs:
            raise ValueError(f"{out}: this run finished after epoch {state['epoch'] + 1} and kept only its weights, so it cannot "
                             f"go on to {epochs} epochs; give the longer run its own out_dir, or delete this folder to start again")
        random.setstate((state["py_rng"][0], tuple(state["py_rng"][1]), state["py_rng"][2]))
        return state
    extra = torch.load(ck / "last_optim.pt", weights_only=True)
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    states = extra["torch_rng"]
    if rank < len(states):
        torch.set_rng_state(states[rank])  # one state per process
    elif epochs is None or state["epoch"] + 1 < epochs:  # a finished run needs no random state: it only loads
        raise ValueError(f"{out}: this run was checkpointed by {len(states)} process(es) and cannot resume exactly with "
                         f"process {rank}; resume it with gpus={len(states) if len(states) > 1 else 0}, or delete the folder to start again")
    random.setstate((state["py_rng"][0], tuple(state["py_rng"][1]), state["py_rng"][2]))
    return state


def read_history(run_dir) -> list[dict]:
    """The per-epoch records of a training run (its metrics.jsonl)."""
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights saved by :func:`fit` into ``model``."""
    from safetensors.torch import load_model

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found")
    load_model(model, str(p))
    return model


@dataclass(frozen=True)
class Launch:
    """Where a launcher put this process: its global ``rank`` in a world of ``world`` processes, and its
    ``local_rank`` among the ``local_world`` processes of its node (which GPU it takes)."""

    rank: int
    world: int
    local_rank: int
    local_world: int


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched(env: dict | None = None) -> Launch | None:
    """The world torchrun (or a launcher that sets the same variables) started this process in, read from
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``, which torchrun sets too); None when
    ``RANK`` and ``WORLD_SIZE`` are not set. Half a launch (``RANK`` without ``MASTER_ADDR``, say) is an
    error naming what is missing: the process could only hang at the rendezvous."""
    env = os.environ if env is None else env
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [v for v in LAUNCH_VARIABLES if v not in env]
    if missing:
        raise RuntimeError(f"{', '.join(v for v in LAUNCH_VARIABLES if v in env)} set but not {', '.join(missing)}: "
                           "launch with torchrun (which sets all of them), or set all five as it does")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise RuntimeError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_RANK={env['LOCAL_RANK']!r}: "
                           "each must be an integer") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local < local_world <= world):
        raise RuntimeError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}, LOCAL_WORLD_SIZE={local_world}: need "
                           "0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
    return Launch(rank, world, local, local_world)


def check_launch(cfg: "TrainConfig", launch: Launch) -> tuple[str, str | None]:
    """``(device type, backend)`` for a run in a launcher's world, or a clear error: ``gpus`` must count the
    world's processes (0 or 1 for a world of one), and on GPUs each node needs a GPU per local process."""
    if max(1, cfg.gpus) != launch.world:
        raise ValueError(f"train.gpus={cfg.gpus}, but the launcher started {launch.world} process(es) (WORLD_SIZE={launch.world}): "
                         f"set gpus to {launch.world} or leave it out of the config")
    if launch.world > 1 and not cfg.out_dir:
        raise ValueError(f"a run in a launcher's world of {launch.world} processes needs train.out_dir, a folder every node sees: "
                         "global rank 0 writes the checkpoints there and every rank reads the selected weights back")
    if not torch.cuda.is_available() or cfg.gpus == 0:
        return "cpu", ("gloo" if launch.world > 1 else None)
    n = torch.cuda.device_count()
    if launch.local_world > n:  # every rank of the node sees it, so all of them stop, not only the excess ones
        raise ValueError(f"torchrun started {launch.local_world} processes on this node, but it has {n} GPU(s): start at most {n} "
                         f"per node (torchrun --nproc_per_node {n}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) for CPU processes")
    return "cuda", ("nccl" if launch.world > 1 else None)


def process_tag(gpus: int) -> tuple:
    """What a cached run's key adds for its process count: nothing for one process (one-process keys stay as they
    were), ``("processes", N)`` for N. N processes see the same global batches, but each draws its own dropout and
    masks, and CPU processes keep their own BatchNorm statistics: a run over N processes is another run, so the
    same seed, scale and ``gpus`` give the same tables whatever was cached before."""
    n = max(1, int(gpus))
    return () if n == 1 else (("processes", n),)


def shared_gpus(gpus: int) -> int:
    """The ``gpus`` a shared model (the backbone, the generators) is built with when a notebook asks for ``gpus``:
    the same on a machine with GPUs; one process on a machine without, where more processes bring no speed. So
    every notebook on the CPU reads the one cached backbone and generators whatever its ``gpus``, while its own
    runs train over the processes it asks for."""
    return int(gpus) if torch.cuda.is_available() else 0


def _local_batch(cfg: TrainConfig, world: int) -> int:
    """Each process's share of the global batch ``cfg.batch_size``; an error where it does not split evenly."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over {world} processes")
    return cfg.batch_size // world


# ---------------------------------------------------------------------------------------------
def _train(rank: int, world: int, spec: TaskSpec, cfg: TrainConfig, device_type: str, backend: str | None, port: int | None,
           local: tuple[int, int] | None = None) -> dict:
    """One process's training. ``port``: the rendezvous port of a world this module spawned; None in a
    launcher's world (torchrun set ``MASTER_ADDR`` and ``MASTER_PORT``). ``local``: ``(local rank, processes on
    this node)``, by default ``(rank, world)`` (one node)."""
    local_rank, local_world = local or (rank, world)
    # A world this module spawned makes and ends its group. A launcher's world makes it once and keeps it to the end of
    # the process: destroying a group and making another on torchrun's store can hang (the second reuses the first's keys).
    own_group = world > 1 and port is not None and not dist.is_initialized()
    if world > 1 and not dist.is_initialized():
        if port is not None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(backend, rank=rank, world_size=world)
    if cfg.threads or world > 1:
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // local_world))
    device = torch.device(f"cuda:{local_rank}") if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(cfg.seed + rank)
    np.random.seed((cfg.seed + rank) % 2**32)
    torch.manual_seed(cfg.seed + rank)

    task = spec.build()
    model = task.build().to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm's statistics over the global batch, as one process computes them
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    data = task.train_data()
    # ``batch_size`` is the global batch, whatever the process count: gpus=N trains what one process trains
    # (the same batches, contrastive losses over the gathered batch, gradients averaged), so a run cached by
    # one process count is the same run for another, up to floating-point rounding (and, on CPU processes,
    # BatchNorm's statistics, which are per process: SyncBatchNorm needs GPUs).
    global_bs, local_bs = cfg.batch_size, _local_batch(cfg, world)
    steps_per_epoch = len(data) // global_bs
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(data)} items) is smaller than one global batch ({global_bs})")
    opt_steps = max(1, steps_per_epoch * cfg.epochs // cfg.grad_accum)
    if cfg.max_steps is not None:  # a capped run: its schedule is the capped one, and it ends at the cap
        opt_steps = min(opt_steps, cfg.max_steps)
    opt = build_optimizer(model, cfg)
    warmup = int(cfg.warmup_epochs * steps_per_epoch / cfg.grad_accum) if cfg.warmup_steps is None else int(cfg.warmup_steps)
    sched = cosine_schedule(opt, opt_steps, warmup, cfg.min_lr_ratio)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    start_epoch, history, best = 0, [], {cfg.select: -math.inf}
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a fresh run: forget an earlier one's log and checkpoints
            (out / "metrics.jsonl").unlink(missing_ok=True)
            for f in (out / "checkpoints").glob("*") if (out / "checkpoints").is_dir() else []:
                f.unlink()
    if world > 1:
        dist.barrier()
    run_end = cfg.epochs  # the epochs the run takes: a cap (max_steps) ends it early; a pause (stop_after_epochs) does not
    if cfg.max_steps is not None:
        run_end = min(run_end, math.ceil(cfg.max_steps * cfg.grad_accum / steps_per_epoch))
    if out is not None and cfg.resume:
        st = _load_checkpoint(out, model, opt, sched, rank, run_end)
        if st is not None:
            start_epoch, history, best = st["epoch"] + 1, st["history"], st["best"]
    if world > 1:  # every rank must resume from the same epoch: a folder some node sees stale or not at all would hang
        starts = [None] * world
        dist.all_gather_object(starts, start_epoch)
        if len(set(starts)) > 1:
            raise RuntimeError(f"the processes found different checkpoints in {out} (epoch to start from, by rank: {starts}): "
                               "out_dir must be one folder every node sees")
    # Some parameters may take no part in a task's loss (the image tokens' projection when only pooled
    # features are aligned, a stage-1 tower's projection heads): DDP must look for them each step.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    if cfg.compile:
        ddp = torch.compile(ddp)

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x if world == 1 else _GatherWithGrad.apply(x.contiguous())

    amp = device.type == "cuda" and cfg.bf16
    log_path = out / "metrics.jsonl" if out is not None and rank == 0 else None
    end_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    t_start = time.time()
    end_epoch = min(end_epoch, run_end)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        order = epoch_order(len(data), cfg.seed, epoch, getattr(data, "lengths", None), global_bs)
        it = range(steps_per_epoch)
        if cfg.progress and rank == 0:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=2.0)
        sums: dict[str, float] = {}
        t0, done = time.time(), 0
        for step in it:
            if cfg.max_steps is not None and (epoch * steps_per_epoch + step) // cfg.grad_accum >= cfg.max_steps:
                break
            idx = order[step * global_bs + rank * local_bs: step * global_bs + (rank + 1) * local_bs]
            raw = data.batch(idx) if hasattr(data, "batch") else _collate([data[int(i)] for i in idx])
            batch = _to_device(raw, device)
            accumulate = (step + 1) % cfg.grad_accum != 0 and step + 1 != steps_per_epoch
            ctx = ddp.no_sync() if (world > 1 and accumulate) else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, logs = task.loss(ddp, batch, gather)
                (loss / cfg.grad_accum).backward()
            if not accumulate:
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
            for k, v in {"loss": loss.detach(), **logs}.items():  # summed on the device: no per-step sync
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
            done += 1
            if cfg.progress and rank == 0 and hasattr(it, "set_postfix") and step % 20 == 0:
                it.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs = time.time() - t0
        done = max(done, 1)
        rec = {"epoch": epoch, "step": epoch * steps_per_epoch + done, "lr": sched.get_last_lr()[0], "seconds": secs,
               "pairs_per_s": done * global_bs / secs, **{k: float(v) / done for k, v in sums.items()}}
        improved = False
        rng_states = [torch.get_rng_state()]
        if world > 1:  # every process's generator goes into the checkpoint (a collective: all ranks call it)
            rng_states = [None] * world
            dist.all_gather_object(rng_states, torch.get_rng_state())
        if rank == 0:
            model.eval()
            with torch.no_grad():
                val = task.evaluate(model)
            rec.update({f"val_{k}": v for k, v in val.items()})
            improved = val.get(cfg.select, -math.inf) > best.get(cfg.select, -math.inf)
            if improved:
                best = {**val, "epoch": epoch}
            history.append(rec)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if out is not None:
                pyr = random.getstate()
                state = {"epoch": epoch, "history": history, "best": best, "config": asdict(cfg),
                         "py_rng": [pyr[0], list(pyr[1]), pyr[2]]}
                _save_checkpoint(out, model, opt, sched, state, improved, rng_states, final=epoch + 1 == run_end)
            if cfg.progress:
                shown = ", ".join(f"{k}={v:.2f}" for k, v in val.items())
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f}, {rec['pairs_per_s']:.0f} pairs/s, val {shown}", flush=True)
        if world > 1:
            dist.barrier()
    if world > 1:  # every rank returns rank 0's record of the run
        shared = [history, best]
        dist.broadcast_object_list(shared, src=0)
        history, best = shared
    if own_group:
        dist.destroy_process_group()
    return {"history": history, "best": best, "seconds": time.time() - t_start, "model": model}


class _GatherWithGrad(torch.autograd.Function):
    """Every process's ``x`` concatenated along dim 0 (equal sizes), with the gradient flowing back: each
    process's slice receives the sum of the gradients all processes computed for it."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _worker(rank: int, world: int, spec: TaskSpec, cfg: TrainConfig, device_type: str, backend: str, port: int, result_file: str) -> None:
    """Entry point of each spawned DDP process (importable, so spawn can find it). A rank that raises
    writes its traceback beside the result first: a peer blocked in a collective may die of a signal
    (gloo's SIGABRT) before spawn sees this rank's exception, and :func:`fit` must still name the cause.
    A rank killed by a fatal signal (SIGABRT, SIGSEGV) leaves its Python stack in ``rank{r}.fault``.

    A rank that finished leaves with ``os._exit(0)``, skipping the interpreter's teardown: there, gloo's
    process group is destroyed with the objects around it, and once its peer has gone that can abort
    (CI saw rank 1 of a FAFA run die of SIGABRT after training, with no Python stack: the fault handler
    was already off). Everything a run leaves (checkpoints, ``result.json``) is written and closed first."""
    import faulthandler

    Path(result_file).parent.mkdir(parents=True, exist_ok=True)
    fault = open(Path(result_file).with_name(f"rank{rank}.fault"), "w")
    faulthandler.enable(fault, all_threads=True)
    try:
        res = _train(rank, world, spec, cfg, device_type, backend, port)
        if rank == 0:
            Path(result_file).write_text(json.dumps({k: v for k, v in res.items() if k != "model"}))
    except BaseException:
        import traceback

        Path(result_file).with_name(f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # the fault handler stays on to the end: a signal before this line still leaves a stack


def _spawn(world: int, args: tuple, result_file: str) -> None:
    """Run the ``world`` processes; when one fails, raise with the first traceback a rank wrote."""
    import torch.multiprocessing as mp

    errors = [Path(result_file).with_name(f"rank{r}.error") for r in range(world)]
    faults = [f.with_suffix(".fault") for f in errors]
    for f in errors + faults:
        f.unlink(missing_ok=True)
    try:
        mp.spawn(_worker, args=args, nprocs=world, join=True)
    except Exception as e:
        written = [f for f in errors if f.is_file()] or [f for f in faults if f.is_file() and f.stat().st_size]
        if not written:
            raise RuntimeError(f"a DDP process of {world} failed ({type(e).__name__}: {e}) and left neither a traceback "
                               f"nor a stack beside {result_file}: it died before its training began") from e
        first = min(written, key=lambda f: f.stat().st_mtime)
        seen = next((line.strip(" -") for line in str(e).splitlines() if line.strip(" -")), "")
        raise RuntimeError(f"DDP process {first.stem[4:]} of {world} failed first (spawn saw: {type(e).__name__}, {seen}); "
                           f"its {'traceback' if first.suffix == '.error' else 'stack at the fatal signal'}:\n{first.read_text()}") from e
    for f in faults:  # a clean run leaves no empty fault files behind
        f.unlink(missing_ok=True)


def fit(spec: TaskSpec, cfg: TrainConfig, launch: Launch | None = None) -> FitResult:
    """Train ``spec``'s task under ``cfg``; return the model with its best validation weights.

    ``launch``: this process's place in a world a launcher started (:func:`launched`, e.g. under torchrun):
    then nothing is spawned, this process trains as rank ``launch.rank`` (a world of more than one needs
    ``out_dir``, a folder every node sees), and every rank returns the same model, read back from ``out_dir`` as a
    spawned run's is. The launcher's process group stays up for further runs; the command line ends it."""
    cfg = apply_limits(cfg)
    t = time.time()
    if launch is not None:
        return _fit_launched(spec, cfg, launch, t)
    if cfg.gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"this process is one of a launcher's {os.environ['WORLD_SIZE']} ranks (WORLD_SIZE is set), and gpus={cfg.gpus} "
                           "would spawn a world of its own on each: pass launch=train.launched() to fit to join the launcher's world")
    device_type, backend = resolve_devices(cfg.gpus)
    world = max(1, cfg.gpus)
    _local_batch(cfg, world)  # before any process starts
    if world == 1:
        res = _train(0, 1, spec, cfg, device_type, backend, None)
        model = res["model"].cpu()
    else:
        import tempfile

        out_dir = cfg.out_dir or tempfile.mkdtemp(prefix="pr-ddp-")
        cfg = TrainConfig(**{**asdict(cfg), "out_dir": out_dir})
        result_file = str(Path(out_dir) / "result.json")
        if cfg.progress:
            where = f"{world} GPUs (NCCL)" if device_type == "cuda" else f"{world} CPU processes (gloo; no GPU here)"
            print(f"DistributedDataParallel over {world} processes on {where}", flush=True)
        _spawn(world, (world, spec, cfg, device_type, backend, _free_port(), result_file), result_file)
        res = json.loads(Path(result_file).read_text())
        model = spec.build().build()
        load_weights(model, Path(out_dir) / "checkpoints" / "last.safetensors")
    best_file = Path(cfg.out_dir) / "checkpoints" / "best.safetensors" if cfg.out_dir else None
    if best_file is not None and best_file.is_file():
        load_weights(model, best_file)  # model selection: the best validation epoch
    model.eval()
    return FitResult(model=model, history=res["history"], best=res["best"], out_dir=cfg.out_dir, seconds=time.time() - t)


def _fit_launched(spec: TaskSpec, cfg: TrainConfig, launch: Launch, t: float) -> FitResult:
    device_type, backend = check_launch(cfg, launch)
    _local_batch(cfg, launch.world)
    if cfg.progress and launch.rank == 0:
        where = f"{launch.world} GPU process(es) (NCCL)" if device_type == "cuda" else f"{launch.world} CPU process(es) (gloo)"
        print(f"in the launcher's world: {where}, {launch.local_world} on this node; global rank 0 writes the checkpoints",
              flush=True)
    res = _train(launch.rank, launch.world, spec, cfg, device_type, backend, None, (launch.local_rank, launch.local_world))
    model = res["model"].cpu()
    if cfg.out_dir:  # as a spawned run returns it: a fresh model with rank 0's weights, the best epoch's where selection kept one
        ck = Path(cfg.out_dir) / "checkpoints"
        if launch.world > 1:
            model = spec.build().build()
            load_weights(model, ck / "last.safetensors")
        if (ck / "best.safetensors").is_file():
            load_weights(model, ck / "best.safetensors")
    model.eval()
    return FitResult(model=model, history=res["history"], best=res["best"], out_dir=cfg.out_dir, seconds=time.time() - t)


# ---------------------------------------------------------------------------------------------
def _check_passed_on_kwargs(factory, kwargs: dict) -> None:
    """A task class whose ``__init__`` passes ``**kw`` on to its parent (``IRRATask(irr=..., **kw)``) binds any
    keyword; follow the chain of ``__init__``s up the class's MRO until one takes no ``**kw``, and refuse the
    keywords that none of them names."""
    import inspect

    if not isinstance(factory, type):
        return
    named: set[str] = set()
    for cls in factory.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        ps = inspect.signature(init).parameters.values()
        named |= {p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in ps):
            unknown = sorted(set(kwargs) - named)
            if unknown:
                raise TypeError(f"got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
            return


def check_run(spec: TaskSpec, cfg: TrainConfig, launch: Launch | None = None) -> str:
    """Check a run before anything starts (no process is spawned, no data read): the task can be imported
    and takes its keyword arguments, ``gpus`` fits this machine (or, under a launcher, ``launch``'s world), the
    folders and files it names exist, real weights are on disk. Returns a line saying what will run; raises
    with the first problem found."""
    import inspect

    from . import params

    if launch is None:
        params.check_gpus(cfg.gpus, "train.gpus")
    else:
        check_launch(cfg, launch)
    _local_batch(cfg, max(1, cfg.gpus))
    mod, _, name = spec.target.partition(":")
    if not name:
        raise ValueError(f"task target {spec.target!r} must be 'package.module:Name'")
    try:
        factory = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"task target {spec.target!r} cannot be imported: {e}") from None
    try:
        inspect.signature(factory).bind(**spec.kwargs)
        _check_passed_on_kwargs(factory, spec.kwargs)
    except TypeError as e:
        raise TypeError(f"task {spec.target} does not take these kwargs: {e}") from None
    kw = spec.kwargs
    if kw.get("root") is not None:
        root = Path(kw["root"]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"task kwargs 'root': folder {root} does not exist")
        from .datasets.formats import TPR_FORMATS

        fmt = TPR_FORMATS.get(kw.get("dataset"))
        if fmt is not None and not (root / fmt.annotation).is_file():
            raise FileNotFoundError(f"task kwargs 'root': {root} has no {fmt.annotation} ({fmt.title}'s annotation file)")
    for key in ("init", "captions"):
        if kw.get(key) is not None and not Path(kw[key]).expanduser().is_file():
            raise FileNotFoundError(f"task kwargs {key!r}: file {kw[key]} does not exist")
    if kw.get("weights") is not None:
        params.check_weights(kw["weights"], "task kwargs 'weights'")
    n = max(1, cfg.gpus)
    dev = "the CPU" if cfg.gpus == 0 else (f"{n} GPU(s)" if torch.cuda.is_available() else f"{n} CPU processes (gloo, DDP)")
    if launch is not None:
        dev += f" in the launcher's world (WORLD_SIZE={launch.world}, {launch.local_world} per node; nothing spawned)"
    out = "no checkpoints (out_dir not set)"
    if cfg.out_dir:
        last = Path(cfg.out_dir) / "checkpoints" / "last_state.json"
        out = f"checkpoints in {cfg.out_dir}" + (" (resuming)" if cfg.resume and last.is_file() else "")
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return (f"will train {spec.target}({args}) for {cfg.epochs} epochs, batch {cfg.batch_size} (global), lr {cfg.lr:g}, "
            f"on {dev}; {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m person_retrieval.train", description="Train a task from a JSON config: "
                                 '{"task": {"target": "person_retrieval.papers.tpr:IRRATask", "kwargs": {...}}, "train": {...TrainConfig...}}')
    ap.add_argument("--config", required=True, help="path to the JSON config")
    ap.add_argument("--gpus", type=int, help="override train.gpus")
    ap.add_argument("--dry-run", action="store_true", help="check the config and say what would run, then stop")
    args = ap.parse_args(argv)
    p = Path(args.config)
    if not p.is_file():
        ap.error(f"config file {p} not found")
    try:
        conf = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        ap.error(f"{p}: not valid JSON ({e})")
    if "task" not in conf or "target" not in conf["task"]:
        ap.error(f"{p}: needs a 'task' object with a 'target' (module:Name) and optional 'kwargs'")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(conf.get("train", {})) - known
    if unknown:
        ap.error(f"{p}: unknown training options {sorted(unknown)}; known: {sorted(known)}")
    cfg = TrainConfig(**conf.get("train", {}))
    if args.gpus is not None:
        cfg.gpus = args.gpus
    try:
        launch = launched()
    except RuntimeError as e:
        ap.error(str(e))
    if launch is not None and args.gpus is None and "gpus" not in conf.get("train", {}):
        cfg.gpus = launch.world if launch.world > 1 else int(torch.cuda.is_available())
    spec = TaskSpec(conf["task"]["target"], conf["task"].get("kwargs", {}))
    try:
        plan = check_run(spec, cfg, launch)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        ap.error(f"{p}: {e}")
    lead = launch is None or launch.rank == 0
    if lead:
        print(plan, flush=True)
    if args.dry_run:
        return 0
    res = fit(spec, cfg, launch)
    if lead:
        print(json.dumps({"best": res.best, "seconds": round(res.seconds, 1), "out_dir": res.out_dir}), flush=True)
    if dist.is_initialized():  # the launcher's group, kept for the process's life, ends with it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
