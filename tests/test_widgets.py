"""The classroom demos (notebook 08), driven through their callbacks, without a browser."""
from collections import Counter

import pytest
import torch
import torch.nn as nn

from person_retrieval.analysis import COMPARED, world_people
from person_retrieval.assistants.grammar import parse_claims, render_claims
from person_retrieval.datasets.torch_data import to_float
from person_retrieval.models import DualEncoder, build_backbone, pretrained_mini_clip, split_data
from person_retrieval.papers import ctgi
from person_retrieval.widgets import ComposedRetrievalDemo, Gallery, GenerationDemo, TextRetrievalDemo, rank_of_first, rank_plot

pytest.importorskip("ipywidgets")


class _AttributeOracle(nn.Module):
    """A test model whose ranking is known: an image's feature is the one-hot of its person's true outfit
    (looked up by the image itself), a text's the one-hot of what the world's grammar reads in it, and the
    similarity the number of claims the person has."""

    def __init__(self, data, people):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))  # a device to be on
        self.vocab = sorted({(s, str(p[s])) for p in people for s in COMPARED})
        self.pos = {v: i for i, v in enumerate(self.vocab)}
        self.by_image = {to_float(im).numpy().tobytes(): p for im, p in zip(data.images, people)}
        self.texts: list[str] = []

    def tokenize(self, texts):
        self.texts.extend(texts)
        return torch.arange(len(self.texts) - len(texts), len(self.texts)).view(-1, 1) + 1

    def _onehot(self, pairs):
        v = torch.zeros(len(self.vocab))
        for pair in pairs:
            if pair in self.pos:
                v[self.pos[pair]] = 1
        return v

    def embed_images(self, x):
        return {"global": torch.stack([self._onehot((s, str(p[s])) for s in COMPARED) for p in (self.by_image[im.numpy().tobytes()] for im in x)])}

    def embed_texts(self, ids):
        return {"global": torch.stack([self._onehot(parse_claims(self.texts[int(i) - 1]).items()) for i in ids[:, 0]])}

    @staticmethod
    def similarity(txt, img):
        return txt["global"] @ img["global"].T


@pytest.fixture(scope="module")
def cuhk(tiny_world):
    data = split_data("cuhk_pedes", tiny_world["cuhk_pedes"], "test", build_backbone(None, "tiny"))
    return data, world_people(data, tiny_world["cuhk_pedes"])


def test_naming_the_targets_rare_attribute_ranks_it_higher(cuhk):
    data, people = cuhk
    oracle = _AttributeOracle(data, people)
    g = Gallery(oracle, data, tokenize=oracle.tokenize)
    assert g.index is None  # not a plain cosine model: ranked by its own similarity
    imgs = {s: Counter(str(p[s]) for p in people) for s in ("upper_color", "lower_color", "shoes_color")}
    n, i, slot = min((imgs[s][str(p[s])], i, s) for i, p in enumerate(people) for s in imgs)  # the rarest colour in the gallery
    pid, mine = int(data.image_pids[i]), str(people[i][slot])
    common, n_common = imgs[slot].most_common(1)[0]
    assert common != mine and n < n_common
    rare_q, common_q = render_claims({slot: mine}), render_claims({slot: common})
    assert parse_claims(rare_q) == {slot: mine}
    assert g.rank_of(rare_q, pid) <= n < n_common < g.rank_of(common_q, pid)  # first among the few; behind all the many


