import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from person_retrieval import train
from person_retrieval.train import TaskSpec, TrainConfig, fit, resolve_devices

TINY = TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", {"scale": "tiny", "seed": 0, "n_ids": 40})


def cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=1e-3, gpus=0, seed=0, progress=False, warmup_epochs=0.5)
    return TrainConfig(**{**base, **kw})


def test_device_resolution(monkeypatch):
    assert resolve_devices(0) == ("cpu", None)
    if not torch.cuda.is_available():
        assert resolve_devices(2) == ("cpu", "gloo")
        with pytest.raises(ValueError, match="'gpus'=1 asks for a GPU, but this machine has none"):
            resolve_devices(1)
        with pytest.raises(ValueError, match="'gpus'=64 would start 64 CPU processes"):
            resolve_devices(64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="asks for 2 GPUs, but this machine has 1"):
        resolve_devices(2)
    with pytest.raises(ValueError, match="non-negative integer"):
        resolve_devices("2")


def test_schedule_warms_up_then_decays():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = train.cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_per_module_learning_rates():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = train.build_optimizer(m, TrainConfig(lr=0.1, lr_mult={"1.": 5.0}))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [0.1, 0.5]


def test_resume_ends_with_the_same_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = fit(TINY, cfg(out_dir=str(a)))
    part = fit(TINY, cfg(out_dir=str(b), stop_after_epochs=1))  # "interrupted" after epoch 1
    assert len(part.history) == 1
    done = fit(TINY, cfg(out_dir=str(b)))  # resumes at epoch 2
    assert [h["epoch"] for h in done.history] == [0, 1, 2]
    wa, wb = load_file(a / "checkpoints" / "last.safetensors"), load_file(b / "checkpoints" / "last.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and all("val_R1" in r for r in log)
    assert full.best["epoch"] in (0, 1, 2)


def test_a_finished_run_keeps_weights_only_and_reloads_from_its_cache(tmp_path):
    """The optimizer state (twice the model under AdamW) is kept only while a run can still resume: a paused run
    keeps it, a finished one drops it, and when its last epoch is also its best, last and best are one file."""
    paused = fit(TINY, cfg(out_dir=str(tmp_path), stop_after_epochs=1))
    ck = tmp_path / "checkpoints"
    assert len(paused.history) == 1 and (ck / "last_optim.pt").is_file()
    done = fit(TINY, cfg(out_dir=str(tmp_path)))
    assert not (ck / "last_optim.pt").exists() and json.loads((ck / "last_state.json").read_text())["final"] is True
    if done.best["epoch"] == done.history[-1]["epoch"]:
        assert (ck / "last.safetensors").stat().st_ino == (ck / "best.safetensors").stat().st_ino
    again = fit(TINY, cfg(out_dir=str(tmp_path)))  # the cached run: loads, trains nothing
    assert again.history == done.history and again.best == done.best
    a, b = dict(done.model.named_parameters()), dict(again.model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    capped = cfg(out_dir=str(tmp_path / "capped"), epochs=3, max_steps=1)  # a cap ends the run in its first epoch
    first = fit(TINY, capped)
    assert not (tmp_path / "capped" / "checkpoints" / "last_optim.pt").exists()
    assert fit(TINY, capped).history == first.history  # and the capped run loads from its cache


def test_model_selection_uses_the_best_validation_epoch(tmp_path):
    res = fit(TINY, cfg(out_dir=str(tmp_path)))
    best = max(res.history, key=lambda h: h["val_R1"])
    assert res.best["epoch"] == best["epoch"]
    w = load_file(tmp_path / "checkpoints" / "best.safetensors")
    got = dict(res.model.named_parameters())
    shared = [k for k in w if k in got]
    assert len(shared) > 10
    assert all(torch.equal(w[k], got[k].detach()) for k in shared)


def test_two_processes_over_gloo(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus=2 would mean two GPUs")
    res = fit(TINY, cfg(gpus=2, epochs=1, out_dir=str(tmp_path)))
    assert len(res.history) == 1 and res.history[0]["loss"] > 0
    assert (tmp_path / "checkpoints" / "last.safetensors").is_file()


def test_command_line_entry(tmp_path):
    conf = {"task": {"target": TINY.target, "kwargs": TINY.kwargs},
            "train": {"epochs": 1, "batch_size": 8, "progress": False, "out_dir": str(tmp_path / "run")}}
    p = tmp_path / "run.json"
    p.write_text(json.dumps(conf))
    r = subprocess.run([sys.executable, "-m", "person_retrieval.train", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "best" in json.loads(r.stdout.strip().splitlines()[-1])
    p.write_text(json.dumps({"task": conf["task"], "train": {"epochz": 1}}))
    r = subprocess.run([sys.executable, "-m", "person_retrieval.train", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown training options ['epochz']" in r.stderr


def test_epoch_order_is_a_permutation_with_length_buckets():
    lengths = torch.randint(5, 70, (103,))
    o = train.epoch_order(103, seed=1, epoch=2, lengths=lengths, batch=8)
    assert sorted(o.tolist()) == list(range(103))
    assert torch.equal(o, train.epoch_order(103, seed=1, epoch=2, lengths=lengths, batch=8))
    assert not torch.equal(o, train.epoch_order(103, seed=1, epoch=3, lengths=lengths, batch=8))
    spread = lambda order: float(lengths[order[:96]].view(12, 8).float().std(1).mean())  # noqa: E731
    assert spread(o) < 0.5 * spread(train.epoch_order(103, 1, 2))  # batches are more uniform in length


def test_resume_under_ddp_ends_with_the_same_weights(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus=2 would mean two GPUs")
    a, b = tmp_path / "a", tmp_path / "b"
    fit(TINY, cfg(gpus=2, epochs=2, out_dir=str(a)))
    fit(TINY, cfg(gpus=2, epochs=2, out_dir=str(b), stop_after_epochs=1))
    fit(TINY, cfg(gpus=2, epochs=2, out_dir=str(b)))
    wa, wb = load_file(a / "checkpoints" / "last.safetensors"), load_file(b / "checkpoints" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("task, says", [
    ("FailsOnRankOne", ["its traceback", "rank one's own error at its first step"]),  # a Python exception
    ("AbortsOnRankOne", ["stack at the fatal signal", "_ddp_tasks.py"]),  # SIGABRT: no traceback, faulthandler's stack
])
def test_a_failing_ddp_process_is_named_with_where_it_failed(tmp_path, task, says):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus=2 would mean two GPUs")
    spec = TaskSpec(f"_ddp_tasks:{task}", {"scale": "tiny", "seed": 0, "n_ids": 40})
    with pytest.raises(RuntimeError, match="DDP process 1 of 2 failed first") as e:
        fit(spec, cfg(gpus=2, epochs=1, out_dir=str(tmp_path)))
    assert "in loss" in str(e.value) and all(s in str(e.value) for s in says), str(e.value)


def test_a_finished_ddp_process_leaves_without_the_interpreters_teardown(tmp_path):
    """A rank that aborts while Python tears down (where gloo's process group is destroyed) no longer fails
    a run that had finished: each finished rank leaves with os._exit(0), its checkpoints already written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus=2 would mean two GPUs")
    spec = TaskSpec("_ddp_tasks:AbortsAtExitOnRankOne", {"scale": "tiny", "seed": 0, "n_ids": 40})
    res = fit(spec, cfg(gpus=2, epochs=1, out_dir=str(tmp_path)))
    assert [h["epoch"] for h in res.history] == [0] and (tmp_path / "checkpoints" / "last.safetensors").is_file()
    assert not list(tmp_path.glob("rank*.fault")) and not list(tmp_path.glob("rank*.error"))


def test_the_gather_keeps_every_process_gradient(tmp_path):
    """Gathered features carry their gradient home: each process's slice gets the sum over the processes'
    copies of the global loss (world x the true gradient, which DDP's averaging then divides by world)."""
    import torch.multiprocessing as mp

    from _ddp_tasks import gather_gradient

    mp.spawn(gather_gradient, args=(2, train._free_port(), str(tmp_path)), nprocs=2, join=True)
    w = torch.arange(6.0)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.equal(got["y"], torch.tensor([0.0, 1, 2, 10, 11, 12]))
        x = torch.arange(3.0) + 10 * r
        assert torch.allclose(got["grad"], 2 * (2 * x * w[3 * r: 3 * r + 3]))


def test_batches_travel_as_bytes_and_are_normalised_on_the_device():
    from person_retrieval.datasets.torch_data import CLIP_MEAN, CLIP_STD

    task = TINY.build()
    data = task.train_data()
    raw = data.batch(torch.arange(4))
    assert raw["image"].dtype == torch.uint8 and raw["ids"].shape[1] % 8 == 0
    out = train._to_device(raw, torch.device("cpu"))
    want = (raw["image"].float() / 255 - CLIP_MEAN) / CLIP_STD
    assert out["image"].dtype == torch.float32 and torch.allclose(out["image"], want)
    assert torch.equal(out["ids"], raw["ids"]) and torch.equal(out["pid"], raw["pid"])


def test_fixed_pretraining_temperature_is_not_trained(tmp_path):
    import math

    spec = TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", {"scale": "tiny", "seed": 0, "n_ids": 40, "temperature": 0.03})
    res = fit(spec, cfg(epochs=1, out_dir=str(tmp_path)))
    scale = res.model.backbone.logit_scale
    assert not scale.requires_grad and math.isclose(float(scale), math.log(1 / 0.03), rel_tol=1e-6)
    assert math.isclose(res.history[0]["temperature"], 0.03, rel_tol=1e-4)


def test_a_failed_checkpoint_write_leaves_nothing_and_names_a_full_disk(tmp_path, monkeypatch):
    import collections
    import shutil

    from person_retrieval import train

    def failing(p):
        p.write_bytes(b"half")
        raise RuntimeError("serialization failed")

    target = tmp_path / "best.safetensors"
    with pytest.raises(RuntimeError, match="serialization failed"):
        train._write_atomic(target, failing)  # plenty of space: the original error
    assert list(tmp_path.iterdir()) == []
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match="only 1 MiB free.*PR_CACHE_DIR"):
        train._write_atomic(target, failing)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The command line checks its config before it spawns anything.
def _cli(tmp_path, conf, *extra):
    import json

    from person_retrieval.train import main

    p = tmp_path / "run.json"
    p.write_text(json.dumps(conf))
    return main(["--config", str(p), *extra])


def test_cli_says_what_it_will_run(tiny_world, tmp_path, capsys):
    conf = {"task": {"target": "person_retrieval.papers.tpr:IRRATask",
                     "kwargs": {"dataset": "rstpreid", "root": str(tiny_world["rstpreid"]), "scale": "tiny"}},
            "train": {"epochs": 3, "batch_size": 8, "out_dir": str(tmp_path / "run")}}
    assert _cli(tmp_path, conf, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "will train person_retrieval.papers.tpr:IRRATask(dataset='rstpreid'" in out and "for 3 epochs, batch 8" in out
    assert "on the CPU" in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, msg", [
    ({"train": {"gpus": 64}}, "parameter 'train.gpus'=64 would start 64 CPU processes"),
    ({"train": {"gpus": 1}}, "parameter 'train.gpus'=1 asks for a GPU, but this machine has none"),
    ({"kwargs": {"root": "/no/such/CUHK-PEDES"}}, "task kwargs 'root': folder /no/such/CUHK-PEDES does not exist"),
    ({"kwargs": {"root": "EMPTY"}}, "has no data_captions.json"),
    ({"kwargs": {"weights": "ViT-B-16"}}, "task kwargs 'weights'.*no local weights for 'ViT-B-16': put the open_clip checkpoint"),
    ({"kwargs": {"init": "/no/such.safetensors"}}, "task kwargs 'init': file /no/such.safetensors does not exist"),
    ({"kwargs": {"learning_rate": 1}}, "does not take these kwargs"),
    ({"target": "person_retrieval.papers.tpr:NoSuchTask"}, "cannot be imported"),
])
def test_cli_refuses_a_bad_config_before_spawning(tiny_world, tmp_path, change, msg, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kwargs = {"dataset": "rstpreid", "root": str(tiny_world["rstpreid"]), "scale": "tiny", **change.get("kwargs", {})}
    if kwargs["root"] == "EMPTY":
        kwargs["root"] = str(tmp_path)
    conf = {"task": {"target": change.get("target", "person_retrieval.papers.tpr:IRRATask"), "kwargs": kwargs},
            "train": {"epochs": 1, **change.get("train", {})}}
    with pytest.raises(SystemExit) as e:
        _cli(tmp_path, conf)
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)


def test_check_run_follows_kwargs_passed_on_to_the_parent_task():
    # IRRATask(irr=..., **kw) hands the rest to _TPRTask: its own, its parent's keywords pass, others do not
    from person_retrieval.train import _check_passed_on_kwargs
    from person_retrieval.papers.tpr import IRRATask

    _check_passed_on_kwargs(IRRATask, {"irr": True, "mask_prob": 0.2, "dataset": "rstpreid", "root": "r", "lock_image": True})
    with pytest.raises(TypeError, match="'learning_rate', 'lr'"):
        _check_passed_on_kwargs(IRRATask, {"irr": True, "lr": 1, "learning_rate": 1, "dataset": "rstpreid"})


def test_lit_pretraining_keeps_the_attribute_trained_trunk(tmp_path, monkeypatch):
    from person_retrieval.models import pretrain

    monkeypatch.setitem(pretrain.TOWER_IDS, "tiny", {"train": 40, "val": 12})
    monkeypatch.setitem(pretrain.TOWER_CONFIG, "tiny", dict(epochs=1, batch_size=16, lr=3e-3, warmup_epochs=0.3))
    tower = pretrain.pretrained_image_tower("tiny", 0, progress=False)
    assert tower.is_file() and pretrain.pretrained_image_tower("tiny", 0, progress=False) == tower  # cached
    trunk = {k: v for k, v in load_file(str(tower)).items() if k.startswith(("features", "trunk"))}
    spec = TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask",
                    {"scale": "tiny", "seed": 0, "n_ids": 40, "temperature": 0.03, "tower": str(tower)})
    res = fit(spec, cfg(epochs=1, out_dir=str(tmp_path / "lit")))
    after = res.model.backbone.clip.visual.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trunk.items())  # weights and batch-norm statistics
    head = load_file(str(tower))["head.0.weight"]
    assert not torch.equal(after["head.0.weight"], head)  # the projection did learn


def test_cache_keys_name_cached_files_relative_to_the_cache(tmp_path, monkeypatch):
    from person_retrieval.papers.tpr import _path_key

    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "a"))
    inside_a = _path_key(str(tmp_path / "a" / "models" / "m" / "backbone.safetensors"))
    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path / "b"))
    assert _path_key(str(tmp_path / "b" / "models" / "m" / "backbone.safetensors")) == inside_a == "cache:models/m/backbone.safetensors"
    assert _path_key(str(tmp_path / "elsewhere")) == str((tmp_path / "elsewhere").resolve())


def test_a_finished_run_loads_under_another_process_count(tmp_path):
    """A run cached by one process is only loaded when another process count asks for it (notebook 04 asks
    with gpus=2 for notebook 01's run); an unfinished one refuses to resume inexactly, saying how."""
    fit(TINY, cfg(out_dir=str(tmp_path / "done"), epochs=1))
    fit(TINY, cfg(out_dir=str(tmp_path / "paused"), epochs=3, stop_after_epochs=1))
    task = TINY.build()
    model = task.build()
    c = cfg(epochs=1)
    opt = train.build_optimizer(model, c)
    sched = train.cosine_schedule(opt, 10, 1, 0.0)
    assert train._load_checkpoint(tmp_path / "done", model, opt, sched, rank=1, epochs=1)["epoch"] == 0
    with pytest.raises(ValueError, match="checkpointed by 1 process"):
        train._load_checkpoint(tmp_path / "paused", model, opt, sched, rank=1, epochs=3)
    with pytest.raises(ValueError, match="finished after epoch 1 and kept only its weights, so it cannot go on to 3 epochs"):
        train._load_checkpoint(tmp_path / "done", model, opt, sched, rank=0, epochs=3)


def test_two_processes_train_what_one_process_trains(tmp_path):
    """``batch_size`` is the global batch: over two gloo processes the same batches are seen, split in half, and the
    weights end where one process's do, up to floating-point rounding (a task with no BatchNorm and no dropout)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus=2 would mean two GPUs")
    spec = TaskSpec("_ddp_tasks:LinearContrastive", {})
    one = fit(spec, cfg(epochs=2, out_dir=str(tmp_path / "one")))
    two = fit(spec, cfg(epochs=2, gpus=2, out_dir=str(tmp_path / "two")))
    assert [h["step"] for h in two.history] == [h["step"] for h in one.history] == [12, 24]  # 96 pairs, global batch 8
    start = spec.build().build().state_dict()
    wa, wb = (load_file(tmp_path / x / "checkpoints" / "last.safetensors") for x in ("one", "two"))
    moved = max((wa[k] - start[k]).abs().max().item() for k in wa)
    gap = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert moved > 1e-2 and gap < 1e-4 * moved, (moved, gap)
    with pytest.raises(ValueError, match="does not split evenly over 2 processes"):
        fit(spec, cfg(epochs=1, gpus=2, batch_size=7, out_dir=str(tmp_path / "odd")))


def test_a_run_over_several_processes_has_its_own_cache_key():
    from person_retrieval.config import config_tag

    conf = {"epochs": 3, "batch_size": 8}
    assert train.process_tag(0) == train.process_tag(1) == ()  # one process: keys as they always were
    assert config_tag(conf, *train.process_tag(0)) == config_tag(conf)
    assert config_tag(conf, *train.process_tag(2)) not in (config_tag(conf), config_tag(conf, *train.process_tag(4)))


def test_a_shared_model_is_the_same_one_whatever_gpus_on_a_cpu_machine():
    """Notebooks run with -p gpus 2 read the backbone that make tables (gpus=0) built: on a machine without GPUs
    shared models are built in one process."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: there the shared models use the GPUs asked for")
    from person_retrieval.models import pretrained_mini_clip

    assert train.shared_gpus(2) == 0
    assert pretrained_mini_clip("tiny", 0, gpus=2, progress=False) == pretrained_mini_clip("tiny", 0, progress=False)


def test_irra_with_relation_reasoning_trains_over_two_processes(tiny_world, tmp_path):
    """IRRA's implicit relation reasoning passes everything it trains through the model's forward, so DDP
    reduces its gradients: two gloo processes train it, and the masked-word loss falls."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus=2 would mean two GPUs")
    spec = TaskSpec("person_retrieval.papers.tpr:IRRATask", {"dataset": "rstpreid", "root": str(tiny_world["rstpreid"]),
                                                             "scale": "tiny", "irr": True, "irr_layers": 1})
    res = fit(spec, cfg(gpus=2, epochs=2, batch_size=16, lr=5e-4, out_dir=str(tmp_path)))
    mlm = [h["mlm"] for h in res.history]
    assert len(mlm) == 2 and mlm[1] < mlm[0] < 12.0, mlm
    assert any(k.startswith("irr.") for k in load_file(tmp_path / "checkpoints" / "last.safetensors"))
