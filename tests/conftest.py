"""Test configuration: offline, and results and caches in temporary folders so the committed
tables and figures are never touched by a test run."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
_tmp = tempfile.mkdtemp(prefix="pr-tests-")
os.environ["PR_RESULTS_DIR"] = os.path.join(_tmp, "results")
os.environ.setdefault("PR_CACHE_DIR", os.path.join(_tmp, "cache"))

import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    """Remove this run's caches and results (about 1.5 GB): a CI disk must not fill up over runs.
    ``PR_KEEP_TEST_FILES=1`` keeps them for a look after a failure."""
    if not os.environ.get("PR_KEEP_TEST_FILES"):
        shutil.rmtree(_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_world():
    """Every world dataset at scale tiny, built once per test session: name -> folder."""
    from person_retrieval.world import FORMAT_NAMES, world_dataset

    return {name: world_dataset(name, "tiny", seed=0, progress=False) for name in FORMAT_NAMES}


@pytest.fixture
def kill_after_first_shard():
    """Run ``code`` (a ``python -c`` program that synthesizes into ``sys.argv[1]`` the configuration given as JSON in
    ``sys.argv[2]``) and SIGKILL it once its first shard's record is on disk: a real crash part-way."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    def run(code: str, folder, config: dict, poll: float = 0.02) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "lib")}
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder), json.dumps(config)], env=env)
        t0 = time.time()
        while not (Path(folder) / "shards" / "shard_00000.json").is_file() and time.time() - t0 < 300 and proc.poll() is None:
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    return run
