#!/usr/bin/env python
"""Model benchmark: mixed-task batches through a Llama model with 8 LoRA adapters, PEFT against switchcit.

The model is a randomly initialised Llama (``LlamaConfig`` + ``LlamaForCausalLM``, nothing downloaded)
with 8 PEFT LoRA adapters ``task0`` … ``task7`` (r16, alpha 32, on q/k/v/o/gate/up/down;
``init_lora_weights=False`` so B is nonzero and every adapter changes the output), in eval mode under
``torch.inference_mode()``. Every method of a batch runs in the same process on the same inputs:

* ``base``               adapters disabled (``with model.disable_adapter():``): the floor.
* ``peft_1``             PEFT, one active adapter (``task0``) for every sequence, plain forward.
* ``peft_mixed_2``/``_8``  PEFT's mixed batch ``model(..., adapter_names=[...])`` with 2 resp. 8 tasks
                         assigned round-robin over the sequences; PEFT loops over the tasks in every layer.
* ``switchcit_mixed_2``/``_8``  the same calls after ``switchcit.accelerate(model)``: one multi-LoRA op
                         per layer. The PEFT rows are timed before ``accelerate``; ``restore`` follows.

Batches (every forward computes the logits of the last position only, ``logits_to_keep=1``):

* ``decode B×1``  one decode step: one new token per sequence on top of a ``DynamicCache`` that a
  base-model prefill of random tokens filled once (128 tokens on GPU and ``--cpu``). Each call appends
  its token and crops the cache back (``cache.crop(-1)``), so every call decodes the same step and pays
  the cache append that ``generate`` pays.
* ``prefill B×S``  one forward of S tokens per sequence, without a cache.

Modes: ``eager``; on CUDA also ``graph``: the forward captured once in a CUDA graph (after warm-up on a
side stream) and its replays timed, for ``base``, ``peft_1`` and the switchcit rows. PEFT's mixed path
indexes with Python lists in every layer (a blocking host-to-device copy), so its rows have no graph
(``null``); a capture that fails is recorded as an error string. Times are medians per forward:
``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` over ``--repeats`` calls on CPU;
ratio = time / ``base`` time in the same mode.

Correctness before timing: each switchcit row's logits (every mode) must match PEFT's eager logits for
the same ``adapter_names``, and each graph replay the eager logits of its own method, within
``0.15 · max|logit|`` in bf16 (see ``TOLERANCE``) or ``1e-4 · max|logit|`` in fp32; else the run aborts.
It also aborts if that bound is not below the gap between PEFT's mixed-8 and mixed-2 logits (what
misrouted sequences look like): the check could not see a routing error.

    python benchmarks/bench_model.py          # CUDA: the 1.1B shape (TinyLlama), bf16, eager + graph
    python benchmarks/bench_model.py --cpu    # a scaled-down float32 Llama on CPU, eager only
    python benchmarks/bench_model.py --smoke  # the tiniest model and batches on CPU (CI)

Writes ``<out>/model-<tag>.json`` and ``.md`` (tag e.g. ``h100``, ``cpu`` or ``cpu-smoke``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import switchcit
from common import REPO, WrongResult, capture, device_tag, median_ms, run_metadata, warm_up
from switchcit.ops import select_backend

PEFT_ROWS = ("base", "peft_1", "peft_mixed_2", "peft_mixed_8")
SWITCHCIT_ROWS = ("switchcit_mixed_2", "switchcit_mixed_8")
METHODS = PEFT_ROWS + SWITCHCIT_ROWS
GRAPHED = ("base", "peft_1", "switchcit_mixed_2", "switchcit_mixed_8")
# Whose eager logits each row must reproduce; a method not listed is checked (in graph mode) against itself.
REFERENCE = {"switchcit_mixed_2": "peft_mixed_2", "switchcit_mixed_8": "peft_mixed_8"}
ADAPTERS = tuple(f"task{i}" for i in range(8))
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
# Max abs logit difference / max |logit|. In bf16, rounding alone moves the logits of this random
# 22-layer model by a few % of max |logit| (switchcit vs PEFT, measured on CPU for the GPU shape: 3.3% at
# decode B=64 and B=256, 5.6% at 8×512), while sending a sequence to the wrong adapter moves them by >100%.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.5e-1}



@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


@dataclass(frozen=True)
class Sweep:
    shape: ModelShape
    dtype: torch.dtype
    decode_sizes: tuple[int, ...]  # B of the decode-step batches
    cached_tokens: int  # prefilled KV cache length of the decode batches
    prefill: tuple[int, int]  # (B, S) of the prefill batch
    modes: tuple[str, ...]
    repeats: int  # timed calls per row on CPU


GPU_SWEEP = Sweep(ModelShape(22, 2048, 5632, 32, 4, 32000), torch.bfloat16, (64, 256), 128, (16, 512),
                  ("eager", "graph"), repeats=0)
CPU_SWEEP = Sweep(ModelShape(4, 512, 1408, 8, 2, 32000), torch.float32, (64, 256), 128, (16, 128),
                  ("eager",), repeats=7)
SMOKE_SWEEP = Sweep(ModelShape(2, 64, 128, 4, 2, 256), torch.float32, (8, 16), 8, (8, 16),
                    ("eager",), repeats=2)


@dataclass
class Batch:
    name: str
    input_ids: torch.Tensor  # [B, S]: static, so a captured graph replays on the same tensor
    cache: DynamicCache | None = None  # decode: the prefilled KV cache
    cached_tokens: int = 0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def kv_tensors(self) -> list:
        """The K/V tensors the next call reads (it then points the cache at its own, new ones)."""
        return [] if self.cache is None else list(self.cache)

    def crop_cache(self) -> None:
        """Crop every cache layer back to the prefilled tokens (a failed graph capture can stop mid-forward)."""
        for layer in self.cache.layers if self.cache is not None else ():
            extra = layer.get_seq_length() - self.cached_tokens
            if extra > 0:
                layer.crop(-extra)


# --------------------------------------------------------------------------------------------------
# Model, batches, methods


def build_model(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Random Llama + 8 LoRA adapters, all in ``dtype`` (PEFT would keep bf16 adapters in fp32)."""
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config)

    def lora_config() -> LoraConfig:
        return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), init_lora_weights=False)

    model = get_peft_model(base, lora_config(), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, lora_config())
    return model.to(dtype).eval()


