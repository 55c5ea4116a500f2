"""Report of a continual run: a markdown table comparing methods (each figure with its interval, the
base model and the trivial baseline beside them) and plots.

Reads the records :func:`switchcit.cit.metrics.results_dict` builds (``RUN_DIR/<method>/results.json``)
and writes ``RUN_DIR/report.md``, ``RUN_DIR/methods.png`` (AP, BWT and FWT of every method, bars with
interval whiskers), ``RUN_DIR/<method>/matrix.png`` (heatmap of R[t][i]) and
``RUN_DIR/<method>/curves.png`` (each task's score across stages).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["figure_text", "write_report"]

CONTINUAL_METRICS = ("AP", "BWT", "FWT", "forgetting")
COMPARED = ("AP", "BWT", "FWT")  # the cross-method plot
MISSING = "—"


def _cell(value: float | None, interval: Sequence[float] | None = None) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}" + ("" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]")


def figure_text(results: Mapping, name: str) -> str:
    """A figure of a ``results.json`` record as text: ``61.67 [58.10, 65.20]`` (with its interval), or —."""
    return _cell(results[name], results.get(f"{name}_ci"))


def _cells(values: Sequence[float | None] | None, intervals: Sequence | None) -> list[str]:
    """A row of scores with their intervals (either may be missing)."""
    return [_cell(value, None if intervals is None else intervals[i]) for i, value in enumerate(values or [])]


def _by_task(results: Mapping, values: Sequence[float | None], intervals: Sequence | None) -> dict[str, str]:
    return dict(zip(results["tasks"], _cells(values, intervals)))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines, first column left-aligned and the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(method_results: Mapping[str, Mapping]) -> str:
    # Methods normally share one task stream; the union keeps the table whole if they do not.
    tasks = list(dict.fromkeys(task for results in method_results.values() for task in results["tasks"]))
    metric_of = {task: name for results in method_results.values() for task, name in results["metric"].items()}
    first = next(iter(method_results.values()))
    seeds = first.get("seeds")
    lines = [
        "# Continual instruction tuning results", "",
        "R[t][i] is the score on task i after training through task t (0–100, the task's main metric). "
        "AP is the mean final score; BWT < 0 and forgetting > 0 mean that earlier tasks got worse; "
        f"FWT compares a task before its own training with the untrained model. {MISSING} = not available.", "",
    ]
    if seeds:
        lines += [f"Seeds: {', '.join(map(str, seeds))}. Each figure is the mean over the seeds, [in brackets] its "
                  "95 % bootstrap interval: seeds and each task's test examples resampled, the corpus metric "
                  "recomputed for every cell.", ""]
    summary = []
    for method, results in method_results.items():
        final = _by_task(results, results["matrix"][-1], (results.get("matrix_ci") or [None])[-1])
        summary.append([method] + [figure_text(results, name) for name in CONTINUAL_METRICS]
                       + [final.get(task, MISSING) for task in tasks])
    for label, key in (("base model", "baseline"), ("trivial baseline", "trivial_baseline")):
        if first.get(key):  # the same for every method of the run
            scores = _by_task(first, first[key], first.get(f"{key}_ci"))
            summary.append([label] + [MISSING] * len(CONTINUAL_METRICS) + [scores.get(task, MISSING) for task in tasks])
    lines += _table(["method", *CONTINUAL_METRICS, *(f"{task} ({metric_of[task]})" for task in tasks)], summary)
    if first.get("trivial_rule"):
        rules = "; ".join(f"{task}: {rule}" for task, rule in first["trivial_rule"].items())
        lines += ["", f"Trivial baseline: {rules} (a classification metric: the train split's majority class; "
                      "else the input copied)."]
    lines += ["", "![AP, BWT and FWT per method](methods.png)", "",
              "Per method: " + ", ".join(f"[{method}: R[t][i]]({method}/matrix.png)" for method in method_results)]

    routed = {method: results for method, results in method_results.items() if results.get("switch_accuracy")}
    if routed:
        n_stages = max(len(results["switch_accuracy"]) for results in routed.values())
        lines += ["", "## Switch accuracy per stage (%)", "",
                  "Stage t: after training through the t-th task of the method's stream.", ""]
        rows = [[method] + [_cell(value) for value in results["switch_accuracy"]]
                + [MISSING] * (n_stages - len(results["switch_accuracy"])) for method, results in routed.items()]
        lines += _table(["method", *map(str, range(1, n_stages + 1))], rows)

    for method, results in method_results.items():
        rows = [["base model", *_cells(results["baseline"], results.get("baseline_ci"))]] if results.get(
            "baseline") else []
        intervals = results.get("matrix_ci") or [None] * len(results["matrix"])
        rows += [[f"after {task}", *_cells(row, row_intervals)]
                 for task, row, row_intervals in zip(results["tasks"], results["matrix"], intervals)]
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


def _plot_methods(method_results: Mapping[str, Mapping], path: Path) -> Path:
    """AP, BWT and FWT of every method side by side, whiskers over each figure's interval."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3 + 1.2 * len(COMPARED) * max(1, len(method_results) / 2), 4), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(method_results)
    for number, (method, results) in enumerate(method_results.items()):
        values = [np.nan if results[name] is None else results[name] for name in COMPARED]
        intervals = [results.get(f"{name}_ci") for name in COMPARED]
        whiskers = np.array([[0.0, 0.0] if interval is None or np.isnan(value) else
                             [value - interval[0], interval[1] - value] for value, interval in zip(values, intervals)])
        axes.bar(np.arange(len(COMPARED)) + (number - (len(method_results) - 1) / 2) * width, values, width,
                 yerr=whiskers.T, capsize=3, label=method)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(COMPARED)), labels=COMPARED)
    axes.set_ylabel("points (0–100 scale)")
    seeds = next(iter(method_results.values())).get("seeds") or []
    axes.set_title(f"methods compared ({len(seeds) or 1} seed{'' if len(seeds) <= 1 else 's'}; whiskers: 95 % "
                   "interval)")
    axes.legend()
    figure.savefig(path, dpi=100)
    return path


def write_report(run_dir: str | Path, method_results: Mapping[str, Mapping]) -> list[Path]:
    """Write ``report.md``, ``methods.png`` and each method's ``matrix.png`` and ``curves.png`` under
    ``run_dir``; ``method_results`` maps a method to its :func:`switchcit.cit.metrics.results_dict`
    record. Returns the written paths, the report first, then ``methods.png``."""
    if not method_results:
        raise ValueError("no method results to report")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = run_dir / "report.md"
    report.write_text(_markdown(method_results))
    paths = [report, _plot_methods(method_results, run_dir / "methods.png")]
    for method, results in method_results.items():
        folder = run_dir / method
        folder.mkdir(exist_ok=True)
        paths += [_plot_matrix(method, results, folder / "matrix.png"),
                  _plot_curves(method, results, folder / "curves.png")]
    return paths
