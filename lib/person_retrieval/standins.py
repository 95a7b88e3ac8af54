"""Stand-ins of the released files, for walking the paper path (``scale="paper"``) where the real ones
cannot be downloaded: the paper-path test, ``benchmarks/bench_gpu.py`` and a new user's dry run.

    paths = standins.write_all(tmp)   # {"data_root": ..., "weights_dir": ..., "models_dir": ..., "clip": ..., ...}

* **Data**: the six datasets in their released layouts (``CUHK-PEDES/reid_raw.json`` + ``imgs/``, IRRA's
  ICFG-PEDES and RSTPReid files, the CPR release's ``ITCPR/query.json`` / ``gallery.json`` and
  ``SynCPR/SynCPR.json``, DiaNA's ``ChatPedes/train_reid.json``), written by the mini world at ``tiny`` and
  copied under the real folder names, so the notebooks read them exactly as a user's folders.
* **Weights** as the releases save them: CLIP ViT-B/16 as a full-size open_clip state dict in safetensors
  (random, so retrieval is chance: the point is the path, shapes, memory and speed); FLUX.1-dev, BLIP-2 ITM,
  Qwen2-VL and Llama as tiny configurations of the real classes written with ``save_pretrained``.

Nothing here is a result: every number a notebook computes on these files is noise, and the tables say
the source is the stand-ins.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

#: Folder names under PR_MODELS_DIR / PR_WEIGHTS_DIR, as a user would name the released models.
NAMES = {"clip": "ViT-B-16", "flux": "FLUX.1-dev", "blip2": "blip2-itm-vit-g", "vlm": "Qwen2-VL-7B-Instruct",
         "llm": "Llama-3.2-1B-Instruct", "swin": "swinv2-base-patch4-window12-192-22k"}


def write_data(root: str | Path, seed: int = 0) -> Path:
    """The six datasets under ``root`` in their released layouts (real folder names); returns ``root``."""
    from .datasets.formats import REAL_FOLDERS
    from .world import world_dataset

    root = Path(root)
    for name, folder in REAL_FOLDERS.items():
        dst = root / folder
        if not dst.is_dir():
            src = world_dataset(name, "tiny", seed=seed, progress=False)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("world.json"))
    return root


#: The paper-path test's CLIP: ViT-B/16's layout (patch 16, CLIP's vocabulary and 77 positions) at a tiny width
#: and depth, described by an open_clip model config beside the checkpoint, as a fine-tuned variant would be.
TINY_VIT = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def write_clip(weights_dir: str | Path, arch: str = "ViT-B-16", seed: int = 0, tiny: bool = False) -> Path:
    """An open_clip state dict (random weights) at ``weights_dir/<arch>.safetensors``: full-size ``arch``,
    or with ``tiny`` the :data:`TINY_VIT` configuration written beside it as ``<arch>.json``."""
    import json

    import open_clip
    from safetensors.torch import save_file

    path = Path(weights_dir) / f"{arch}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        if tiny:
            path.with_suffix(".json").write_text(json.dumps(TINY_VIT, indent=1))
            from .models.backbone import _register_config

            _register_config(arch, path)
        model = open_clip.create_model(arch, pretrained=None)
        tmp = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return path


def write_flux(folder: str | Path, seed: int = 0) -> Path:
    """FLUX.1-dev's classes at a tiny size, saved in diffusers' layout (``model_index.json``, ...)."""
    from .generators.flux import tiny_flux_pipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        tiny_flux_pipeline(seed).save_pretrained(str(folder))
    return folder


def write_blip2(folder: str | Path, seed: int = 0) -> Path:
    """A ``Blip2ForImageTextRetrieval`` at a tiny size, with a BERT tokenizer, saved as the ITM release is."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        cfg = Blip2Config(vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=2),
                          qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                              encoder_hidden_size=32, vocab_size=_bert_tokenizer().vocab_size,
                                              use_qformer_text_input=True, max_position_embeddings=64),
                          num_query_tokens=4, image_text_hidden_size=16)
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(cfg).eval()
        with torch.no_grad():  # a released checkpoint's query tokens are trained; transformers starts them at zero, where
            model.query_tokens.normal_(0.0, 0.02)  # LayerNorm's gradient is unbounded and clipping stops every step
        model.save_pretrained(str(folder))
        _bert_tokenizer().save_pretrained(str(folder))
    return folder


def _bert_tokenizer():
    """A BERT word-piece tokenizer over the world's words (BLIP-2's Q-Former reads BERT tokens)."""
    import tempfile

    from transformers import BertTokenizerFast

    from .assistants import tiny

    words = [w for w in tiny.tokenizer().get_vocab() if not w.startswith("<")]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *sorted(set(words))]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast(str(Path(d) / "vocab.txt"), do_lower_case=True)