def test_the_text_demo_answers_through_its_widgets(cuhk, tiny_world):
    data, people = cuhk
    oracle = _AttributeOracle(data, people)
    torch.manual_seed(0)
    cosine = DualEncoder(build_backbone(None, "tiny"))
    demo = TextRetrievalDemo({"cuhk_pedes": data}, {"oracle": oracle, "cosine": cosine}, {"cuhk_pedes": people}, k=5)
    demo._galleries["cuhk_pedes", "oracle"] = Gallery(oracle, data, tokenize=oracle.tokenize)
    res = demo.pick_caption(3)
    assert demo.query.value == data.captions[3] and res.target_pid == int(data.caption_pids[3])
    assert demo.results.value.count('class="pr-hit"') == 5 and len(res.ranked) == 5
    assert ("#2ca02c" in demo.results.value) == (res.target_pid in res.ranked_pids.tolist())  # the person to find, outlined
    assert "the query says" in demo.claims.value and ("right" in demo.status.value) == res.r1
    snap = demo.snapshot().data  # the static copy papermill keeps: every output the widgets show now
    assert demo.results.value in snap and demo.claims.value in snap and demo.status.value in snap
    demo.caption.value = 4  # the widget's own observer searches again
    assert demo.last.text == data.captions[4]
    edited = demo.search(render_claims({"upper_color": str(people[0]["upper_color"])}))
    assert edited.typed and edited.target_pid is None and edited.claims == {"upper_color": str(people[0]["upper_color"])}
    demo.model.value = "cosine"  # a plain cosine model: searched with faiss, same order as its similarity
    g = demo.gallery()
    assert g.index is not None
    sim = cosine.similarity(g.embed(demo.query.value), g.features)[0]
    assert torch.equal(torch.as_tensor(demo.last.ranked[:3]), torch.argsort(-sim, stable=True)[:3])
    with pytest.raises(ValueError, match="at least one dataset"):
        TextRetrievalDemo({}, {"cosine": cosine})


def test_a_model_whose_gallery_reads_summaries_ranks_over_them_in_the_text_demo(cuhk):
    """CECA's gallery: the same test images, each with a text beside it; the demo must rank over that split."""
    import dataclasses

    from person_retrieval.papers import ceca

    data, people = cuhk
    backbone = build_backbone(None, "tiny")
    torch.manual_seed(0)
    model = ceca.CECAModel(backbone).eval()
    summaries = backbone.tokenize([f"a person in {p['upper_color']} and {p['lower_color']}" for p in people])
    with_s = dataclasses.replace(data, image_texts=summaries)
    demo = TextRetrievalDemo({"cuhk_pedes": data}, {"CECA": {"cuhk_pedes": model}}, {"cuhk_pedes": people}, k=5,
                             gallery_data={"CECA": {"cuhk_pedes": with_s}})
    g = demo.gallery()
    assert g.data is with_s and "summary" in g.features and g.index is None
    res = demo.pick_caption(2)
    want = model.similarity(g.embed(data.captions[2]), model.embed_images(to_float(data.images), summaries))[0]
    assert torch.equal(torch.as_tensor(res.ranked), torch.argsort(-want, stable=True)[:5])
    plain = Gallery(model, data)  # without the summaries the gallery is another one
    assert "summary" not in plain.features and not torch.allclose(plain.features["global"], g.features["global"])
    shuffled = dataclasses.replace(with_s, image_pids=with_s.image_pids.flip(0))
    with pytest.raises(ValueError, match="is not the gallery of dataset 'cuhk_pedes'"):
        TextRetrievalDemo({"cuhk_pedes": data}, {"CECA": model}, gallery_data={"CECA": {"cuhk_pedes": shuffled}})
    with pytest.raises(ValueError, match="names model 'RDE'"):
        TextRetrievalDemo({"cuhk_pedes": data}, {"CECA": model}, gallery_data={"RDE": {"cuhk_pedes": with_s}})


def _buttons(widget):
    import ipywidgets as W

    if isinstance(widget, W.Button):
        yield widget
    for c in getattr(widget, "children", ()):
        yield from _buttons(c)


