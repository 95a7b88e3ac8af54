"""CTGI's assistant stages on this CPU: MTG pseudo-captions per second (6 rounds), and MTI queries per
second with the mini assistants against a gallery of 1,000 images (the RSTPReid-sized test split at
small), scored by the zero-shot mini CLIP. With a real MLLM the calls per query, not this arithmetic,
set the cost: the figures printed include them."""
import sys
import time

import torch

from person_retrieval import assistants as A
from person_retrieval import models
from person_retrieval.datasets import load_split
from person_retrieval.world import dataset_root
from person_retrieval.models import build_backbone
from person_retrieval.papers import ctgi
from person_retrieval.train import load_weights


def main(scale: str = "small") -> None:
    root = dataset_root("rstpreid", None, scale, 0)
    vlm, lm = A.mini_vlm(scale, progress=False), A.MiniLM()
    split = load_split("rstpreid", root, "train")
    from person_retrieval.viz import load_image

    ims = [load_image(p) for p in split.image_paths[:1024]]
    t = time.perf_counter()
    ctgi.mtg_captions(ims, vlm, lm, rounds=6)
    dt = time.perf_counter() - t
    print(f"MTG ({scale}, 6 rounds): {len(ims) / dt:,.0f} images/s, {vlm.usage.total_items() / len(ims):.1f} MLLM calls per image")
    bb = build_backbone(None, scale)
    load_weights(bb, models.pretrained_mini_clip(scale, 0, progress=False))
    model = models.DualEncoder(bb).eval()
    test = models.split_data("rstpreid", root, "test", bb)
    sim, text_scores = ctgi.scores_and_scorer(model, test)
    gallery = test.images.permute(0, 2, 3, 1).contiguous().numpy()
    vlm2 = A.MiniVLM(vlm.recognizer)
    t = time.perf_counter()
    b = ctgi.mti_rerank_batch(test.captions, sim, gallery, vlm2, A.MiniLM(), text_scores, top_k=20)
    dt = time.perf_counter() - t
    c = b.cost()
    print(f"MTI ({scale}, K=20, {len(gallery)} gallery images): {len(test.captions) / dt:,.0f} queries/s; "
          f"{c['MLLM calls / query']:.1f} MLLM calls and {c['LLM calls / query']:.2f} LLM calls per query; "
          f"refined {c['refined %']:.0f}%, no anchor {c['no anchor %']:.0f}%")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(*sys.argv[1:2])
