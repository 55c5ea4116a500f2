"""Hugging Face / PEFT integration.

* :func:`accelerate` / :func:`restore`: route every PEFT ``lora.Linear`` of a ``PeftModel`` through the
  multi-LoRA op — plain forward, ``generate`` and mixed batches (``adapter_names=[...]``) — in one pass
  per layer instead of PEFT's loop over adapters. Instance-level, idempotent, reversible; patched
  layers stay ``LoraLayer`` instances (PEFT hands ``adapter_names`` only to those).
* :func:`load_adapters` / :func:`save_adapter`: an adapter bank (:class:`MultiLoraLinear` layers) on a
  plain transformers model, from and to PEFT adapter folders (safetensors), without PEFT at run time.

Weights are read with safetensors only (never unpickled).
"""
from __future__ import annotations

import json
import logging
import math
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from switchcit.modules import MultiLoraLinear, RoutingContext, linear_features
from switchcit.ops import lora_delta

__all__ = ["accelerate", "restore", "routing_context", "route", "load_adapters", "save_adapter"]

logger = logging.getLogger("switchcit")

_CONTEXT_ATTR = "switchcit_context"
_BANK_ATTR = "_switchcit_bank"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def routing_context(model: nn.Module) -> RoutingContext:
    """The :class:`RoutingContext` that :func:`accelerate` or :func:`load_adapters` attached to ``model``."""
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        raise ValueError("this model has no adapter bank: call switchcit.accelerate or switchcit.load_adapters first")
    return context


# --------------------------------------------------------------------------------------------------
# PeftModel acceleration


def accelerate(model: nn.Module) -> nn.Module:
    """Serve every PEFT LoRA ``Linear`` layer of ``model`` with the multi-LoRA op; returns ``model``.

    Layers the op cannot serve (DoRA, LoRA bias, merged weights, other variants, non-linear layers)
    stay on PEFT's path, named in one warning. Calling it again patches only what is new; the number
    of accelerated layers is logged and kept in ``model.switchcit_accelerated_layers``.
    """
    from peft.tuners.lora import LoraLayer

    context = getattr(model, _CONTEXT_ATTR, None) or RoutingContext()
    accelerated, skipped = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        reason = _unservable(module)
        if reason:
            skipped.append(f"{name} ({reason})")
            continue
        if _BANK_ATTR not in module.__dict__:
            module.__dict__[_BANK_ATTR] = _PeftBank(module, context)  # not a submodule: no state_dict entry
            module.forward = types.MethodType(_accelerated_forward, module)
        accelerated += 1
    setattr(model, _CONTEXT_ATTR, context)
    model.switchcit_accelerated_layers = accelerated
    if skipped:
        warnings.warn(f"switchcit: {len(skipped)} LoRA layer(s) stay on PEFT's path: {', '.join(skipped)}", stacklevel=2)
    logger.info("switchcit: %d LoRA layers accelerated, %d left to PEFT", accelerated, len(skipped))
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every layer gets PEFT's own forward back."""
    for module in model.modules():
        if module.__dict__.pop(_BANK_ATTR, None) is not None:
            del module.forward
    for attr in (_CONTEXT_ATTR, "switchcit_accelerated_layers"):
        model.__dict__.pop(attr, None)
    return model


def _unservable(module: nn.Module) -> str | None:
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear):
        return f"{type(module).__name__} layer"
    if any(module.use_dora.values()):
        return "DoRA"
    if any(getattr(module, "lora_bias", {}).values()):
        return "LoRA bias"
    if module.lora_variant:
        return "LoRA variant " + ", ".join(sorted(module.lora_variant))
    if module.merged:
        return "merged weights"
    return None


