"""Training throughput (pairs/s) of the mini CLIP at tiny and small on this CPU, through the real training
loop, and the evaluation time of a CUHK-PEDES-sized test (6,156 captions x 3,074 images) end to end
(encoding with the small mini CLIP, then the metrics)."""
import time

import torch

from person_retrieval.datasets.torch_data import RetrievalData
from person_retrieval.models import DualEncoder, evaluate_retrieval
from person_retrieval.models import build_backbone
from person_retrieval.train import TaskSpec, TrainConfig, fit


def training(scale: str, n_ids: int, batch: int) -> None:
    spec = TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", {"scale": scale, "seed": 0, "n_ids": n_ids})
    r = fit(spec, TrainConfig(epochs=2, batch_size=batch, lr=1e-3, progress=False))
    h = r.history[-1]  # the second epoch: caches warm
    print(f"train {scale:5s} (batch {batch}): {h['pairs_per_s']:,.0f} pairs/s ({h['seconds']:.1f} s for {h['step'] // 2 * batch} pairs)", flush=True)


def evaluation() -> None:
    bb = build_backbone(None, "small")
    h, w = bb.image_size
    g = torch.Generator().manual_seed(0)
    data = RetrievalData(
        images=torch.randint(0, 256, (3074, 3, h, w), dtype=torch.uint8, generator=g),
        image_pids=torch.arange(3074) // 3,
        tokens=bb.tokenize(["a man wearing a black jacket, blue jeans and white sneakers. he is carrying a backpack."] * 6156),
        caption_pids=(torch.arange(6156) // 2) % 1025, caption_image_ids=torch.arange(6156) // 2, captions=[""] * 6156)
    t = time.perf_counter()
    evaluate_retrieval(DualEncoder(bb).eval(), data)
    print(f"evaluate a CUHK-PEDES-sized test (6,156 x 3,074) with the small mini CLIP: {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    training("tiny", 300, 32)
    training("small", 1000, 64)
    evaluation()
