"""Launched by torchrun: the training loop joins the launcher's world instead of spawning its own, and the
syntheses take their shard from RANK / WORLD_SIZE and merge into what one process writes. Run here with
``torchrun --standalone --nproc_per_node 2`` on gloo (CPU processes)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from person_retrieval import shards, train
from person_retrieval.config import cache_dir
from person_retrieval.world import dataset_root
from person_retrieval.train import Launch, TaskSpec, TrainConfig, fit, launched

LIB = str(Path(__file__).resolve().parents[1] / "lib")
TINY = TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", {"scale": "tiny", "seed": 0, "n_ids": 40})
TRAIN = dict(epochs=2, batch_size=8, lr=1e-3, seed=0, progress=False, warmup_epochs=0.5)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

needs_cpu_processes = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: two ranks would need two GPUs")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "PYTHONPATH": LIB + os.pathsep + env.get("PYTHONPATH", ""), **extra}


def torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N`` (as ``python -m torch.distributed.run``) running a module."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _config(path: Path, out: Path, **train_kw) -> Path:
    path.write_text(json.dumps({"task": {"target": TINY.target, "kwargs": TINY.kwargs}, "train": {**TRAIN, "out_dir": str(out), **train_kw}}))
    return path


def _checkpoint_bytes(run: Path) -> dict:
    return {n: (run / "checkpoints" / f"{n}.safetensors").read_bytes() for n in ("last", "best")}


# ---------------------------------------------------------------------------------------------- reading the launch
def test_the_launch_is_read_from_torchruns_variables():
    assert launched({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert launched(env) == Launch(rank=3, world=4, local_rank=1, local_world=2)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE set but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        launched({"RANK": "0", "WORLD_SIZE": "2"})  # half a launch would hang at the rendezvous
    with pytest.raises(RuntimeError, match="0 <= RANK < WORLD_SIZE"):
        launched({**env, "RANK": "4"})
    with pytest.raises(RuntimeError, match="must be an integer"):
        launched({**env, "RANK": "one"})


def test_gpus_must_count_the_launchers_world():
    two = Launch(rank=0, world=2, local_rank=0, local_world=2)
    with pytest.raises(ValueError, match=r"train.gpus=3, but the launcher started 2 process\(es\).*set gpus to 2 or leave it out"):
        train.check_launch(TrainConfig(gpus=3), two)
    with pytest.raises(ValueError, match="needs train.out_dir, a folder every node sees"):
        train.check_launch(TrainConfig(gpus=2), two)
    if not torch.cuda.is_available():
        assert train.check_launch(TrainConfig(gpus=2, out_dir="runs/x"), two) == ("cpu", "gloo")
        assert train.check_launch(TrainConfig(gpus=0), Launch(0, 1, 0, 1)) == ("cpu", None)


def test_a_spawning_fit_inside_a_launchers_world_is_refused(monkeypatch):
    """Under torchrun, fit without launch= and gpus=N would start N processes on every rank: refused, saying how."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="pass launch=train.launched"):
        fit(TINY, TrainConfig(**TRAIN, gpus=2))