def _accelerated_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` with the adapter loop replaced by one call of the op."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    bank: _PeftBank = self.__dict__[_BANK_ATTR]
    adapter_names = kwargs.get("adapter_names")
    if not bank.serves(adapter_names) or any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's path, unchanged
    kwargs.pop("adapter_names", None)
    for key in VARIANT_KWARG_KEYS:
        kwargs.pop(key, None)
    if adapter_names is not None and len(adapter_names) != len(x):
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )

    result = self.base_layer(x, *args, **kwargs)
    context = bank.context
    context.route_names(adapter_names if adapter_names is not None else self.active_adapters, x.device)
    lora_a, lora_b, ranks, scaling = bank.stacked(x.dtype)  # may add adapter names: plan after it
    plan = context.plan_for(x)
    if plan is None or lora_a.shape[1] == 0:
        return result
    if result.dtype == x.dtype:
        return lora_delta(x, lora_a, lora_b, plan, scaling, out=result, ranks=ranks)
    return result + lora_delta(x, lora_a, lora_b, plan, scaling, ranks=ranks).to(result.dtype)


class _PeftBank:
    """A PEFT layer's adapters stacked as the op wants them, rebuilt when they change."""

    def __init__(self, module: nn.Module, context: RoutingContext):
        self.module, self.context = module, context
        self._key, self._stacked = None, None
        for name in module.lora_A:
            context.add(name)

    def serves(self, adapter_names) -> bool:
        module = self.module
        if module.disable_adapters or module.merged or module.lora_variant or _unservable(module):
            return False
        if module.training and any(d.p > 0 for d in module.lora_dropout.values() if isinstance(d, nn.Dropout)):
            return False  # per-adapter dropout on x is PEFT's job
        if adapter_names is None and len(module.active_adapters) != 1:
            return False  # several active adapters are summed, not routed
        return True

    def stacked(self, dtype: torch.dtype):
        """``(lora_a [N, R, H], lora_b [N, O, R], ranks [N], scaling [N])`` over the context's adapters.

        Cached while no adapter is added, changed in place (optimizer steps bump ``_version``) or
        rescaled; rebuilt on every call when gradients must flow back to PEFT's parameters.
        """
        module = self.module
        weights = [(module.lora_A[n].weight, module.lora_B[n].weight) for n in module.lora_A]
        needs_graph = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in weights)
        key = (dtype, module.base_layer.weight.device, len(self.context.names), tuple(module.lora_A), tuple(module.scaling.values()),
               tuple((a._version, b._version) for a, b in weights))
        if needs_graph or key != self._key:
            for name in module.lora_A:
                self.context.add(name)  # adapters added to the PeftModel after accelerate
            names = self.context.names
            pairs = [(module.lora_A[n].weight, module.lora_B[n].weight) if n in module.lora_A else None for n in names]
            self._stacked = self._stack(pairs, dtype)
            self._key = None if needs_graph else key
        return self._stacked

    def _stack(self, pairs, dtype):
        module = self.module
        in_features, out_features = linear_features(module.base_layer)
        present = [p for p in pairs if p is not None]
        max_rank = max((a.shape[0] for a, _ in present), default=0)
        device = module.base_layer.weight.device
        zeros_a = torch.zeros(max_rank, in_features, device=device, dtype=dtype)
        zeros_b = torch.zeros(out_features, max_rank, device=device, dtype=dtype)
        lora_a, lora_b, ranks, scaling = [], [], [], []
        for name, pair in zip(self.context.names, pairs):
            if pair is None:
                lora_a.append(zeros_a), lora_b.append(zeros_b), ranks.append(0), scaling.append(0.0)
                continue
            a, b = pair
            pad = max_rank - a.shape[0]
            lora_a.append(nn.functional.pad(a.to(dtype), (0, 0, 0, pad)))
            lora_b.append(nn.functional.pad(b.to(dtype), (0, pad)))
            ranks.append(a.shape[0])
            scaling.append(float(module.scaling[name]))
        num = len(pairs)
        return (
            torch.stack(lora_a) if num else zeros_a.new_zeros(0, max_rank, in_features),
            torch.stack(lora_b) if num else zeros_b.new_zeros(0, out_features, max_rank),
            torch.tensor(ranks, dtype=torch.int32, device=device),
            torch.tensor(scaling, dtype=torch.float32, device=device),
        )


# --------------------------------------------------------------------------------------------------
# Adapter banks from and to PEFT folders


def load_adapters(model: nn.Module, adapters: Mapping[str, str | Path]) -> nn.Module:
    """Load PEFT LoRA adapter folders ``{"task": path, ...}`` into an adapter bank on ``model``.

    Each targeted linear layer becomes a :class:`MultiLoraLinear` (once) sharing the model's
    :class:`RoutingContext` (``switchcit.routing_context(model)``); route with
    ``context.route(["task", "__base__", ...])`` — one adapter per sequence — before a forward or
    ``generate``. Returns ``model``.
    """
    from safetensors.torch import load_file

    context = getattr(model, _CONTEXT_ATTR, None) or RoutingContext()
    loaded = []
    for name, folder in adapters.items():  # check every folder before changing the model
        folder = Path(folder)
        config = _read_lora_config(folder)
        weights = _group_lora_weights(load_file(str(folder / PEFT_WEIGHTS)), folder)
        missing = [path for path in weights if not _has_module(model, path)]
        if missing:
            raise ValueError(f"adapter {name!r} ({folder}) targets modules this model lacks: {missing[:3]}")
        loaded.append((name, config, weights))
    for name, config, weights in loaded:
        for path, (lora_a, lora_b) in weights.items():
            layer = _bank_layer(model, path, context)
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
            layer.add_adapter(name, lora_a.to(layer.lora_a.dtype), lora_b.to(layer.lora_b.dtype),
                              alpha=alpha, use_rslora=bool(config.get("use_rslora")))
    setattr(model, _CONTEXT_ATTR, context)
    return model


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


def route(model: nn.Module, adapters) -> None:
    """Shorthand for ``routing_context(model).route(adapters)``: one adapter (name, id, ``None`` or
    ``"__base__"``) per sequence of the next forwards."""
    routing_context(model).route(adapters, device=next(model.parameters()).device)

