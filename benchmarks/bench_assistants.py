"""Assistant throughput: the mini MLLM's answers/s (recognizer included) on this CPU, SmolLM2-135M-Instruct's
answers/s, and the transformers VLM path (a tiny Qwen2-VL-class model) answering a batch of 256 images,
on the CPU and, where there is one, on the GPU in bf16 (the same code path)."""
import time

import numpy as np
import torch

from person_retrieval import assistants as A
from person_retrieval.assistants import prompts as P
from person_retrieval.world import PROFILES, render, sample_person, sample_state


def images(n: int, height: int):
    rng = np.random.default_rng(0)
    return [render(sample_person(rng, i), sample_state(rng, PROFILES["cuhk_pedes"]), height) for i in range(n)]


def mini(scale: str = "small") -> None:
    t = time.perf_counter()
    vlm = A.mini_vlm(scale, progress=False)
    print(f"mini MLLM ({scale}): recognizer ready in {time.perf_counter() - t:.1f} s (trained unless cached); "
          f"held-out accuracy {np.mean(list(vlm.recognizer.accuracy.values())):.1f}% mean over heads", flush=True)
    ims = images(512, 128 if scale == "small" else 64)
    qs = [list(P.CECA_QUESTIONS.values())[i % 5] for i in range(len(ims))]
    vlm.answer(ims[:8], qs[:8])
    t = time.perf_counter()
    vlm.answer(ims, qs)
    print(f"mini MLLM answer: {len(ims) / (time.perf_counter() - t):,.0f} answers/s (batch {len(ims)})", flush=True)
    lm = A.MiniLM()
    jobs = [P.CECA_SUMMARY.format(answers=a) for a in vlm.answer(ims[:200], qs[:200])]
    t = time.perf_counter()
    lm.generate(jobs)
    print(f"mini LM summaries: {len(jobs) / (time.perf_counter() - t):,.0f} /s", flush=True)


def smol() -> None:
    from person_retrieval.assistants.hf import smollm2

    lm = smollm2()
    jobs = [P.REPHRASE.format(text=f"A man wearing a {c} jacket and blue jeans.") for c in ("red", "black", "green", "white")]
    lm.generate(jobs[:1], max_new_tokens=4)
    t = time.perf_counter()
    out = lm.generate(jobs, max_new_tokens=32)
    dt = time.perf_counter() - t
    print(f"SmolLM2-135M-Instruct, CPU: {len(jobs) / dt:.2f} answers/s (batch 4, up to 32 new tokens); e.g. {out[0]!r}", flush=True)


def tiny_qwen(device: str, dtype) -> None:
    from person_retrieval.assistants import tiny
    from person_retrieval.assistants.hf import TransformersVLM

    model, proc = tiny.qwen2_vl()
    vlm = TransformersVLM(model.to(device=device, dtype=dtype), proc, max_new_tokens=8)
    ims = images(256, 128)
    vlm.answer(ims[:4], P.CECA_QUESTIONS["Q1"])
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    vlm.answer(ims, P.CECA_QUESTIONS["Q1"])
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"tiny Qwen2-VL ({device}, {str(dtype).split('.')[-1]}): {256 / (time.perf_counter() - t):,.0f} answers/s "
          "for one batch of 256 images (8 new tokens)", flush=True)


if __name__ == "__main__":
    mini()
    smol()
    tiny_qwen("cpu", torch.float32)
    if torch.cuda.is_available():
        tiny_qwen("cuda", torch.bfloat16)
