"""Report of a continual run: a markdown table comparing methods and plots of each method's score matrix.

Reads the records :func:`switchcit.cit.metrics.results_dict` builds (``RUN_DIR/<method>/results.json``)
and writes ``RUN_DIR/report.md``, ``RUN_DIR/<method>/matrix.png`` (heatmap of R[t][i]) and
``RUN_DIR/<method>/curves.png`` (each task's score across stages).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_report"]

CONTINUAL_METRICS = ("AP", "BWT", "FWT", "forgetting")
MISSING = "—"


def _cell(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines, first column left-aligned and the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(method_results: Mapping[str, Mapping]) -> str:
    # Methods normally share one task stream; the union keeps the table whole if they do not.
    tasks = list(dict.fromkeys(task for results in method_results.values() for task in results["tasks"]))
    metric_of = {task: name for results in method_results.values() for task, name in results["metric"].items()}
    lines = [
        "# Continual instruction tuning results", "",
        "R[t][i] is the score on task i after training through task t (0–100, the task's main metric). "
        "AP is the mean final score; BWT < 0 and forgetting > 0 mean that earlier tasks got worse; "
        f"FWT compares a task before its own training with the untrained model. {MISSING} = not available.", "",
    ]
    summary = []
    for method, results in method_results.items():
        final = dict(zip(results["tasks"], results["matrix"][-1]))
        summary.append([method] + [_cell(results[name]) for name in CONTINUAL_METRICS]
                       + [_cell(final.get(task)) for task in tasks])
    lines += _table(["method", *CONTINUAL_METRICS, *(f"{task} ({metric_of[task]})" for task in tasks)], summary)

    routed = {method: results for method, results in method_results.items() if results.get("switch_accuracy")}
    if routed:
        n_stages = max(len(results["switch_accuracy"]) for results in routed.values())
        lines += ["", "## Switch accuracy per stage (%)", "",
                  "Stage t: after training through the t-th task of the method's stream.", ""]
        rows = [[method] + [_cell(value) for value in results["switch_accuracy"]]
                + [MISSING] * (n_stages - len(results["switch_accuracy"])) for method, results in routed.items()]
        lines += _table(["method", *map(str, range(1, n_stages + 1))], rows)

    for method, results in method_results.items():
        rows = [["base model", *map(_cell, results["baseline"])]] if results.get("baseline") else []
        rows += [[f"after {task}", *map(_cell, row)] for task, row in zip(results["tasks"], results["matrix"])]
        lines += ["", f"## {method}: R[t][i]", ""]
        lines += _table(["stage", *results["tasks"]], rows)
    return "\n".join(lines) + "\n"


def _as_array(values: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Scores as floats with NaN where an entry is None (not evaluated)."""
    return np.array([[np.nan if value is None else value for value in row] for row in values], dtype=float)


def _plot_matrix(method: str, results: Mapping, path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    tasks, scores = results["tasks"], _as_array(results["matrix"])
    figure = Figure(figsize=(2 + 1.4 * len(tasks), 1.5 + 0.8 * len(tasks)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(scores, cmap=colormaps["viridis"].with_extremes(bad="lightgray"), vmin=0, vmax=100)
    axes.set_xticks(range(len(tasks)), labels=[f"{task}\n({results['metric'][task]})" for task in tasks])
    axes.set_yticks(range(len(tasks)), labels=[f"after {task}" for task in tasks])
    axes.set_xlabel("evaluated task")
    for (stage, task), score in np.ndenumerate(scores):
        if not np.isnan(score):
            axes.text(task, stage, f"{score:.1f}", ha="center", va="center", color="white" if score < 60 else "black")
    axes.set_title(f"{method}: R[t][i]")
    figure.colorbar(image, ax=axes, label="score")
    figure.savefig(path, dpi=100)
    return path


def _plot_curves(method: str, results: Mapping, path: Path) -> Path:
    from matplotlib.figure import Figure

    tasks, scores = results["tasks"], _as_array(results["matrix"])
    baseline = results.get("baseline")
    labels = (["base model"] if baseline else []) + [f"after {task}" for task in tasks]
    figure = Figure(figsize=(2.5 + 1.2 * len(labels), 4), layout="constrained")
    axes = figure.add_subplot()
    for i, task in enumerate(tasks):
        curve = list(scores[:, i])
        if baseline:
            curve.insert(0, float("nan") if baseline[i] is None else baseline[i])
        axes.plot(range(len(labels)), curve, marker="o", label=f"{task} ({results['metric'][task]})")
    axes.set_xticks(range(len(labels)), labels=labels)
    axes.set_ylabel("score")
    axes.set_title(f"{method}: scores across the stream")
    axes.legend()
    figure.savefig(path, dpi=100)
    return path


def write_report(run_dir: str | Path, method_results: Mapping[str, Mapping]) -> list[Path]:
    """Write ``report.md`` and each method's ``matrix.png`` and ``curves.png`` under ``run_dir``;
    ``method_results`` maps a method to its :func:`switchcit.cit.metrics.results_dict` record. Returns the
    written paths, the report first."""
    if not method_results:
        raise ValueError("no method results to report")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = run_dir / "report.md"
    report.write_text(_markdown(method_results))
    paths = [report]
    for method, results in method_results.items():
        folder = run_dir / method
        folder.mkdir(exist_ok=True)
        paths += [_plot_matrix(method, results, folder / "matrix.png"),
                  _plot_curves(method, results, folder / "curves.png")]
    return paths
