"""What every benchmark report records about its run (device, date, versions, commit), the machine's
limits measured beside the timings, and the helpers the benchmark scripts share."""
from __future__ import annotations

import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def run_metadata(device: torch.device) -> dict:
    """Device name, UTC date, torch/triton/python versions and the git commit of this run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def median_ms(fn: Callable[[], object], repeats: int, on_cuda: bool = False) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` on CUDA (it warms up itself), else
    ``time.perf_counter`` over ``repeats`` calls after one warm-up call."""
    if on_cuda:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def warm_up(fn: Callable[[], object], calls: int = 3) -> None:
    """Run ``fn`` off the default stream before a CUDA-graph capture: Triton compiles, cuBLAS picks
    its kernels, and nothing of that is recorded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one call of a warmed-up ``fn``; returns the graph and its static output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_results(out: Path, name: str, title: str, meta: dict, rows: list[dict], header: list[str],
                  table: list[list[str]], notes: str = "") -> tuple[Path, Path]:
    """``out/name.json`` (metadata + rows) and ``out/name.md`` (metadata, the table, notes)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# {title}", ""] + [f"- {key}: `{value}`" for key, value in meta.items()] + [""]
    lines += markdown_table(header, table) + ["", notes.strip(), ""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


class WrongResult(AssertionError):
    """A method disagrees with its reference: its timings would be meaningless, so the run stops."""


def device_tag(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``h100``; names without a model number are slugified."""
    model = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Za-z]*)\b", device_name)
    return model.group(1).lower() if model else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def peft_mixed_batch_loop(x, lora_a, lora_b, adapter_ids, scaling):
    """The LoRA term as PEFT's ``lora.Linear._mixed_batch_forward`` computes it, line for line: Python
    index lists per adapter, then ``result[indices] += lora_B(lora_A(x[indices])) * scaling`` (each token
    a one-token sequence). ``scaling``: a float or one per adapter."""
    import torch.nn.functional as F

    names = adapter_ids.tolist()  # PEFT receives adapter_names as a Python list
    result = x.new_zeros(x.shape[0], lora_b.shape[1])
    for adapter in set(names):
        if adapter < 0:
            continue
        indices = [index for index, item in enumerate(names) if item == adapter]
        scale = scaling[adapter] if isinstance(scaling, torch.Tensor) else scaling
        result[indices] += F.linear(F.linear(x[indices], lora_a[adapter]), lora_b[adapter]) * scale
    return result


def gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """The machine's limit beside the timings: a big float32 GEMM's rate in this run."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def tiny_llama(folder: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer in ``folder``, for ``--smoke`` runs."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from switchcit.pretrained import smollm2_135m_instruct

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_135m_instruct()).save_pretrained(folder)
    return folder


def memory_gbps(megabytes: int = 256, repeats: int = 5) -> dict[str, float]:
    """The machine's memory limits in this run, over buffers far larger than the caches (medians): a
    copy's read + write GB/s and a sum's read GB/s."""
    src = torch.randn(megabytes << 18)  # float32
    dst = torch.empty_like(src)
    copy = median_ms(lambda: dst.copy_(src), repeats)
    read = median_ms(lambda: src.sum(), repeats)
    return {"copy (read + write) GB/s": 2 * src.nbytes / copy / 1e6, "read (sum) GB/s": src.nbytes / read / 1e6}
