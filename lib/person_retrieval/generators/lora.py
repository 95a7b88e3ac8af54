"""LoRA on a Flux transformer's attention projections, with TIPS's strength and per-layer scale.

TIPS adapts ``W`` by ``W' = W + Delta W`` with ``Delta W = beta * gamma * B A`` (rank ``r``): ``B A`` is
peft's LoRA (``B`` starts at zero, so training starts from the base model), ``gamma`` a learnable scalar
per adapted layer (here a parameter ``lora_gamma`` beside ``B``, applied by a forward hook), and
``beta`` the strength chosen at sampling time (peft's per-adapter ``scaling``; ``lora_alpha = r`` so
that ``beta = 1`` means the trained update). SynCPR varies ``beta`` across samples for style diversity.

Several named adapters live on one transformer (the mini world's SPG, IDPG and dual-panel adapters share
one base model); :func:`use_adapter` picks one, or none.

Files: :func:`save_lora` / :func:`load_lora` keep everything (``gamma`` included) in one safetensors
file with the rank and targets in its metadata. :func:`diffusers_lora_state` folds ``gamma`` into ``B``
for diffusers' own ``FluxPipeline.save_lora_weights`` / ``load_lora_weights`` format.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

#: Flux's joint attention: the image stream's and the text stream's projections (TIPS: "LoRA is
#: introduced to fine-tune the cross-attention layers of DiT").
FLUX_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_PLACEHOLDER = "{adapter}"


def _gamma_hook(module: nn.Module, inputs, output):
    return output * module.lora_gamma


def _lora_layers(transformer: nn.Module, name: str):
    for mod_name, mod in transformer.named_modules():
        lora_b = getattr(mod, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and name in lora_b:
            yield mod_name, mod


def add_lora(transformer: nn.Module, name: str, rank: int = 32, targets: list[str] | None = None,
             learn_gamma: bool = True) -> int:
    """Add adapter ``name`` (rank ``rank``) on ``targets`` (default: :data:`FLUX_ATTENTION` present in the
    model); only the adapter's parameters are left trainable. Returns the number of adapted layers."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    present = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n, _ in transformer.named_modules()}
    targets = [t for t in (targets or FLUX_ATTENTION) if t in present or t.split(".")[-1] in present]
    if not targets:
        raise ValueError("none of the LoRA target modules is in this transformer")
    if name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"the transformer already has an adapter named {name!r}")
    with warnings.catch_warnings():  # peft warns whenever a second adapter joins; that is the design here
        warnings.simplefilter("ignore")
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True), adapter_name=name)
    n = 0
    for _, mod in _lora_layers(transformer, name):
        lb = mod.lora_B[name]
        lb.lora_gamma = nn.Parameter(torch.ones((), device=lb.weight.device, dtype=lb.weight.dtype), requires_grad=learn_gamma)
        lb.register_forward_hook(_gamma_hook)
        n += 1
    for p_name, p in transformer.named_parameters():  # only this adapter learns
        p.requires_grad_(f".{name}." in p_name and "lora_" in p_name and (learn_gamma or "lora_gamma" not in p_name))
    return n


def set_beta(transformer: nn.Module, name: str, beta: float) -> None:
    """The adapter's strength ``beta`` (sampling time; 0 is the base model, 1 the trained update)."""
    for _, mod in _lora_layers(transformer, name):
        mod.scaling[name] = float(beta) * mod.lora_alpha[name] / mod.r[name]


def gammas(transformer: nn.Module, name: str) -> dict[str, float]:
    """Each adapted layer's learned scale ``gamma``."""
    return {n: float(m.lora_B[name].lora_gamma) for n, m in _lora_layers(transformer, name)}


def use_adapter(transformer: nn.Module, name: str | None, beta: float | None = None) -> None:
    """Make ``name`` the active adapter (``None``: the base model alone), optionally at strength ``beta``."""
    if name is None:
        if getattr(transformer, "peft_config", None):
            transformer.disable_adapters()
        return
    if name not in getattr(transformer, "peft_config", {}):
        have = sorted(getattr(transformer, "peft_config", {}))
        raise KeyError(f"no adapter named {name!r}; this transformer has {have}")
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer.enable_adapters()
    for mod in transformer.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.set_adapter(name)
    if beta is not None:
        set_beta(transformer, name, beta)


@contextlib.contextmanager
def adapter(transformer: nn.Module, name: str | None, beta: float = 1.0):
    """``with adapter(t, "spg", beta=0.8): ...`` samples with that adapter; the base model outside."""
    use_adapter(transformer, name, beta)
    try:
        yield transformer
    finally:
        if name is not None:
            set_beta(transformer, name, 1.0)
        use_adapter(transformer, None)


# ---------------------------------------------------------------------------------------------
def lora_state(transformer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors (A, B and gamma), keyed without the adapter's name."""
    out = {}
    for k, v in transformer.state_dict().items():
        if "lora_" in k and f".{name}." in k + ".":
            out[k.replace(f".{name}.", f".{_PLACEHOLDER}.").replace(f".{name}", f".{_PLACEHOLDER}")] = v.detach().cpu().contiguous()
    if not out:
        raise KeyError(f"no adapter named {name!r} to save")
    return out


def save_lora(transformer: nn.Module, name: str, path: str | Path) -> Path:
    """Save adapter ``name`` to one safetensors file (rank and targets in its metadata), atomically."""
    from safetensors.torch import save_file

    conf = transformer.peft_config[name]
    meta = {"rank": str(conf.r), "targets": json.dumps(sorted(conf.target_modules)), "format": "person_retrieval-lora-1"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state(transformer, name), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_lora(transformer: nn.Module, path: str | Path, name: str) -> nn.Module:
    """Add adapter ``name`` to ``transformer`` from a file written by :func:`save_lora`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "person_retrieval-lora-1":
        raise ValueError(f"{path} is not a LoRA file written by save_lora (metadata {meta}); "
                         "for diffusers' format use FluxPipeline.load_lora_weights")
    add_lora(transformer, name, int(meta["rank"]), json.loads(meta["targets"]))
    state = {k.replace(_PLACEHOLDER, name): v for k, v in load_file(str(path)).items()}
    own = transformer.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise ValueError(f"{path} does not fit this transformer: {len(missing)} tensors have no place, e.g. {missing[0]}")
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path} does not fit this transformer: shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                         f"expected {tuple(own[wrong[0]].shape)}")
    transformer.load_state_dict(state, strict=False)
    for p in transformer.parameters():
        p.requires_grad_(False)
    return transformer


def diffusers_lora_state(transformer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter in peft's plain LoRA layout with ``gamma`` folded into ``B`` (``B' = gamma B``), for
    ``FluxPipeline.save_lora_weights(dir, transformer_lora_layers=...)``; loads anywhere diffusers does."""
    state = lora_state(transformer, name)
    out = {}
    for k, v in state.items():
        if k.endswith("lora_gamma"):
            continue
        if ".lora_B." in k:
            v = v * state[k.rsplit(".", 1)[0] + ".lora_gamma"]
        out[k.replace(f".{_PLACEHOLDER}", "")] = v
    return out
