"""TIPS's synthesis speed on this CPU (the paper: 2.43 s per sample on one H800 with FLUX.1-dev): each stage
timed once over ``n`` identities (prompts, SPG seeds, the seed filter, IDPG expansions, the expansion filter,
captions), then the whole pipeline (redraws included) into a fresh folder, as kept pairs per second.

    python benchmarks/bench_tips.py [scale] [identities]      (default: tiny 12; small needs the small caches)
"""
import sys
import tempfile
import time

from person_retrieval.config import rng_for
from person_retrieval.papers import tips


def main(scale: str = "tiny", n: int = 12) -> None:
    lm, gen, vlm, names = tips.mini_models(scale, 0, progress=False)
    ex, sizes, profile = tips.domain(scale, 0, "cuhk_pedes", None, "zero_shot")
    rng = rng_for(0, "bench-tips")
    t = {}

    def timed(name, f):
        t0 = time.perf_counter()
        out = f()
        t[name] = time.perf_counter() - t0
        return out

    texts = timed("prompts (LLM)", lambda: tips.seed_prompts(lm, range(n), "zero_shot", ex))
    seeds = timed("seeds (SPG)", lambda: tips.draw_seeds(gen, "spg", texts, tips.draw_sizes(sizes, n, rng), 0))
    timed("seed filter (MLLM, 2 scores)", lambda: tips.seed_scores(vlm, seeds, texts))
    diffs = [d for d, _ in tips.draw_differences(4 * n, rng)]
    refs = seeds.repeat_interleave(4, 0)
    exp = timed("expansions (IDPG, 4 each)", lambda: tips.expand(gen, "spg+idpg", refs, diffs, 0))
    timed("expansion filter (MLLM, 3 scores)", lambda: tips.expansion_scores(vlm, exp, refs))
    timed("captions (MLLM, 2 each)", lambda: tips.captions(vlm, exp, rng))
    per = {"prompts (LLM)": n, "seeds (SPG)": n, "seed filter (MLLM, 2 scores)": n, "expansions (IDPG, 4 each)": 4 * n,
           "expansion filter (MLLM, 3 scores)": 4 * n, "captions (MLLM, 2 each)": 4 * n}
    print(f"TIPS stages at {scale} ({n} identities, {names[1]}):")
    for k, v in t.items():
        print(f"  {k:36s} {v:7.2f} s  {1000 * v / per[k]:8.1f} ms per image")
    one_pass = sum(t.values()) / (5 * n)
    print(f"  one pass, no redraws: {one_pass:.3f} s per image, {one_pass / 2:.3f} s per pair (two captions an image)")
    for source in ("spg+idpg", "oracle"):
        cfg = tips.TIPSConfig(n_prompts=n, scenario="zero_shot", source=source, shard_size=n, seed=0, models=names)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            tips.synthesize(d, cfg, lm, gen, vlm, ex, sizes, profile, progress=False)
            man = tips.assemble(d)
            s = time.perf_counter() - t0
            draws = tips.rejection_table(d)
        drawn = int(draws[draws.criterion == "any (draw rejected)"].draws.sum())
        rate = f"{man['pairs'] / s:.2f} kept pairs/s ({s / man['pairs']:.2f} s per kept pair)" if man["pairs"] else "no pair kept"
        print(f"  whole pipeline, {source:8s}: {s:6.1f} s, {drawn} images drawn, {man['images']} kept, {rate}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 12)
