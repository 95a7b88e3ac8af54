"""Rendering throughput (images/s on one core) and the time to write a CUHK-PEDES-shaped small world."""
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from person_retrieval.config import get_scale, rng_for  # noqa: E402
from person_retrieval.world import build_dataset, render, sample_people, sample_state  # noqa: E402


def rendering(height: int = 128, n: int = 5000) -> float:
    rng = rng_for(0, "bench")
    people = sample_people(rng, 500)
    states = [sample_state(rng) for _ in range(n)]
    render(people[0], states[0], height)  # warm the background caches
    t = time.perf_counter()
    for i in range(n):
        render(people[i % 500], states[i], height)
    return n / (time.perf_counter() - t)


def main():
    for h in (128, 64):
        print(f"render {h}x{h // 2}: {rendering(h):,.0f} images/s on one core")
    sc = get_scale("small")
    size = sc.tpr["cuhk_pedes"]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        root = build_dataset("cuhk_pedes", f"{d}/cuhk", "small", 0, progress=False)
        dt = time.perf_counter() - t
        n = sum(1 for _ in (root / "imgs").rglob("*.jpg"))
    print(f"write small CUHK-PEDES-shaped world ({sum(size.ids.values())} identities, test {size.ids['test']}; "
          f"{n} images, {size.captions_per_image} captions each, all splits): {dt:.1f} s")


if __name__ == "__main__":
    main()
