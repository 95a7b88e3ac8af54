"""The real CLIP architecture (ViT-B/16 + CLIP's 12-layer text transformer, random init, 384x128 input,
bf16 autocast) through the project's one training loop on one GPU, IRRA-style loss (SDM + ID):
pairs/s eager and compiled, model FLOPs utilisation against the card's measured bf16 matrix-product
rate, and where a step's time goes (data, host-to-device copy, GPU compute).

    python benchmarks/bench_gpu.py [--steps 150] [--batch 128]
"""
import argparse
import json
import time
from functools import cached_property

import torch

from person_retrieval.datasets.torch_data import RetrievalData
from person_retrieval.models import Backbone
from person_retrieval.papers.tpr import IRRATask
from person_retrieval.train import TaskSpec, TrainConfig, _to_device, fit


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def vit_b16() -> Backbone:
    import open_clip

    from person_retrieval.models.backbone import _tokenizer

    model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=(384, 128))
    return Backbone(model, _tokenizer(), "ViT-B-16 (random init)", {"arch": "ViT-B-16", "image_size": [384, 128]})


class ThroughputTask(IRRATask):
    """IRRA's loss on ViT-B/16 at 384x128 over random images and world-style captions (throughput only)."""

    def __init__(self, n_pairs: int = 19200, n_images: int = 4096, n_ids: int = 1000):
        super().__init__("cuhk_pedes", ".", scale="small")
        self.n_pairs, self.n_images, self.n_ids = n_pairs, n_images, n_ids

    @cached_property
    def backbone(self) -> Backbone:
        return vit_b16()

    @cached_property
    def _splits(self):
        import numpy as np

        from person_retrieval.world import caption, sample_person, sample_state, PROFILES

        g = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)
        people = [sample_person(rng, i) for i in range(self.n_ids)]
        img_pid = torch.arange(self.n_images) % self.n_ids
        cap_img = torch.randint(0, self.n_images, (self.n_pairs,), generator=g)
        caps = [caption(people[int(img_pid[i])], sample_state(rng, PROFILES["cuhk_pedes"]), "cuhk_pedes", rng)[0]
                for i in cap_img[:2000].tolist()]
        caps = [caps[i % len(caps)] for i in range(self.n_pairs)]
        data = RetrievalData(images=torch.randint(0, 256, (self.n_images, 3, 384, 128), dtype=torch.uint8, generator=g),
                             image_pids=img_pid, tokens=self.backbone.tokenize(caps), caption_pids=img_pid[cap_img],
                             caption_image_ids=cap_img, captions=caps)
        return data, None

    def evaluate(self, model) -> dict:
        return {}


def flops_per_pair(task: ThroughputTask, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = task.build().cuda()
    data = task.train_data()
    b = _to_device(data.batch(torch.arange(batch)), torch.device("cuda"))
    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = task.loss(model, b, lambda x: x)
        loss.backward()
    return fc.get_total_flops() / batch


def step_breakdown(task: ThroughputTask, batch: int, steps: int = 30) -> dict:
    """Milliseconds per step: building the batch on the host, copying it, and the GPU step alone."""
    from person_retrieval.train import build_optimizer

    dev = torch.device("cuda")
    model = task.build().to(dev)
    data = task.train_data()
    opt = build_optimizer(model, TrainConfig(lr=1e-5))
    idx = [torch.randperm(len(data))[:batch] for _ in range(steps)]
    t = time.perf_counter()
    raws = [data.batch(i) for i in idx]
    host = (time.perf_counter() - t) / steps
    torch.cuda.synchronize()
    t = time.perf_counter()
    batches = [_to_device(r, dev) for r in raws]
    torch.cuda.synchronize()
    copy = (time.perf_counter() - t) / steps
    for i, b in enumerate(batches + batches[:5]):
        if i == 5:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = task.loss(model, b, lambda x: x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    gpu = (time.perf_counter() - t) / steps
    return {"host_batch_ms": round(1e3 * host, 1), "h2d_copy_ms": round(1e3 * copy, 1), "gpu_step_ms": round(1e3 * gpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--modes", default="eager,compile")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 8192^3 matrix product {peak:.0f} TFLOP/s", flush=True)
    spec = TaskSpec("bench_gpu:ThroughputTask", {"n_pairs": a.steps * a.batch})
    task = spec.build()
    fpp = flops_per_pair(task, a.batch)
    print(f"model FLOPs per training pair (forward + backward, counted): {fpp / 1e9:.1f} GFLOP", flush=True)
    print("step breakdown (eager):", json.dumps(step_breakdown(task, a.batch)), flush=True)
    for mode in a.modes.split(","):
        cfg = TrainConfig(epochs=3, batch_size=a.batch, lr=1e-5, warmup_epochs=0.1, gpus=1, progress=False,
                          compile=(mode == "compile"))
        r = fit(spec, cfg)
        rates = [h["pairs_per_s"] for h in r.history]
        best = max(rates[1:])  # the first epoch holds warm-up (and compilation)
        print(f"{mode}: pairs/s per epoch {[round(x) for x in rates]}; steady {best:,.0f} pairs/s, "
              f"MFU {best * fpp / 1e12 / peak:.1%} of the measured bf16 rate; "
              f"60 IRRA epochs of CUHK-PEDES (68,126 pairs) in {60 * 68126 / best / 60:.0f} min", flush=True)


if __name__ == "__main__":
    main()
