"""The mini backend: assistants learned from the world, never reading the ground truth of the image they
are asked about.

* :class:`AttributeRecognizer`: a small convolutional network trained on rendered world images and their
  attribute labels (people it will never be asked about), predicting every slot and the view, trained
  across capture sizes (each image also seen as a 2 or 4 times smaller capture), with a realism head that
  tells a whole person from a broken image. It is what the mini MLLM "sees"; its per-slot accuracy on
  held-out identities is measured, good and imperfect.
* :class:`MiniVLM`: answers questions (parsed with :func:`.grammar.question_groups`) in sentences from
  what the recognizer predicts, describes a few salient attributes as an unprompted MLLM does, judges and
  scores images by the probability the recognizer gives to what a text claims (its 1-10 scale fitted per
  criterion and camera on validation renders; :mod:`.judge_check` measures it against the world's
  truth). An error-injection knob (:class:`Noise`) adds hallucinations, contradictions and repetitions,
  for experiments that need a noisy assistant (ChatPedes cleaning).
* :class:`MiniLM`: the text jobs of the papers' prompts (summaries, reconstructions, merges, rephrasings,
  dialogue-round categorisation, quadruples, seed prompts) done with the world's lexicon and grammar. It
  recognises which prompt of :mod:`.prompts` it was given; any other prompt is an error.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import cache_dir, get_scale, rng_for
from ..losses import attribute_loss
from ..metrics import head_accuracy
from ..world.attributes import SLOT_VALUES, Person, sample_person
from ..world.labels import HEADS, labelled_images
from ..world.render import State
from . import grammar, prompts
from .base import LanguageModel, VisionLanguageModel

IDENTITY = ["gender", "age", "build", "skin", "hair_style", "hair_color"]
OUTFIT = ["upper_type", "upper_color", "upper_pattern", "lower_type", "lower_color", "shoes_type", "shoes_color", "hat", "bag",
          "held", "accessory"]



class RecognizerNet(nn.Module):
    """Four stride-2 convolutions keep a coarse spatial map (top, legs and feet stay apart), then one
    linear head per attribute."""

    def __init__(self, size: tuple[int, int], width: int = 24, realism: bool = False):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for k, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(a, b, 5 if k == 0 else 3, stride=2, padding=2 if k == 0 else 1, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        h, wd = size[0] // 16, size[1] // 16
        self.trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(chans[-1] * h * wd, 256), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})
        # realism: the logit that the image shows a whole, plausible person (not a broken image)
        self.real = nn.Linear(256, 1) if realism else None
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(self.features(x))
        out = {k: head(z) for k, head in self.heads.items()}
        if self.real is not None:
            out[REAL] = self.real(z).squeeze(-1)
        return out


#: The realism output's key (not an attribute head).
REAL = "_real"


@dataclass
class RecognizerConfig:
    n_train: int = 3000  # identities, two images each
    n_val: int = 400
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 24
    #: Capture-size augmentation: each training image is reduced by one of these factors (area) and brought
    #: back to the input size (bilinear), as a smaller capture reaches the recognizer; () trains at the
    #: native size only. The pipelines hand the judge images drawn at the generator's height (half the
    #: native one at small) from cameras up to 4 times coarser.
    capture_factors: tuple[int, ...] = (1, 2, 4)
    #: A realism head, trained to tell renders from renders broken by :func:`training_breakage` (a third
    #: of each batch): what the judge's quality and naturalness scores read. The grids it shuffles leave out
    #: the judge check's 8 x 4 (:func:`broken_image`), so that check tests a breakage it never saw.
    realism: bool = True


RECOGNIZER_CONFIGS = {"tiny": RecognizerConfig(n_train=600, n_val=100, epochs=4, batch_size=64, width=16),
                      "small": RecognizerConfig(epochs=8, width=32)}


def _render_set(n: int, seed: int, purpose: str, height: int):
    return labelled_images(rng_for(seed, "recognizer", purpose), n, height)


def _to_input(images_u8: torch.Tensor, size) -> torch.Tensor:
    x = images_u8.float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - 0.45) / 0.25


#: The block grids (rows, columns) :func:`training_breakage` shuffles (not the judge check's 8 x 4).
TRAINING_GRIDS = ((2, 2), (4, 2), (4, 4), (16, 8), (16, 4))


def training_breakage(images_u8: torch.Tensor, which: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The images ``which`` (bool) broken, each one way: its blocks shuffled on a grid of :data:`TRAINING_GRIDS`,
    its lower half swapped for another image's (two people in one), or a quarter of it replaced by noise."""
    out = images_u8.clone()
    n, _, h, w = out.shape
    for i in which.nonzero().flatten().tolist():
        kind = int(torch.randint(3, (1,), generator=g))
        if kind == 0:
            gh, gw = TRAINING_GRIDS[int(torch.randint(len(TRAINING_GRIDS), (1,), generator=g))]
            bh, bw = h // gh, w // gw
            blocks = out[i, :, :gh * bh, :gw * bw].reshape(3, gh, bh, gw, bw).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, bh, bw)
            blocks = blocks[torch.randperm(gh * gw, generator=g)]
            out[i, :, :gh * bh, :gw * bw] = blocks.reshape(gh, gw, 3, bh, bw).permute(2, 0, 3, 1, 4).reshape(3, gh * bh, gw * bw)
        elif kind == 1:
            j = (i + 1 + int(torch.randint(max(1, n - 1), (1,), generator=g))) % n
            cut = h // 3 + int(torch.randint(h // 3, (1,), generator=g))
            out[i, :, cut:] = images_u8[j, :, cut:]
        else:
            y0, x0 = int(torch.randint(h // 2, (1,), generator=g)), int(torch.randint(w // 2, (1,), generator=g))
            out[i, :, y0:y0 + h // 2, x0:x0 + w // 2] = torch.randint(0, 256, (3, h // 2, w // 2), generator=g, dtype=torch.uint8)
    return out


def captured(images_u8: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image as a capture ``factors[i]`` times smaller brings it: reduced by area averaging, rounded
    to uint8 (a stored image) and brought back to its size (bilinear, as :func:`_to_input` does)."""
    out = images_u8.clone()
    h, w = images_u8.shape[-2:]
    for f in factors.unique().tolist():
        if f <= 1:
            continue
        idx = (factors == f).nonzero().flatten()
        x = F.interpolate(images_u8[idx].float(), size=(max(1, h // f), max(1, w // f)), mode="area").round().clamp(0, 255)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        out[idx] = x.round().clamp(0, 255).to(torch.uint8)
    return out


class AttributeRecognizer:
    """A trained :class:`RecognizerNet` with its input size. ``predict(images) -> {head: probabilities}``."""

    def __init__(self, net: RecognizerNet, accuracy: dict | None = None):
        self.net = net.eval()
        self.accuracy = accuracy or {}

    @property
    def tag(self) -> str:
        """A hash of the weights (computed once): what keys the caches of what an assistant seeing through
        this recognizer produced."""
        if "_tag" not in self.__dict__:
            import hashlib

            h = hashlib.sha1()
            for k, v in sorted(self.net.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().numpy().tobytes())
            self._tag = h.hexdigest()[:10]
        return self._tag

    @torch.no_grad()
    def predict(self, images: list[np.ndarray] | torch.Tensor, batch: int = 256, realness: bool = False) -> dict[str, torch.Tensor]:
        """``{head: probabilities}``; ``realness``: also ``REAL``, the probability that each image shows a
        whole, plausible person (only from a recognizer with a realism head)."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        outs: dict[str, list] = {h: [] for h in HEADS}
        if realness and self.net.real is not None:
            outs[REAL] = []
        for s in range(0, len(images), batch):
            logits = self.net(_to_input(images[s: s + batch], self.net.size))
            for h, v in logits.items():
                if h in outs:
                    outs[h].append(v.sigmoid() if h == REAL else v.softmax(-1))
        return {h: torch.cat(v) for h, v in outs.items()}

    @classmethod
    def train(cls, scale: str = "small", seed: int = 0, progress: bool = True, config: RecognizerConfig | None = None) -> "AttributeRecognizer":
        """Train on rendered people (none of them in any dataset), report accuracy on held-out people."""
        cfg = config or RECOGNIZER_CONFIGS[get_scale(scale).name]
        h = get_scale(scale).image_height
        size = (h, h // 2)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y, _, _ = _render_set(cfg.n_train, seed, "train", h)
        xv, yv, _, _ = _render_set(cfg.n_val, seed, "val", h)
        net = RecognizerNet(size, cfg.width, cfg.realism)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        steps = cfg.epochs * (len(x) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.15)
        it = range(cfg.epochs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="attribute recognizer", leave=False)
        for _ in it:
            net.train()
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
                idx = order[s: s + cfg.batch_size]
                xb = x[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb[flip] = xb[flip].flip(-1)
                yb = {k: y[k][idx] for k in HEADS}
                real = None
                if cfg.realism:
                    real = torch.rand(len(idx), generator=g) >= 1 / 3
                    xb = training_breakage(xb, ~real, g)
                    yb = {k: v.masked_fill(~real, -1) for k, v in yb.items()}  # a broken image has no attributes to learn
                if cfg.capture_factors:
                    f = torch.tensor(cfg.capture_factors)[torch.randint(len(cfg.capture_factors), (len(idx),), generator=g)]
                    xb = captured(xb, f)
                out = net(_to_input(xb, size))
                loss = attribute_loss({k: out[k] for k in HEADS}, yb)
                if real is not None:
                    loss = loss + F.binary_cross_entropy_with_logits(out[REAL], real.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        rec = cls(net.eval())
        rec.accuracy = rec.evaluate(xv, yv)
        return rec

    def evaluate(self, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-head accuracy (%) over the images where the head's label is visible."""
        probs = self.predict(x)
        return head_accuracy({h: p.argmax(-1) for h, p in probs.items()}, {h: y[h] for h in HEADS})

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_model

        path.mkdir(parents=True, exist_ok=True)
        (path / "recognizer.json").write_text(json.dumps({"size": list(self.net.size), "width": self.net.features[0].out_channels,
                                                          "realism": self.net.real is not None, "heads": HEADS,
                                                          "accuracy": self.accuracy}, indent=1))
        tmp = path / "recognizer.safetensors.tmp"
        save_model(self.net, str(tmp))
        tmp.replace(path / "recognizer.safetensors")

    @classmethod
    def load(cls, path: Path) -> "AttributeRecognizer":
        from safetensors.torch import load_model

        path = Path(path)
        meta_file, weights = path / "recognizer.json", path / "recognizer.safetensors"
        if not weights.is_file() or not meta_file.is_file():
            raise FileNotFoundError(f"no trained recognizer in {path} (expected recognizer.json and recognizer.safetensors)")
        meta = json.loads(meta_file.read_text())
        if meta["heads"] != HEADS:
            raise ValueError(f"{path}: recognizer was trained for other attribute heads; retrain it")
        net = RecognizerNet(tuple(meta["size"]), meta["width"], meta.get("realism", False))
        load_model(net, str(weights))
        return cls(net, meta.get("accuracy"))


def recognizer_tag(scale: str = "small", config: RecognizerConfig | None = None) -> str:
    """A hash of the recognizer's configuration at ``scale`` (its cache key; part of the names that key
    the caches of what the mini MLLM produced)."""
    import hashlib
    from dataclasses import asdict

    cfg = config or RECOGNIZER_CONFIGS[get_scale(scale).name]
    return hashlib.sha1(json.dumps([asdict(cfg), HEADS, 1], sort_keys=True).encode()).hexdigest()[:8]


def trained_recognizer(scale: str = "small", seed: int = 0, progress: bool = True) -> AttributeRecognizer:
    """The recognizer for ``(scale, seed)``, trained and cached on first use."""
    path = cache_dir() / "models" / f"recognizer-{scale}-seed{seed}-{recognizer_tag(scale)}"
    if (path / "recognizer.safetensors").is_file():
        return AttributeRecognizer.load(path)
    rec = AttributeRecognizer.train(scale, seed, progress)
    rec.save(path)
    return rec


# =============================================================================================
def item_rng(seed: int, *parts) -> np.random.Generator:
    """The random stream of one assistant item: a function of the assistant's seed and the item's input
    (image hashes as bytes, texts) alone. A sampling assistant answers one input the same way whenever it
    is asked (as a seeded sampler does), whatever it was asked before: results then depend only on the
    seed and the inputs, and not on call order, batch composition or which calls a cache skipped."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        b = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(b).to_bytes(8, "little") + b)
    d = h.digest()
    return np.random.default_rng([int(seed), int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")])


def item_rngs(seed: int, items: list[tuple]) -> list[np.random.Generator]:
    """:func:`item_rng` for each item of one call; the k-th repeat of an identical item within the call
    draws its own stream (k is part of its input), as rows of one sampled batch do."""
    seen: dict = {}
    out = []
    for it in items:
        k = seen[it] = seen.get(it, -1) + 1
        out.append(item_rng(seed, *it, k))
    return out


@dataclass(frozen=True)
class Noise:
    """Error injection for answers: each answer independently contradicts the image (a wrong value),
    hallucinates an extra item the image does not show, or repeats the previous answer."""

    contradiction: float = 0.0
    hallucination: float = 0.0
    repetition: float = 0.0

    def __post_init__(self):
        for k in ("contradiction", "hallucination", "repetition"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Noise.{k} must lie in [0, 1], got {v!r}")
        if self.contradiction + self.hallucination + self.repetition > 1.0:
            raise ValueError("Noise rates must sum to at most 1")


_GROUP_SLOTS_ANSWERED = {"upper": ["upper_type", "upper_color"], "lower": ["lower_type", "lower_color"],
                         "shoes": ["shoes_type", "shoes_color"], "hair": ["hair_color", "hair_style"], "hat": ["hat"],
                         "bag": ["bag"], "held": ["held"], "accessory": ["accessory"], "gender": ["gender"], "age": ["age"]}


class MiniVLM(VisionLanguageModel):
    """The mini MLLM: sees through an :class:`AttributeRecognizer`, speaks the world's language."""

    name = "mini-vlm"

    #: The version of its 1-10 scale (:meth:`calibration`); with the recognizer's weights, part of its name,
    #: which keys the caches of what it produced (TIPS, SynCPR, ChatPedes).
    scale_version = 2

    def __init__(self, recognizer: AttributeRecognizer, noise: Noise = Noise(), seed: int = 0, judge_threshold: float = 0.5):
        super().__init__()
        self.recognizer, self.noise, self.seed = recognizer, noise, seed
        self.name = f"mini-vlm:{getattr(recognizer, 'tag', type(recognizer).__name__)}:s{self.scale_version}"
        self.rng = np.random.default_rng(seed)  # replaced per item: see item_rng
        self.judge_threshold = judge_threshold
        self._last_answer: str | None = None
        self._memo: dict[bytes, tuple[Person, State, dict]] = {}

    # -- what it sees --------------------------------------------------------------------------
    #: How many images' perceptions are remembered. Re-ranking asks about the same gallery images again
    #: and again (MTI confirms up to 20 candidates per query), and a real MLLM server caches the image
    #: encoding the same way; the answers are the same with or without the memo.
    memo_size = 50_000

    @staticmethod
    def _keys(ims: list[np.ndarray]) -> list[bytes]:
        """A content hash of each image: the memo's key and part of each answer's random stream."""
        import hashlib

        return [hashlib.blake2b(im if im.flags.c_contiguous else np.ascontiguousarray(im), digest_size=16,
                                person=str(im.shape).encode()[:16]).digest() for im in ims]

    def perceive(self, images) -> list[tuple[Person, State, dict]]:
        """For each image: the person and viewpoint it believes it sees, and the head probabilities."""
        from .base import _images

        ims = _images(images)
        keys = self._keys(ims)
        todo = {k: im for k, im in zip(keys, ims) if k not in self._memo}
        if todo:
            if len(self._memo) + len(todo) > self.memo_size:
                self._memo.clear()
            try:
                got = self.recognizer.predict(list(todo.values()), realness=True)
            except TypeError:  # a recognizer without realness (a stand-in)
                got = self.recognizer.predict(list(todo.values()))
            probs = {h: v.numpy() for h, v in got.items()}
            for i, k in enumerate(todo):
                p = {h: probs[h][i] for h in HEADS}
                if REAL in probs:
                    p[REAL] = float(probs[REAL][i])
                val = {h: HEADS[h][int(p[h].argmax())] for h in HEADS}
                person = Person(pid=-1, **{k: val[k] for k in Person.__dataclass_fields__ if k not in ("pid", "shade")})
                self._memo[k] = (person, State(view=val["view"], pose=val["pose"], scene=val["scene"]), p)
        return [self._memo[k] for k in keys]

    def claim_probability(self, probs: dict, claims: dict[str, str]) -> float:
        """Mean probability the recognizer gives to each claim it can check (1.0 if none)."""
        ps = [float(probs[s][HEADS[s].index(v)]) for s, v in claims.items() if s in HEADS and v in HEADS[s]]
        return float(np.mean(ps)) if ps else 1.0

    @staticmethod
    def claim_evidence(probs: dict, claims: dict[str, str]) -> float:
        """The geometric mean of the probabilities the recognizer gives to each claim it can check (1.0 if
        none): one claim it finds false sinks it, as one false claim makes a description wrong."""
        ps = [float(probs[s][HEADS[s].index(v)]) for s, v in claims.items() if s in HEADS and v in HEADS[s]]
        return _geo(ps) if ps else 1.0

    def _item_rngs(self, images, texts) -> list[np.random.Generator]:
        """One random stream per (image, text) item of a call: :func:`item_rng` of the seed, the image's
        content and the text, so an answer depends on nothing else (not on earlier calls, a cache that
        skipped them, or the other items of the batch)."""
        from .base import _images

        return item_rngs(self.seed, list(zip(self._keys(_images(images)), texts)))

    # -- the interface -------------------------------------------------------------------------
    def _answer(self, images, questions):
        seen = self.perceive(images)
        out = []
        for (person, state, probs), q, rng in zip(seen, questions, self._item_rngs(images, questions)):
            self.rng = rng
            # The one memory across calls, on purpose: a repeating assistant repeats what it said last
            # (off unless Noise.repetition > 0).
            text = self._answer_one(person, state, q, self._last_answer)
            if text is not None and grammar.question_groups(q) != ["describe"]:
                self._last_answer = text
            out.append(text if text is not None else self._unanswerable(q))
        return out

    @staticmethod
    def _unanswerable(q: str) -> str:
        return "I cannot tell that from the image."

    def _converse(self, images, dialogues):
        """CAM's conversation (CECA): the last user turn is answered with every earlier turn in context.
        What the context changes: the random stream (a function of the image and the whole dialogue); a
        repetition (:class:`Noise`) repeats the previous turn of *this* dialogue; later answers keep the
        gender the conversation already stated (a contradicted gender carries on, as a real chat's would);
        and the summary request (``prompts.CECA_SUMMARY_TURN``) is answered from the earlier answers' claims
        together with what the image shows that no answer covered."""
        from ..world.attributes import visible_slots

        seen = self.perceive(images)
        texts = [json.dumps([[m["role"], m["content"]] for m in d]) for d in dialogues]
        out = []
        for (person, state, _), d, rng in zip(seen, dialogues, self._item_rngs(images, texts)):
            self.rng = rng
            q = d[-1]["content"]
            earlier = [m["content"] for m in d[:-1] if m["role"] == "assistant"]
            said = grammar.parse_claims(" ".join(earlier))
            if prompts.identify(q) is prompts.CECA_SUMMARY:
                vis = set(visible_slots(person, state.view))
                shown = {s: v for s, v in outfit_claims(person).items() if s in vis or s.endswith("_color") and s[:-6] in vis}
                out.append(grammar.render_claims({**shown, **said}, self.rng))
                continue
            p = person.replace(gender=said["gender"]) if said.get("gender") in ("man", "woman") else person
            text = self._answer_one(p, state, q, earlier[-1] if earlier else None)
            out.append(text if text is not None else self._unanswerable(q))
        return out

    def _answer_one(self, person: Person, state: State, q: str, last: str | None) -> str | None:
        """One answer from what it sees; ``last``: what a repetition repeats. None: not a question about
        the person's attributes."""
        from ..world import language

        groups = grammar.question_groups(q)
        if groups == ["describe"]:
            return self._describe_one(person, state, 4)
        if not groups:
            return None
        r = self.rng.random()
        n = self.noise
        if r < n.repetition and last is not None:
            return last
        p = person
        if r < n.repetition + n.contradiction:
            p = self._contradict(person, groups)
        parts = []
        for g in groups:
            if g == "gender":
                parts.append(f"The person is a {p.gender}.")
            elif g == "age":
                parts.append(f"{p.pronoun.capitalize()} looks {'middle-aged' if p.age == 'adult' else p.age}.")
            else:
                parts.append(language.answer(p, state, g, self.rng))
        if n.repetition + n.contradiction <= r < n.repetition + n.contradiction + n.hallucination:
            parts.append(self._hallucinate(person, groups))
        return " ".join(parts)

    def _contradict(self, person: Person, groups: list[str]) -> Person:
        g = groups[int(self.rng.integers(len(groups)))]
        slot = _GROUP_SLOTS_ANSWERED.get(g, [g])[-1]
        if slot == "hair_style" and person.hair_style == "bald":
            return person.replace(hair_style="short")
        choices = [v for v in SLOT_VALUES[slot] if v != getattr(person, slot) and not (slot == "lower_type" and v == "skirt")]
        return person.replace(**{slot: str(self.rng.choice(choices))})

    def _hallucinate(self, person: Person, asked: list[str]) -> str:
        from ..world.language import BAG_WORDS, HAT_WORDS, HELD_WORDS

        pron = person.pronoun.capitalize()
        options = []
        if person.held == "none":
            options.append(f"{pron} is also holding a {str(self.rng.choice([h for h in HELD_WORDS]))}.")
        if person.hat == "none":
            options.append(f"{pron} is also wearing a {str(self.rng.choice(SLOT_VALUES['hat_color']))} {str(self.rng.choice(list(HAT_WORDS)))}.")
        if person.bag == "none":
            options.append(f"{pron} is also carrying a {str(self.rng.choice(list(BAG_WORDS)))}.")
        options = options or [f"{pron} is also wearing glasses."]
        return options[int(self.rng.integers(len(options)))]

    def _describe_one(self, person: Person, state: State, k: int) -> str:
        from ..world.attributes import visible_slots
        from ..world.language import SALIENCE

        vis = set(visible_slots(person, state.view))
        groups = [g for g in ("upper", "lower", "shoes", "hair", "hat", "bag", "held", "accessory")
                  if any(s in vis for s in grammar.GROUPS[g])]
        w = np.array([SALIENCE["rstpreid"][g] for g in groups])
        pick = set(self.rng.choice(groups, size=min(k, len(groups)), replace=False, p=w / w.sum()).tolist())
        slots = {"gender"} | {s for g in pick for s in grammar.GROUPS[g] if s in vis or s.endswith("_color")}
        claims = {s: getattr(person, s) for s in slots if hasattr(person, s)}
        claims = {s: v for s, v in claims.items() if v not in ("none", "plain") or s in ("hat", "bag", "held")}
        if claims.get("hat") == "none":
            claims.pop("hat_color", None)
        if claims.get("bag") == "none":
            claims.pop("bag_color", None)
        return grammar.render_claims(claims, self.rng)

    def _describe(self, images, instructions):
        seen = self.perceive(images)
        out = []
        for (person, state, _), ins, rng in zip(seen, instructions, self._item_rngs(images, instructions)):
            self.rng = rng
            thorough = bool(re.search(r"detail|all |every|thorough|template", ins.lower()))
            out.append(self._describe_one(person, state, 6 if thorough else 3))
        return out

    def _judge(self, images, texts):
        seen = self.perceive(images)
        return [self.claim_probability(probs, grammar.parse_claims(t)) >= self.judge_threshold for (_, _, probs), t in zip(seen, texts)]

    def _evidence(self, kind: str, criterion: str, seen, texts, refs) -> list[float]:
        """The recognizer's raw evidence in [0, 1] for each item on a criterion of ``kind``."""
        out = []
        for (person, state, probs), text, ref in zip(seen, texts, refs):
            if kind == "alignment":
                if text is None:
                    raise ValueError(f"criterion {criterion!r} scores image-text alignment: pass texts")
                s = self.claim_evidence(probs, grammar.parse_claims(text))
            elif kind == "quality":  # the realism head's belief in a whole, plausible person; without one, how
                # sure the recognizer is of what it sees (broken images score low)
                s = probs[REAL] if REAL in probs else float(np.mean([float(probs[h].max()) for h in IDENTITY + OUTFIT]))
            elif kind in ("identity", "variation"):
                if ref is None:
                    raise ValueError(f"criterion {criterion!r} compares two images: pass references")
                rp = ref[2]
                if kind == "identity":  # the same outfit too, unless the criterion allows a change of clothes
                    agree = {h: float((probs[h] * rp[h]).sum()) for h in IDENTITY + OUTFIT}
                    if _CHANGE_OF_CLOTHES.search(criterion):
                        # the world's people differ only in six coarse traits: the outfit tells them apart too,
                        # bar the few garments or items a change of clothes changes (SynCPR's pairs: one to three)
                        kept_outfit = sorted(agree[h] for h in OUTFIT)[CHANGED_ITEMS:]
                        s = _geo([agree[h] for h in IDENTITY] + kept_outfit)
                    else:
                        s = _geo(list(agree.values()))
                else:
                    s = float(np.mean([1 - float((probs[h] * rp[h]).sum()) for h in ("view", "pose", "scene", "held", "bag")]))
                    s = min(1.0, 2.5 * s)
            else:  # relevance: the edit's claims hold in the target and not all of them in the reference
                if text is None or ref is None:
                    raise ValueError(f"criterion {criterion!r} needs texts (the relative caption) and references")
                claims = grammar.parse_claims(text)
                s = self.claim_evidence(probs, claims) * (1 - 0.5 * self.claim_evidence(ref[2], claims))
            out.append(max(0.0, min(1.0, s)))
        return out

    def _score(self, images, criterion, texts, references):
        from .base import _images

        kind = _criterion_kind(criterion)
        seen = self.perceive(images)
        refs = self.perceive(references) if references[0] is not None else [None] * len(seen)
        ev = self._evidence(kind, criterion, seen, texts, refs)
        if not self.calibrated:
            return [int(np.clip(round(1 + 9 * s), 1, 10)) for s in ev]
        ims = _images(images)
        return [self.calibration(kind, criterion, int(im.shape[0])).score(s, capture_detail(im)) for s, im in zip(ev, ims)]

    # -- the scale of its 1-10 scores ------------------------------------------------------------------
    #: Calibrated (the default): the 1-10 scale is fitted, per criterion, image height and camera
    #: resolution, on validation renders of people in no dataset at the height of the images being judged,
    #: from each camera of the world (:data:`~person_retrieval.world.render.RES_FACTORS`): fitting items (a
    #: person and their own description, the same person again, a true relative caption) and failing ones
    #: (another person's description, another person, another pair's relative caption, a render broken into
    #: shuffled blocks). Evidence at the threshold where the two are told apart with equal error scores 8.5
    #: (rounded up: 9, the TIPS bar, and SynCPR's 8.5), the median fitting evidence 10, and the upper
    #: quartile of failing evidence 1; in between, linearly (:class:`ScoreScale`). A judged image gets the
    #: scale of the camera whose validation renders show as much fine detail as it does
    #: (:func:`capture_detail`): a small capture is judged against small captures, as a person who knows the
    #: photo is small would. A real MLLM gives good, real items 9 or 10 and clear failures the lowest
    #: scores: so must this one, for a bar such as SynCPR's mean of 8.5 to mean what it means there.
    #: Variation (TIPS's yes/no, from 6) keeps one anchor: 10 is the median variation between two renders
    #: of a person. Uncalibrated, the evidence itself maps to 1-10 (``1 + 9 s``).
    calibrated = True
    n_calibration = 768  # 256 per camera

    def calibration(self, kind: str, criterion: str = "", height: int | None = None) -> "ScoreScale":
        """The fitted scale of ``kind`` for images ``height`` pixels high (default: the recognizer's own),
        computed once from validation renders (deterministic by the assistant's seed)."""
        h = int(height or self.recognizer.net.size[0])
        key = (kind, kind == "identity" and bool(_CHANGE_OF_CLOTHES.search(criterion)), h)
        cache = self.__dict__.setdefault("_scales", {})
        if key not in cache:
            (seen, texts, refs), false, factors, detail = self._calibration_items(kind, criterion, h)
            true_ev = np.asarray(self._evidence(kind, criterion, seen, texts, refs))
            false_ev = np.asarray(self._evidence(kind, criterion, *false)) if false is not None else None
            scales = {}
            for f in sorted(set(factors)):
                m = np.asarray(factors) == f
                scales[f] = (float(np.median(np.asarray(detail)[m])),
                             ScoreScale.fit(true_ev[m], false_ev[m] if false_ev is not None else None))
            cache[key] = CaptureScales(scales, ScoreScale.fit(true_ev, false_ev))
        return cache[key]

    def reference_evidence(self, kind: str, criterion: str = "", height: int | None = None) -> float:
        """The median evidence on real, fitting validation items of ``kind`` (what scores 10 at the
        sharpest camera)."""
        return self.calibration(kind, criterion, height).by_factor[1][1].top

    def _calibration_items(self, kind: str, criterion: str, height: int):
        """Validation items of ``kind`` at ``height``: ``(fitting, failing, camera factors, details)``,
        fitting and failing each ``(seen, texts, refs)`` as :meth:`_evidence` takes them (failing: None for
        variation); the camera factor of each item and the :func:`capture_detail` of its judged image."""
        from ..world.language import edit_person, relative_caption
        from ..world.render import RES_FACTORS, render, sample_state

        rng = rng_for(self.seed, "mini-vlm", "calibration", kind, height)
        clothes = kind == "identity" and bool(_CHANGE_OF_CLOTHES.search(criterion))
        n = self.n_calibration
        people, a, b, texts = [], [], [], []
        for i in range(n):
            p = sample_person(rng, -1 - i)
            q = edit_person(p, rng)[0] if kind == "relevance" or clothes else p
            f = RES_FACTORS[i % len(RES_FACTORS)]
            s1, s2 = sample_state(rng), sample_state(rng)
            a.append(render(p, replace(s1, res_factor=f), height))
            b.append(render(q, replace(s2, res_factor=f), height))
            if kind == "relevance":
                texts.append(relative_caption(p, q, rng))
            elif kind == "alignment":  # a description of some of what the person wears (a seed prompt) or all of it
                keep = rng.uniform(0.4, 1.0)
                texts.append(grammar.render_claims({k: v for k, v in outfit_claims(q).items() if k == "gender" or rng.random() < keep}, rng))
            people.append(p)
        # each item's failing partner: the next person of the same camera
        other = np.array([(i + len(RES_FACTORS)) % n if (i + len(RES_FACTORS)) % n % len(RES_FACTORS) == i % len(RES_FACTORS)
                          else (i + len(RES_FACTORS) - n) % n for i in range(n)])
        factors = [RES_FACTORS[i % len(RES_FACTORS)] for i in range(n)]
        detail = [capture_detail(x) for x in b]
        if kind == "quality":
            broken = [broken_image(x, rng) for x in b]
            out = (self.perceive(b), [None] * n, [None] * n), (self.perceive(broken), [None] * n, [None] * n)
        elif kind == "alignment":
            seen = self.perceive(b)
            out = (seen, texts, [None] * n), (seen, [texts[j] for j in other], [None] * n)
        else:
            seen, refs = self.perceive(b), self.perceive(a)
            if kind == "variation":
                out = (seen, [None] * n, refs), None
            elif kind == "identity":
                out = (seen, [None] * n, refs), ([seen[j] for j in other], [None] * n, refs)
            else:
                out = (seen, texts, refs), (seen, [texts[j] for j in other], refs)
        return (*out, factors, detail)


def capture_detail(image: np.ndarray) -> float:
    """How sharp an image is, whatever its content: the log ratio of the mean grey-level difference between
    neighbouring pixels to that between pixels two apart. An edge a coarser camera smeared over several
    pixels changes little from one pixel to the next; a sharp one changes all at once. What the calibrated
    judge reads the capture's camera from (on the world's renders it names the camera of 9 in 10 or more)."""
    x = np.asarray(image, np.float32).mean(-1) / 255.0
    g1 = np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()
    g2 = np.abs(x[2:] - x[:-2]).mean() + np.abs(x[:, 2:] - x[:, :-2]).mean()
    return float(np.log(g1 / (g2 + 1e-6) + 1e-6))


@dataclass(frozen=True)
class CaptureScales:
    """One :class:`ScoreScale` per camera factor, each with the median :func:`capture_detail` of its
    validation renders: an image is scored on the scale of the camera nearest in detail (``pooled``: one
    scale over every camera)."""

    by_factor: dict
    pooled: "ScoreScale"

    def scale_for(self, detail: float | None) -> "ScoreScale":
        if detail is None or not self.by_factor:
            return self.pooled
        return min(self.by_factor.values(), key=lambda m_s: abs(m_s[0] - detail))[1]

    def score(self, s: float, detail: float | None = None) -> int:
        return self.scale_for(detail).score(s)


def broken_image(image: np.ndarray, rng: np.random.Generator, grid: tuple[int, int] = (8, 4)) -> np.ndarray:
    """An image broken as a failed generation is: its blocks (``grid`` rows x columns) shuffled."""
    h, w = image.shape[:2]
    gh, gw = grid
    bh, bw = h // gh, w // gw
    blocks = [image[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].copy() for i in range(gh) for j in range(gw)]
    out = image.copy()
    for k, src in enumerate(rng.permutation(len(blocks))):
        i, j = divmod(k, gw)
        out[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = blocks[src]
    return out


@dataclass(frozen=True)
class ScoreScale:
    """A 1-10 scale of evidence: ``bottom`` scores 1, ``threshold`` 8.5, ``top`` 10, linearly in between
    (scores round half up, so the threshold reaches 9). Without failing items (``threshold`` None): 10 at
    ``top``, in proportion below."""

    top: float
    threshold: float | None = None
    bottom: float = 0.0

    @classmethod
    def fit(cls, true_ev: np.ndarray, false_ev: np.ndarray | None = None) -> "ScoreScale":
        """``top``: the median fitting evidence; ``threshold``: where the share of fitting items below it
        equals the share of failing items at or above it (the equal-error point); ``bottom``: the upper
        quartile of failing evidence."""
        top = max(1e-6, float(np.median(true_ev)))
        if false_ev is None or not len(false_ev):
            return cls(top)
        cands = np.unique(np.concatenate([true_ev, false_ev]))
        gap = [abs(float((true_ev < t).mean()) - float((false_ev >= t).mean())) for t in cands]
        t = float(cands[int(np.argmin(gap))])
        t = min(t, top)
        bottom = min(float(np.quantile(false_ev, 0.75)), t)
        return cls(top, t, bottom)

    def value(self, s: float) -> float:
        if self.threshold is None:
            return 1 + 9 * min(1.0, s / self.top)
        if s >= self.top:
            return 10.0
        if s >= self.threshold:
            return 8.5 + 1.5 * (s - self.threshold) / max(self.top - self.threshold, 1e-9)
        if s <= self.bottom:
            return 1.0
        return 1 + 7.5 * (s - self.bottom) / max(self.threshold - self.bottom, 1e-9)

    def score(self, s: float) -> int:
        return int(np.clip(np.floor(self.value(s) + 0.5), 1, 10))


def _geo(ps) -> float:
    return float(np.exp(np.mean(np.log(np.clip(np.asarray(ps, dtype=float), 1e-4, 1.0)))))


#: How many garments or items a change of clothes may change without the judge doubting the identity.
CHANGED_ITEMS = 3

_CHANGE_OF_CLOTHES = re.compile(r"whatever (they|he|she) wears?|change of cloth|different cloth|other cloth", re.I)

_KINDS = {
    "alignment": ["align", "match", "description", "prompt", "tips_seed_alignment", "judge"],
    "quality": ["quality", "natural", "fidelity", "realism", "artifact"],
    "identity": ["identity", "same person", "consistent", "consistency"],
    "variation": ["variation", "differ"],
    "relevance": ["relevance", "relative caption"],
}


def _criterion_kind(criterion: str) -> str:
    c = criterion.lower()
    for kind in ("identity", "variation", "relevance", "alignment", "quality"):
        if any(k in c for k in _KINDS[kind]):
            return kind
    raise ValueError(f"the mini MLLM cannot score {criterion!r}: it scores alignment with a text, image quality, identity "
                     "consistency or variation between two images, and relevance of a relative caption "
                     f"(prompt names such as {sorted(n for n in prompts.PROMPTS if n.startswith(('tips_', 'syncpr_')))})")


# =============================================================================================
class MiniLM(LanguageModel):
    """The mini language model: the papers' text jobs, done with the world's lexicon and grammar."""

    name = "mini-lm"

    def __init__(self, seed: int = 0, lenient: bool = False, repeats: bool = True):
        super().__init__()
        self.seed = seed
        # DiaNA's categorisation: a lenient reader calls an answer hallucinated only when it claims an item
        # (hat, bag, held object, accessory) the captions do not mention, not any unmentioned detail; a reader
        # with ``repeats=False`` judges each round against the captions alone, never against the earlier rounds.
        self.lenient, self.repeats = lenient, repeats
        if lenient or not repeats:
            self.name = "mini-lm" + ("-lenient" if lenient else "") + ("" if repeats else "-no-repeats")
        self.rng = np.random.default_rng(seed)  # replaced per prompt: see item_rng

    def _generate(self, batch, max_new_tokens):
        out = []
        texts = [item if isinstance(item, str) else next(m["content"] for m in reversed(item) if m.get("role") == "user")
                 for item in batch]
        for text, rng in zip(texts, item_rngs(self.seed, [(t,) for t in texts])):
            self.rng = rng
            p = prompts.identify(text)
            if p is None:
                raise ValueError("the mini language model only does the jobs of the project's prompts "
                                 f"(person_retrieval.assistants.prompts: {sorted(prompts.PROMPTS)}); got: {text[:80]!r}")
            job = getattr(self, f"_job_{p.name}", None)
            if job is None:
                raise ValueError(f"prompt {p.name!r} is not a job for the mini language model (image prompts go to a "
                                 "vision-language model; templates such as tips_difference_text are only formatted)")
            out.append(job(text))
        return out

    # -- rewriting --------------------------------------------------------------------------------
    def _rewrite(self, text: str) -> str:
        body = text.split("\n", 1)[1] if "\n" in text else text
        return grammar.render_claims(grammar.parse_claims(body), self.rng)

    _job_ceca_summary = _rewrite
    _job_ctgi_reconstruct = _rewrite

    def _job_rephrase(self, text):
        return grammar.render_claims(grammar.parse_claims(_field(text, "Description")), self.rng)

    def _job_ctgi_aggregate(self, text):
        q, a = grammar.parse_claims(_field(text, "Query")), grammar.parse_claims(_field(text, "Answers"))
        return grammar.render_claims({**a, **q}, self.rng)

    # -- DiaNA's dialogue-round categorisation ---------------------------------------------------
    def _job_diana_categorize(self, text):
        tail = "- Captions:" + text.rsplit("- Captions:", 1)[1]  # the dialogue to classify follows the example
        caps = _field(tail, "- Captions")
        dia = tail.split("- Dialogue:", 1)[1].split("- Output:", 1)[0]
        rounds = re.findall(r"Assistant:\s*(.*?)\n\s*User:\s*(.*?)(?=\n\s*Assistant:|\Z)", dia.strip() + "\n", re.S)
        return ", ".join(categorize_rounds(caps, [(q.strip(), a.strip()) for q, a in rounds], lenient=self.lenient, repeats=self.repeats))

    def _job_diana_categorize_last(self, text):
        return self._job_diana_categorize(text).split(", ")[-1]

    # -- generation of new descriptions -----------------------------------------------------------
    def _job_syncpr_quadruple(self, text):
        from ..world.language import edit_person, relative_caption

        lines = text.split("\n")
        after = next((i for i, ln in enumerate(lines) if ln.startswith("Reverse:")), len(lines) - 1)
        hint = grammar.parse_claims("\n".join(lines[after + 1:]))
        person = sample_person(self.rng, -1)
        person = person.replace(**{k: v for k, v in hint.items() if hasattr(person, k)})
        target, _ = edit_person(person, self.rng)
        forward, reverse = relative_caption(person, target, self.rng), relative_caption(target, person, self.rng)
        ref = grammar.render_claims(outfit_claims(person), self.rng)
        tgt = grammar.render_claims(outfit_claims(target), self.rng)
        return f"Reference: {ref}\nTarget: {tgt}\nForward: {forward}\nReverse: {reverse}"

    def _job_tips_seed_prompt_zero_shot(self, text):
        person = sample_person(self.rng, -1)
        want = grammar.parse_claims(" ".join(_field(text, f"Suggested {k}") for k in ("character", "colour", "clothing")))
        colour = grammar.parse_claims(_field(text, "Suggested colour") + " shirt").get("upper_color")
        cloth = grammar.parse_claims(_field(text, "Suggested clothing"))
        if colour and cloth:  # the suggested colour goes on the suggested garment
            group = next((k.split("_")[0] for k in cloth if k.endswith("_type")), None)
            if group:
                want[f"{group}_color"] = colour
        person = person.replace(**{k: v for k, v in want.items() if hasattr(person, k)})
        claims = outfit_claims(person)
        keep = {k: v for k, v in claims.items() if k in want or self.rng.random() < 0.6 or k == "gender"}
        return grammar.render_claims(keep, self.rng)

    def _job_tips_seed_prompt_few_shot(self, text):
        examples = [grammar.parse_claims(line) for line in text.split("\n")[1:] if line.strip()]
        if not examples:
            raise ValueError("the few-shot seed prompt needs example sentences")
        new: dict[str, str] = {}
        for g, slots in {**grammar.GROUPS, "gender": ["gender"], "age": ["age"]}.items():
            having = [e for e in examples if any(s in e for s in slots)]
            if having:
                src = having[int(self.rng.integers(len(having)))]
                new.update({s: src[s] for s in slots if s in src})
        return grammar.render_claims(new, self.rng)


def _field(text: str, name: str) -> str:
    m = re.search(rf"{re.escape(name)}:\s*(.*)", text)
    return m.group(1).strip() if m else ""


def outfit_claims(p: Person) -> dict[str, str]:
    c = {s: getattr(p, s) for s in ["gender", "hair_style", "hair_color", "upper_type", "upper_color", "upper_pattern", "lower_type",
                                    "lower_color", "shoes_type", "shoes_color", "hat", "hat_color", "bag", "bag_color", "held",
                                    "accessory"]}
    for slot, gate in (("hat_color", "hat"), ("bag_color", "bag")):
        if c[gate] == "none":
            c.pop(slot)
    for s in ("hat", "bag", "held", "accessory"):
        if c[s] == "none":
            c.pop(s)
    if c["upper_pattern"] == "plain":
        c.pop("upper_pattern")
    return c


#: Slots that say an item is there (or not): what a lenient categoriser still calls hallucinated.
ITEM_SLOTS = ("hat", "bag", "held", "accessory")


def categorize_rounds(captions: str, rounds: list[tuple[str, str]], lenient: bool = False, repeats: bool = True) -> list[str]:
    """DiaNA's four categories for each (question, answer) round against the captions' claims (precedence:
    Contradictory, Repeated, Hallucinatory, Matched). ``lenient``: only a claimed item the captions do not
    mention is hallucinated; other unmentioned details count as matched. ``repeats=False``: no round is
    compared with the earlier ones (none is Repeated)."""
    cap = grammar.parse_claims(captions)
    said: set = set()
    out = []
    for q, a in rounds:
        claims = grammar.parse_claims(a)
        groups = grammar.claimed_groups(claims) or set(grammar.question_groups(q)) - {"describe"}
        if any(cap.get(s) not in (None, v) for s, v in claims.items()):
            out.append("Contradictory")
        elif repeats and groups and groups <= said:
            out.append("Repeated")
        elif any(s not in cap and v != "none" for s, v in claims.items() if s != "gender" and (not lenient or s in ITEM_SLOTS)):
            out.append("Hallucinatory")
        else:
            out.append("Matched")
        said |= groups
    return out
