"""FAFA's training throughput (triplets/s) at tiny and small on this CPU, through the real training loop on
the world's rendered SynCPR-format triplets (the mini Q-Former over the mini CLIP's frozen tokens; a random
backbone: the speed is the same), and, where torch sees a CUDA GPU, the real-size BLIP-2 Q-Former
configuration (768 wide, 12 layers, 32 queries over 257 ViT-g tokens of width 1,408) in bf16."""
import time

import torch

from person_retrieval.papers import fafa
from person_retrieval.train import TaskSpec, TrainConfig, fit
from person_retrieval.world import world_dataset


def mini(scale: str, batch: int) -> None:
    root = world_dataset("syncpr", scale, 0, progress=False)
    spec = TaskSpec("person_retrieval.papers.fafa:FAFATask", {"root": str(root), "scale": scale})
    r = fit(spec, TrainConfig(epochs=2, batch_size=batch, lr=5e-4, progress=False))
    h = r.history[-1]
    print(f"FAFA {scale:5s} (batch {batch} triplets, shuffled as the release trains): {h['pairs_per_s']:,.0f} "
          f"triplets/s ({h['seconds']:.1f} s an epoch)", flush=True)


def real_size_gpu(batch: int = 64, steps: int = 20) -> None:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    dev = torch.device("cuda")
    q = Blip2QFormerModel(Blip2QFormerConfig(encoder_hidden_size=1408, use_qformer_text_input=True)).to(dev)
    size = fafa.QFormerSize(768, 12, 12, 32, 256, 3072)
    model = fafa.FAFAModel(q, size.queries, torch.nn.Embedding(30522, 768), size.proj).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    img = torch.randn(batch, 257, 1408, device=dev)
    ids = torch.randint(1, 30522, (batch, 24), device=dev)
    mask = torch.ones(batch, 24, dtype=torch.long, device=dev)
    gid = torch.arange(batch, device=dev) // 2
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            comp, tgt, scale = model(img, ids, mask, img.roll(1, 0))
            loss, _ = fafa.fafa_loss(comp.float(), tgt.float(), gid, scale, model.phi)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"FAFA real-size Q-Former, bf16, {torch.cuda.get_device_name()}: {steps * batch / (time.perf_counter() - t):,.0f} triplets/s "
          f"(batch {batch})", flush=True)


if __name__ == "__main__":
    mini("tiny", 8)
    mini("small", 64)
    if torch.cuda.is_available():
        real_size_gpu()
    else:
        print("FAFA real-size Q-Former: skipped (no CUDA GPU here)")
