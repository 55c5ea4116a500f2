"""A run's results, from what its folder holds: every saved prediction (:mod:`switchcit.cit.evaluation`)
scored again per example, each figure's mean and 95 % bootstrap interval over test examples and seeds
(:func:`switchcit.cit.metrics.bootstrap_intervals`), ``RUN_DIR/<method>/results.json`` and the report.

With ``--seeds``, each seed's run lives in ``RUN_DIR/seed-<s>/`` (a whole run: its own results and
report); ``RUN_DIR/<method>/results.json`` and ``RUN_DIR/report.md`` cover all the seeds.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from switchcit.cit.checkpoint import write_json_atomic
from switchcit.cit.config import TrainConfig
from switchcit.cit.data import Example, load_task
from switchcit.cit.evaluation import (
    BASE_PREDICTIONS,
    load_eval_sets,
    read_predictions,
    routing_accuracy,
    stage_predictions,
    task_metrics,
    trivial_baseline,
)
from switchcit.cit.methods import METHODS
from switchcit.cit.metrics import bootstrap_intervals, continual_figures, example_statistics, results_dict
from switchcit.cit.report import figure_text, write_report

__all__ = ["RESULTS_FILE", "seed_runs", "write_results"]

logger = logging.getLogger("switchcit")

RESULTS_FILE = "results.json"
REPLICATES = 1000  # bootstrap replicates per interval


def seed_runs(config: TrainConfig) -> list[TrainConfig]:
    """The single-seed runs of ``config``: itself, or with ``seeds`` one run per seed in
    ``RUN_DIR/seed-<s>/`` (each its own run folder, continued by the same command)."""
    if not config.seeds:
        return [config]
    return [dataclasses.replace(config, seed=seed, seeds=[], out=str(Path(config.out) / f"seed-{seed}"))
            for seed in config.seeds]


def _figures(scores: list[list[float | None]]) -> dict:
    """A table's rows: the base model, the trivial baseline, then the stages."""
    return continual_figures(scores[2:], baseline=scores[0], trivial_baseline=scores[1])


def _row(path: Path, eval_sets: dict[str, list[Example]], metrics: dict[str, str]) -> list[np.ndarray | None]:
    """Per-example statistics of every task from the predictions saved in ``path`` (None for a task the
    stage did not evaluate: ``--eval-ahead``)."""
    records = read_predictions(path)
    row = []
    for task, examples in eval_sets.items():
        answers = [record for record in records if record["task"] == task]
        if not answers:
            row.append(None)
            continue
        if [record["prompt"] for record in answers] != [example.prompt for example in examples]:
            raise ValueError(f"{path}: the {task} predictions are not this run's test examples")
        row.append(example_statistics(metrics[task], examples, [record["output"] for record in answers]))
    return row


def write_results(config: TrainConfig) -> dict[str, dict]:
    """Score the predictions saved by every stage of every method (and every seed), write each
    method's ``results.json`` and the report in ``config.out``; returns ``{method: results}``."""
    runs, tasks = seed_runs(config), config.task_names
    metrics = task_metrics(config)
    train_sets = {name: load_task(folder, "train", config.fields, config.train_examples)
                  for name, folder in zip(tasks, config.tasks)}
    eval_sets, fixed_rows, rules = [], [], {}
    for run in runs:
        run_eval_sets = load_eval_sets(run)
        trivial = []
        for task, examples in run_eval_sets.items():
            rules[task], answers = trivial_baseline(metrics[task], train_sets[task], examples)
            trivial.append(example_statistics(metrics[task], examples, answers))
        eval_sets.append(run_eval_sets)
        fixed_rows.append([_row(Path(run.out) / BASE_PREDICTIONS, run_eval_sets, metrics), trivial])

    results = {}
    for name in config.methods:
        routes = METHODS[name].routing == "switch"
        tables, accuracies = [], []
        for run, run_eval_sets, fixed in zip(runs, eval_sets, fixed_rows):
            stages, accuracy = [], []
            for stage in range(len(tasks)):
                path = stage_predictions(run.out, name, stage)
                evaluated = path.is_file()  # a method that trains only at the end is evaluated only then
                stages.append(_row(path, run_eval_sets, metrics) if evaluated else [None] * len(tasks))
                accuracy.append(routing_accuracy(read_predictions(path), tasks[: stage + 1])
                                if evaluated and routes else np.nan)
            tables.append(fixed + stages)
            accuracies.append(accuracy)
        estimates = bootstrap_intervals(tables, [metrics[task] for task in tasks], _figures, replicates=REPLICATES)
        switch_accuracy = [None if np.isnan(a) else float(a) for a in np.mean(accuracies, axis=0)] if routes else None
        results[name] = results_dict(name, tasks, estimates, seeds=[run.seed for run in runs], metrics=metrics,
                                     trivial_rule=rules, switch_accuracy=switch_accuracy)
        write_json_atomic(Path(config.out) / name / RESULTS_FILE, results[name])
        logger.info("%s: AP %s, BWT %s (%d seed%s)", name, figure_text(results[name], "AP"),
                    figure_text(results[name], "BWT"), len(runs), "" if len(runs) == 1 else "s")
    paths = write_report(config.out, results)
    logger.info("report: %s", ", ".join(map(str, paths)))
    return results

