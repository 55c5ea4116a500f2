"""The continual-learning methods, as data: what each trains on, which adapter it trains, and how its
evaluation routes prompts. The trainer has no branch on a method's name.

* ``switchcit``  — a new LoRA adapter per task on the frozen base; the switch routes each prompt;
* ``oracle``     — the same per-task adapters, routed by the true task (the switch's upper bound);
* ``sequential`` — one LoRA trained on task after task (the forgetting baseline);
* ``replay``     — one LoRA trained on each task plus the retained samples of the earlier ones (a fixed
  share of each batch, ``--replay-rate``: mixed into the task's data by size, a 1 % sample would
  make up about 1 % of the batches);
* ``multitask``  — one LoRA trained once on all tasks together (the upper bound; last stage only).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["METHODS", "Method"]


@dataclass(frozen=True)
class Method:
    name: str
    per_task_adapters: bool = False  # an adapter per task, named after it (trained once, shared)
    routing: str = "own"  # "switch": the switch picks; "true_task": the prompt's own task; "own": its one adapter
    replays: bool = False  # adds the earlier tasks' retained samples to each task's data
    joint: bool = False  # trained once, at the last stage, on every task (steps × tasks)

    def adapter(self, tasks: Sequence[str], stage: int) -> str:
        """The adapter this method trains at ``stage``."""
        return tasks[stage] if self.per_task_adapters else self.name

    def trains_at(self, tasks: Sequence[str], stage: int) -> bool:
        return not self.joint or stage == len(tasks) - 1

    def steps(self, steps_per_task: int, tasks: Sequence[str]) -> int:
        return steps_per_task * (len(tasks) if self.joint else 1)

    def training_examples(self, tasks: Sequence[str], stage: int, train_sets: Mapping[str, list],
                          retained: Mapping[str, list]) -> tuple[list, list]:
        """``(examples, replayed)``: what the method trains on at ``stage``, and the earlier tasks'
        retained examples it replays (empty unless it replays)."""
        if self.joint:
            return [e for t in tasks for e in train_sets[t]], []
        replayed = [e for earlier in tasks[:stage] for e in retained[earlier]] if self.replays else []
        return train_sets[tasks[stage]], replayed

    def eval_adapters(self, tasks: Sequence[str], stage: int, prompt_tasks: Sequence[str]) -> list[str | None] | None:
        """The adapter of each evaluated prompt (``None``: the base model); ``None`` for all: the switch picks."""
        if self.routing == "switch":
            return None
        if self.routing == "true_task":
            seen = set(tasks[: stage + 1])  # a task's own adapter, once it has one
            return [task if task in seen else None for task in prompt_tasks]
        return [self.name] * len(prompt_tasks)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("switchcit", per_task_adapters=True, routing="switch"),
    Method("oracle", per_task_adapters=True, routing="true_task"),
    Method("sequential"),
    Method("replay", replays=True),
    Method("multitask", joint=True),
)}
