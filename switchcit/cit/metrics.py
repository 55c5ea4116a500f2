"""Task metrics (SARI, ROUGE, BLEU, Yes/No accuracy) and continual-learning metrics (AP, BWT, FWT,
forgetting) over the score matrix ``R[t][i]`` = score on task ``i`` after training through task ``t``.

Every task score is on a 0–100 scale. ``results_dict`` builds what the training loop writes to
``RUN_DIR/<method>/results.json`` and :mod:`switchcit.report` reads.

SARI (Xu et al., 2016) is computed as EASSE does (the library of the ASSET authors), with deletion
scored by precision as in the paper (EASSE's ``corpus_sari(..., use_f1_for_deletion=False)``):

* text is lowercased and tokenised with sacrebleu's 13a tokenizer;
* for n = 1..4, three operations on n-grams: *add* (in the prediction, not in the source; distinct
  n-grams), *keep* and *delete* (counted with multiplicity and weighted by the number r of references:
  source and prediction counts are multiplied by r and compared with the pooled reference counts, so
  an n-gram that k of r references keep counts k/r). An operation is correct where the references
  do it too; precision = correct / done by the prediction, recall = correct / done by the references;
* per order: F1 of add, F1 of keep, precision of delete; each averaged over n; SARI = their mean;
* 0/0 counts as 0 (as in EASSE and Xu's ``SARI.py``): an unchanged sentence scores only on keep
  (at most 33.3), so copying the source is not rewarded.

``corpus_sari`` pools the counts of all sentences before the ratios (EASSE's corpus level);
``sari`` is the same on one sentence. Hugging Face ``evaluate`` instead averages sentence scores
and counts 0/0 as 1 — a copy of the source then scores above the human references on ASSET.
"""
from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np

from switchcit.cit.data import Example

__all__ = [
    "sari", "corpus_sari", "rouge", "bleu", "yes_no_accuracy", "exact_match",
    "TASK_METRICS", "DEFAULT_METRICS", "METRIC_NAMES", "METRIC_FIELDS",
    "main_metric", "score_task", "continual_metrics", "results_dict",
]

SARI_MAX_ORDER = 4
ADD, KEEP, DELETE = range(3)  # SARI's operations, an axis of the n-gram counts


# --- SARI -------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()


