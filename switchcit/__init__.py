"""switchcit: continual instruction tuning with per-task LoRA adapters routed by a task switch.

The data path, one module each: prompt (:mod:`~switchcit.prompts`) → switch (:mod:`~switchcit.switch`)
→ routing plan (:mod:`~switchcit.modules`, built once per forward by the model's routing context) →
adapter-bank layers (:mod:`~switchcit.modules`, :mod:`~switchcit.ops`) → output; :mod:`~switchcit.pipeline`
owns the whole path.

* ops: ``lora_linear`` / ``lora_delta`` (one multi-LoRA layer, per-token adapters), ``build_routing_plan``,
  ``switch_route`` — each beside its plain-PyTorch reference (``switchcit.ops.naive``)
* modules: ``MultiLoraLinear`` (adapter bank on a base linear), ``RoutingContext`` (one per model)
* Hugging Face / PEFT: ``accelerate`` / ``restore`` a PeftModel, ``load_adapters`` / ``save_adapter``
  PEFT folders into an adapter bank, ``route`` sequences to adapters
* ``Switch`` (task classifier) and ``SwitchModel`` (the pipeline); ``switchcit.cit`` (training) and
  ``switchcit.serving`` (the OpenAI-compatible server and the vLLM gateway)
"""
from switchcit import ops
from switchcit.adapters import load_adapters, routing_context, save_adapter, set_adapters
from switchcit.modules import NO_ADAPTER, MultiLoraLinear, RoutingContext
from switchcit.ops import RoutingPlan, build_routing_plan, lora_delta, lora_linear, switch_route
from switchcit.peft_patch import accelerate, restore
from switchcit.pipeline import SwitchModel
from switchcit.switch import Switch

__version__ = "0.1.0"
__all__ = [
    "ops", "lora_delta", "lora_linear", "RoutingPlan", "build_routing_plan", "switch_route",
    "NO_ADAPTER", "MultiLoraLinear", "RoutingContext",
    "accelerate", "restore", "set_adapters", "routing_context", "load_adapters", "save_adapter",
    "Switch", "SwitchModel",
    "__version__",
]
