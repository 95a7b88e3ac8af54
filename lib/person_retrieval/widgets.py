"""Interactive retrieval demos for the classroom (notebook 08), over the other notebooks' cached models.

Each demo is a small class that holds its ipywidgets and a plain-Python callback, so a test (or a script)
drives it without a browser: set a widget's value or call the callback, read what it returned and what the
widgets now show. The gallery's features are computed once per (dataset, model); a query costs one text
encoding and one search (faiss for plain cosine models, a matrix product for models with a richer
similarity such as RDE's two embeddings or DiaNA's refined one).

* :class:`TextRetrievalDemo`: a caption (a test caption, editable), a dataset and a model; the top-10 with
  the true person outlined, whether the query's Rank-1 is right, and what the query says by the world's
  grammar, checked against the top-1 person and the true one.
* :class:`ChatRetrievalDemo`: chat-based retrieval (DiaNA, built by ``papers.diana.chat_demo``: shared code
  imports no paper). A test dialogue's first round starts it; the
  questioner asks about what has not been said, the user answers (or the MLLM answers from the target
  image), and every round re-ranks the gallery; a plot follows the target's rank over the rounds.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np
import torch

from .datasets.torch_data import RetrievalData, trim_tokens


# ---------------------------------------------------------------------------------------------
# Search
class Gallery:
    """A model's gallery features, computed once, and its search. ``faiss`` is used where the model's
    similarity is the plain cosine of one global feature (:class:`~.models.retrieval.DualEncoder`); any other
    model ranks by its own ``similarity``."""

    def __init__(self, model, data: RetrievalData, tokenize=None):
        from .models.retrieval import DualEncoder, encode_images

        self.model, self.data = model.eval(), data
        self.tokenize = tokenize or model.backbone.tokenize
        self.features = encode_images(model, data)
        self.index = None
        if getattr(type(model), "similarity", None) is DualEncoder.similarity:
            import faiss

            x = torch.nn.functional.normalize(self.features["global"], dim=-1).numpy().astype(np.float32)
            self.index = faiss.IndexFlatIP(x.shape[1])
            self.index.add(x)

    @torch.no_grad()
    def embed(self, text: str) -> dict:
        dev = next(self.model.parameters()).device
        return {k: v.float().cpu() for k, v in self.model.embed_texts(trim_tokens(self.tokenize([text])).to(dev)).items()}

    @torch.no_grad()
    def search(self, text: str, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best gallery images for ``text``: (indices, scores), best first."""
        txt = self.embed(text)
        k = min(k, len(self.data.images))
        if self.index is not None:
            q = torch.nn.functional.normalize(txt["global"], dim=-1).numpy().astype(np.float32)
            scores, idx = self.index.search(q, k)
            return idx[0], scores[0]
        s = self.model.similarity(txt, self.features)[0]
        order = torch.argsort(-s, stable=True)[:k]
        return order.numpy(), s[order].numpy()

    def rank_of(self, text: str, pid: int) -> int:
        """1-based rank of the first image of person ``pid`` for ``text`` (over the whole gallery)."""
        idx, _ = self.search(text, len(self.data.images))
        hits = np.nonzero(self.data.image_pids.numpy()[idx] == pid)[0]
        return int(hits[0]) + 1 if len(hits) else len(idx) + 1


# ---------------------------------------------------------------------------------------------
# Rendering
def thumbnail_html(image, caption: str = "", outline: bool = False, height: int = 128) -> str:
    """One image (uint8 tensor [3, H, W] or array [H, W, 3]) as an inline PNG with a caption underneath; the
    true person's images get a thick green outline."""
    from PIL import Image

    a = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    src = base64.b64encode(buf.getvalue()).decode()
    border = "4px solid #2ca02c" if outline else "4px solid transparent"
    return (f'<figure class="pr-hit" style="display:inline-block;margin:2px;text-align:center">'
            f'<img src="data:image/png;base64,{src}" style="height:{height}px;border:{border}"/>'
            f'<figcaption style="font-size:11px">{html.escape(caption)}</figcaption></figure>')


def claims_html(claims: dict, people: dict[str, dict | None]) -> str:
    """What a query says (slot = value, by the world's grammar) against each named person's truth:
    a tick where the person has it, a cross where not."""
    if not claims:
        return "<i>the world's grammar reads no attribute in this query</i>"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in people)
    rows = []
    for slot, value in claims.items():
        cells = "".join("<td>?</td>" if p is None or slot not in p else f"<td>{'&#10003;' if p[slot] == value else '&#10007; ' + html.escape(str(p[slot]))}</td>"
                        for p in people.values())
        rows.append(f"<tr><td>{html.escape(slot)} = {html.escape(value)}</td>{cells}</tr>")
    return f'<table class="pr-claims"><tr><th>the query says</th>{head}</tr>{"".join(rows)}</table>'


