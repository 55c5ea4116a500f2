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
    "CLASSIFICATION_METRICS", "FIGURES", "main_metric", "score_task", "example_statistics", "score_of_statistics",
    "continual_metrics", "continual_figures", "bootstrap_intervals", "results_dict",
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


def _sari_from_counts(counts: np.ndarray) -> np.ndarray:
    """SARI of pooled counts ``[..., order, operation, 3]``, one score per leading index."""
    correct, by_prediction, by_references = np.moveaxis(np.asarray(counts, dtype=float), -1, 0)
    precision = np.divide(correct, by_prediction, out=np.zeros_like(correct), where=by_prediction > 0)
    recall = np.divide(correct, by_references, out=np.zeros_like(correct), where=by_references > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(correct),
                   where=precision + recall > 0)
    add, keep, delete = f1[..., ADD].mean(-1), f1[..., KEEP].mean(-1), precision[..., DELETE].mean(-1)
    return 100 * (add + keep + delete) / 3


def _sari_statistics(sources: Sequence[str], predictions: Sequence[str],
                     references_list: Sequence[Sequence[str]]) -> np.ndarray:
    """Each sentence's SARI counts, flattened: ``[sentences, order × operation × 3]``."""
    _check_lengths(predictions, sources=sources, references=references_list)
    return np.stack([_sari_counts(*sentence).ravel() for sentence in zip(sources, predictions, references_list)])


def _sari_of_totals(totals: np.ndarray) -> np.ndarray:
    return _sari_from_counts(totals.reshape(*totals.shape[:-1], SARI_MAX_ORDER, 3, 3))


