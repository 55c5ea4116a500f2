"""``switchcit train`` and ``switchcit eval``: the command-line face of :mod:`switchcit.cit`.

    switchcit train --base MODEL_DIR --tasks DIR[,DIR...] --methods switchcit,sequential --out RUN_DIR
    switchcit eval RUN_DIR [--predictions FILE]
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from switchcit.cit.config import TrainConfig, add_config_arguments, config_from_args
from switchcit.cit.methods import __doc__ as METHODS_DOC
from switchcit.cli import command_error

__all__ = ["add_command", "log_to", "print_summary", "reevaluate"]

logger = logging.getLogger("switchcit")


def add_command(commands) -> None:
    parser = commands.add_parser(
        "train", help="continual instruction tuning over a task stream, comparing methods",
        description=__doc__ + "\n" + METHODS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.set_defaults(run=_train)
    parser = commands.add_parser("eval", help="re-evaluate the final adapters of a saved run",
                                 description=reevaluate.__doc__)
    parser.add_argument("run_dir", type=Path, help="the --out folder of `switchcit train`")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="write one JSON line per test example (method, task, prompt, adapter, max_tokens, output, "
                             "reference, score; seed with --seeds)")
    parser.set_defaults(run=lambda args: _print_scores(reevaluate(args.run_dir, args.predictions)))


def _train(args: argparse.Namespace) -> None:
    from switchcit.cit.trainer import train

    try:
        config = config_from_args(args)
        config.validate()
    except (ValueError, FileNotFoundError) as err:
        command_error("train", err)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        log_to(Path(config.out) / "train.log")  # --out may come from --config
    results = train(config)
    if main_process:
        print_summary(results, Path(config.out))


def reevaluate(run_dir: str | Path, predictions: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Scores of each method's final adapters on its tasks' eval sets, written to
    ``RUN_DIR/<method>/eval.json`` (compare with the last row of its ``results.json``; a run with
    ``--seeds``: each seed's in ``RUN_DIR/seed-<s>/<method>/eval.json``, their mean in
    ``RUN_DIR/<method>/eval.json``); with ``--predictions FILE``, every test example's record, one JSON
    line each (with its ``seed`` in a run with ``--seeds``)."""
    import numpy as np

    from switchcit.cit.checkpoint import write_json_atomic
    from switchcit.cit.evaluation import write_predictions
    from switchcit.cit.results import seed_runs
    from switchcit.cit.trainer import Trainer

    run_dir = Path(run_dir)
    try:
        config = TrainConfig.load(run_dir)
        config.validate()
    except (ValueError, FileNotFoundError) as err:
        command_error("eval", err)
    per_seed, records = {method: [] for method in config.methods}, []
    for run in seed_runs(config):
        trainer = Trainer(run)
        for method in config.methods:
            scores, method_records = trainer.evaluate_saved(method)
            write_json_atomic(Path(run.out) / method / "eval.json", scores)
            per_seed[method].append(scores)
            tag = {"seed": run.seed} if config.seeds else {}
            records += [{"method": method} | tag | record for record in method_records]
            logger.info("%s%s: %s", method, f" (seed {run.seed})" if config.seeds else "",
                        ", ".join(f"{t} {s:.2f}" for t, s in scores.items()))
    final = {method: {task: float(score) for task, score in
                      zip(config.task_names, np.mean([[s[t] for t in config.task_names] for s in seeds], axis=0))}
             for method, seeds in per_seed.items()}
    if config.seeds:
        for method, scores in final.items():
            write_json_atomic(run_dir / method / "eval.json", scores)
    if predictions is not None:
        write_predictions(predictions, records)
    return final


def _print_scores(final: dict[str, dict[str, float]]) -> None:
    for method, scores in final.items():
        print(f"{method:12s} " + "  ".join(f"{task} {score:6.2f}" for task, score in scores.items()))


def print_summary(results: dict[str, dict], out: Path) -> None:
    """The methods' AP, BWT and FWT (with their 95 % intervals) and final per-task scores, the base
    model's and the trivial baseline's scores, and where the report and plots are."""
    from switchcit.cit.report import figure_text

    def fmt(value):
        return "—" if value is None else f"{value:.2f}"

    first = next(iter(results.values()))
    seeds = first.get("seeds") or []
    print(f"\n{len(seeds) or 1} seed(s); [95 % interval]")
    print(f"{'method':16s} {'AP':>22s} {'BWT':>22s} {'FWT':>22s}  " + "  ".join(first["tasks"]))
    for method, r in results.items():
        print(f"{method:16s} " + " ".join(f"{figure_text(r, name):>22s}" for name in ("AP", "BWT", "FWT")) + "  "
              + "  ".join(fmt(s) for s in r["matrix"][-1]))
    for label, key in (("base model", "baseline"), ("trivial baseline", "trivial_baseline")):
        if first.get(key):
            print(f"{label:16s} " + " ".join(f"{'—':>22s}" for _ in range(3)) + "  "
                  + "  ".join(fmt(s) for s in first[key]))
    plots = sorted(out.glob("*.png")) + sorted(out.glob("*/*.png"))
    print(f"report: {out / 'report.md'}; plots: {', '.join(map(str, plots))}")


def log_to(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per message, whatever the root logger does
    if not logger.handlers:
        for handler in (logging.StreamHandler(), logging.FileHandler(path)):
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
