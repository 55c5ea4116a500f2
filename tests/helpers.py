"""Random multi-LoRA problems shared by the tests, the backends they run on, and a tiny random Llama."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from switchcit.ops.cpp import HAS_CPP_KERNELS

# Every backend of the LoRA op that can run here, with the dtypes it takes (torch: the float64 spec).
BACKEND_DTYPES = {"torch": (torch.float64,), "triton": (torch.float32, torch.float16, torch.bfloat16)}
if HAS_CPP_KERNELS:
    BACKEND_DTYPES["cpp"] = (torch.float32, torch.bfloat16)
BACKENDS = tuple(BACKEND_DTYPES)


def backend_device(backend: str, device: torch.device) -> torch.device:
    """The C++ kernels take CPU tensors; the other backends run on the test device."""
    return torch.device("cpu") if backend == "cpp" else device


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    adapter_ids: torch.Tensor
    scaling: float | torch.Tensor
    ranks: torch.Tensor | None

    def reference_delta(self) -> torch.Tensor:
        """The float64 spec on the same (already rounded) inputs, ``[T, O]``."""
        from switchcit.ops.naive import lora_delta_reference

        scaling = self.scaling.double() if isinstance(self.scaling, torch.Tensor) else self.scaling
        x = self.x.flatten(0, -2).double()
        return lora_delta_reference(
            x, self.lora_a.double(), self.lora_b.double(), self.adapter_ids.reshape(-1), scaling, self.ranks
        )

    def reference_grads(self, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float64 autograd of the spec: gradients of x, lora_a and lora_b for ``grad_out [T, O]``."""
        from switchcit.ops.naive import lora_delta_reference

        inputs = tuple(t.detach().double().requires_grad_() for t in (self.x, self.lora_a, self.lora_b))
        scaling = self.scaling.double() if isinstance(self.scaling, torch.Tensor) else self.scaling
        delta = lora_delta_reference(*inputs, self.adapter_ids.reshape(-1), scaling, self.ranks)
        return torch.autograd.grad(delta, inputs, grad_out.double())


def make_problem(
    gen: torch.Generator,
    tokens: int,
    hidden: int,
    out_features: int,
    num_adapters: int,
    max_rank: int,
    *,
    ids: str = "random",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    id_dtype: torch.dtype = torch.int64,
    tensor_scaling: bool = True,
    heterogeneous_ranks: bool = True,
) -> Problem:
    """``ids``: random (incl. −1) | all_base | one_adapter | skip_some (adapters 1 and 3 get no tokens)."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    if ids == "all_base":
        adapter_ids = torch.full((tokens,), -1)
    elif ids == "one_adapter":
        adapter_ids = torch.full((tokens,), num_adapters - 1)
    else:
        adapter_ids = torch.randint(-1, num_adapters, (tokens,), generator=gen)
        if ids == "skip_some":
            adapter_ids[(adapter_ids == 1) | (adapter_ids == 3)] = 0
    scaling = (torch.rand(num_adapters, generator=gen) * 2 + 0.1).to(dtype).to(device) if tensor_scaling else 0.75
    ranks = None
    if heterogeneous_ranks:
        ranks = torch.randint(0, max_rank + 1, (num_adapters,), generator=gen)
        ranks[:1] = max_rank  # the full rank is always exercised
        ranks = ranks.to(device)
    return Problem(
        x=randn(tokens, hidden),
        weight=randn(out_features, hidden, scale=max(hidden, 1) ** -0.5),
        bias=randn(out_features),
        lora_a=randn(num_adapters, max_rank, hidden, scale=max(hidden, 1) ** -0.5),
        lora_b=randn(num_adapters, out_features, max_rank, scale=max(max_rank, 1) ** -0.5),
        adapter_ids=adapter_ids.to(id_dtype).to(device),
        scaling=scaling,
        ranks=ranks,
    )


def tiny_llama_batch(generator: torch.Generator):
    """A random 2-layer Llama with grouped-query attention (6 heads over 2), in eval mode, and a batch of 3
    sequences of 9 tokens, two of them left-padded: ``(model, ids, attention_mask)``."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :1] = 0
    return model, ids, mask