def sari(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (0–100) of ``prediction`` as a simplification of ``source``; see the module notes."""
    return float(_sari_from_counts(_sari_counts(source, prediction, references)))


def corpus_sari(sources: Sequence[str], predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """SARI of a corpus from the n-gram counts of all its sentences pooled (not a mean of sentence scores)."""
    return float(_sari_of_totals(_sari_statistics(sources, predictions, references_list).sum(0)))


# --- generation and classification metrics ---------------------------------------------------------

def _check_lengths(predictions: Sequence, **others: Sequence) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    for name, values in others.items():
        if len(values) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(values)} {name}")


def _mean_statistics(scores) -> np.ndarray:
    """``[score, 1]`` per example: summed, the corpus mean is their ratio."""
    scores = np.asarray(list(scores), dtype=float)
    return np.stack([scores, np.ones_like(scores)], axis=-1)


def _mean_of_totals(totals: np.ndarray) -> np.ndarray:
    return totals[..., 0] / totals[..., 1]


def _rouge_statistics(predictions: Sequence[str], references_list: Sequence[Sequence[str]],
                      kind: str) -> np.ndarray:
    from rouge_score.rouge_scorer import RougeScorer

    _check_lengths(predictions, references=references_list)
    scorer = RougeScorer([kind])
    return _mean_statistics(100 * scorer.score_multi(list(references), prediction)[kind].fmeasure
                            for prediction, references in zip(predictions, references_list))


def rouge(predictions: Sequence[str], references_list: Sequence[Sequence[str]], kind: str = "rougeL") -> float:
    """Mean ROUGE F-measure × 100 (``rouge-score``, no stemming); each prediction is scored against its
    best-matching reference."""
    return float(_mean_of_totals(_rouge_statistics(predictions, references_list, kind).sum(0)))


@lru_cache(maxsize=1)
def _bleu_metric():
    from sacrebleu.metrics import BLEU

    return BLEU()  # corpus_bleu's settings


def _bleu_statistics(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> np.ndarray:
    """sacrebleu's sentence statistics (lengths, n-gram matches and totals; what its own bootstrap sums)."""
    _check_lengths(predictions, references=references_list)
    n_streams = max(map(len, references_list))
    # sacrebleu wants one stream per reference position; None marks a missing reference.
    streams = [[refs[k] if k < len(refs) else None for refs in references_list] for k in range(n_streams)]
    return np.array(_bleu_metric()._extract_corpus_statistics(list(predictions), streams), dtype=float)


def _bleu_of_totals(totals: np.ndarray) -> np.ndarray:
    return np.apply_along_axis(lambda row: _bleu_metric()._compute_score_from_stats(row).score, -1, totals)


def bleu(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU; examples may have different numbers of references."""
    return float(_bleu_of_totals(_bleu_statistics(predictions, references_list).sum(0)))


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _yes_no_statistics(predictions: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    _check_lengths(predictions, labels=labels)
    answers = [_YES_NO.search(prediction) for prediction in predictions]
    return _mean_statistics(100 * (answer is not None and answer[1].lower() == label.strip().lower())
                            for answer, label in zip(answers, labels))


def yes_no_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Percentage of predictions whose first whole word "yes" or "no" (any case) matches the label; a
    prediction with neither word is wrong."""
    return float(_mean_of_totals(_yes_no_statistics(predictions, labels).sum(0)))


def _exact_match_statistics(predictions: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    _check_lengths(predictions, labels=labels)
    return _mean_statistics(100 * (prediction.strip().casefold() == label.strip().casefold())
                            for prediction, label in zip(predictions, labels))


def exact_match(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Percentage of predictions equal to the label, ignoring case and surrounding whitespace."""
    return float(_mean_of_totals(_exact_match_statistics(predictions, labels).sum(0)))


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


# Every metric is a function of per-example statistics summed over the corpus: a resample of the
# examples is a weighted sum of their rows, and the corpus metric is recomputed from it exactly.
_STATISTICS: dict[str, Callable[[Sequence[Example], Sequence[str]], np.ndarray]] = {
    "sari": lambda examples, predictions: _sari_statistics(_sources(examples), predictions, _references(examples)),
    "rougeL": lambda examples, predictions: _rouge_statistics(predictions, _references(examples), "rougeL"),
    "rouge1": lambda examples, predictions: _rouge_statistics(predictions, _references(examples), "rouge1"),
    "bleu": lambda examples, predictions: _bleu_statistics(predictions, _references(examples)),
    "accuracy": lambda examples, predictions: _yes_no_statistics(predictions, _labels(examples)),
    "exact_match": lambda examples, predictions: _exact_match_statistics(predictions, _labels(examples)),
}
_SCORE_OF_TOTALS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sari": _sari_of_totals, "rougeL": _mean_of_totals, "rouge1": _mean_of_totals, "bleu": _bleu_of_totals,
    "accuracy": _mean_of_totals, "exact_match": _mean_of_totals,
}
# The metrics that score a class label (their trivial baseline is the majority class).
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "exact_match")


def example_statistics(metric: str, examples: Sequence[Example], predictions: Sequence[str]) -> np.ndarray:
    """``metric``'s statistics of each prediction, ``[examples, k]``: the corpus score is
    :func:`score_of_statistics` of their sum."""
    return _STATISTICS[metric](examples, predictions)


def score_of_statistics(metric: str, totals: np.ndarray) -> np.ndarray:
    """``metric``'s score of statistics summed over examples, ``[..., k]`` → ``[...]`` (one row: that
    example's own score)."""
    return _SCORE_OF_TOTALS[metric](np.asarray(totals, dtype=float))


_METRICS: dict[str, Callable[[Sequence[Example], Sequence[str]], float]] = {
    name: lambda examples, predictions, name=name: float(
        score_of_statistics(name, example_statistics(name, examples, predictions).sum(0)))
    for name in _STATISTICS
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


# The figures of a run, in results.json's order; each is followed there by its interval (``<name>_ci``).
FIGURES = ("matrix", "baseline", "trivial_baseline", "AP", "BWT", "FWT", "forgetting")


def continual_figures(matrix: Sequence[Sequence[float | None]], baseline: Sequence[float | None] | None = None,
                      trivial_baseline: Sequence[float | None] | None = None) -> dict:
    """The :data:`FIGURES` of one run: its score matrix, the base model's scores (``baseline``, b_i of
    FWT), the trivial baseline's scores (majority class or copy of the input) and the continual metrics."""
    summary = continual_metrics(matrix, baseline)
    return {"matrix": [list(row) for row in matrix], "baseline": None if baseline is None else list(baseline),
            "trivial_baseline": None if trivial_baseline is None else list(trivial_baseline),
            **{name: summary[name] for name in ("AP", "BWT", "FWT", "forgetting")}}


def _array(value) -> np.ndarray:
    """A figure (a number, a list or a list of lists; None inside) as floats, NaN for None."""
    if isinstance(value, (list, tuple)):
        return np.array([_array(item) for item in value], dtype=float)
    return np.array(np.nan if value is None else value, dtype=float)


def _plain(values: np.ndarray, leaf_ndim: int = 0):
    """Back to nested lists of floats, None where NaN; the last ``leaf_ndim`` axes form one leaf."""
    if values.ndim > leaf_ndim:
        return [_plain(item, leaf_ndim) for item in values]
    return None if np.isnan(values).any() else values.tolist()


def bootstrap_intervals(tables: Sequence[Sequence[Sequence[np.ndarray | None]]], metrics: Sequence[str],
                        figures: Callable[[list[list[float | None]]], Mapping], *, replicates: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict:
    """Each figure's mean over seeds and its percentile bootstrap interval over seeds and examples.

    ``tables[s][r][i]``: :func:`example_statistics` of task i in row r (a stage, a baseline…) of seed s,
    None where not evaluated; every row of a task holds the same examples in the same order.
    ``metrics[i]``: task i's metric. ``figures(scores)``: named figures (a number, a list or a list of
    lists, None inside) of one table of scores (rows × tasks, None where not evaluated).

    A replicate draws as many seeds as there are, with replacement; for each drawn seed and task it
    draws the task's examples with replacement, one draw for all rows (paired), and recomputes every
    cell's corpus metric from the resampled statistics; its figures are the mean of the drawn seeds'.
    Returns ``{name: mean over the seeds, name + "_ci": [low, high]}``, the central ``level`` of the
    replicates (None where a figure is None). Seeded: the same inputs give the same intervals."""
    if not tables or not 0 < level < 1 or replicates < 1:
        raise ValueError(f"need at least one table, 0 < level < 1 and replicates ≥ 1 (got {len(tables)}, "
                         f"{level}, {replicates})")
    n_rows, n_tasks = len(tables[0]), len(metrics)
    if any(len(table) != n_rows or any(len(row) != n_tasks for row in table) for table in tables):
        raise ValueError(f"every table needs {n_rows} rows of {n_tasks} tasks")

    def figures_of(scores: np.ndarray) -> dict[str, np.ndarray]:
        table = [[None if np.isnan(score) else float(score) for score in row] for row in scores]
        return {name: _array(value) for name, value in figures(table).items()}

    observed = np.full((len(tables), n_rows, n_tasks), np.nan)
    resampled = np.full((replicates, len(tables), n_rows, n_tasks), np.nan)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(len(tables), size=(replicates, len(tables)))
    for s, table in enumerate(tables):
        picked = drawn == s
        for i, metric in enumerate(metrics):
            cells = [(r, np.asarray(row[i], dtype=float)) for r, row in enumerate(table) if row[i] is not None]
            if not cells:
                continue
            n_examples = len(cells[0][1])
            if any(len(rows) != n_examples for _, rows in cells):
                raise ValueError(f"seed {s}, task {i}: rows hold different numbers of examples")
            weights = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=int(picked.sum()))
            for r, rows in cells:
                observed[s, r, i] = score_of_statistics(metric, rows.sum(0))
                if len(weights):  # a seed no replicate drew
                    resampled[picked, r, i] = score_of_statistics(metric, weights @ rows)

    per_seed = [figures_of(scores) for scores in observed]
    per_replicate = [[figures_of(scores) for scores in draw] for draw in resampled]
    estimates = {}
    for name in per_seed[0]:
        mean = np.mean([figures[name] for figures in per_seed], axis=0)
        replicate_means = np.array([np.mean([figures[name] for figures in draw], axis=0) for draw in per_replicate])
        low, high = np.quantile(replicate_means, [(1 - level) / 2, (1 + level) / 2], axis=0)
        estimates[name] = _plain(mean)
        estimates[f"{name}_ci"] = _plain(np.stack([low, high], axis=-1), leaf_ndim=1)
    return estimates


def _floats(values):
    """Plain floats (JSON-serialisable, e.g. from numpy scalars), keeping None, at any nesting."""
    if values is None or isinstance(values, (list, tuple)):
        return None if values is None else [_floats(value) for value in values]
    return float(values)


def results_dict(method: str, tasks: Sequence[str], estimates: Mapping, *, seeds: Sequence[int] | None = None,
                 metrics: Mapping[str, str] | None = None, trivial_rule: Mapping[str, str] | None = None,
                 switch_accuracy: Sequence[float | None] | None = None) -> dict:
    """The ``results.json`` record of one method: task order, main metric per task (``metrics``, else
    each task's fallback), the seeds, then each of :data:`FIGURES` from ``estimates`` (from
    :func:`bootstrap_intervals`, or :func:`continual_figures` of one run) followed by its interval
    ``<name>_ci`` (None without one), the trivial baseline's rule per task, and the switch accuracy per
    stage in percent (mean over seeds; None when the method does not route)."""
    matrix = estimates["matrix"]
    if len(tasks) != len(matrix):
        raise ValueError(f"{len(tasks)} task names for a score matrix of {len(matrix)} stages")
    if switch_accuracy is not None and len(switch_accuracy) != len(tasks):
        raise ValueError(f"{len(switch_accuracy)} switch accuracies for {len(tasks)} stages")
    record = {
        "method": method,
        "tasks": list(tasks),
        "metric": {task: main_metric(task, (metrics or {}).get(task)) for task in tasks},
        "seeds": None if seeds is None else [int(seed) for seed in seeds],
    }
    for name in FIGURES:
        record[name] = _floats(estimates.get(name))
        record[f"{name}_ci"] = estimates.get(f"{name}_ci")
    record["trivial_rule"] = None if trivial_rule is None else dict(trivial_rule)
    record["switch_accuracy"] = _floats(switch_accuracy)
    return record