# ---------------------------------------------------------------------------------------------
# Text-based person retrieval
@dataclass
class TextResult:
    text: str
    target_pid: int
    ranked: np.ndarray  # gallery indices, best first
    ranked_pids: np.ndarray
    scores: np.ndarray
    claims: dict

    @property
    def r1(self) -> bool:
        return bool(len(self.ranked_pids)) and int(self.ranked_pids[0]) == self.target_pid


class TextRetrievalDemo:
    """Type a description, see who the model retrieves. ``datasets``: name -> test :class:`RetrievalData`;
    ``models``: name -> model (zero-shot, IRRA, RDE, CECA, any with ``embed_images``/``embed_texts``/
    ``similarity``), or name -> {dataset: model} for models fine-tuned per style; ``people``: name -> the
    true person record of every gallery image (the world's; None on real data), for the claims table. The query box starts with test caption ``caption``; editing it keeps
    that caption's person as the one to find."""

    def __init__(self, datasets: dict[str, RetrievalData], models: dict[str, object], people: dict[str, list[dict]] | None = None,
                 k: int = 10, caption: int = 0):
        import ipywidgets as W

        if not datasets or not models:
            raise ValueError("TextRetrievalDemo needs at least one dataset and one model")
        self.datasets, self.models, self.people, self.k = datasets, models, people or {}, k
        self._galleries: dict[tuple[str, str], Gallery] = {}
        first = next(iter(datasets))
        self.dataset = W.Dropdown(options=list(datasets), value=first, description="dataset")
        self.model = W.Dropdown(options=list(models), value=next(iter(models)), description="model")
        self.caption = W.BoundedIntText(value=caption, min=0, max=len(datasets[first].captions) - 1, description="caption #")
        self.query = W.Textarea(value=datasets[first].captions[caption], layout=W.Layout(width="95%", height="4em"), description="query")
        self.button = W.Button(description="Search", button_style="primary")
        self.status = W.HTML()
        self.results = W.HTML()
        self.claims = W.HTML()
        self.last: TextResult | None = None
        self.button.on_click(lambda _: self.search())
        self.caption.observe(lambda ch: self.pick_caption(ch["new"]), names="value")
        self.dataset.observe(lambda ch: self._dataset_changed(), names="value")
        self.model.observe(lambda ch: self.search(), names="value")
        self.widget = W.VBox([W.HBox([self.dataset, self.model, self.caption]), self.query, self.button, self.status, self.results,
                              self.claims])

    def gallery(self, dataset: str | None = None, model: str | None = None) -> Gallery:
        key = (dataset or self.dataset.value, model or self.model.value)
        if key not in self._galleries:
            m = self.models[key[1]]
            self._galleries[key] = Gallery(m[key[0]] if isinstance(m, dict) else m, self.datasets[key[0]])
        return self._galleries[key]

    def _dataset_changed(self):
        d = self.datasets[self.dataset.value]
        self.caption.max = len(d.captions) - 1
        self.pick_caption(min(self.caption.value, self.caption.max))

    def pick_caption(self, i: int) -> TextResult:
        """Fill the query box with test caption ``i`` and search."""
        if self.caption.value != i:
            self.caption.value = i  # its observer calls back here
            return self.last
        self.query.value = self.datasets[self.dataset.value].captions[i]
        return self.search()

    def search(self, text: str | None = None) -> TextResult:
        """Rank the gallery for ``text`` (default: the query box), show the top-k and the claims table."""
        from .assistants.grammar import parse_claims

        if text is not None:
            self.query.value = text
        data = self.datasets[self.dataset.value]
        target = int(data.caption_pids[self.caption.value])
        idx, scores = self.gallery().search(self.query.value, self.k)
        pids = data.image_pids.numpy()[idx]
        res = TextResult(self.query.value, target, idx, pids, scores, parse_claims(self.query.value))
        self.last = res
        self.status.value = (f"<b>Rank-1 {'right' if res.r1 else 'wrong'}</b>: the person to find is id {target} "
                             f"(outlined in green); {self.model.value} on {self.dataset.value}")
        self.results.value = "".join(thumbnail_html(data.images[i], f"{r + 1}. id {p} ({s:.2f})", outline=int(p) == target)
                                     for r, (i, p, s) in enumerate(zip(idx, pids, scores)))
        people = self.people.get(self.dataset.value)
        if people is not None:
            true_img = int(data.caption_image_ids[self.caption.value])
            self.claims.value = claims_html(res.claims, {"top-1": people[int(idx[0])], "the person to find": people[true_img]})
        else:
            self.claims.value = claims_html(res.claims, {})
        return res

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)