def _tokens(text: str) -> list[str]:
    return _tokenizer_13a()(text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _scaled(counts: Counter, factor: int) -> Counter:
    return Counter({gram: count * factor for gram, count in counts.items()})


def _total(counts: Counter) -> int:
    return sum(counts.values())


def _sari_counts(source: str, prediction: str, references: Sequence[str]) -> np.ndarray:
    """``counts[n - 1, operation]`` = (done correctly, done by the prediction, done by the references)
    for the n-grams of order n; operations ADD, KEEP, DELETE (see the module notes)."""
    if not references:
        raise ValueError("SARI needs at least one reference")
    source_tokens, prediction_tokens = _tokens(source), _tokens(prediction)
    reference_tokens = [_tokens(reference) for reference in references]
    counts = np.zeros((SARI_MAX_ORDER, 3, 3))
    for n in range(1, SARI_MAX_ORDER + 1):
        source_ngrams, prediction_ngrams = _ngrams(source_tokens, n), _ngrams(prediction_tokens, n)
        pooled_references = sum((_ngrams(tokens, n) for tokens in reference_tokens), Counter())

        added = set(prediction_ngrams) - set(source_ngrams)
        added_by_references = set(pooled_references) - set(source_ngrams)
        counts[n - 1, ADD] = len(added & added_by_references), len(added), len(added_by_references)

        weighted_source = _scaled(source_ngrams, len(references))
        weighted_prediction = _scaled(prediction_ngrams, len(references))
        for operation, by_prediction, by_references in (
            (KEEP, weighted_source & weighted_prediction, weighted_source & pooled_references),
            (DELETE, weighted_source - weighted_prediction, weighted_source - pooled_references),
        ):
            correct = by_prediction & by_references
            counts[n - 1, operation] = _total(correct), _total(by_prediction), _total(by_references)
    return counts


def _sari_from_counts(counts: np.ndarray) -> float:
    correct, by_prediction, by_references = np.moveaxis(counts, -1, 0)
    precision = np.divide(correct, by_prediction, out=np.zeros_like(correct), where=by_prediction > 0)
    recall = np.divide(correct, by_references, out=np.zeros_like(correct), where=by_references > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(correct),
                   where=precision + recall > 0)
    add, keep, delete = f1[:, ADD].mean(), f1[:, KEEP].mean(), precision[:, DELETE].mean()
    return float(100 * (add + keep + delete) / 3)


def sari(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (0–100) of ``prediction`` as a simplification of ``source``; see the module notes."""
    return _sari_from_counts(_sari_counts(source, prediction, references))


def corpus_sari(sources: Sequence[str], predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """SARI of a corpus from the n-gram counts of all its sentences pooled (not a mean of sentence scores)."""
    _check_lengths(predictions, sources=sources, references=references_list)
    return _sari_from_counts(sum(map(_sari_counts, sources, predictions, references_list)))


# --- generation and classification metrics ---------------------------------------------------------

def _check_lengths(predictions: Sequence, **others: Sequence) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    for name, values in others.items():
        if len(values) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(values)} {name}")


def rouge(predictions: Sequence[str], references_list: Sequence[Sequence[str]], kind: str = "rougeL") -> float:
    """Mean ROUGE F-measure × 100 (``rouge-score``, no stemming); each prediction is scored against its
    best-matching reference."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_lengths(predictions, references=references_list)
    scorer = RougeScorer([kind])
    return 100 * statistics.fmean(scorer.score_multi(list(references), prediction)[kind].fmeasure
                                  for prediction, references in zip(predictions, references_list))


def bleu(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU; examples may have different numbers of references."""
    from sacrebleu import corpus_bleu

    _check_lengths(predictions, references=references_list)
    n_streams = max(map(len, references_list))
    # sacrebleu wants one stream per reference position; None marks a missing reference.
    streams = [[refs[k] if k < len(refs) else None for refs in references_list] for k in range(n_streams)]
    return corpus_bleu(list(predictions), streams).score


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def yes_no_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Percentage of predictions whose first whole word "yes" or "no" (any case) matches the label; a
    prediction with neither word is wrong."""
    _check_lengths(predictions, labels=labels)
    answers = [_YES_NO.search(prediction) for prediction in predictions]
    return 100 * statistics.fmean(answer is not None and answer[1].lower() == label.strip().lower()
                                  for answer, label in zip(answers, labels))


def exact_match(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Percentage of predictions equal to the label, ignoring case and surrounding whitespace."""
    _check_lengths(predictions, labels=labels)
    return 100 * statistics.fmean(prediction.strip().casefold() == label.strip().casefold()
                                  for prediction, label in zip(predictions, labels))


# --- per-task scoring -------------------------------------------------------------------------------

def _references(examples: Sequence[Example]) -> list[list[str]]:
    return [example.references or [example.target] for example in examples]


def _sources(examples: Sequence[Example]) -> list[str]:
    missing = [i for i, example in enumerate(examples) if example.source is None]
    if missing:
        raise ValueError(f"SARI needs the source sentence; examples {missing[:5]} have none")
    return [example.source for example in examples]


def _labels(examples: Sequence[Example]) -> list[str]:
    missing = [i for i, example in enumerate(examples) if example.label is None]
    if missing:
        raise ValueError(f"this metric needs labels; examples {missing[:5]} have none")
    return [example.label for example in examples]


_METRICS: dict[str, Callable[[Sequence[Example], Sequence[str]], float]] = {
    "sari": lambda examples, predictions: corpus_sari(_sources(examples), predictions, _references(examples)),
    "rougeL": lambda examples, predictions: rouge(predictions, _references(examples), "rougeL"),
    "rouge1": lambda examples, predictions: rouge(predictions, _references(examples), "rouge1"),
    "bleu": lambda examples, predictions: bleu(predictions, _references(examples)),
    "accuracy": lambda examples, predictions: yes_no_accuracy(predictions, _labels(examples)),
    "exact_match": lambda examples, predictions: exact_match(predictions, _labels(examples)),
}

# The metrics of each task of the stream, main metric first.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "simplification": ("sari",),
    "explanation": ("rougeL", "bleu"),
    "haiku": ("rouge1", "bleu"),
    "covidfact": ("accuracy",),
}
# Any other task; exact match is added when every example has a label.
DEFAULT_METRICS: tuple[str, ...] = ("rougeL",)


METRIC_NAMES: tuple[str, ...] = tuple(_METRICS)
# The example field a metric reads besides the references (a run checks it before training).
METRIC_FIELDS: dict[str, str] = {"sari": "source", "accuracy": "label", "exact_match": "label"}


def main_metric(task_name: str, declared: str | None = None) -> str:
    """The metric that stands for a task in the score matrix: ``declared`` (``--metric`` or the task's
    ``task.json``) when given, else the fallback chosen by the task's name."""
    if declared is not None and declared not in _METRICS:
        raise ValueError(f"unknown metric {declared!r}; known: {', '.join(METRIC_NAMES)}")
    return declared or TASK_METRICS.get(task_name, DEFAULT_METRICS)[0]


def score_task(task_name: str, examples: Sequence[Example], predictions: Sequence[str],
               metric: str | None = None) -> dict[str, float]:
    """``{metric: score}`` for the predictions on ``examples``, main metric (``main_metric(task_name,
    metric)``) first."""
    _check_lengths(predictions, examples=examples)
    names = TASK_METRICS.get(task_name)
    if names is None:
        has_labels = all(example.label is not None for example in examples)
        names = DEFAULT_METRICS + (("exact_match",) if has_labels else ())
    main = main_metric(task_name, metric)
    return {name: _METRICS[name](examples, predictions) for name in (main, *(n for n in names if n != main))}


# --- continual-learning metrics ---------------------------------------------------------------------

def _mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def continual_metrics(matrix: Sequence[Sequence[float | None]], baseline: Sequence[float | None] | None = None
                      ) -> dict[str, float | list[float | None] | None]:
    """AP, BWT, FWT, forgetting and the final per-task scores of a T × T score matrix.

    ``matrix[t][i]`` is the score on task i after training through task t (0-based here), None where
    that task was not evaluated; ``baseline[i]`` is the untrained model's score. Each metric averages
    only the terms whose entries are all present and is None when no term is: so BWT, FWT and
    forgetting are None for T = 1, and FWT is None without a baseline or without the entries
    R[i-1][i] (tasks evaluated before they are trained)."""
    n_tasks = len(matrix)
    if n_tasks == 0 or any(len(row) != n_tasks for row in matrix):
        lengths = [len(row) for row in matrix]
        raise ValueError(f"the score matrix must be square and non-empty, got rows of lengths {lengths}")
    if baseline is not None and len(baseline) != n_tasks:
        raise ValueError(f"{len(baseline)} baseline scores for {n_tasks} tasks")
    final = list(matrix[-1])
    earlier = range(n_tasks - 1)  # tasks that can be forgotten, and the stages before the last

    backward = [final[i] - matrix[i][i] for i in earlier if final[i] is not None and matrix[i][i] is not None]
    forward = [] if baseline is None else [
        matrix[i - 1][i] - baseline[i] for i in range(1, n_tasks)
        if matrix[i - 1][i] is not None and baseline[i] is not None
    ]
    forgetting = []
    for i in earlier:
        before = [matrix[stage][i] for stage in earlier if matrix[stage][i] is not None]
        if before and final[i] is not None:
            forgetting.append(max(before) - final[i])
    return {
        "AP": _mean_or_none([score for score in final if score is not None]),
        "BWT": _mean_or_none(backward),
        "FWT": _mean_or_none(forward),
        "forgetting": _mean_or_none(forgetting),
        "final": final,
    }


def _floats(values: Sequence[float | None] | None) -> list[float | None] | None:
    """Plain floats (JSON-serialisable, e.g. from numpy scalars), keeping None."""
    return None if values is None else [None if value is None else float(value) for value in values]


def results_dict(method: str, tasks: Sequence[str], matrix: Sequence[Sequence[float | None]],
                 baseline: Sequence[float | None] | None = None,
                 switch_accuracy: Sequence[float | None] | None = None,
                 metrics: Mapping[str, str] | None = None) -> dict:
    """The ``results.json`` record of one method: task order, main metric per task (``metrics``, else
    each task's fallback), score matrix, baseline, the continual metrics and the switch accuracy per
    stage in percent (None when the method does not route)."""
    if len(tasks) != len(matrix):
        raise ValueError(f"{len(tasks)} task names for a score matrix of {len(matrix)} stages")
    if switch_accuracy is not None and len(switch_accuracy) != len(tasks):
        raise ValueError(f"{len(switch_accuracy)} switch accuracies for {len(tasks)} stages")
    summary = continual_metrics(matrix, baseline)
    return {
        "method": method,
        "tasks": list(tasks),
        "metric": {task: main_metric(task, (metrics or {}).get(task)) for task in tasks},
        "matrix": [_floats(row) for row in matrix],
        "baseline": _floats(baseline),
        "AP": summary["AP"],
        "BWT": summary["BWT"],
        "FWT": summary["FWT"],
        "forgetting": summary["forgetting"],
        "switch_accuracy": _floats(switch_accuracy),
    }
