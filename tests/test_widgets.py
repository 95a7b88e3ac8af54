"""The classroom demos (notebook 08), driven through their callbacks, without a browser."""
from collections import Counter

import pytest
import torch
import torch.nn as nn

from person_retrieval.analysis import COMPARED, world_people
from person_retrieval.assistants.grammar import parse_claims, render_claims
from person_retrieval.datasets.torch_data import to_float
from person_retrieval.models import DualEncoder, build_backbone, split_data
from person_retrieval.widgets import Gallery, TextRetrievalDemo

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
    demo.caption.value = 4  # the widget's own observer searches again
    assert demo.last.text == data.captions[4]
    edited = demo.search(render_claims({"upper_color": str(people[0]["upper_color"])}))
    assert edited.target_pid == int(data.caption_pids[4]) and edited.claims == {"upper_color": str(people[0]["upper_color"])}
    demo.model.value = "cosine"  # a plain cosine model: searched with faiss, same order as its similarity
    g = demo.gallery()
    assert g.index is not None
    sim = cosine.similarity(g.embed(demo.query.value), g.features)[0]
    assert torch.equal(torch.as_tensor(demo.last.ranked[:3]), torch.argsort(-sim, stable=True)[:3])
    with pytest.raises(ValueError, match="at least one dataset"):
        TextRetrievalDemo({}, {"cosine": cosine})


def test_the_chat_demo_reranks_by_the_whole_dialogue_after_every_answer(tiny_world):
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
    assert q1 and "pr-plot" in demo.plot.value
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
