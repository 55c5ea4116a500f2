"""Triton kernels of switchcit, installed as ``switchcit.kernels`` (never a top-level ``kernels``)."""
from .lora import LoraKernelConfig, pick_config, segmented_lora_delta

__all__ = ["LoraKernelConfig", "pick_config", "segmented_lora_delta"]
