"""Evaluation of a continual run: every task's test prompts in one mixed stream of batches through the
pipeline (:class:`switchcit.pipeline.SwitchModel`, the path ``switchcit serve`` runs), scored per task,
with one prediction record per prompt, saved per stage:

    RUN_DIR/<method>/predictions/stage-<k>.jsonl   after training through the k-th task (k = 1…T)
    RUN_DIR/predictions/base-model.jsonl           the base model (b_i of FWT)

A record: ``task``, ``prompt``, ``adapter`` (``"base"``: none), ``max_tokens``, ``output``,
``reference`` (the example's target) and ``score`` (the task's main metric on this example alone).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from switchcit.cit.data import Example, load_task, retained_sample
from switchcit.cit.metrics import CLASSIFICATION_METRICS, example_statistics, main_metric, score_of_statistics
from switchcit.serving.openai import BASE_MODEL_NAME  # records name the adapter as the server does

if TYPE_CHECKING:
    from switchcit.cit.config import TrainConfig

__all__ = ["BASE_PREDICTIONS", "FrozenAnswers", "evaluate_tasks", "load_eval_sets", "read_predictions",
           "routing_accuracy", "stage_predictions", "task_metrics", "trivial_baseline", "write_predictions"]

BASE_PREDICTIONS = Path("predictions") / "base-model.jsonl"  # under the run folder


def load_eval_sets(config: TrainConfig) -> dict[str, list[Example]]:
    """Each task's test examples evaluated at every stage: ``eval_examples`` of them drawn by the run's
    seed, or all of a task that has fewer."""
    return {name: _sample(load_task(folder, "test", config.fields), config.eval_examples, config.seed)
            for name, folder in zip(config.task_names, config.tasks)}


def _sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    return retained_sample(examples, min(1.0, count / len(examples)), seed)[:count]


def task_metrics(config: TrainConfig) -> dict[str, str]:
    """Each task's main metric: declared (``--metric``, ``task.json``), else chosen by its name."""
    declared = config.declared_metrics()
    return {task: main_metric(task, declared[task]) for task in config.task_names}


class FrozenAnswers:
    """Greedy answers of adapters whose weights never change again, by (adapter, prompt, max_new_tokens):
    ``frozen`` names them (SwitchCIT's per-task adapters, never retrained once trained); the base model
    (``None``) is always frozen. An evaluation then generates only what it has not answered before —
    a later stage, or another method with the same adapters (oracle) — and reuses the rest: what the
    same greedy generation of that prompt gave (an answer does not depend on what shares its batch)."""

    def __init__(self, frozen: Collection[str]):
        self.frozen = frozenset(frozen)
        self._answers: dict[tuple[str | None, str, int], str] = {}

    def generate(self, pipeline, prompts: list[str], adapters: list[str | None] | None, *, max_new_tokens: int,
                 batch_size: int) -> tuple[list[str], list[str | None]]:
        """``pipeline.generate``'s answers and adapters; ``adapters`` ``None``: the switch picks, here
        before generating (an encoder pass to its layer), so that known answers are found."""
        if adapters is None:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad together
            routes = [None] * len(prompts)
            for first in range(0, len(order), batch_size):
                chunk = order[first : first + batch_size]
                for i, adapter in zip(chunk, pipeline.route([prompts[i] for i in chunk])):
                    routes[i] = adapter
            adapters = routes
        keys = [(adapter, prompt, max_new_tokens) for adapter, prompt in zip(adapters, prompts)]
        new = list(dict.fromkeys(key for key in keys if key not in self._answers))  # each once, in order
        answers = dict(self._answers)
        if new:
            texts, _ = pipeline.generate([k[1] for k in new], [k[0] for k in new], max_new_tokens=max_new_tokens,
                                         batch_size=batch_size)
            answers.update(zip(new, texts))
            self._answers.update((k, text) for k, text in zip(new, texts) if k[0] is None or k[0] in self.frozen)
        return [answers[key] for key in keys], list(adapters)


def evaluate_tasks(pipeline, eval_sets: dict[str, list[Example]],
                   adapters_of: Callable[[list[str]], list[str | None] | None], *, max_new_tokens: int,
                   batch_size: int, metrics: Mapping[str, str] | None = None,
                   answers: FrozenAnswers | None = None) -> tuple[dict[str, float], list[dict]]:
    """Main-metric score per task (``metrics[task]``, else the task's fallback) and one record per prompt
    (see the module notes). ``adapters_of(tasks of the prompts)``: an adapter name (``None``: base
    model) per prompt, or ``None`` for the switch to pick. ``answers``: reuse the answers of frozen
    adapters (:class:`FrozenAnswers`); without it every prompt goes through one routed generate."""
    tasks = [task for task, examples in eval_sets.items() for _ in examples]
    prompts = [e.prompt for examples in eval_sets.values() for e in examples]
    generate = pipeline.generate if answers is None else partial(answers.generate, pipeline)
    texts, adapters = generate(prompts, adapters_of(tasks), max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores, predictions, start = {}, [], 0
    for task, examples in eval_sets.items():
        stop = start + len(examples)
        metric = main_metric(task, (metrics or {}).get(task))
        rows = example_statistics(metric, examples, texts[start:stop])
        scores[task] = float(score_of_statistics(metric, rows.sum(0)))
        predictions += [{"task": task, "prompt": example.prompt, "adapter": adapter or BASE_MODEL_NAME,
                         "max_tokens": max_new_tokens, "output": answer, "reference": example.target,
                         "score": float(score)}
                        for example, adapter, answer, score in zip(examples, adapters[start:stop], texts[start:stop],
                                                                   score_of_statistics(metric, rows))]
        start = stop
    return scores, predictions


def routing_accuracy(predictions: Sequence[dict], seen: Sequence[str]) -> float:
    """Percent of the seen tasks' prompts that went to their own task's adapter."""
    hits = [p["adapter"] == p["task"] for p in predictions if p["task"] in seen]
    return 100.0 * sum(hits) / max(1, len(hits))


def stage_predictions(run_dir: str | Path, method: str, stage: int) -> Path:
    """Where ``method``'s records after (0-based) ``stage`` are saved: ``predictions/stage-<stage + 1>.jsonl``."""
    return Path(run_dir) / method / "predictions" / f"stage-{stage + 1}.jsonl"


def write_predictions(path: str | Path, records: Sequence[dict]) -> None:
    """One JSON line per record, the file replaced atomically (a restart sees all of it or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, path)


def read_predictions(path: str | Path) -> list[dict]:
    """The records :func:`write_predictions` wrote."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def trivial_baseline(metric: str, train_examples: Sequence[Example],
                     test_examples: Sequence[Example]) -> tuple[str, list[str]]:
    """``(rule, answers)`` of the trivial baseline on ``test_examples``: for a classification metric
    the train split's majority class (label, else target) for every prompt; otherwise a copy of the
    input (the source sentence where there is one, else the prompt)."""
    if metric in CLASSIFICATION_METRICS:
        majority, _ = Counter(e.target if e.label is None else e.label for e in train_examples).most_common(1)[0]
        return f"majority class {majority!r}", [majority] * len(test_examples)
    sources = [e.source for e in test_examples]
    if all(source is not None for source in sources):
        return "copy of the source", sources
    return "copy of the prompt", [e.prompt for e in test_examples]
