"""The LLM and MLLM roles (see :mod:`.base`), with a learned mini backend (:mod:`.mini`) and a transformers
backend (:mod:`.hf`), and every prompt of the papers (:mod:`.prompts`).

    vlm = assistants.mini_vlm(scale)          # the attribute recognizer trained on the world (cached)
    lm = assistants.MiniLM()
    vlm.answer(images, prompts.CECA_QUESTIONS["Q1"])
"""
from . import grammar, prompts
from .base import (
    LanguageModel, Usage, VisionLanguageModel, categorize_dialogue, parse_categories, parse_score, parse_scores, parse_yes_no,
)
from .mini import AttributeRecognizer, MiniLM, MiniVLM, Noise, categorize_rounds, trained_recognizer


def mini_vlm(scale: str = "small", seed: int = 0, noise: Noise = Noise(), progress: bool = True) -> MiniVLM:
    """The mini MLLM for ``(scale, seed)`` (its recognizer trained and cached on first use)."""
    return MiniVLM(trained_recognizer(scale, seed, progress), noise=noise, seed=seed)


def load(scale: str = "small", seed: int = 0, vlm: str | None = None, llm: str | None = None, device: str = "cpu",
         assistant_seed: int | None = None):
    """The MLLM and the LLM a notebook's ``vlm`` / ``llm`` parameters name: the mini ones by default (the
    MLLM's recognizer trained for ``(scale, seed)``), else transformers models by name or local folder. Both
    draw their randomness from ``assistant_seed`` (default ``seed``)."""
    s = seed if assistant_seed is None else assistant_seed
    if vlm is None:
        v = MiniVLM(trained_recognizer(scale, seed), seed=s)
    else:
        from .hf import TransformersVLM

        v = TransformersVLM.load(vlm, device=device, seed=s)
    if llm is None:
        lm = MiniLM(seed=s)
    else:
        from .hf import TransformersLM

        lm = TransformersLM.load(llm, device=device, seed=s)
    return v, lm


__all__ = ["grammar", "prompts", "categorize_dialogue", "LanguageModel", "VisionLanguageModel", "Usage", "parse_yes_no", "parse_score", "parse_scores",
           "parse_categories", "AttributeRecognizer", "MiniLM", "MiniVLM", "Noise", "categorize_rounds", "trained_recognizer",
           "mini_vlm", "load"]
