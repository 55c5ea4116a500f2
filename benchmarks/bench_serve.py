#!/usr/bin/env python
"""Serving benchmark: ``switchcit serve`` on mixed-adapter traffic, mixed batches against one adapter
per batch, over HTTP on loopback.

The run: ``--run RUN_DIR``, or one built on the fly (``switchcit.testing.build_run``): the base
model SmolLM2-135M-Instruct (float32) with one random LoRA adapter per task (r16, alpha 32, on
q_proj, v_proj, down_proj; B nonzero) for the tasks haiku, simplify, factcheck, and a switch trained on
a few prompts per task with the base as encoder. ``--smoke`` builds a tiny random Llama instead.

The server is the app of ``switchcit serve`` (``create_app`` + ``make_server``) in this process on
127.0.0.1, with ``--max-batch-size`` and ``--batch-window-ms``. Traffic is open-loop: ``--requests``
chat requests arrive as a Poisson process of ``--rate`` requests/s (seeded: the same arrival times in
every scenario), each sent at its arrival time, ``max_tokens`` = ``--max-tokens``. The prompts are the
tasks' prompts in a fixed shuffled order; each request's model is drawn uniformly from the adapters
and ``base``. Scenarios, same requests and arrivals:

* ``mixed``: the server's batcher takes the oldest queued requests, whatever their adapters: one
  ``generate`` call per mixed batch.
* ``one adapter per batch``: the same server, except that a batch holds only requests for the oldest
  queued request's adapter, as a server that runs one adapter per forward must: the requests are
  grouped and served one adapter at a time, the others wait for a later batch.
* ``auto``: as ``mixed``, with ``model: "auto"``: the switch routes each prompt inside its batch's
  prefill (it reads layer K of the same forward).

Reported per scenario: throughput (requests/s; generated tokens/s from the answers' ``usage``) from
the first arrival to the last answer, latency per request (arrival → answer; p50, p99) and the mean
batch size. Each scenario starts with one warm-up batch. The clients share the process (and its GIL)
with the server; the model's work runs outside the GIL. Writes ``<out>/serve-<tag>.json`` and ``.md``.

    python benchmarks/bench_serve.py            # SmolLM2-135M on CPU (a few minutes on 2 cores)
    python benchmarks/bench_serve.py --smoke    # a tiny random Llama, seconds (CI)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import torch

from common import REPO, run_metadata
from switchcit.pipeline import SwitchModel
from switchcit.serving.app import create_app
from switchcit.serving.batcher import Batcher
from switchcit.testing import TASKS, TOPICS, build_run, serving, task_prompts

SCENARIOS = ("mixed", "one adapter per batch", "auto")
CPU_DEFAULTS = {"requests": 96, "rate": 2.0, "max_tokens": 16, "max_batch_size": 16}
SMOKE_DEFAULTS = {"requests": 24, "rate": 100.0, "max_tokens": 4, "max_batch_size": 8}


class OneAdapterPerBatch(Batcher):
    """The baseline policy: a batch holds only requests for the oldest queued request's model."""

    def _take_batch(self):
        model = self._pending[0].item.model
        batch = [p for p in self._pending if p.item.model == model][: self.max_batch_size]
        for pending in batch:
            self._pending.remove(pending)
        return batch


class BatchSizes:
    """Wraps a batcher's batch function to record the size of every batch."""

    def __init__(self, batcher: Batcher):
        self.run_batch, self.sizes = batcher.run_batch, []
        batcher.run_batch = self

    def __call__(self, requests):
        self.sizes.append(len(requests))
        return self.run_batch(requests)


