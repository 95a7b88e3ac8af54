"""Generator throughput: the mini generator's sampling (images/s, SPG at its default steps, with
guidance) and training (samples/s, base and LoRA), and the FLUX.1-dev code path on a tiny randomly
initialised config at TIPS's 192x384 and 28 steps: one LoRA training step and one sampling call.

On a CUDA device the FLUX path runs in bf16 and the mini generator's training is timed on the GPU as
well as on the CPU. ``python benchmarks/bench_generators.py [scale]`` (default small; the mini generator
is trained first if it is not cached)."""
import sys
import time

import torch


def _time(fn, repeat: int = 1) -> float:
    fn()  # warm-up (first-call allocations, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def mini(scale: str) -> None:
    from person_retrieval.generators.flow import Condition, flow_matching_loss
    from person_retrieval.generators.lora import add_lora
    from person_retrieval.generators.mini import MINI_FLUX, TEXT_DIM, mini_flux, mini_generators, token_channels, token_grid

    gen, report = mini_generators(scale, 0, progress=False)
    n = 32
    dt = _time(lambda: gen.spg(["a man in a red shirt and blue jeans"] * n, (32, 64), seed=0))
    print(f"mini generator ({scale}, {gen.steps} steps, SPG guidance {gen.spg_guidance}): sampling {n / dt:.1f} images/s on the CPU")
    for k, v in report.items():
        if isinstance(v, dict):
            print(f"  trained {k}: {v['seconds']:.0f} s, {v['samples_per_s']:.0f} samples/s")
    cfg = MINI_FLUX[scale]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for lora in (False, True):
            model = mini_flux(cfg, TEXT_DIM[scale]).to(dev)
            if lora:
                model.requires_grad_(False)
                add_lora(model, "spg", cfg.rank)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
            b = cfg.batch_size
            grid = token_grid(cfg)
            x = torch.randn(b, grid[0] * grid[1], token_channels(cfg), device=dev)
            c = Condition(torch.randn(b, 60, TEXT_DIM[scale], device=dev), torch.randn(b, TEXT_DIM[scale], device=dev))

            def step():
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    loss = flow_matching_loss(model, x, c, grid)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            dt = _time(step, 5)
            print(f"mini generator training ({'LoRA' if lora else 'all weights'}, batch {b}) on {dev}: {b / dt:,.0f} samples/s")


def flux_tiny() -> None:
    from person_retrieval.generators import flux, lora

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    pipe = flux.tiny_flux_pipeline().to(dev, dtype)
    gen = flux.flux_generator(pipe, height=384, width=192, steps=28, batch=8)
    lora.add_lora(pipe.transformer, "spg", rank=32)
    lora.use_adapter(pipe.transformer, "spg")
    opt = flux.lora_optimizer(pipe.transformer)
    imgs = torch.randint(0, 256, (1, 3, 384, 192), dtype=torch.uint8, device=dev)

    def step():
        loss = flux.lora_loss(gen, "spg", imgs, ["a man in a red shirt"], sizes=[(64, 128)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(f"FLUX path, tiny config, {dev} {str(dtype).split('.')[-1]}: one LoRA step at 192x384 {1000 * _time(step, 3):.0f} ms")
    n = 8
    dt = _time(lambda: gen.spg(["a man in a red shirt"] * n, (64, 128), seed=0))
    print(f"FLUX path, tiny config: 28-step sampling of a batch of {n} at 192x384 {dt:.2f} s ({n / dt:.1f} images/s)")


if __name__ == "__main__":
    scale = sys.argv[1] if len(sys.argv) > 1 else "small"
    torch.manual_seed(0)
    flux_tiny()
    mini(scale)