def make_batches(model: torch.nn.Module, sweep: Sweep, device: torch.device) -> Iterator[Batch]:
    """The decode batches, then the prefill batch; one at a time, so one KV cache is alive at once."""
    gen = torch.Generator().manual_seed(0)

    def tokens(size: int, length: int) -> torch.Tensor:
        return torch.randint(sweep.shape.vocab, (size, length), generator=gen).to(device)

    for size in sweep.decode_sizes:
        with model.disable_adapter():  # the cached values do not change the cost of a step
            prompt = tokens(size, sweep.cached_tokens)
            cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values
        yield Batch(f"decode B={size} (cache {sweep.cached_tokens})", tokens(size, 1), cache, sweep.cached_tokens)
    size, length = sweep.prefill
    yield Batch(f"prefill B={size}×{length}", tokens(size, length))


@contextlib.contextmanager
def method_forward(model: torch.nn.Module, batch: Batch, method: str) -> Iterator[Callable[[], torch.Tensor]]:
    """One forward of ``batch`` as ``method`` runs it, returning the last-position logits ``[B, 1, V]``."""
    kwargs = {}
    if "mixed" in method:
        tasks = int(method.rsplit("_", 1)[1])
        kwargs["adapter_names"] = [ADAPTERS[i % tasks] for i in range(batch.size)]

    def forward() -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, past_key_values=batch.cache, use_cache=batch.cache is not None,
                       logits_to_keep=1, **kwargs).logits
        if batch.cache is not None:
            batch.cache.crop(-1)  # drop this step's token: every call decodes the same step
        return logits

    # Adapters are switched off around all of base's calls, not in each: PEFT walks every module to do it.
    with model.disable_adapter() if method == "base" else contextlib.nullcontext():
        yield forward


