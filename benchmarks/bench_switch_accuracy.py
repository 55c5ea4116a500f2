"""Switch accuracy on the real CIT tasks for each switch layer K and retention level, measured through
the calls users make: ``Switch.train`` (= ``encode_features`` + ``Switch.fit``) and ``Switch.route``
(= ``encode_features`` + ``Switch.classify``); tests/test_switch.py pins this script's path to those calls.

    python benchmarks/bench_switch_accuracy.py --data ../shared/data/cit --out benchmarks/results

The switch trains on a retained sample of each task's *train* split (nested: 0.01 % ⊂ 0.1 % ⊂ 1 %) and
is tested on ``--test-per-task`` prompts of each *test* split (0: all) and on every chatterbot-corpus
utterance, a task it never saw (it should go to the base model). Each prompt's features at every K come
from one encoder pass (``encode_layers``), reused by all retention levels.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import run_metadata, write_results
from switchcit.cit.data import chatterbot_dialogues, load_task, retained_sample
from switchcit.switch import Switch, encode_layers, load_encoder

TASKS = ("simplification", "explanation", "haiku", "covidfact")
RETENTION = (0.01, 0.001, 0.0001)
UNSEEN = "chatterbot"


def collect_prompts(data: Path, test_per_task: int, seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(retained, test)``: the retained prompts in sampling order (the first k of them are the smaller
    retained samples) and the test prompts per task, the unseen task's included."""
    retained, test = {}, {}
    for task in TASKS:
        retained[task] = retained_sample([e.prompt for e in load_task(data / task, "train")], max(RETENTION), seed)
        prompts = [e.prompt for e in load_task(data / task, "test")]
        test[task] = retained_sample(prompts, 1.0, seed + 1)[:test_per_task or None]
    test[UNSEEN] = sorted({a for pairs in chatterbot_dialogues().values() for a, _ in pairs})
    return retained, test


def encode_parts(prompts: dict[str, list[str]], encoder, tokenizer, layers: list[int],
                 cache: Path | None) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {task: [n, D]}}`` from one ``encode_layers`` pass over every prompt; with ``cache``, kept
    in a safetensors file named by a hash of the prompts and layers (refitting the switches is then quick)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    flat = [p for task in prompts for p in prompts[task]]
    key = hashlib.sha256(json.dumps([flat, layers, Path(encoder.config._name_or_path).name]).encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"features-{key}.safetensors"
    if path is not None and path.is_file():
        pooled = {int(k): v for k, v in load_file(str(path)).items()}
    else:
        pooled = encode_layers(flat, encoder, tokenizer, layers)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({str(k): v.contiguous() for k, v in pooled.items()}, str(path))
    parts = {}
    for layer, rows in pooled.items():
        parts[layer], start = {}, 0
        for task, task_prompts in prompts.items():
            parts[layer][task] = rows[start : start + len(task_prompts)]
            start += len(task_prompts)
    return parts


def fit_switch(features: dict[int, dict[str, torch.Tensor]], layer: int, count: dict[str, int], seed: int) -> Switch:
    """``Switch.train`` after its encoder pass: ``Switch.fit`` on the first ``count[task]`` retained prompts."""
    rows = [features[layer][t][: count[t]] for t in TASKS]
    gate_rows = [features[0][t][: count[t]] for t in TASKS]
    labels = [t for t in TASKS for _ in range(count[t])]
    return Switch.fit(torch.cat(rows), torch.cat(gate_rows), labels, layer=layer, seed=seed)


def route(switch: Switch, features: dict[int, torch.Tensor], gate_features: torch.Tensor) -> list[str | None]:
    """``Switch.route`` after its encoder pass."""
    return [switch.tasks[i] if i >= 0 else None for i in switch.classify(features, gate_features).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cit"))
    parser.add_argument("--encoder", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="0,2,4,8,15,29", help="switch layers K, comma-separated")
    parser.add_argument("--test-per-task", type=int, default=250, help="test prompts per task (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="keep the encoded features here (re-runs refit only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="switch-accuracy")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.encoder is None:
        from switchcit.pretrained import smollm2_135m_instruct

        args.encoder = str(smollm2_135m_instruct())
    layers = sorted({0, *(int(k) for k in args.layers.split(","))})
    encoder, tokenizer = load_encoder(args.encoder)
    retained, test = collect_prompts(args.data, args.test_per_task, args.seed)

    started = time.perf_counter()
    features = {"retained": encode_parts(retained, encoder, tokenizer, layers, args.cache),
                "test": encode_parts(test, encoder, tokenizer, layers, args.cache)}
    encode_seconds = time.perf_counter() - started

    rows = []
    for retention in RETENTION:
        count = {t: max(1, round(len(retained[t]) * retention / max(RETENTION))) for t in TASKS}
        for layer in layers:
            switch = fit_switch(features["retained"], layer, count, args.seed)
            per_task = {}
            for task in (*TASKS, UNSEEN):
                routed = route(switch, features["test"][layer][task], features["test"][0][task])
                expected = None if task == UNSEEN else task
                per_task[task] = 100.0 * sum(r == expected for r in routed) / len(routed)
            known = sum(len(test[t]) * per_task[t] for t in TASKS) / sum(len(test[t]) for t in TASKS)
            rows.append({"retention": retention, "retained_per_task": count, "layer": layer, "accuracy": known,
                         "unseen_to_base": per_task[UNSEEN], "per_task": per_task,
                         "epochs": switch.epochs_trained, "gate_open": switch.max_distance == float("inf")})
            print(f"retention {retention:.2%} K={layer:2d}: {known:6.2f}% right, "
                  f"{per_task[UNSEEN]:6.2f}% unseen → base, {switch.epochs_trained} epochs", flush=True)

    meta = run_metadata(torch.device("cpu")) | {
        "encoder": Path(args.encoder).name, "test_prompts": {t: len(p) for t, p in test.items()},
        "encode_seconds": round(encode_seconds, 1),
        "command": "python benchmarks/bench_switch_accuracy.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "name", "encoder", "cache")),
    }
    header = ["retention", "retained/task", "K", "right %", "unseen → base %", *TASKS, "epochs"]
    table = [[f"{r['retention']:.2%}",
              str(min(r["retained_per_task"].values())) + "–" + str(max(r["retained_per_task"].values())),
              str(r["layer"]), f"{r['accuracy']:.2f}", f"{r['unseen_to_base']:.2f}",
              *(f"{r['per_task'][t]:.1f}" for t in TASKS), str(r["epochs"])] for r in rows]
    write_results(args.out, args.name, "Switch accuracy by switch layer K and retention", meta, rows, header, table,
                  notes=__doc__)


if __name__ == "__main__":
    main()
