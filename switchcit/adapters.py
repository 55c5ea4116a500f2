"""Adapter banks on plain transformers models, from and to PEFT adapter folders (safetensors only,
never unpickled), without PEFT at run time:

* :func:`load_adapters` / :func:`save_adapter`: PEFT folders ↔ :class:`MultiLoraLinear` layers;
* :func:`routing_context`: the model's :class:`RoutingContext`; :func:`set_adapters`: one adapter per sequence
  for hand-written loops (the pipeline, :mod:`switchcit.pipeline`, does it for you).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from switchcit.modules import MultiLoraLinear, RoutingContext, attach_context
from switchcit.peft_patch import CONTEXT_ATTR

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "adapter_layers", "load_adapters", "routing_context", "save_adapter",
           "install_adapters", "read_adapter", "set_adapters", "unload_adapter"]

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def routing_context(model: nn.Module) -> RoutingContext:
    """The :class:`RoutingContext` that :func:`switchcit.accelerate` or :func:`load_adapters` attached to ``model``."""
    context = getattr(model, CONTEXT_ATTR, None)
    if context is None:
        raise ValueError("this model has no adapter bank: call switchcit.accelerate or switchcit.load_adapters first")
    return context


def load_adapters(model: nn.Module, adapters: Mapping[str, str | Path]) -> nn.Module:
    """Load PEFT LoRA adapter folders ``{"task": path, ...}`` into an adapter bank on ``model``.

    Each targeted linear layer becomes a :class:`MultiLoraLinear` (once) sharing the model's
    :class:`RoutingContext` (``switchcit.routing_context(model)``); route with
    ``switchcit.set_adapters(model, ["task", None, ...])`` — one adapter per sequence — before a forward or
    ``generate``. Returns ``model``.
    """
    install_adapters(model, [read_adapter(model, name, folder) for name, folder in adapters.items()])
    return model


def read_adapter(model: nn.Module, name: str, folder: str | Path) -> tuple[str, dict, dict]:
    """A PEFT LoRA folder read and checked against ``model`` (every problem raised here, nothing
    changed): ``(name, config, {module path: (lora_A, lora_B)})`` for :func:`install_adapters`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_lora_config(folder)
    weights = _group_lora_weights(load_file(str(folder / PEFT_WEIGHTS)), folder)
    missing = [path for path in weights if not _has_module(model, path)]
    if missing:
        raise ValueError(f"adapter {name!r} ({folder}) targets modules this model lacks: {missing[:3]}")
    return name, config, weights


def install_adapters(model: nn.Module, adapters: Sequence[tuple[str, dict, dict]]) -> None:
    """Put adapters from :func:`read_adapter` into ``model``'s bank (no file access: fast enough to run
    between two generation steps)."""
    context = getattr(model, CONTEXT_ATTR, None) or RoutingContext()
    for name, config, weights in adapters:
        for path, (lora_a, lora_b) in weights.items():
            layer = _bank_layer(model, path, context)
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
            layer.add_adapter(name, lora_a.to(layer.lora_a.device, layer.lora_a.dtype),
                              lora_b.to(layer.lora_b.device, layer.lora_b.dtype),
                              alpha=alpha, use_rslora=bool(config.get("use_rslora")))
    setattr(model, CONTEXT_ATTR, attach_context(model, context))


def unload_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name`` from ``model``'s bank; its id stays reserved (plans built before stay valid)."""
    context = routing_context(model)
    context.id_of(name)  # KeyError for an unknown adapter, before any change
    for module in model.modules():
        if isinstance(module, MultiLoraLinear):
            module.remove_adapter(name)
    context.remove(name)


def save_adapter(model: nn.Module, name: str, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model``'s bank as a PEFT LoRA folder (config + safetensors)."""
    from safetensors.torch import save_file

    tensors, ranks, alphas, fan_in_fan_out = {}, {}, {}, False
    for path, module in model.named_modules():
        if isinstance(module, MultiLoraLinear) and name in module.adapter_names:
            lora_a, lora_b, scaling = module.adapter_weights(name)
            tensors[f"base_model.model.{path}.lora_A.weight"] = lora_a.detach().contiguous().cpu()
            tensors[f"base_model.model.{path}.lora_B.weight"] = lora_b.detach().contiguous().cpu()
            ranks[path], alphas[path] = lora_a.shape[0], scaling * lora_a.shape[0]
            fan_in_fan_out |= not isinstance(module.base_layer, nn.Linear)
    if not tensors:
        raise KeyError(f"no layer of this model has adapter {name!r}")
    rank = max(ranks.values())
    alpha = alphas[max(ranks, key=ranks.get)]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if not math.isclose(a, alpha)},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _read_lora_config(folder: Path) -> dict:
    for file in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {file} is missing")
    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: only LoRA adapters are supported, got peft_type {config['peft_type']!r}")
    unsupported = [k for k in ("use_dora", "modules_to_save") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise ValueError(f"{folder}: an adapter bank cannot hold {', '.join(unsupported)}")
    return config


def _group_lora_weights(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (lora_A [r, H], lora_B [O, r])}`` from PEFT's flat safetensors keys."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise ValueError(f"{folder}: unexpected tensor {key!r} in {PEFT_WEIGHTS}")
        grouped.setdefault(match.group(1), {})[match.group(2)] = tensor
    incomplete = [path for path, pair in grouped.items() if len(pair) != 2]
    if incomplete:
        raise ValueError(f"{folder}: lora_A or lora_B missing for {incomplete[:3]}")
    return {path: (pair["lora_A"], pair["lora_B"]) for path, pair in grouped.items()}


def _pattern_value(patterns: Mapping[str, float], path: str, default: float) -> float:
    """PEFT's rule: a pattern applies to a module whose name ends with it (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _bank_layer(model: nn.Module, path: str, context: RoutingContext) -> MultiLoraLinear:
    module = model.get_submodule(path)
    if isinstance(module, MultiLoraLinear):
        return module
    layer = MultiLoraLinear(module, context)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    return layer


def set_adapters(model: nn.Module, adapters: Sequence[str | None] | torch.Tensor | None) -> None:
    """One adapter per sequence for the next forwards of ``model``: names (``None``: the base model), an
    id tensor (−1: the base model), or ``None`` for none assigned."""
    context = routing_context(model)
    if adapters is not None and not isinstance(adapters, torch.Tensor):
        adapters = context.ids_of(adapters, device=next(model.parameters()).device)
    context.assign(adapters)


def adapter_layers(adapter_folder: str | Path) -> set[int]:
    """The decoder layer indices a PEFT adapter folder has weights in (``….layers.<i>.…`` keys)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_folder) / PEFT_WEIGHTS), "pt") as f:
        return {int(m.group(1)) for key in f.keys() if (m := re.search(r"\.layers\.(\d+)\.", key))}