# --------------------------------------------------------------------------------------------------
# Graphs, timing, checks


class CapturedForward:
    """``fn`` captured once in a CUDA graph on its static inputs; ``replay()`` reruns it into ``out``."""

    def __init__(self, fn: Callable[[], torch.Tensor], batch: Batch):
        warm_up(fn)
        # The captured decode step reads the K/V tensors the cache holds now and leaves the cache pointing
        # at its own output: keep them alive, or every replay would read freed memory.
        self._kv_read = batch.kv_tensors()
        self.graph, self.out = capture(fn)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def checked_diff(label: str, logits: torch.Tensor, reference: torch.Tensor, bound: float) -> float:
    diff = max_abs_diff(logits, reference)
    if not diff <= bound:  # also catches NaN
        raise WrongResult(f"{label}: max abs logit difference {diff:.4g} exceeds {bound:.4g}")
    return diff


def error_string(err: Exception) -> str:
    return f"{type(err).__name__}: {next(iter(str(err).splitlines()), '')[:300]}"


# --------------------------------------------------------------------------------------------------
# One batch


class BatchRun:
    """Checks and times every method on one batch, in every mode; the PEFT rows run before ``accelerate``."""

    def __init__(self, model: torch.nn.Module, batch: Batch, sweep: Sweep, on_cuda: bool):
        self.model, self.batch, self.sweep, self.on_cuda = model, batch, sweep, on_cuda
        self.eager_logits: dict[str, torch.Tensor] = {}
        self.check: dict = {}

    def run(self) -> dict:
        methods = {method: self.measure_method(method) for method in PEFT_ROWS}
        self.check_sensitivity()
        switchcit.accelerate(self.model)
        try:
            methods |= {method: self.measure_method(method) for method in SWITCHCIT_ROWS}
        finally:
            switchcit.restore(self.model)
        for mode in self.sweep.modes:
            base = methods["base"][mode]
            if "ms" not in base:
                continue  # base's capture failed: no floor in this mode
            for result in methods.values():
                if result[mode] is not None and "ms" in result[mode]:
                    result[mode]["ratio"] = result[mode]["ms"] / base["ms"]
        batch = self.batch
        return {
            "batch": batch.name, "kind": "decode" if batch.cache is not None else "prefill",
            "batch_size": batch.size, "new_tokens": batch.input_ids.shape[1],
            "cached_tokens": batch.cached_tokens,
            "check": self.check, "methods": methods,
        }

    def check_sensitivity(self) -> None:
        """The bound must be finer than what misrouting sequences does to the logits, or the check is blind."""
        effect = max_abs_diff(self.eager_logits["peft_mixed_8"], self.eager_logits["peft_mixed_2"])
        bound = self.bound("peft_mixed_8")
        if not effect > bound:
            raise WrongResult(f"{self.batch.name}: misrouting moves the logits by {effect:.3g}, within the "
                              f"bound {bound:.3g}: the check could not see it")
        self.check["misrouting_effect"] = effect

    def bound(self, reference: str) -> float:
        return TOLERANCE[self.sweep.dtype] * self.eager_logits[reference].float().abs().max().item()

    def measure_method(self, method: str) -> dict:
        with method_forward(self.model, self.batch, method) as fn:
            results = {mode: self.measure(method, mode, fn) for mode in self.sweep.modes}
        print(f"  {method:<18} " + "  ".join(f"{mode} {cell(r)}" for mode, r in results.items()), flush=True)
        return results

    def measure(self, method: str, mode: str, fn: Callable[[], torch.Tensor]) -> dict | None:
        """Run ``method`` once in ``mode``, check its logits if it has a reference, then time it."""
        if mode == "graph" and method not in GRAPHED:
            return None
        if mode == "graph":
            try:
                run = CapturedForward(fn, self.batch).replay
            except Exception as err:  # a capture limit of this torch/transformers build, not a wrong result
                self.batch.crop_cache()
                return {"error": error_string(err)}
        else:
            run = fn
        logits = run()  # also the first warm-up of the CPU timer
        reference = REFERENCE.get(method, method if mode == "graph" else None)
        if reference is None:
            self.eager_logits[method] = logits
        else:
            entry = self.check.setdefault(method, {"reference": f"{reference} eager", "bound": self.bound(reference)})
            label = f"{self.batch.name} {method} {mode}"
            entry[mode] = checked_diff(label, logits, self.eager_logits[reference], entry["bound"])
        return {"ms": median_ms(run, self.sweep.repeats, self.on_cuda)}


