"""switchcit: continual instruction tuning with per-task LoRA adapters routed by a task switch.

The data path: prompt → switch → routing plan (built once per forward) → adapter-bank layers → output.
This package holds the core op and its routing plan; kernels live in ``switchcit.kernels``.
"""
from switchcit import ops
from switchcit.ops import lora_delta, lora_linear
from switchcit.routing import RoutingPlan, build_routing_plan

__version__ = "0.1.0"
__all__ = ["ops", "lora_delta", "lora_linear", "RoutingPlan", "build_routing_plan", "__version__"]
