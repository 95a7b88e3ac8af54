"""Notebook 08's demos: the latency of each interaction (median of 20, after one warm-up), over the
notebook's own models. The demos are built by running the notebook's code cells (from its source,
notebooks/src/08_demos.py) in this process, so the figures are those of the notebook's objects; models
missing from the cache are trained first (not timed).

    python benchmarks/bench_demos.py [scale]     # default small
"""
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def notebook_objects(scale: str) -> dict:
    from build_notebooks import parse

    ns: dict = {}
    for cell in parse((ROOT / "notebooks" / "src" / "08_demos.py").read_text()):
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), ns)
            if "parameters" in cell["metadata"].get("tags", []):
                ns["scale"] = scale
    return ns


def median_ms(fn, n: int = 20) -> float:
    fn()  # warm-up
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(scale: str = "small") -> None:
    ns = notebook_objects(scale)
    text, comp, chat, gen = ns["text_demo"], ns["composed_demo"], ns["chat_demo"], ns["gen_demo"]
    n_text = len(text.datasets[text.dataset.value].captions)
    def searched_with(model):  # the model picked (its gallery computed once, before the timing), then a search
        def run(i=0):
            if text.model.value != model:
                text.model.value = model
            return text.search(f"A person in red shoes {i}.")
        return run

    rows = [
        ("text: pick a caption and search", lambda i=0: text.pick_caption((7 * i + 1) % n_text)),
        *[(f"text: search an edited query ({m})", searched_with(m)) for m in text.models],
        ("composed: next query (3 rankings)", lambda i=0: comp.step(1) if comp.query_no.value + 1 < len(comp.captions) else comp.pick(0)),
        ("composed: search an edited text", lambda i=0: comp.search(f"the same person, with a red bag {i}")),
        ("chat: answer a round (DiaNA + MTI)", lambda i=0: chat.answer("she wears black trainers") if len(chat.rounds) < 8 else chat.restart(i % 5)),
        ("generation: 8 samples", lambda i=0: gen.run(seed=i)),
    ]
    print(f"demo latency at scale={scale} (median of 20, ms; one CPU process, torch threads {__import__('torch').get_num_threads()})")
    for name, fn in rows:
        print(f"  {name:44s} {median_ms(fn):8.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