def make_requests(count: int, max_tokens: int, seed: int = 0) -> list[dict]:
    gen = random.Random(seed)
    prompts = [p for task in TASKS for p in task_prompts(task, TOPICS)]
    gen.shuffle(prompts)
    return [{"model": gen.choice([*TASKS, "base"]), "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]} for i in range(count)]


async def open_loop(url: str, requests: list[dict], arrivals: list[float]) -> tuple[float, list[float], int]:
    """Send each request at its arrival time (seconds from the start); returns ``(seconds from the
    start to the last answer, latency per request in ms, generated tokens)``. Every answer must be 200."""
    latencies, tokens = [], 0
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def send(body: dict, arrival: float) -> None:
            nonlocal tokens
            await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
            response = await client.post("/v1/chat/completions", json=body)
            latencies.append((time.perf_counter() - start - arrival) * 1e3)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")
            tokens += response.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(send(body, arrival) for body, arrival in zip(requests, arrivals)))
        return time.perf_counter() - start, latencies, tokens


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_scenario(model: SwitchModel, scenario: str, requests: list[dict], arrivals: list[float], args) -> dict:
    batcher_class = OneAdapterPerBatch if scenario == "one adapter per batch" else Batcher
    app = create_app(model, max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                     max_new_tokens=args.max_tokens, max_queue=len(requests), batcher_class=batcher_class)
    if scenario == "auto":
        requests = [body | {"model": "auto"} for body in requests]
    with serving(app) as (url, _):
        warm_up = requests[: args.max_batch_size]
        asyncio.run(open_loop(url, warm_up, [0.0] * len(warm_up)))
        sizes = BatchSizes(app.state.batcher)
        wall, latencies, tokens = asyncio.run(open_loop(url, requests, arrivals))
    return {
        "scenario": scenario, "requests": len(requests), "wall_s": wall,
        "requests_per_s": len(requests) / wall, "tokens_per_s": tokens / wall, "generated_tokens": tokens,
        "latency_ms_p50": percentile(latencies, 50), "latency_ms_p99": percentile(latencies, 99),
        "mean_batch_size": statistics.mean(sizes.sizes), "batches": len(sizes.sizes),
    }


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    gen, now, arrivals = random.Random(seed), 0.0, []
    for _ in range(count):
        arrivals.append(now)
        now += gen.expovariate(rate)
    return arrivals


def markdown(report: dict) -> str:
    env, config = report["environment"], report["config"]
    lines = [
        f"# Serving benchmark: {env['device']}",
        "",
        f"- date (UTC) {env['date_utc']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"fastapi {env['fastapi']}, uvicorn {env['uvicorn']}, python {env['python']}; git {env['git_commit']}",
        f"- model: {config['model']}; adapters {', '.join(config['adapters'])} (+ base)",
        f"- {config['requests']} chat requests, Poisson arrivals at {config['rate']} requests/s, max_tokens "
        f"{config['max_tokens']}, over HTTP on 127.0.0.1; server max batch {config['max_batch_size']}, window "
        f"{config['batch_window_ms']} ms; greedy, KV cache",
        f"- command: `{config['command']}`",
        "",
        "| scenario | requests/s | tokens/s | p50 latency (ms) | p99 latency (ms) | mean batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["scenarios"]:
        lines.append(f"| {row['scenario']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{row['latency_ms_p50']:.0f} | {row['latency_ms_p99']:.0f} | {row['mean_batch_size']:.1f} |")
    lines += ["", "Scenarios and measures: see the docstring of benchmarks/bench_serve.py."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="serve this run instead of building one")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few requests (CI)")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--rate", type=float, help="requests per second (Poisson arrivals)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.set_defaults(**(SMOKE_DEFAULTS if parser.parse_known_args()[0].smoke else CPU_DEFAULTS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        if args.run is not None:
            run, model_name = args.run, f"the run {args.run}"
        elif args.smoke:
            run, model_name = build_run(Path(scratch)), "random Llama, 2 layers, hidden 64 (SmolLM2 tokenizer)"
        else:
            from switchcit.pretrained import smollm2_135m_instruct

            run = build_run(Path(scratch), base_folder=smollm2_135m_instruct(), rank=16)
            model_name = "SmolLM2-135M-Instruct, float32, random LoRA adapters r16 on q_proj, v_proj, down_proj"
        model = SwitchModel.from_run(run)
        requests = make_requests(args.requests, args.max_tokens)
        arrivals = poisson_arrivals(args.requests, args.rate)
        scenarios = []
        for scenario in SCENARIOS:
            scenarios.append(run_scenario(model, scenario, requests, arrivals, args))
            print(json.dumps(scenarios[-1]), flush=True)

    tag = "cpu-smoke" if args.smoke else "cpu"
    environment = run_metadata(torch.device("cpu")) | {
        name: version(name) for name in ("transformers", "fastapi", "uvicorn", "httpx")}
    config = {
        "model": model_name, "adapters": TASKS, "requests": args.requests, "rate": args.rate,
        "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "batch_window_ms": args.batch_window_ms,
        "command": shlex.join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
    }
    report = {"environment": environment, "config": config, "scenarios": scenarios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"serve-{tag}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