def test_the_command_line_refuses_a_disagreeing_gpus_before_the_rendezvous(tmp_path):
    """Checked before any process group is made: a wrong config fails at once instead of hanging."""
    p = _config(tmp_path / "run.json", tmp_path / "run", gpus=3)
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    r = subprocess.run([sys.executable, "-m", "person_retrieval.train", "--config", str(p)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "set gpus to 2 or leave it out of the config" in r.stderr, r.stderr
    p = _config(tmp_path / "run.json", tmp_path / "run")  # gpus left out: the world's size, said in the plan
    r = subprocess.run([sys.executable, "-m", "person_retrieval.train", "--config", str(p), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "in the launcher's world (WORLD_SIZE=2, 2 per node; nothing spawned)" in r.stdout, r.stdout + r.stderr


def test_a_share_given_besides_torchruns_must_agree():
    launch = Launch(rank=1, world=2, local_rank=1, local_world=2)
    assert shards.share_from(launch, None, None) == (1, 2) == shards.share_from(launch, 1, 2)
    assert shards.share_from(None, None, None) == (0, 1)
    with pytest.raises(ValueError, match="num_shards=4, but the launcher set WORLD_SIZE=2"):
        shards.share_from(launch, None, 4)


# ---------------------------------------------------------------------------------------------- the training loop
@needs_cpu_processes
def test_torchrun_trains_to_the_weights_the_loop_spawns(tmp_path):
    """The same run three ways: spawned by the loop (gpus=2), launched by torchrun (2 ranks), and launched by
    torchrun but paused after one epoch and resumed by a second launch. All end byte for byte the same."""
    fit(TINY, TrainConfig(**TRAIN, gpus=2, out_dir=str(tmp_path / "spawned")))
    r = torchrun("person_retrieval.train", "--config", str(_config(tmp_path / "a.json", tmp_path / "launched")))
    assert "in the launcher's world" in r.stdout and r.stdout.count('"best"') == 1  # rank 0 alone reports
    assert json.loads(r.stdout.strip().splitlines()[-1])["out_dir"] == str(tmp_path / "launched")
    want = _checkpoint_bytes(tmp_path / "spawned")
    assert _checkpoint_bytes(tmp_path / "launched") == want
    torchrun("person_retrieval.train", "--config", str(_config(tmp_path / "b.json", tmp_path / "resumed", stop_after_epochs=1)))
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "last_state.json").read_text())["epoch"] == 0
    r = torchrun("person_retrieval.train", "--config", str(_config(tmp_path / "b.json", tmp_path / "resumed")))
    assert "(resuming)" in r.stdout and _checkpoint_bytes(tmp_path / "resumed") == want
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1]  # epoch 0 from the first launch, epoch 1 from the second
    history = [json.loads(line) for line in (tmp_path / "launched" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]  # one log, written by global rank 0


# ---------------------------------------------------------------------------------------------- the syntheses
def _folder_digest(root: Path, skip=("timing.json",)) -> dict:
    """Every file of a synthesis folder (its images included) by path, as a hash; timings left out."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


@needs_cpu_processes
def test_syncpr_under_torchrun_merges_into_what_one_process_writes(tmp_path):
    """One process writes to --out; torchrun's two ranks to the default folder, the one notebook 03 reads
    (syncpr_dataset finds it done and synthesizes nothing). Same files, images included."""
    from person_retrieval.papers import syncpr

    args = ["--scale", "tiny", "--n-quadruples", "6", "--shard-size", "2", "--keep-mean", "1"]  # keep all: the merge, not the filter
    assert syncpr.main([*args, "--out", str(tmp_path / "one")]) == 0
    r = torchrun("person_retrieval.papers.syncpr", *args)
    assert "share 0 of 2: 2 shard(s) synthesized now [0, 2]" in r.stdout and "share 1 of 2: 1 shard(s) synthesized now [1]" in r.stdout
    assert r.stdout.count("candidate triplets") == 1  # rank 0 assembles
    folder = Path(r.stdout.split("synthesis folder: ")[1].split(" (")[0])
    timing = (folder / "timing.json").read_text()
    assert json.loads(timing)["processes"] == 2
    root, manifest = syncpr.syncpr_dataset("tiny", 0, n_quadruples=6, shard_size=2, keep_mean=1, progress=False)
    assert root == folder and (folder / "timing.json").read_text() == timing  # found done: nothing redone, timing kept
    one, two = _folder_digest(tmp_path / "one"), _folder_digest(folder)
    assert one == two and "SynCPR.json" in one and sum(k.endswith(".jpg") for k in one) == 6 * 2 * 2
    assert len(json.loads((folder / "SynCPR.json").read_text())) == 6 * 2 * 2 == manifest["kept"]
    shutil.rmtree(folder)


def test_syncpr_shared_by_hand_merges_when_the_last_share_ends(tmp_path, capsys):
    from person_retrieval.papers import syncpr

    args = ["--scale", "tiny", "--n-quadruples", "6", "--shard-size", "2", "--keep-mean", "1"]
    assert syncpr.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert syncpr.main([*args, "--out", str(tmp_path / "split"), "--shard", "1", "--num-shards", "2"]) == 0
    assert not (tmp_path / "split" / "manifest.json").exists() and "share 1 of 2 is done" in capsys.readouterr().out
    assert syncpr.main([*args, "--out", str(tmp_path / "split"), "--shard", "0", "--num-shards", "2"]) == 0
    assert _folder_digest(tmp_path / "split") == _folder_digest(tmp_path / "one")


@needs_cpu_processes
def test_tips_under_torchrun_merges_into_what_one_process_writes(tmp_path):
    """Both runs write the cache folder notebook 02_tips reads (the session's test cache); the first is moved aside."""
    from person_retrieval.papers import tips

    args = ["--scale", "tiny", "--n-prompts", "6", "--shard-size", "2", "--keep-score", "1"]  # keep all: the merge, not the filter
    assert tips.main(args) == 0
    (folder,) = [p for p in (cache_dir() / "tips").iterdir() if p.name.startswith("cuhk_pedes-tiny-seed0-few_shot-spg_idpg")
                 and json.loads((p / "synthesis.json").read_text())["n_prompts"] == 6]
    one = _folder_digest(folder)
    folder.rename(tmp_path / "one")
    r = torchrun("person_retrieval.papers.tips", *args)
    assert r.stdout.count("pairs kept") == 1 and _folder_digest(folder) == one
    assert "share 0 of 2: 2 shard(s) synthesized now [0, 2]" in r.stdout and "share 1 of 2: 1 shard(s) synthesized now [1]" in r.stdout
    man = json.loads((folder / "manifest.json").read_text())
    assert man["identities"] == 6 and man["images"] == 30 and len(man["shards"]) == 3
    # the notebook's call finds the same folder done
    world = dataset_root("cuhk_pedes", None, "tiny", 0)
    root, _ = tips.tips_dataset("tiny", 0, 0, n_prompts=6, shard_size=2, keep_score=1, max_tries=tips.MAX_TRIES, progress=False,
                                few_shot_root=tips.few_shot_split("cuhk_pedes", world, 0.01, 0))
    assert root == folder and json.loads((folder / "timing.json").read_text())["processes"] == 2
    shutil.rmtree(folder)


def test_a_half_set_launch_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "person_retrieval.papers.syncpr", "--scale", "tiny", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env=_env(WORLD_SIZE="1"), timeout=120)
    assert r.returncode == 2 and "error: WORLD_SIZE set but not RANK" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_each_synthesis_has_a_command_line_with_help():
    for mod in ("syncpr", "tips"):
        r = subprocess.run([sys.executable, "-m", f"person_retrieval.papers.{mod}", "--help"], capture_output=True, text=True,
                           env=_env(), timeout=120)
        assert r.returncode == 0 and "torchrun" in r.stdout and "--num-shards" in r.stdout, r.stderr
