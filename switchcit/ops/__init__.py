"""The ops, each with its plain-PyTorch reference beside it (:mod:`switchcit.ops.naive`):

* :func:`lora_linear` / :func:`lora_delta` — one linear layer plus per-token LoRA from an adapter bank
  (:mod:`switchcit.ops.lora`; Triton kernels in ``switchcit.kernels``, C++ kernels in ``switchcit._C``);
* :func:`build_routing_plan` / :class:`RoutingPlan` — the tokens of a forward sorted by adapter, built
  once and read by every layer (:mod:`switchcit.ops.routing`);
* :func:`switch_route` — the switch's classifier and gate on the device (:mod:`switchcit.ops.switch_route`);
* :func:`linear` — ``F.linear`` with a C++ kernel for decode-sized batches on CPU (:mod:`switchcit.ops.dense`);
* :func:`rms_norm` / :func:`add_rms_norm` / :func:`apply_rotary_` — a decoder layer's other ops, one C++ call
  each on CPU, and the Llama layer forward built from them (:mod:`switchcit.ops.decoder`).

One backend selector serves them all (:func:`select_backend`).
"""
from switchcit.ops.backends import BACKENDS, select_backend
from switchcit.ops.decoder import add_rms_norm, apply_rotary_, rms_norm
from switchcit.ops.dense import linear
from switchcit.ops.lora import lora_delta, lora_linear
from switchcit.ops.naive import SwitchHead
from switchcit.ops.routing import RoutingPlan, build_routing_plan
from switchcit.ops.switch_route import switch_route

__all__ = [
    "BACKENDS", "select_backend", "lora_delta", "lora_linear", "RoutingPlan", "build_routing_plan",
    "SwitchHead", "switch_route", "linear", "rms_norm", "add_rms_norm", "apply_rotary_",
]