def figure_html(fig) -> str:
    """A matplotlib figure as an inline PNG (closed after)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f'<img class="pr-plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


# ---------------------------------------------------------------------------------------------
# Chat-based person retrieval
@dataclass
class ChatResult:
    rounds: list  # (question, answer) so far
    ranks: list  # the target's rank after each round
    ranked_pids: np.ndarray  # the top-k now


class ChatRetrievalDemo:
    """Find a person by talking (chat-based retrieval; :func:`person_retrieval.papers.diana.chat_demo` builds
    it for DiaNA on ChatPedes). ``data``: the gallery (one image per person to find); ``first_rounds[i]``:
    the (request, description) round a dialogue about image ``i`` starts from; ``text``: a dialogue's rounds as
    the model reads them; ``ask(said, asked, rng)``: the questioner's next question (``said``, ``asked``: the
    attribute groups covered so far; it adds what it asks to ``asked``); ``vlm``: the MLLM that can answer
    from the target image (None: the user always types). Each answer re-ranks the gallery by the whole
    dialogue."""

    def __init__(self, model, data: RetrievalData, first_rounds: list[tuple[str, str]], tokenize, text, ask, vlm=None, k: int = 5,
                 start: int = 0, seed: int = 0):
        import ipywidgets as W

        self.first_rounds, self.text, self.ask_fn, self.vlm, self.k, self.seed = first_rounds, text, ask, vlm, k, seed
        self.gallery = Gallery(model, data, tokenize)
        self.entry = W.BoundedIntText(value=start, min=0, max=len(first_rounds) - 1, description="person #")
        self.question = W.Text(description="system", disabled=True, layout=W.Layout(width="95%"))
        self.answer_box = W.Text(placeholder="your answer (or your own line), then Send", description="you", layout=W.Layout(width="95%"))
        self.send = W.Button(description="Send", button_style="primary")
        self.from_image = W.Button(description="Answer from the image", disabled=vlm is None,
                                   tooltip="the MLLM answers from the target image" if vlm is not None else "no MLLM given")
        self.transcript, self.results, self.plot = W.HTML(), W.HTML(), W.HTML()
        self.send.on_click(lambda _: self.answer(self.answer_box.value))
        self.from_image.on_click(lambda _: self.answer(None))
        self.entry.observe(lambda ch: self.restart(ch["new"]), names="value")
        self.widget = W.VBox([self.entry, self.transcript, self.question, self.answer_box, W.HBox([self.send, self.from_image]),
                              W.HBox([self.results, self.plot])])
        self.restart(start)

    def restart(self, i: int) -> ChatResult:
        """Begin again with gallery image ``i``'s person: the first round, the ranking, the first question."""
        from .assistants import grammar
        from .assistants.mini import item_rng

        data = self.gallery.data
        self.target_pid, self.target_image = int(data.image_pids[i]), i
        self.rounds = [tuple(self.first_rounds[i])]
        self.ranks: list[int] = []
        self.said = grammar.claimed_groups(grammar.parse_claims(self.rounds[0][1]))
        self.asked: set = set()
        self.rng = item_rng(self.seed, "chat-demo", data.image_paths[i] if data.image_paths else i)
        return self._rerank()

    def ask(self) -> str:
        """The questioner's next question (also shown in its box)."""
        self.question.value = self.ask_fn(self.said, self.asked, self.rng)
        return self.question.value

    def answer(self, text: str | None = None) -> ChatResult:
        """Answer the question in view with ``text`` (the user's words; None: the MLLM answers from the
        target image), re-rank by the whole dialogue, and ask the next question."""
        from .assistants import grammar

        q = self.question.value
        if text is None:
            if self.vlm is None:
                raise ValueError("no MLLM was given to answer from the image: type an answer")
            img = self.gallery.data.images[self.target_image].permute(1, 2, 0).numpy()
            text = self.vlm.answer([img], [q])[0]
        text = text.strip()
        if not text:
            raise ValueError("the answer is empty: type something, or answer from the image")
        self.rounds.append((q, text))
        self.said |= grammar.claimed_groups(grammar.parse_claims(text))
        self.answer_box.value = ""
        return self._rerank()

    def dialogue(self) -> str:
        return self.text(self.rounds)

    def _rerank(self) -> ChatResult:
        import matplotlib.pyplot as plt

        data = self.gallery.data
        idx, scores = self.gallery.search(self.dialogue(), len(data.images))
        pids = data.image_pids.numpy()[idx]
        self.ranks.append(int(np.nonzero(pids == self.target_pid)[0][0]) + 1)
        top, top_pids = idx[: self.k], pids[: self.k]
        self.transcript.value = "<br>".join(f"<b>system</b>: {html.escape(q)}<br><b>you</b>: {html.escape(a)}" for q, a in self.rounds)
        self.results.value = (f"<div>round {len(self.rounds)}: the person to find is at rank <b>{self.ranks[-1]}</b></div>"
                              + "".join(thumbnail_html(data.images[i], f"{r + 1}. id {p}", outline=int(p) == self.target_pid)
                                        for r, (i, p) in enumerate(zip(top, top_pids))))
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot(range(1, len(self.ranks) + 1), self.ranks, "o-")
        ax.set(xlabel="round", ylabel="rank of the target", yscale="log", title="the target's rank")
        ax.invert_yaxis()
        self.plot.value = figure_html(fig)
        self.ask()
        return ChatResult(list(self.rounds), list(self.ranks), top_pids)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