# --------------------------------------------------------------------------------------------------
# Reports


def cell(result: dict | None) -> str:
    if result is None:
        return "—"
    if "error" in result:
        return "error"
    ratio = f" ({result['ratio']:.2f}×)" if "ratio" in result else ""
    return f"{result['ms']:.3f} ms{ratio}"


def headline(rows: list[dict], modes: tuple[str, ...]) -> list[dict]:
    """Per batch: switchcit mixed 8 / base in every mode, and / PEFT mixed 8 in eager mode."""
    lines = []
    for row in rows:
        ours = row["methods"]["switchcit_mixed_8"]
        lines.append({
            "batch": row["batch"],
            "over_base": {mode: (ours[mode] or {}).get("ratio") for mode in modes},
            "over_peft_mixed_8_eager": ours["eager"]["ms"] / row["methods"]["peft_mixed_8"]["eager"]["ms"],
        })
    return lines



def environment(device: torch.device, args: argparse.Namespace, sweep: Sweep) -> dict:
    meta = run_metadata(device)
    tag = "cpu-smoke" if args.smoke else "cpu" if args.cpu else device_tag(meta["device"])
    return meta | {
        "device_tag": tag,
        "dtype": str(sweep.dtype).removeprefix("torch."),
        "switchcit_backend": select_backend(None, torch.empty(0, dtype=sweep.dtype, device=device)),
        "modes": list(sweep.modes),
        "timer": "triton.testing.do_bench median" if device.type == "cuda"
        else f"time.perf_counter median of {sweep.repeats}",
    }


def model_summary(model: torch.nn.Module, sweep: Sweep) -> dict:
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    return asdict(sweep.shape) | {
        "params": sum(p.numel() for p in model.parameters()) - lora,
        "adapters": len(ADAPTERS), "rank": RANK, "alpha": ALPHA, "target_modules": list(TARGET_MODULES),
        "lora_params_per_adapter": lora // len(ADAPTERS),
    }