def test_a_typed_query_is_not_judged_against_the_captions_person(cuhk):
    """The query box starts with a test caption, whose person is the one to find; a query the user types is
    nobody's caption: no "Rank-1 right/wrong", no one outlined, its claims against the top-1 only."""
    data, people = cuhk
    oracle = _AttributeOracle(data, people)
    demo = TextRetrievalDemo({"cuhk_pedes": data}, {"oracle": oracle}, {"cuhk_pedes": people}, k=5)
    demo._galleries["cuhk_pedes", "oracle"] = Gallery(oracle, data, tokenize=oracle.tokenize)
    judged = demo.pick_caption(0)
    assert judged.r1 is not None and "Rank-1" in demo.status.value and "the person to find" in demo.claims.value
    demo.query.value = "A man in red shoes."  # typed into the box, then Search
    demo.button.click()
    typed = demo.last
    assert typed.typed and typed.r1 is None and typed.text == "A man in red shoes."
    assert "Rank-1" not in demo.status.value and "the person to find is id" not in demo.status.value
    assert "your own query" in demo.status.value and "oracle on cuhk_pedes" in demo.status.value
    assert "#2ca02c" not in demo.results.value and demo.results.value.count('class="pr-hit"') == 5  # no one outlined
    assert "shoes_color = red" in demo.claims.value and "top-1" in demo.claims.value and "the person to find" not in demo.claims.value
    assert demo.search(data.captions[0] + " ").r1 == judged.r1  # the caption itself (give or take a space) is judged
    demo.caption.value = 2  # another test caption: judged again
    assert demo.last.target_pid == int(data.caption_pids[2]) and "Rank-1" in demo.status.value


def test_every_button_label_fits(cuhk):
    """ipywidgets' default button width cuts a long label ("Answer from the image") short: each demo's
    buttons size themselves to their labels."""
    data, people = cuhk
    demos = [TextRetrievalDemo({"cuhk_pedes": data}, {"oracle": _AttributeOracle(data, people)}),
             ComposedRetrievalDemo(data.images[:2], ["a", "b"], [0, 1], data.images[:3], [0, 1, -1],
                                   {"r": lambda i, t: torch.arange(3.0)}),
             GenerationDemo(lambda *a: torch.zeros(1, 3, 8, 4, dtype=torch.uint8), {"none": None})]
    buttons = [b for d in demos for b in _buttons(d.widget)]
    assert {b.description for b in buttons} >= {"Search", "random", "Generate"}
    assert all(b.layout.width == "max-content" for b in buttons), [(b.description, b.layout.width) for b in buttons]


def test_the_rank_plot_reads_as_plain_ranks_rank_1_on_top():
    import matplotlib.pyplot as plt

    for ranks, refined in (([17, 4, 1], None), ([1], [1]), ([3, 2], [5, 1])):
        fig = rank_plot(ranks, refined)
        ax = fig.axes[0]
        bottom, top = ax.get_ylim()
        assert ax.get_yscale() == "linear" and top < 1 < bottom and bottom >= max(ranks + (refined or []))  # inverted: 1 on top
        ticks = [t for t in ax.get_yticks() if top <= t <= bottom]
        assert ticks and all(float(t).is_integer() for t in ticks) and min(ticks) <= 2, ticks
        assert list(ax.get_xticks()) == list(range(1, len(ranks) + 1)), ax.get_xticks()
        plt.close(fig)


def test_the_generation_demo_says_tiny_models_draw_no_people():
    gen = lambda prompts, size, beta, seed: torch.zeros(len(prompts), 3, 8, 4, dtype=torch.uint8)  # noqa: E731
    tiny = GenerationDemo(gen, {"none": None}, prompt="a woman", n=2, scale="tiny")
    tiny.run()
    assert "draws no people" in tiny.note.value and "draws no people" in tiny.snapshot().data
    small = GenerationDemo(gen, {"none": None}, prompt="a woman", n=2, scale="small")
    assert small.note.value == "" and "draws no people" not in small.snapshot().data


