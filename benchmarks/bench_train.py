"""Training throughput (pairs/s) of the mini CLIP at tiny and small on this CPU, through the real training
loop, for each image tower: the convolutional tower (locked, as in the alt-text pretraining and the locked
fine-tuning; unlocked, as when every layer trains) beside the first mini CLIP's vision transformer; and the
evaluation time of a CUHK-PEDES-sized test (6,156 captions x 3,074 images) end to end (encoding with the
small mini CLIP, then the metrics), for both towers."""
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from person_retrieval.datasets.torch_data import RetrievalData
from person_retrieval.models import DualEncoder, backbone as bbm, build_backbone, evaluate_retrieval
from person_retrieval.train import TaskSpec, TrainConfig, fit

ORIGINAL = dict(bbm.MINI_CONFIGS)


def use_tower(vision: str) -> None:
    for s in ("tiny", "small"):
        bbm.MINI_CONFIGS[s] = dataclasses.replace(ORIGINAL[s], vision=vision)


def training(scale: str, n_ids: int, batch: int, vision: str, locked: bool = False) -> None:
    use_tower(vision)
    kw = {"scale": scale, "seed": 0, "n_ids": n_ids, "temperature": 0.03}
    with tempfile.TemporaryDirectory() as d:
        if locked:  # a tower file to lock (random weights: the speed is the same)
            from safetensors.torch import save_model

            kw["tower"] = str(Path(d) / "tower.safetensors")
            save_model(build_backbone(None, scale).clip.visual, kw["tower"])
        r = fit(TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", kw),
                TrainConfig(epochs=2, batch_size=batch, lr=1e-3, progress=False))
    h = r.history[-1]  # the second epoch: caches warm
    name = f"{vision}{' (locked)' if locked else ''}"
    print(f"train {scale:5s} {name:13s} (batch {batch}): {h['pairs_per_s']:,.0f} pairs/s "
          f"({h['seconds']:.1f} s for {h['step'] // 2 * batch} pairs)", flush=True)


def evaluation(vision: str) -> None:
    use_tower(vision)
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
    print(f"evaluate a CUHK-PEDES-sized test (6,156 x 3,074), small mini CLIP, {vision} tower: "
          f"{time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    for vision, locked in (("vit", False), ("conv", False), ("conv", True)):
        training("tiny", 300, 32, vision, locked)
        training("small", 1000, 64, vision, locked)
    evaluation("vit")
    evaluation("conv")