def write_markdown(path: Path, env: dict, model: dict, rows: list[dict], lines: list[dict]) -> None:
    modes = env["modes"]
    text = [
        f"# Model benchmark: {env['device']}",
        "",
        f"- date (UTC) {env['date_utc']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}; "
        f"git {env['git_commit'] or 'n/a'}",
        f"- random Llama: {model['layers']} layers, hidden {model['hidden']}, intermediate {model['intermediate']}, "
        f"{model['heads']}/{model['kv_heads']} heads, vocab {model['vocab']}, {model['params'] / 1e6:.1f}M params, "
        f"{env['dtype']}",
        f"- {model['adapters']} LoRA adapters r{model['rank']} (alpha {model['alpha']}) on "
        f"{', '.join(model['target_modules'])}: {model['lora_params_per_adapter'] / 1e6:.2f}M params each; "
        f"switchcit backend {env['switchcit_backend']}",
        f"- ms per forward, {env['timer']}; (×) = time / base in the same mode; — = not run. "
        "Methods and batches: see the docstring of benchmarks/bench_model.py.",
        "",
        "## Headline: switchcit mixed 8 / base",
        "",
        "| batch | " + " | ".join(modes) + " | switchcit mixed 8 / PEFT mixed 8 (eager) |",
        "|---|" + "---:|" * (len(modes) + 1),
    ]
    for line in lines:
        ratios = [f"{r:.2f}×" if r is not None else "—" for r in line["over_base"].values()]
        text.append(f"| {line['batch']} | " + " | ".join(ratios) + f" | {line['over_peft_mixed_8_eager']:.2f}× |")
    for mode in modes:
        text += ["", f"## {mode}", "", "| batch | method | ms | × base |", "|---|---|---:|---:|"]
        for row in rows:
            for method in METHODS:
                result = row["methods"][method][mode]
                if result is None:
                    cells = ["—", "—"]
                elif "error" in result:
                    cells = [f"error: {result['error']}", "—"]
                else:
                    cells = [f"{result['ms']:.3f}", f"{result['ratio']:.2f}×" if "ratio" in result else "—"]
                text.append(f"| {row['batch']} | {method} | " + " | ".join(cells) + " |")
    text += ["", "## Correctness: max abs logit difference vs the reference", "",
             "| batch | method | reference | bound | " + " | ".join(modes) + " |",
             "|---|---|---|---:|" + "---:|" * len(modes)]
    for row in rows:
        for method in GRAPHED:
            entry = row["check"].get(method)
            if entry:
                diffs = ["—" if entry.get(mode) is None else f"{entry[mode]:.3g}" for mode in modes]
                text.append(f"| {row['batch']} | {method} | {entry['reference']} | {entry['bound']:.3g} | "
                            + " | ".join(diffs) + " |")
    text += [""] + [f"- {row['batch']}: misrouting (PEFT mixed 8 vs mixed 2) moves the logits by "
                    f"{row['check']['misrouting_effect']:.3g}" for row in rows]
    path.write_text("\n".join(text) + "\n")


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--cpu", action="store_true", help="scaled-down float32 Llama on CPU, eager only")
    size.add_argument("--smoke", action="store_true", help="tiniest model and batches on CPU (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--repeats", type=int, help="timed calls per row on CPU (CUDA: do_bench decides)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not (args.cpu or args.smoke or torch.cuda.is_available()):
        parser.error("no CUDA device: the full benchmark needs a GPU (use --cpu or --smoke)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep = SMOKE_SWEEP if args.smoke else CPU_SWEEP if args.cpu else GPU_SWEEP
    if args.repeats:
        sweep = replace(sweep, repeats=args.repeats)
    device = torch.device("cpu" if args.cpu or args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # ops this small gain nothing from threads, and CI machines are shared
    env = environment(device, args, sweep)
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}, switchcit backend "
          f"{env['switchcit_backend']}", flush=True)

    model = build_model(sweep.shape, sweep.dtype, device)
    rows = []
    with torch.inference_mode():
        for batch in make_batches(model, sweep, device):
            print(batch.name, flush=True)
            rows.append(BatchRun(model, batch, sweep, device.type == "cuda").run())
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next batch's graphs start from free memory

    summary = model_summary(model, sweep)
    lines = headline(rows, sweep.modes)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"model-{env['device_tag']}"
    report = {"environment": env, "model": summary, "batches": rows, "headline": lines}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_markdown(stem.with_suffix(".md"), env, summary, rows, lines)
    for line in lines:
        over_base = ", ".join(f"{mode} {r:.2f}×" for mode, r in line["over_base"].items() if r is not None)
        print(f"switchcit mixed 8 / base, {line['batch']}: {over_base}; "
              f"/ PEFT mixed 8 (eager) {line['over_peft_mixed_8_eager']:.2f}×")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