def test_the_chat_demo_reranks_by_the_whole_dialogue_after_every_answer(tiny_world, monkeypatch):
    from person_retrieval import widgets

    plotted = []
    monkeypatch.setattr(widgets, "rank_plot", lambda ranks, refined=None: plotted.append((list(ranks), refined)) or rank_plot(ranks, refined))
    from person_retrieval import assistants
    from person_retrieval.datasets import read_chatpedes
    from person_retrieval.papers import diana

    folder = diana.build_chatpedes("tiny", 0, progress=False) / "clean"
    task = diana.DiaNATask(chat_root=str(folder), scale="tiny")
    torch.manual_seed(0)
    model = task.build()
    entries = read_chatpedes(folder, "test")
    vlm, _ = assistants.load("tiny", 0)
    demo = diana.chat_demo(model, entries, folder / "imgs", task._tokenize, task.backbone.image_size, vlm=vlm, k=5, start=2)
    first_answer = diana.rounds_of(entries[2]["chats"][0])[0][1]
    assert demo.target_pid == entries[2]["id"] and len(demo.ranks) == 1 and first_answer in demo.transcript.value
    q1 = demo.question.value
    assert q1 and "pr-plot" in demo.plot.value and plotted[-1] == (demo.ranks, None)  # plain ranks, rank 1 on top
    assert all(b.layout.width == "max-content" for b in _buttons(demo.widget))
    demo.answer_box.value = "they wear a red hat"
    demo.send.click()  # the button's own handler
    assert demo.rounds[-1] == (q1, "they wear a red hat") and demo.answer_box.value == ""
    assert demo.ranks[-1] == demo.gallery.rank_of(diana.dialogue_text(demo.rounds), demo.target_pid)
    q2 = demo.question.value
    res = demo.answer(None)  # the MLLM answers from the target image
    assert len(res.rounds) == 3 and res.rounds[-1][0] == q2 and res.rounds[-1][1] and len(res.ranks) == 3
    assert demo.results.value.count('class="pr-hit"') == 5
    with pytest.raises(ValueError, match="the answer is empty"):
        demo.answer("  ")
    demo.entry.value = 0  # another person: the dialogue starts again
    assert len(demo.rounds) == 1 and demo.target_pid == entries[0]["id"] and len(demo.ranks) == 1

    # CTGI's MTI as a second re-ranking: a refiner that changes nothing leaves the ranks as they are ...
    same = diana.chat_demo(model, entries, folder / "imgs", task._tokenize, task.backbone.image_size, vlm=vlm, start=2,
                           refine=lambda text, scores, gallery: (scores, None))
    same.answer("they wear a red hat")
    assert same.refined_ranks == same.ranks == demo_ranks_for(diana, model, entries, folder, task, same.rounds, same.target_pid)
    assert "no refinement this round" in same.refined_results.value
    # ... and the real one re-ranks as mti_rerank does, its refined query shown
    _, lm = assistants.load("tiny", 0)
    mti = diana.chat_demo(model, entries, folder / "imgs", task._tokenize, task.backbone.image_size, vlm=vlm, start=2,
                          refine=ctgi.mti_refiner(vlm, lm, top_k=5))
    res = mti.answer(None)
    g = mti.gallery
    direct = ctgi.mti_rerank(mti.dialogue(), g.scores(mti.dialogue()), g.data.images.permute(0, 2, 3, 1).numpy(), vlm, lm, g.scores, top_k=5)
    assert res.refined == direct.refined and len(res.refined_ranks) == len(res.ranks) == 2
    assert res.refined_ranks[-1] == rank_of_first(g.data.image_pids.numpy()[torch.argsort(-direct.scores, stable=True).numpy()], mti.target_pid)
    assert "+ MTI" in mti.refined_results.value or "multi-turn interaction" in mti.refined_results.value


def demo_ranks_for(diana, model, entries, folder, task, rounds, pid):
    """The target's rank after each round, computed without the demo: the whole dialogue so far, ranked."""
    g = Gallery(model, diana.chat_retrieval_data(entries, folder / "imgs", task._tokenize, task.backbone.image_size, n_rounds=1), task._tokenize)
    return [g.rank_of(diana.dialogue_text(rounds[: n + 1]), pid) for n in range(len(rounds))]


