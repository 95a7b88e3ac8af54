"""Evaluation time and peak memory of the metrics: a CUHK-PEDES-sized test (6,156 text queries x 3,074
images) and a 20,000 x 20,000 problem, with the torch and faiss paths. Each case runs in a fresh
process so its peak resident memory is its own.

    python benchmarks/bench_metrics.py            # all cases
    python benchmarks/bench_metrics.py CASE PATH  # one case (used internally)
"""
import resource
import subprocess
import sys
import time

CASES = {"cuhk": (6156, 3074), "20k": (20000, 20000)}


def one(case: str, path: str) -> None:
    import numpy as np
    import torch

    from person_retrieval.metrics import retrieval_metrics, retrieval_metrics_from_features

    nq, ng = CASES[case]
    rng = np.random.default_rng(0)
    n_ids = ng // 3
    gp = np.arange(ng) % n_ids
    qp = rng.integers(0, n_ids, nq)
    centers = rng.normal(size=(n_ids, 512)).astype(np.float32)
    g = torch.from_numpy(centers[gp] + rng.normal(scale=2.5, size=(ng, 512)).astype(np.float32))
    q = torch.from_numpy(centers[qp] + rng.normal(scale=2.5, size=(nq, 512)).astype(np.float32))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if path == "similarity":
        qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
        m = retrieval_metrics(qn @ gn.T, qp, gp)
    else:
        m = retrieval_metrics_from_features(q, g, qp, gp, backend=path)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{case:5s} {nq}x{ng} {path:10s}: {dt:6.2f} s, peak RSS {peak / 1024:,.0f} MiB "
          f"(+{(peak - base) / 1024:,.0f} MiB over the inputs), R1={m['R1']:.1f} mAP={m['mAP']:.1f}", flush=True)


def main():
    if len(sys.argv) == 3:
        return one(sys.argv[1], sys.argv[2])
    for case in CASES:
        for path in ("similarity", "torch", "faiss"):
            if case == "20k" and path == "similarity":
                continue  # the full 20k x 20k matrix alone is 1.6 GB: use the feature paths
            subprocess.run([sys.executable, __file__, case, path], check=True)


if __name__ == "__main__":
    main()