#: A random model never stops on its own: the stand-ins' generation_config.json caps an answer at this many
#: tokens (``assistants.hf`` honours it), so a smoke run asks for hundreds of answers in seconds.
STANDIN_MAX_NEW_TOKENS = 6


def _cap_generation(model) -> None:
    model.generation_config.max_new_tokens = STANDIN_MAX_NEW_TOKENS


def write_vlm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (the real class, its processor) saved with ``save_pretrained``."""
    from .assistants import tiny

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        model, proc = tiny.qwen2_vl(seed)
        _cap_generation(model)
        model.save_pretrained(str(folder))
        proc.save_pretrained(str(folder))
    return folder


def write_llm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Llama (the real class, its tokenizer) saved with ``save_pretrained``."""
    from .assistants import tiny

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        model, tok = tiny.llama_lm(seed)
        _cap_generation(model)
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
    return folder


def tiny_swinv2(seed: int = 0):
    """A tiny Swin Transformer V2 (transformers' ``Swinv2Model``) at DiaNA's 384x192 input: two stages of one
    block, 16 and 32 channels, the release's window of 12 and patch of 4."""
    from transformers import Swinv2Config, Swinv2Model

    torch.manual_seed(seed)
    return Swinv2Model(Swinv2Config(image_size=[384, 192], patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=12))


def write_swin(folder: str | Path, seed: int = 0) -> Path:
    """DiaNA's image encoder (Swin V2-B in the paper), a tiny one saved with ``save_pretrained``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        tiny_swinv2(seed).save_pretrained(str(folder))
    return folder


def write_all(base: str | Path, seed: int = 0, tiny_clip: bool = False) -> dict:
    """Every stand-in under ``base``: ``data/`` (data_root), ``weights/`` (PR_WEIGHTS_DIR: the CLIP file and
    the FLUX.1-dev folder) and ``models/`` (PR_MODELS_DIR: BLIP-2, Qwen2-VL, Llama, Swin V2). Returns their paths;
    ``clip_name`` is what a notebook's ``weights`` parameter takes (full-size ViT-B-16, or with ``tiny_clip``
    the tiny "ViT-Tiny-16")."""
    base = Path(base)
    wdir, mdir = base / "weights", base / "models"
    clip_name = "ViT-Tiny-16" if tiny_clip else NAMES["clip"]
    return {
        "data_root": write_data(base / "data", seed),
        "weights_dir": wdir, "models_dir": mdir, "clip_name": clip_name,
        "clip": write_clip(wdir, clip_name, seed, tiny=tiny_clip),
        "flux": write_flux(wdir / NAMES["flux"], seed),
        "blip2": write_blip2(mdir / NAMES["blip2"], seed),
        "vlm": write_vlm(mdir / NAMES["vlm"], seed),
        "llm": write_llm(mdir / NAMES["llm"], seed),
        "swin": write_swin(mdir / NAMES["swin"], seed),
    }


def smoke_parameters(notebook: str, paths: dict, max_steps: int = 2, batch_size: int | None = 4, seed: int = 0) -> dict:
    """The papermill parameters of a paper-path smoke run of ``notebook`` (its file stem, e.g. "04_fafa") on
    the stand-ins ``paths`` (from :func:`write_all`): the data, each model the notebook's paper step reads,
    one repeat, ``max_steps`` optimizer steps per training run, and the notebook's synthesis counts small."""
    common = dict(scale="paper", seed=seed, gpus=0, data_root=str(paths["data_root"]), max_steps=max_steps, batch_size=batch_size)
    clip, flux = paths["clip_name"], str(paths["flux"])
    vlm, llm, blip2 = str(paths["vlm"]), str(paths["llm"]), str(paths["blip2"])
    own = {
        "00_world_and_backbone": dict(weights=clip),
        "01_tpr_baselines": dict(weights=clip),
        "02_generators": dict(weights=flux, n_eval=2),
        "02_tips": dict(weights=flux, clip_weights=clip, llm=llm, vlm=vlm, seeds=[seed], n_synthetic=2, max_tries=1, n_previews=4),
        "03_syncpr_itcpr": dict(weights=flux, clip_weights=clip, llm=llm, vlm=vlm, n_quadruples=4),
        "04_fafa": dict(weights=blip2, seeds=[seed]),
        "05_ceca": dict(weights=clip, vlm=vlm, llm=llm, seeds=[seed]),
        "06_diana": dict(weights=clip, llm=llm, vlm=vlm, vision=str(paths["swin"]), seeds=[seed], n_dialogues=1, n_live=1, rounds=2),
        "07_ctgi": dict(weights=clip, vlm=vlm, llm=llm, seeds=[seed], n_captions=16, rounds=2, top_k=2),
        "08_demos": dict(weights=clip),
    }
    if notebook not in own:
        raise ValueError(f"no paper-path parameters for notebook {notebook!r}; expected one of {sorted(own)}")
    return {**common, **own[notebook]}
