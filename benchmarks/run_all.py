"""Run every benchmark and print its figures (`make bench`).

The GPU benchmarks run only where torch sees a CUDA device: ``bench_gpu.py`` (ViT-B/16 at 384x128 through
the training loop) and ``bench_pretrain_budget.py`` (how far a pretraining budget carries; takes
arguments, see its docstring)."""
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GPU_ONLY = {"bench_gpu.py"}
WITH_ARGS = {"bench_pretrain_budget.py": ["12", "6000", "0.03", "2", "1"]}

for script in sorted(HERE.glob("bench_*.py")):
    needs_gpu = script.name in GPU_ONLY or script.name in WITH_ARGS
    if needs_gpu and not torch.cuda.is_available():
        print(f"== {script.name}: skipped (needs a CUDA GPU)", flush=True)
        continue
    print(f"== {script.name}", flush=True)
    subprocess.run([sys.executable, str(script), *WITH_ARGS.get(script.name, [])], check=True)
