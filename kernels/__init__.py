"""Triton kernels of switchcit, installed as ``switchcit.kernels`` (never a top-level ``kernels``)."""
from .lora import (
    LoraKernelConfig,
    TileSchedule,
    lora_expand,
    lora_shrink,
    lora_weight_grad,
    pick_config,
    shrink_partial_shape,
)
from .switch import fused_switch_route

__all__ = [
    "TileSchedule", "LoraKernelConfig", "pick_config", "shrink_partial_shape",
    "lora_shrink", "lora_expand", "lora_weight_grad", "fused_switch_route",
]