def test_the_composed_demo_steps_through_queries_and_ranks_with_each_method():
    torch.manual_seed(0)
    refs, gal = torch.randint(0, 255, (4, 3, 8, 4), dtype=torch.uint8), torch.randint(0, 255, (6, 3, 8, 4), dtype=torch.uint8)
    gal_ids = [10, 11, 12, 13, 11, -1]

    def names_an_id(i, text):  # a text oracle: the gallery items whose id the text names
        return torch.tensor([float(f"id {t}" in text) for t in gal_ids]) - 0.01 * torch.arange(6)

    demo = ComposedRetrievalDemo(refs, ["the same, id 13", "id 11", "id 12", "red"], [13, 11, 12, 10], gal, gal_ids,
                                 {"oracle": names_an_id, "image only": lambda i, text: torch.arange(6.0) * (1 if i % 2 else -1)}, k=3)
    demo.step(1)  # the image-only ranking puts the distractor (id -1) first: it says so
    assert "1. distractor" in demo.results.value and "id -1" not in demo.results.value
    demo.step(-1)
    assert demo.last.query == 0 and demo.last.target_rank == {"oracle": 1, "image only": 4}
    assert demo.results.value.count('class="pr-hit"') == 6 and "reference of query 0" in demo.reference.value
    demo.next.click()
    assert demo.last.query == 1 and demo.text.value == "id 11" and demo.last.ranked_ids["oracle"].tolist() == [11, 11, 10]
    assert demo.last.target_rank["image only"] == 2  # its order 5, 4, 3, ...: ids -1, 11, ...
    demo.step(10)  # clipped at the last query
    assert demo.last.query == 3 and demo.last.target_rank["oracle"] == 1  # 'red' names no id: ties keep index order
    named = demo.search("a red coat, id 12")
    not_named = demo.search("a red coat")
    assert named.target == 10 and named.target_rank["oracle"] == 2 and not_named.target_rank["oracle"] == 1
    demo.query_no.value = 2
    assert demo.last.text == "id 12" and demo.last.target_rank["oracle"] == 1
    demo.pick_random()
    assert 0 <= demo.last.query < 4
    with pytest.raises(ValueError, match="one each per query"):
        ComposedRetrievalDemo(refs, ["a"], [1], gal, gal_ids, {"oracle": names_an_id})


def test_the_composed_demo_scores_fafa_as_the_benchmark_does(tiny_world):
    from person_retrieval.datasets import read_itcpr
    from person_retrieval.papers import fafa

    init = str(pretrained_mini_clip("tiny", 0, progress=False))
    bench = read_itcpr(tiny_world["itcpr"])
    model = fafa.FAFATask(str(tiny_world["syncpr"]), scale="tiny", init=init).build()
    torch.manual_seed(0)
    tpr_model = DualEncoder(build_backbone(None, "tiny"))
    demo = fafa.composed_demo(model, bench, "tiny", init, tpr_model, k=5, start=1)
    sim = fafa.itcpr_similarity(model, bench, "tiny", init)
    base = fafa.baseline_similarities(fafa.mini_backbone("tiny", init), tpr_model, bench)
    g_ids = torch.tensor([g["instance_id"] for g in bench.gallery])
    for i in (1, 2):
        res = demo.pick(i)
        for name, s in (("FAFA", sim[i]), ("image only", base["image only"][i]), ("text only", base["text only"][i])):
            order = torch.argsort(-s, stable=True)
            assert res.ranked_ids[name].tolist() == g_ids[order[:5]].tolist(), name
            assert res.target_rank[name] == rank_of_first(g_ids[order].numpy(), res.target)


def test_the_generation_demo_samples_as_the_generator_does():
    from person_retrieval.generators.mini import mini_generators

    gen, _ = mini_generators("tiny", seed=0, progress=False)
    demo = GenerationDemo(lambda prompts, size, beta, seed: gen.spg(prompts, size, seed=seed, beta=beta),
                          {"no size": None, "large (64x128)": (64, 128)}, prompt="a woman in a red coat", n=3)
    a = demo.run()
    assert a.shape[0] == 3 and a.dtype == torch.uint8 and demo.grid.value.count('class="pr-hit"') == 3
    assert torch.equal(a, gen.spg(["a woman in a red coat"] * 3, None, seed=0, beta=1.0))
    demo.button.click()
    assert torch.equal(demo.last, a)  # same settings, same seed: the same images
    b = demo.run(beta=0.0)
    assert not torch.equal(a, b) and "beta=0.00" in demo.grid.value
    c = demo.run(size="large (64x128)", beta=1.0)
    assert torch.equal(c, gen.spg(["a woman in a red coat"] * 3, (64, 128), seed=0, beta=1.0)) and "large" in demo.grid.value
    with pytest.raises(ValueError, match="the prompt is empty"):
        demo.run(prompt=" ")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        demo.run(size="huge")
