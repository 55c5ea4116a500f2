"""Evaluation of a continual run: every task's test prompts in one mixed stream of batches through the
pipeline (:class:`switchcit.pipeline.SwitchModel`, the path ``switchcit serve`` runs), scored per task,
with one prediction record per prompt."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from switchcit.cit.data import Example
from switchcit.cit.metrics import main_metric, score_task
from switchcit.serving.openai import BASE_MODEL_NAME  # records name the adapter as the server does

__all__ = ["evaluate_tasks", "routing_accuracy"]


def evaluate_tasks(pipeline, eval_sets: dict[str, list[Example]],
                   adapters_of: Callable[[list[str]], list[str | None] | None], *, max_new_tokens: int,
                   batch_size: int, metrics: Mapping[str, str] | None = None) -> tuple[dict[str, float], list[dict]]:
    """Main-metric score per task (``metrics[task]``, else the task's fallback) and one record per prompt
    (task, prompt, adapter, max_tokens, output). ``adapters_of(tasks of the prompts)``: an adapter name
    (``None``: base model) per prompt, or ``None`` for the switch to pick."""
    tasks = [task for task, examples in eval_sets.items() for _ in examples]
    prompts = [e.prompt for examples in eval_sets.values() for e in examples]
    answers, adapters = pipeline.generate(prompts, adapters_of(tasks), max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)
    predictions = [{"task": task, "prompt": prompt, "adapter": adapter or BASE_MODEL_NAME, "max_tokens": max_new_tokens,
                    "output": answer} for task, prompt, adapter, answer in zip(tasks, prompts, adapters, answers)]
    scores, start = {}, 0
    for task, examples in eval_sets.items():
        stop = start + len(examples)
        metric = main_metric(task, (metrics or {}).get(task))
        scores[task] = score_task(task, examples, answers[start:stop], metric)[metric]
        start = stop
    return scores, predictions


def routing_accuracy(predictions: Sequence[dict], seen: Sequence[str]) -> float:
    """Percent of the seen tasks' prompts that went to their own task's adapter."""
    hits = [p["adapter"] == p["task"] for p in predictions if p["task"] in seen]
    return 100.0 * sum(hits) / max(1, len(hits))
