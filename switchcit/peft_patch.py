"""PEFT integration: :func:`accelerate` / :func:`restore` route every PEFT ``lora.Linear`` of a
``PeftModel`` through the multi-LoRA op — plain forward, ``generate`` and mixed batches — in one pass
per layer instead of PEFT's loop over adapters. Instance-level, idempotent, reversible; patched layers
stay ``LoraLayer`` instances (PEFT hands ``adapter_names`` only to those).

Routing: when the model's :class:`~switchcit.modules.RoutingContext` has adapters assigned (the
pipeline, ``switchcit.set_adapters``), layers read its plan like bank layers do. Otherwise PEFT's own routing
applies — ``adapter_names=[...]`` (``"__base__"``: none) or the active adapter — converted to ids here,
the PEFT edge, once per forward for all layers.
"""
from __future__ import annotations

import logging
import types
import warnings

import torch
from torch import nn

from switchcit.modules import NO_ADAPTER, RoutingContext, attach_context, linear_features
from switchcit.ops import RoutingPlan, build_routing_plan, lora_delta

__all__ = ["PEFT_BASE", "accelerate", "restore"]

logger = logging.getLogger("switchcit")

PEFT_BASE = "__base__"  # PEFT's adapter name for "no adapter"
CONTEXT_ATTR = "switchcit_context"
_BANK_ATTR = "_switchcit_bank"
_ROUTING_ATTR = "_switchcit_peft_routing"
_ADAPTER_METHODS = ("add_adapter", "load_adapter")


def accelerate(model: nn.Module) -> nn.Module:
    """Serve every PEFT LoRA ``Linear`` layer of ``model`` with the multi-LoRA op; returns ``model``.

    Layers the op cannot serve (DoRA, LoRA bias, merged weights, other variants, non-linear layers)
    stay on PEFT's path, named in one warning. Calling it again patches only what is new; the number
    of accelerated layers is logged and kept in ``model.switchcit_accelerated_layers``.
    """
    from peft.tuners.lora import LoraLayer

    context = getattr(model, CONTEXT_ATTR, None) or RoutingContext()
    peft_routing = model.__dict__.get(_ROUTING_ATTR) or _PeftRouting(context)
    _follow_adapters(model, context)
    accelerated, skipped = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        reason = _unservable(module)
        if reason:
            skipped.append(f"{name} ({reason})")
            continue
        if _BANK_ATTR not in module.__dict__:
            # not a submodule: no state_dict entry
            module.__dict__[_BANK_ATTR] = _PeftBank(module, context, peft_routing)
            module.forward = types.MethodType(_accelerated_forward, module)
        accelerated += 1
    setattr(model, CONTEXT_ATTR, attach_context(model, context))
    model.__dict__[_ROUTING_ATTR] = peft_routing
    model.switchcit_accelerated_layers = accelerated
    if skipped:
        warnings.warn(f"switchcit: {len(skipped)} LoRA layer(s) stay on PEFT's path: {', '.join(skipped)}",
                      stacklevel=2)
    logger.info("switchcit: %d LoRA layers accelerated, %d left to PEFT", accelerated, len(skipped))
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every layer gets PEFT's own forward back."""
    for module in model.modules():
        if module.__dict__.pop(_BANK_ATTR, None) is not None:
            del module.forward
    for attr in (CONTEXT_ATTR, _ROUTING_ATTR, "switchcit_accelerated_layers", *_ADAPTER_METHODS):
        model.__dict__.pop(attr, None)
    return model


def _follow_adapters(model: nn.Module, context: RoutingContext) -> None:
    """The context knows every adapter of the PeftModel by name, also those added or loaded later (the
    pipeline converts names to ids before any layer runs)."""
    def sync() -> None:
        for name in model.peft_config:
            context.add(name)

    for method in _ADAPTER_METHODS:
        if method in model.__dict__:
            continue
        original = getattr(model, method)

        def changed(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            sync()
            return result

        model.__dict__[method] = changed
    sync()


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
    lora_a, lora_b, ranks, scaling = bank.stacked(x.dtype)  # may add adapter names: plan after it
    if adapter_names is None and bank.context.sequence_ids is not None:
        plan = bank.context.plan  # assigned by the context's owner
    else:
        plan = bank.peft_routing.plan(adapter_names if adapter_names is not None else self.active_adapters, x)
    if plan is None or lora_a.shape[1] == 0:
        return result
    if result.dtype == x.dtype:
        return lora_delta(x, lora_a, lora_b, plan, scaling, out=result, ranks=ranks)
    return result + lora_delta(x, lora_a, lora_b, plan, scaling, ranks=ranks).to(result.dtype)


class _PeftBank:
    """A PEFT layer's adapters stacked as the op wants them, rebuilt when they change."""

    def __init__(self, module: nn.Module, context: RoutingContext, peft_routing: _PeftRouting):
        self.module, self.context, self.peft_routing = module, context, peft_routing
        self._key, self._stacked = None, None
        for name in module.lora_A:
            context.add(name)

    def serves(self, adapter_names) -> bool:
        module = self.module
        if module.disable_adapters or module.merged or module.lora_variant or _unservable(module):
            return False
        if module.training and any(d.p > 0 for d in module.lora_dropout.values() if isinstance(d, nn.Dropout)):
            return False  # per-adapter dropout on x is PEFT's job
        if adapter_names is None and self.context.sequence_ids is None and len(module.active_adapters) != 1:
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
        key = (dtype, module.base_layer.weight.device, len(self.context.names), tuple(module.lora_A),
               tuple(module.scaling.values()), tuple((a._version, b._version) for a, b in weights))
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




class _PeftRouting:
    """PEFT's routing (``adapter_names``, one per sequence, or the active adapters) → the forward's
    plan: built by the first layer that needs it, reused by every other layer of the forward."""

    def __init__(self, context: RoutingContext):
        self.context = context
        self._key, self._plan = None, None

    def plan(self, adapter_names, x: torch.Tensor) -> RoutingPlan:
        key = (tuple(adapter_names), tuple(x.shape[:-1]), x.device, self.context.num_adapters)
        if key != self._key:
            ids = torch.tensor([NO_ADAPTER if n == PEFT_BASE else self.context.add(n) for n in adapter_names],
                               dtype=torch.int64, device=x.device)
            per_sequence = x.shape[:-1].numel() // ids.numel()  # one name per sequence, or one for all
            self._plan = build_routing_plan(ids.repeat_interleave(per_sequence), self.context.num_adapters)
            self._key = key
        return self._plan
