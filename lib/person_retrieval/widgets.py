"""Interactive retrieval demos for the classroom (notebook 08), over the other notebooks' cached models.

Each demo is a small class that holds its ipywidgets and a plain-Python callback, so a test (or a script)
drives it without a browser: set a widget's value or call the callback, read what it returned and what the
widgets now show. The gallery's features are computed once per (dataset, model); a query costs one text
encoding and one search (faiss for plain cosine models, a matrix product for models with a richer
similarity such as RDE's two embeddings or DiaNA's refined one).

* :class:`TextRetrievalDemo`: a caption (a test caption, editable), a dataset and a model; the top-10 with
  the true person outlined, whether the query's Rank-1 is right, and what the query says by the world's
  grammar, checked against the top-1 person and the true one. A query the user typed has no true person:
  it gets its top-10 and its claims against the top-1, and no verdict.
* :class:`ChatRetrievalDemo`: chat-based retrieval (DiaNA, built by ``papers.diana.chat_demo``: shared code
  imports no paper). A test dialogue's first round starts it; the
  questioner asks about what has not been said, the user answers (or the MLLM answers from the target
  image), and every round re-ranks the gallery; a plot follows the target's rank over the rounds, with and
  without CTGI's multi-turn interaction (``papers.ctgi.mti_refiner``).
* :class:`ComposedRetrievalDemo`: a reference image and a relative text (FAFA on ITCPR, built by
  ``papers.fafa.composed_demo``), beside image-only and text-only rankings.
* :class:`GenerationDemo`: a prompt, the size condition and the LoRA strength beta, the generator's samples.

Every button sizes itself to its label (``layout.width = "max-content"``): none is cut short.
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
    def scores(self, text: str) -> torch.Tensor:
        """``[gallery]``: the model's similarity of ``text`` to every gallery image."""
        return self.model.similarity(self.embed(text), self.features)[0].float()

    @torch.no_grad()
    def search(self, text: str, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best gallery images for ``text``: (indices, scores), best first."""
        txt = self.embed(text)
        k = min(k, len(self.data.images))
        if self.index is not None:
            q = torch.nn.functional.normalize(txt["global"], dim=-1).numpy().astype(np.float32)
            scores, idx = self.index.search(q, k)
            return idx[0], scores[0]
        return top_k(self.model.similarity(txt, self.features)[0], k)

    def rank_of(self, text: str, pid: int) -> int:
        """1-based rank of the first image of person ``pid`` for ``text`` (over the whole gallery)."""
        idx, _ = self.search(text, len(self.data.images))
        return rank_of_first(self.data.image_pids.numpy()[idx], pid)


def top_k(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of one query's ``scores``: (indices, scores), best first, ties by index."""
    order = torch.argsort(-scores.float(), stable=True)[:k]
    return order.numpy(), scores.float()[order].numpy()


def rank_of_first(ranked_ids: np.ndarray, target) -> int:
    """1-based position of the first ``target`` in ``ranked_ids`` (past the end when absent)."""
    hits = np.nonzero(np.asarray(ranked_ids) == target)[0]
    return int(hits[0]) + 1 if len(hits) else len(ranked_ids) + 1


def button(description: str, **kw):
    """An ``ipywidgets.Button`` as wide as its label (the default width cuts a long one short)."""
    import ipywidgets as W

    kw.setdefault("layout", W.Layout(width="max-content"))  # not "auto": in a VBox that stretches it
    return W.Button(description=description, **kw)


class _Demo:
    """What every demo shares: its ``widget`` (a box of widgets) shown live in JupyterLab, and a static
    snapshot of what its HTML outputs show now, for an executed copy read without a kernel (papermill)."""

    widget = None

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def snapshot(self):
        """The demo's outputs as they are now (images, tables, plots), as static HTML."""
        import ipywidgets as W
        from IPython.display import HTML

        def walk(w):
            if isinstance(w, W.HTML):
                yield w.value
            for c in getattr(w, "children", ()):
                yield from walk(c)

        return HTML('<div class="pr-snapshot">' + "".join(walk(self.widget)) + "</div>")


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


def hits_html(images, idx, pids, target: int | None, scores=None, height: int = 128, distractor: int | None = None) -> str:
    """A ranked row of thumbnails: ``images[idx[r]]`` captioned "rank. id pid" (and its score), the target
    person's outlined (every demo's result row; ``target`` None: no one is outlined). Items whose id is
    ``distractor`` (ITCPR's -1) are captioned "distractor"."""
    def label(r, p):
        who = "distractor" if distractor is not None and int(p) == int(distractor) else f"id {p}"
        return f"{r + 1}. {who}" + (f" ({scores[r]:.2f})" if scores is not None else "")

    return "".join(thumbnail_html(images[int(i)], label(r, p), outline=target is not None and int(p) == int(target), height=height)
                   for r, (i, p) in enumerate(zip(idx, pids)))


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
    target_pid: int | None  # the test caption's person; None for a query the user typed (no true person)
    ranked: np.ndarray  # gallery indices, best first
    ranked_pids: np.ndarray
    scores: np.ndarray
    claims: dict

    @property
    def typed(self) -> bool:
        return self.target_pid is None

    @property
    def r1(self) -> bool | None:
        """Whether the top-1 is the person to find (None for a typed query: nothing to judge it by)."""
        if self.target_pid is None:
            return None
        return bool(len(self.ranked_pids)) and int(self.ranked_pids[0]) == self.target_pid


class TextRetrievalDemo(_Demo):
    """Type a description, see who the model retrieves. ``datasets``: name -> test :class:`RetrievalData`;
    ``models``: name -> model (zero-shot, IRRA, RDE, CECA, any with ``embed_images``/``embed_texts``/
    ``similarity``), or name -> {dataset: model} for models fine-tuned per style; ``people``: name -> the
    true person record of every gallery image (the world's; None on real data), for the claims table. The query box starts with test caption ``caption``; a query
    typed over it is no longer that caption's, so it has no person to find: no verdict, no outline, its claims
    checked against the top-1 only. ``gallery_data``: model name -> {dataset: split} for a model
    whose gallery reads more than the images (CECA: the same test images, each with its MLLM summary,
    ``papers.ceca.with_summaries``); the images, their order and the captions must be the dataset's own."""

    def __init__(self, datasets: dict[str, RetrievalData], models: dict[str, object], people: dict[str, list[dict]] | None = None,
                 k: int = 10, caption: int = 0, gallery_data: dict[str, dict[str, RetrievalData]] | None = None):
        import ipywidgets as W

        if not datasets or not models:
            raise ValueError("TextRetrievalDemo needs at least one dataset and one model")
        self.gallery_data = gallery_data or {}
        for name, per in self.gallery_data.items():
            if name not in models:
                raise ValueError(f"gallery_data names model {name!r}, which is not among the models {sorted(models)}")
            for d, g in per.items():
                if d not in datasets:
                    raise ValueError(f"gallery_data[{name!r}] names dataset {d!r}, which is not among the datasets {sorted(datasets)}")
                if not torch.equal(g.image_pids, datasets[d].image_pids) or len(g.images) != len(datasets[d].images):
                    raise ValueError(f"gallery_data[{name!r}][{d!r}] is not the gallery of dataset {d!r}: its images differ")
        self.datasets, self.models, self.people, self.k = datasets, models, people or {}, k
        self._galleries: dict[tuple[str, str], Gallery] = {}
        first = next(iter(datasets))
        self.dataset = W.Dropdown(options=list(datasets), value=first, description="dataset")
        self.model = W.Dropdown(options=list(models), value=next(iter(models)), description="model")
        self.caption = W.BoundedIntText(value=caption, min=0, max=len(datasets[first].captions) - 1, description="caption #")
        self.query = W.Textarea(value=datasets[first].captions[caption], layout=W.Layout(width="95%", height="4em"), description="query")
        self.button = button("Search", button_style="primary")
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
            data = self.gallery_data.get(key[1], {}).get(key[0], self.datasets[key[0]])
            self._galleries[key] = Gallery(m[key[0]] if isinstance(m, dict) else m, data)
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
        # a test caption has its person to find; a query typed over it describes whoever the user has in mind
        typed = self.query.value.strip() != data.captions[self.caption.value].strip()
        target = None if typed else int(data.caption_pids[self.caption.value])
        idx, scores = self.gallery().search(self.query.value, self.k)
        pids = data.image_pids.numpy()[idx]
        res = TextResult(self.query.value, target, idx, pids, scores, parse_claims(self.query.value))
        self.last = res
        where = f"{html.escape(self.model.value)} on {html.escape(self.dataset.value)}"
        if typed:
            self.status.value = (f"<b>your own query</b>: no person to find, so no right or wrong (pick a caption # for a test "
                                 f"caption and its person); {where}")
        else:
            self.status.value = (f"<b>Rank-1 {'right' if res.r1 else 'wrong'}</b>: the person to find is id {target} "
                                 f"(outlined in green); {where}")
        self.results.value = hits_html(data.images, idx, pids, target, scores)
        people = self.people.get(self.dataset.value)
        if people is not None:
            named = {"top-1": people[int(idx[0])]}
            if not typed:
                named["the person to find"] = people[int(data.caption_image_ids[self.caption.value])]
            self.claims.value = claims_html(res.claims, named)
        else:
            self.claims.value = claims_html(res.claims, {})
        return res



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
    refined_ranks: list | None = None  # with the refiner (CTGI's MTI): the target's rank after each round
    refined: str | None = None  # the refiner's query this round (None: it left the ranking as it was)


class ChatRetrievalDemo(_Demo):
    """Find a person by talking (chat-based retrieval; :func:`person_retrieval.papers.diana.chat_demo` builds
    it for DiaNA on ChatPedes). ``data``: the gallery (one image per person to find); ``first_rounds[i]``:
    the (request, description) round a dialogue about image ``i`` starts from; ``text``: a dialogue's rounds as
    the model reads them; ``ask(said, asked, rng)``: the questioner's next question (``said``, ``asked``: the
    attribute groups covered so far; it adds what it asks to ``asked``); ``vlm``: the MLLM that can answer
    from the target image (None: the user always types). Each answer re-ranks the gallery by the whole
    dialogue. ``refine(text, scores, gallery)``, if given (CTGI's multi-turn interaction, built by
    ``papers.ctgi.mti_refiner``), re-ranks those scores once more and returns ``(scores, refined query or
    None)``; the demo then shows both rankings and plots both ranks."""

    def __init__(self, model, data: RetrievalData, first_rounds: list[tuple[str, str]], tokenize, text, ask, vlm=None, k: int = 5,
                 start: int = 0, seed: int = 0, refine=None):
        import ipywidgets as W

        self.first_rounds, self.text, self.ask_fn, self.vlm, self.k, self.seed = first_rounds, text, ask, vlm, k, seed
        self.refine = refine
        self.gallery = Gallery(model, data, tokenize)
        self.entry = W.BoundedIntText(value=start, min=0, max=len(first_rounds) - 1, description="person #")
        self.question = W.Text(description="system", disabled=True, layout=W.Layout(width="95%"))
        self.answer_box = W.Text(placeholder="your answer (or your own line), then Send", description="you", layout=W.Layout(width="95%"))
        self.send = button("Send", button_style="primary")
        self.from_image = button("Answer from the image", disabled=vlm is None,
                                 tooltip="the MLLM answers from the target image" if vlm is not None else "no MLLM given")
        self.transcript, self.results, self.refined_results, self.plot = W.HTML(), W.HTML(), W.HTML(), W.HTML()
        self.send.on_click(lambda _: self.answer(self.answer_box.value))
        self.from_image.on_click(lambda _: self.answer(None))
        self.entry.observe(lambda ch: self.restart(ch["new"]), names="value")
        self.widget = W.VBox([self.entry, self.transcript, self.question, self.answer_box, W.HBox([self.send, self.from_image]),
                              W.HBox([W.VBox([self.results, self.refined_results]), self.plot])])
        self.restart(start)

    def restart(self, i: int) -> ChatResult:
        """Begin again with gallery image ``i``'s person: the first round, the ranking, the first question."""
        from .assistants import grammar
        from .assistants.mini import item_rng

        data = self.gallery.data
        self.target_pid, self.target_image = int(data.image_pids[i]), i
        self.rounds = [tuple(self.first_rounds[i])]
        self.ranks: list[int] = []
        self.refined_ranks: list[int] = []
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
        data = self.gallery.data
        n, pids_all = len(data.images), data.image_pids.numpy()
        text = self.dialogue()
        if self.refine is None:
            idx, _ = self.gallery.search(text, n)
        else:
            scores = self.gallery.scores(text)
            idx, _ = top_k(scores, n)
            new_scores, refined = self.refine(text, scores, self.gallery)
            ridx, _ = top_k(new_scores, n)
            self.refined_ranks.append(rank_of_first(pids_all[ridx], self.target_pid))
            note = (f"refined query: <i>{html.escape(refined)}</i>" if refined else "no refinement this round (no candidate confirmed, or an early exit)")
            self.refined_results.value = (f"<div>with multi-turn interaction (CTGI's MTI): rank <b>{self.refined_ranks[-1]}</b>; {note}</div>"
                                          + hits_html(data.images, ridx[: self.k], pids_all[ridx[: self.k]], self.target_pid))
            self._refined_text = refined
        pids = pids_all[idx]
        self.ranks.append(rank_of_first(pids, self.target_pid))
        top, top_pids = idx[: self.k], pids[: self.k]
        self.transcript.value = "<br>".join(f"<b>system</b>: {html.escape(q)}<br><b>you</b>: {html.escape(a)}" for q, a in self.rounds)
        self.results.value = (f"<div>round {len(self.rounds)}: the person to find is at rank <b>{self.ranks[-1]}</b></div>"
                              + hits_html(data.images, top, top_pids, self.target_pid))
        self.plot.value = figure_html(rank_plot(self.ranks, self.refined_ranks if self.refine is not None else None))
        self.ask()
        if self.refine is None:
            return ChatResult(list(self.rounds), list(self.ranks), top_pids)
        return ChatResult(list(self.rounds), list(self.ranks), top_pids, list(self.refined_ranks), self._refined_text)


def rank_plot(ranks: list[int], refined: list[int] | None = None):
    """The target's rank after each round as plain ranks: rank 1 on top (the axis inverted), whole-number
    ticks on both axes; ``refined``: the ranks with CTGI's MTI, beside."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(3, 2))
    rounds = range(1, len(ranks) + 1)
    ax.plot(rounds, ranks, "o-", label="dialogue")
    worst = max(ranks)
    if refined is not None:
        ax.plot(rounds, refined, "s--", label="+ MTI")
        ax.legend(fontsize=7)
        worst = max(worst, *refined)
    ax.set(xlabel="round", ylabel="rank of the target", title="the target's rank (1 = top)")
    ax.set_ylim(max(worst, 2) + 0.5, 0.5)  # bottom > top: rank 1 at the top
    ax.set_xlim(0.5, len(ranks) + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=2))
    if len(ranks) <= 10:
        ax.set_xticks(list(rounds))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


# ---------------------------------------------------------------------------------------------
# Composed person retrieval
@dataclass
class ComposedResult:
    query: int  # the benchmark query whose reference image is in view
    text: str  # the relative text searched with
    target: int  # the id the ground truth carries (ITCPR's instance_id)
    ranked: dict  # ranker name -> gallery indices, best first (top-k)
    ranked_ids: dict  # ranker name -> their ids
    target_rank: dict  # ranker name -> 1-based rank of the first ground truth over the whole gallery


class ComposedRetrievalDemo(_Demo):
    """A reference image and a relative text find the target person (composed person retrieval; built for
    FAFA on ITCPR by ``papers.fafa.composed_demo``). ``references[i]``, ``captions[i]``, ``targets[i]``: query
    ``i``'s reference image (uint8 ``[3, H, W]``), relative caption and the id its ground truths carry;
    ``gallery``, ``gallery_ids``: the gallery's images and ids; ``rankers``: name -> ``score(i, text)``, the
    scores over the gallery of reference ``i`` with ``text`` (the first is the method shown first; an
    image-only ranker ignores the text, a text-only one the image). Arrows step through the queries, *random*
    jumps to one, and the text box (pre-filled with the query's caption) can be edited. Gallery items whose
    id is ``distractor`` (ITCPR's -1: no query's target) are captioned "distractor"."""

    def __init__(self, references, captions: list[str], targets, gallery, gallery_ids, rankers: dict, k: int = 10,
                 start: int = 0, seed: int = 0, distractor: int | None = -1):
        import ipywidgets as W

        if not rankers:
            raise ValueError("ComposedRetrievalDemo needs at least one ranker")
        if not (len(references) == len(captions) == len(targets)):
            raise ValueError(f"{len(references)} reference images, {len(captions)} captions and {len(targets)} targets: one each per query")
        if len(gallery) != len(gallery_ids):
            raise ValueError(f"{len(gallery)} gallery images but {len(gallery_ids)} gallery ids")
        self.references, self.captions, self.targets = references, list(captions), np.asarray(targets)
        self.gallery, self.gallery_ids, self.rankers, self.k = gallery, np.asarray(gallery_ids), dict(rankers), k
        self.distractor = distractor
        self.rng = np.random.default_rng(seed)
        self.query_no = W.BoundedIntText(value=start, min=0, max=len(captions) - 1, description="query #")
        self.prev, self.next = button("\u25c0"), button("\u25b6")
        self.random = button("random")
        self.reference = W.HTML()
        self.text = W.Textarea(layout=W.Layout(width="95%", height="3em"), description="change")
        self.button = button("Search", button_style="primary")
        self.results = W.HTML()
        self.last: ComposedResult | None = None
        self.prev.on_click(lambda _: self.step(-1))
        self.next.on_click(lambda _: self.step(1))
        self.random.on_click(lambda _: self.pick_random())
        self.button.on_click(lambda _: self.search())
        self.query_no.observe(lambda ch: self.pick(ch["new"]), names="value")
        self.widget = W.VBox([W.HBox([self.prev, self.query_no, self.next, self.random]), self.reference, self.text, self.button,
                              self.results])
        self.pick(start)

    def pick(self, i: int) -> ComposedResult:
        """Show query ``i``'s reference image, fill the text box with its caption, and search."""
        if self.query_no.value != i:
            self.query_no.value = i  # its observer calls back here
            return self.last
        self.reference.value = thumbnail_html(self.references[i], f"reference of query {i}", height=160)
        self.text.value = self.captions[i]
        return self.search()

    def step(self, d: int) -> ComposedResult:
        return self.pick(int(np.clip(self.query_no.value + d, 0, len(self.captions) - 1)))

    def pick_random(self) -> ComposedResult:
        return self.pick(int(self.rng.integers(len(self.captions))))

    def search(self, text: str | None = None) -> ComposedResult:
        """Rank the gallery with every ranker for the reference in view and ``text`` (default: the box)."""
        if text is not None:
            self.text.value = text
        i, target = self.query_no.value, int(self.targets[self.query_no.value])
        ranked, ids, ranks, rows = {}, {}, {}, []
        for name, score in self.rankers.items():
            s = torch.as_tensor(score(i, self.text.value)).flatten()
            order, _ = top_k(s, len(s))
            ranked[name], ids[name] = order[: self.k], self.gallery_ids[order[: self.k]]
            ranks[name] = rank_of_first(self.gallery_ids[order], target)
            rows.append(f"<div><b>{html.escape(name)}</b>: the target at rank <b>{ranks[name]}</b></div>"
                        + hits_html(self.gallery, ranked[name], ids[name], target, height=96, distractor=self.distractor))
        self.results.value = "".join(rows)
        self.last = ComposedResult(i, self.text.value, target, ranked, ids, ranks)
        return self.last


# ---------------------------------------------------------------------------------------------
# Generation
TINY_GENERATOR_NOTE = ('<div class="pr-note"><b>At scale tiny the generator draws no people</b>: trained for seconds on '
                       "a few images, it makes blurs of colour. It shows how the controls work (the same settings and seed "
                       "give the same images; beta and the size change them). Scale small trains it far longer.</div>")


class GenerationDemo(_Demo):
    """A prompt, a size condition and the LoRA strength beta, and the generator's samples in a grid (TIPS's
    seed person generator, SynCPR's LoRA strength). ``generate(prompts, size, beta, seed)``: uint8 images
    ``[N, 3, H, W]`` for the prompts at capture size ``size`` (``(w, h)`` or None: no size condition);
    ``sizes``: the sizes offered (label -> size). Same settings, same seed: the same images. ``scale``: the
    scale the generator was trained at; at ``tiny`` the demo says above the grid that it draws no people."""

    def __init__(self, generate, sizes: dict, prompt: str = "", n: int = 8, seed: int = 0, scale: str | None = None):
        import ipywidgets as W

        self.generate_fn, self.n = generate, n
        self.note = W.HTML(TINY_GENERATOR_NOTE if scale == "tiny" else "")
        self.prompt = W.Textarea(value=prompt, layout=W.Layout(width="95%", height="3em"), description="prompt")
        self.sizes = dict(sizes)
        self.size = W.Dropdown(options=list(self.sizes), description="size")  # labels: a None value would read as no choice
        self.beta = W.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="beta")
        self.seed = W.IntText(value=seed, description="seed")
        self.button = button("Generate", button_style="primary")
        self.grid = W.HTML()
        self.last: torch.Tensor | None = None
        self.button.on_click(lambda _: self.run())
        self.widget = W.VBox([self.prompt, W.HBox([self.size, self.beta, self.seed]), self.button, self.note, self.grid])

    def run(self, prompt: str | None = None, size: str | None = None, beta: float | None = None, seed: int | None = None) -> torch.Tensor:
        """Generate ``n`` samples of the prompt (each argument, when given, is set in its widget first;
        ``size`` by its label)."""
        if prompt is not None:
            self.prompt.value = prompt
        if size is not None:
            if size not in self.sizes:
                raise ValueError(f"unknown size {size!r}: one of {list(self.sizes)}")
            self.size.value = size
        if beta is not None:
            self.beta.value = beta
        if seed is not None:
            self.seed.value = seed
        if not self.prompt.value.strip():
            raise ValueError("the prompt is empty: describe a person")
        images = self.generate_fn([self.prompt.value] * self.n, self.sizes[self.size.value], float(self.beta.value), int(self.seed.value))
        self.last = images
        label = self.size.value
        self.grid.value = "".join(thumbnail_html(im, f"#{j} {label} beta={self.beta.value:.2f}", height=112) for j, im in enumerate(images))
        return images
