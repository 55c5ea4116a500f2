"""Evaluation of a continual run: mixed-task batched generation through the adapter bank, task scores,
and ``switchcit eval RUN_DIR`` to re-evaluate a saved run.

Every prompt of a batch names its adapter (``adapter_names``); the accelerated PEFT model runs the
whole mixed batch through the multi-LoRA op in one pass per layer (``switchcit.accelerate``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from switchcit.data import Example
from switchcit.metrics import main_metric, score_task
from switchcit.switch import chat_text

__all__ = ["add_command", "evaluate_tasks", "generate", "reevaluate", "routing_accuracy"]

logger = logging.getLogger("switchcit")


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], adapter_names: Sequence[str] | None, *,
             max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers, one adapter per prompt (``"__base__"``: none; ``adapter_names=None``: the model
    as it is), mixed batches of ``batch_size`` prompts of similar length (less padding); answers in
    input order."""
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts")
    model.eval()
    device = next(model.parameters()).device
    texts = [chat_text(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, padding_side="left",
                           add_special_tokens=False).to(device)
        routing = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in batch]}
        output = model.generate(**inputs, **routing, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, answer in zip(batch, decoded):
            answers[i] = answer.strip()
    return answers


def evaluate_tasks(model, tokenizer, eval_sets: dict[str, list[Example]], adapter_of_prompt, *,
                   max_new_tokens: int, batch_size: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Main-metric score per task over ``eval_sets`` (all tasks in one mixed stream of batches) and the
    adapter each prompt went to. ``adapter_of_prompt(tasks, prompts) -> adapter names`` (or ``None``:
    the model as it is, e.g. the base model)."""
    tasks = [task for task, examples in eval_sets.items() for _ in examples]
    prompts = [e.prompt for examples in eval_sets.values() for e in examples]
    adapters = adapter_of_prompt(tasks, prompts)
    answers = generate(model, tokenizer, prompts, adapters, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores, routed, start = {}, {}, 0
    for task, examples in eval_sets.items():
        stop = start + len(examples)
        scores[task] = score_task(task, examples, answers[start:stop])[main_metric(task)]
        routed[task] = adapters[start:stop] if adapters is not None else []
        start = stop
    return scores, routed


def routing_accuracy(routed: dict[str, list[str]], seen: Sequence[str]) -> float:
    """Percent of the seen tasks' prompts that went to their own task's adapter."""
    hits = [name == task for task in seen for name in routed[task]]
    return 100.0 * sum(hits) / max(1, len(hits))


# --------------------------------------------------------------------------------------------------
# `switchcit eval RUN_DIR`: the final row of every method again, from what the run saved


def reevaluate(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Scores of each method's final adapters on its tasks' eval sets, written to
    ``RUN_DIR/<method>/eval.json``; compare with the last row of its ``results.json``."""
    from switchcit.training import TrainConfig, Trainer

    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir)
    trainer = Trainer(config)
    final = {}
    for method in config.methods:
        scores, _ = trainer.evaluate_saved(method)
        (run_dir / method / "eval.json").write_text(json.dumps(scores, indent=1))
        final[method] = scores
        logger.info("%s: %s", method, ", ".join(f"{t} {s:.2f}" for t, s in scores.items()))
    return final


def add_command(commands) -> None:
    parser = commands.add_parser("eval", help="re-evaluate the final adapters of a saved run",
                                 description=reevaluate.__doc__)
    parser.add_argument("run_dir", type=Path, help="the --out folder of `switchcit train`")
    parser.set_defaults(run=lambda args: _print_scores(reevaluate(args.run_dir)))


def _print_scores(final: dict[str, dict[str, float]]) -> None:
    for method, scores in final.items():
        print(f"{method:12s} " + "  ".join(f"{task} {score:6.2f}" for task, score in scores.items()))

