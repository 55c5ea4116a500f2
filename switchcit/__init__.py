"""switchcit: continual instruction tuning with per-task LoRA adapters routed by a task switch.

The data path: prompt → switch → routing plan (built once per forward) → adapter-bank layers → output.

* ops: ``lora_linear`` / ``lora_delta`` (one multi-LoRA layer, per-token adapters), ``build_routing_plan``
* modules: ``MultiLoraLinear`` (adapter bank on a base linear), ``RoutingContext`` (one per model)
* Hugging Face / PEFT: ``accelerate`` / ``restore`` a PeftModel, ``load_adapters`` / ``save_adapter``
  PEFT folders into an adapter bank, ``route`` sequences to adapters
"""
from switchcit import ops
from switchcit.hf import accelerate, load_adapters, restore, route, routing_context, save_adapter
from switchcit.modules import BASE, MultiLoraLinear, RoutingContext
from switchcit.ops import lora_delta, lora_linear
from switchcit.routing import RoutingPlan, build_routing_plan
from switchcit.switch import Switch, SwitchModel

__version__ = "0.1.0"
__all__ = [
    "ops", "lora_delta", "lora_linear", "RoutingPlan", "build_routing_plan",
    "BASE", "MultiLoraLinear", "RoutingContext",
    "accelerate", "restore", "route", "routing_context", "load_adapters", "save_adapter",
    "Switch", "SwitchModel",
    "__version__",
]
