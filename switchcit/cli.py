"""Command line: ``switchcit demo`` here; every other command lives beside its code and registers
itself through ``add_command(subparsers)`` (see ``COMMAND_MODULES``)."""
from __future__ import annotations

import argparse
import importlib
import time

# Modules that add a subcommand; they import their heavy dependencies only when the command runs.
COMMAND_MODULES: tuple[str, ...] = ()


def demo(args: argparse.Namespace) -> None:
    """A mixed-task batch through one multi-LoRA layer, checked against the float64 reference."""
    import torch

    from switchcit import build_routing_plan, lora_linear
    from switchcit.reference import lora_linear_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    tokens, hidden, out_features, tasks, rank = args.tokens, args.hidden, args.hidden, args.tasks, 16

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    x = randn(tokens, hidden, scale=1.0)
    weight = randn(out_features, hidden, scale=hidden**-0.5)
    lora_a = randn(tasks, rank, hidden, scale=hidden**-0.5)
    lora_b = randn(tasks, out_features, rank, scale=rank**-0.5)
    scaling = torch.full((tasks,), 2.0, device=device, dtype=dtype)
    task_of_token = torch.randint(-1, tasks, (tokens,), generator=gen).to(device)  # −1: base model

    plan = build_routing_plan(task_of_token, tasks)  # once per forward, shared by every layer
    print(f"device {device}, {dtype}; {tokens} tokens from {tasks} tasks + base, layer {hidden}->{out_features}, r{rank}")
    print("tokens per task:", plan.adapter_counts().tolist(), "base-only:", int((task_of_token < 0).sum()))

    expected = lora_linear_reference(x.double(), weight.double(), lora_a.double(), lora_b.double(),
                                     task_of_token, scaling.double())
    for backend in _backends(device):
        start = time.perf_counter()
        y = lora_linear(x, weight, lora_a, lora_b, plan, scaling, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        error = (y.double() - expected).abs().max().item()
        print(f"  {backend:6s}: max |error| vs float64 reference {error:.2e}  ({(time.perf_counter() - start) * 1e3:.1f} ms)")


def _backends(device: str) -> list[str]:
    import importlib.util
    import os

    from switchcit.cpp_ops import HAS_CPP_KERNELS

    backends = ["torch"]
    if device == "cpu" and HAS_CPP_KERNELS:
        backends.append("cpp")
    if importlib.util.find_spec("triton") is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        backends.append("triton")
    return backends


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="switchcit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="run a mixed-task batch through the multi-LoRA op")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(commands)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
