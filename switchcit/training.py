"""The continual instruction tuning loop: one command compares methods on the same task stream.

    switchcit train --base MODEL_DIR --tasks DIR[,DIR...] --methods switchcit,sequential --out RUN_DIR

For each task of the stream, in order, and each method:

* ``switchcit``  — a new LoRA adapter for the task on the frozen base; the switch learns the task from
  a retained sample (``--retention``); evaluation routes every prompt by the switch;
* ``oracle``     — the same per-task adapters, routed by the true task (the switch's upper bound);
* ``sequential`` — one LoRA trained on task after task (the forgetting baseline);
* ``replay``     — one LoRA trained on each task plus the retained samples of the earlier ones;
* ``multitask``  — one LoRA trained once on all tasks together (the upper bound; last stage only);

then every task is evaluated (mixed-task batched generation through the multi-LoRA kernels), filling
row t of R[t][i]. ``RUN_DIR/<method>/results.json`` holds R, AP, BWT, FWT, forgetting (and the
switch's accuracy per stage); ``RUN_DIR/report.md`` and PNG plots compare the methods;
``RUN_DIR/switchcit/`` is what ``switchcit serve`` loads.

Restartable: the same command continues a killed run. Progress is kept in ``RUN_DIR/<method>/state.json``
(stages done, their scores) and ``checkpoint.safetensors`` (the adapter being trained, its optimizer
and step), each replaced atomically; batches, dropout and initialisation are seeded per (stage, step),
so a resumed run ends with the same adapters and results. Under ``torchrun`` the training steps run
with DistributedDataParallel (each rank takes its share of every batch); rank 0 evaluates and writes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from switchcit.data import Example, load_task, retained_sample, task_name
from switchcit.evaluation import evaluate_tasks, routing_accuracy
from switchcit.metrics import results_dict
from switchcit.modules import BASE
from switchcit.switch import chat_text

__all__ = ["METHODS", "TrainConfig", "Trainer", "add_command", "train"]

logger = logging.getLogger("switchcit")

METHODS = ("switchcit", "oracle", "sequential", "replay", "multitask")
PER_TASK_ADAPTERS = ("switchcit", "oracle")  # these two share the adapters (trained once)
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
IGNORE = -100  # label of tokens outside the target (prompt, padding)


@dataclass
class TrainConfig:
    base: str  # a transformers model folder
    tasks: list[str]  # in stream order: folders (<folder>/{train,test}.jsonl) or hf:NAME[:CONFIG] datasets
    out: str
    methods: list[str] = field(default_factory=lambda: ["switchcit", "sequential"])
    steps: int = 100  # optimizer steps per task (multitask: steps × tasks)
    batch_size: int = 8
    lr: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    retention: float = 0.01  # retained fraction of each task's train split (switch, replay)
    train_examples: int | None = None  # cap per task (None: the whole train split)
    eval_examples: int = 50  # test examples per task evaluated at every stage
    max_length: int = 256  # prompt + target tokens in training
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    checkpoint_every: int = 25
    switch_feature: str = "last_token"
    fields: dict[str, str] = field(default_factory=dict)  # our field name → the files' key
    seed: int = 0

    def validate(self) -> None:
        """Fail fast, before any model is loaded: unknown methods, bad numbers, missing or empty task
        folders, unknown field names."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.tasks:
            raise ValueError("the task stream is empty: give --tasks DIR[,DIR...]")
        for name in ("steps", "batch_size", "rank", "eval_examples", "max_length", "max_new_tokens", "eval_batch_size",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 < self.retention <= 1 and 0 <= self.dropout < 1):
            raise ValueError(f"need lr > 0, 0 < retention ≤ 1, 0 ≤ dropout < 1 (got {self.lr}, {self.retention}, {self.dropout})")
        if not (Path(self.base) / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {self.base} has no config.json")
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError(f"task folder names must differ (they name the adapters): {names}")
        for folder in self.tasks:
            for split in ("train", "test"):
                load_task(folder, split, self.fields, limit=1)  # raises a clear error on a bad folder

    @property
    def task_names(self) -> list[str]:
        return [task_name(t) for t in self.tasks]

    def save(self) -> None:
        _write_json(Path(self.out) / CONFIG_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        return cls(**json.loads((Path(run_dir) / CONFIG_FILE).read_text()))


class Trainer:
    """Holds the base model with every method's adapters (one PEFT model), the data and the switch."""

    def __init__(self, config: TrainConfig):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from switchcit.hf import accelerate

        config.validate()
        self.config, self.out = config, Path(config.out)
        self.rank, self.world = _distributed_rank_and_size()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(config.base)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(config.base).to(self.device)
        self.lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=list(config.target_modules), task_type="CAUSAL_LM")
        torch.manual_seed(config.seed)
        self.model = accelerate(get_peft_model(base, self.lora, adapter_name="unused"))
        self.model.delete_adapter("unused")  # adapters are added per method and task below
        self.tasks = config.task_names
        self.train_sets = {n: load_task(t, "train", config.fields, config.train_examples) for n, t in zip(self.tasks, config.tasks)}
        self.eval_sets = {n: _sample(load_task(t, "test", config.fields), config.eval_examples, config.seed)
                          for n, t in zip(self.tasks, config.tasks)}
        self.retained = {n: retained_sample(examples, config.retention, config.seed) for n, examples in self.train_sets.items()}
        self.switch = None  # the switch over the tasks seen so far (method switchcit)
        self.last_switch_accuracy: float | None = None

    # ------------------------------------------------------------------ the stream

    def run(self) -> dict[str, dict]:
        """Train and evaluate every method through the whole stream (continuing a killed run)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.config.save()
        baseline = self.baseline()
        results = {}
        for method in self.config.methods:
            state = self._load_state(method)
            for stage in range(state["stages_done"], len(self.tasks)):
                state["matrix"].append(self.stage(method, stage))
                if method == "switchcit":
                    state["switch_accuracy"].append(self.last_switch_accuracy)
                state["stages_done"] = stage + 1
                if self.rank == 0:
                    _write_json(self.out / method / STATE_FILE, state)
            results[method] = results_dict(method, self.tasks, state["matrix"], baseline,
                                           state["switch_accuracy"] if method == "switchcit" else None)
            if self.rank == 0:
                _write_json(self.out / method / "results.json", results[method])
                logger.info("%s: AP %.2f, BWT %s", method, results[method]["AP"], _fmt(results[method]["BWT"]))
        if self.rank == 0:
            from switchcit.report import write_report

            paths = write_report(self.out, results)
            logger.info("report: %s", ", ".join(map(str, paths)))
        return results

    def stage(self, method: str, stage: int) -> list[float | None]:
        """Train ``method`` on task ``stage`` (resuming from its checkpoint), then evaluate every task."""
        if method == "multitask" and stage < len(self.tasks) - 1:
            return [None] * len(self.tasks)  # trained once, on everything, at the last stage
        logger.info("[%s] stage %d/%d: %s", method, stage + 1, len(self.tasks), self.tasks[stage])
        trains = method not in PER_TASK_ADAPTERS or method == self._per_task_owner()  # per-task adapters: once
        adapter = self._prepare_adapter(method, stage, trains)
        if trains:
            self.train_adapter(method, adapter, stage, self._training_examples(method, stage))
            if method in PER_TASK_ADAPTERS and self.rank == 0:
                self._save_serving_folder(stage)
        _barrier()
        return self.evaluate(method, stage)

    def _per_task_owner(self) -> str:
        return next(m for m in self.config.methods if m in PER_TASK_ADAPTERS)

    def _adapter_name(self, method: str, stage: int) -> str:
        return self.tasks[stage] if method in PER_TASK_ADAPTERS else method

    def _training_examples(self, method: str, stage: int) -> list[Example]:
        task = self.tasks[stage]
        if method == "replay":
            return self.train_sets[task] + [e for earlier in self.tasks[:stage] for e in self.retained[earlier]]
        if method == "multitask":
            return [e for t in self.tasks for e in self.train_sets[t]]
        return self.train_sets[task]

    def _prepare_adapter(self, method: str, stage: int, trains: bool = True) -> str:
        """Make sure every adapter ``method`` needs at ``stage`` is in the model: saved per-task adapters
        from their folders (after a restart, or trained by the other per-task method), the one to
        train seeded-fresh (its checkpoint, if any, is loaded when training starts)."""
        name = self._adapter_name(method, stage)
        if method in PER_TASK_ADAPTERS:
            for task in self.tasks[: stage + (0 if trains else 1)]:
                if task not in self.model.peft_config:
                    self.model.load_adapter(str(self._adapter_folder(task)), adapter_name=task)
        if name not in self.model.peft_config:
            torch.manual_seed(_seed(self.config.seed, "init", name))
            self.model.add_adapter(name, self.lora)
        return name

    # ------------------------------------------------------------------ training

    def train_adapter(self, method: str, adapter: str, stage: int, examples: list[Example]) -> None:
        """``steps`` AdamW steps on ``adapter`` alone (base and other adapters frozen), loss on the
        target tokens only, from the method's checkpoint when it has one for this stage."""
        config = self.config
        steps = config.steps * (len(self.tasks) if method == "multitask" else 1)
        self.model.set_adapter(adapter)  # active and the only trainable one
        params = self._adapter_params(adapter)
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
        start = self._resume(method, adapter, stage, params, optimizer)
        if start >= steps:
            return
        network = self.model
        if self.world > 1:
            network = nn.parallel.DistributedDataParallel(self.model)
        self.model.train()
        progress = _progress(range(start, steps), f"{method}/{self.tasks[stage]}", initial=start, total=steps,
                             disable=self.rank != 0)
        for step in progress:
            torch.manual_seed(_seed(config.seed, method, stage, step, self.rank))  # dropout
            batch = self._batch(examples, _seed(config.seed, "batch", method, stage, step))
            loss = _target_loss(network, **{k: v.to(self.device) for k, v in batch.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
                if self.rank == 0:
                    self._save_checkpoint(method, adapter, stage, step + 1, params, optimizer)
                _barrier()
        self.model.eval()

    @contextlib.contextmanager
    def _base_only(self):
        """Every LoRA layer off (the frozen base), also while no adapter is active yet."""
        self.model.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.model.base_model.enable_adapter_layers()

    def _adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if f".{adapter}." in n}

    def _batch(self, examples: list[Example], seed: int) -> dict[str, torch.Tensor]:
        """This rank's share of a batch drawn (with replacement) by ``seed`` — the same on every rank
        and after a restart."""
        if self.config.batch_size % self.world:
            raise ValueError(f"batch size {self.config.batch_size} does not split over {self.world} processes")
        picks = random.Random(seed).choices(range(len(examples)), k=self.config.batch_size)
        share = picks[self.rank :: self.world]
        return collate([encode_example(self.tokenizer, examples[i], self.config.max_length) for i in share],
                       self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, method, adapter, stage, step, params, optimizer) -> None:
        from safetensors.torch import save_file

        tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
        for name, p in params.items():
            for key, value in optimizer.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().reshape(-1).contiguous()
        meta = {"method": method, "adapter": adapter, "stage": str(stage), "step": str(step)}
        path = self.out / method / CHECKPOINT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path.with_suffix(".tmp")), metadata=meta)
        os.replace(path.with_suffix(".tmp"), path)

    def _resume(self, method, adapter, stage, params, optimizer) -> int:
        """The step to start from: the checkpoint's, if it is this stage's; for a method that keeps
        training one adapter, the previous stage's final weights (fresh optimizer)."""
        from safetensors import safe_open

        path = self.out / method / CHECKPOINT_FILE
        if not path.is_file():
            return 0
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            same_stage = meta["adapter"] == adapter and int(meta["stage"]) == stage
            continues = meta["adapter"] == adapter and int(meta["stage"]) < stage
            if not (same_stage or continues):
                return 0
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(f.get_tensor(f"param/{name}"))
            if continues:
                return 0
            for name, p in params.items():
                optimizer.state[p] = {key: f.get_tensor(f"optim/{name}/{key}").reshape(() if key == "step" else p.shape).to(p.device)
                                      for key in ("step", "exp_avg", "exp_avg_sq")}
            step = int(meta["step"])
        logger.info("[%s] resuming %s at step %d", method, adapter, step)
        return step

    def _load_state(self, method: str) -> dict:
        path = self.out / method / STATE_FILE
        if path.is_file():
            return json.loads(path.read_text())
        return {"stages_done": 0, "matrix": [], "switch_accuracy": []}

    # ------------------------------------------------------------------ evaluation

    def baseline(self) -> list[float]:
        """The base model's score on every task (b_i of FWT), computed once per run."""
        path = self.out / "baseline.json"
        if not path.is_file():
            if self.rank == 0:
                with self._base_only():
                    scores, _ = evaluate_tasks(self.model.base_model.model, self.tokenizer, self.eval_sets,
                                               lambda tasks, prompts: None, max_new_tokens=self.config.max_new_tokens,
                                               batch_size=self.config.eval_batch_size)
                _write_json(path, scores)
            _barrier()
        scores = json.loads(path.read_text())
        return [scores[t] for t in self.tasks]

    def evaluate(self, method: str, stage: int) -> list[float | None]:
        """Row ``stage`` of R: every task's score with the adapters ``method`` has after ``stage``."""
        if self.rank != 0:
            _barrier()
            return [None] * len(self.tasks)  # rank 0 holds the results
        if method == "switchcit":
            self.switch = self._train_switch(stage)
            choose = self._switch_routes
        elif method == "oracle":
            seen = set(self.tasks[: stage + 1])  # the true task's adapter, once it has one
            choose = lambda tasks, prompts: [task if task in seen else BASE for task in tasks]
        else:
            choose = lambda tasks, prompts: [method] * len(prompts)  # one adapter for all
        scores, routed = self._evaluate(choose)
        if method == "switchcit":
            self.last_switch_accuracy = routing_accuracy(routed, self.tasks[: stage + 1])
            logger.info("[switchcit] switch accuracy %.2f%%", self.last_switch_accuracy)
        logger.info("[%s] after %s: %s", method, self.tasks[stage], ", ".join(f"{t} {s:.2f}" for t, s in scores.items()))
        _barrier()
        return [scores[t] for t in self.tasks]

    def _evaluate(self, choose) -> tuple[dict[str, float], dict[str, list[str]]]:
        self.model.set_adapter(next(iter(self.model.peft_config)))  # PEFT's generate wants one active; names route
        return evaluate_tasks(self.model, self.tokenizer, self.eval_sets, choose,
                              max_new_tokens=self.config.max_new_tokens, batch_size=self.config.eval_batch_size)

    def evaluate_saved(self, method: str) -> tuple[dict[str, float], dict[str, list[str]]]:
        """The final stage of ``method`` from its saved adapters (``switchcit eval``)."""
        last = len(self.tasks) - 1
        self._prepare_adapter(method, last, trains=False)
        if method not in PER_TASK_ADAPTERS:  # its final weights are in its last checkpoint
            self._resume(method, method, last + 1, self._adapter_params(method), optimizer=None)
        scores = self.evaluate(method, last)
        return dict(zip(self.tasks, scores)), {}

    def _train_switch(self, stage: int):
        """The switch over the tasks seen so far, from their retained prompts only."""
        from switchcit.switch import Switch

        seen = self.tasks[: stage + 1]
        prompts = [e.prompt for t in seen for e in self.retained[t]]
        labels = [t for t in seen for _ in self.retained[t]]
        with self._base_only():  # features of the frozen base
            switch = Switch.train(prompts, labels, encoder=self.model.base_model.model, tokenizer=self.tokenizer,
                                  feature=self.config.switch_feature, seed=self.config.seed)
        switch.save(self.out / "switchcit" / "switch")
        return switch

    def _switch_routes(self, tasks, prompts) -> list[str]:
        with self._base_only():
            routed = self.switch.route(prompts)
        return [task if task is not None else BASE for task in routed]

    # ------------------------------------------------------------------ the serving folder

    def _adapter_folder(self, task: str) -> Path:
        return self.out / "switchcit" / "adapters" / task

    def _save_serving_folder(self, stage: int) -> None:
        """``RUN_DIR/switchcit/``: the task's adapter as a PEFT folder, and the manifest."""
        from switchcit.runs import write_run_manifest

        task = self.tasks[stage]
        folder = self._adapter_folder(task)
        self.model.save_pretrained(str(folder.parent), selected_adapters=[task])
        seen = self.tasks[: stage + 1]
        write_run_manifest(self.out / "switchcit", Path(self.config.base).resolve(),
                           {t: self._adapter_folder(t) for t in seen}, self.out / "switchcit" / "switch")


def encode_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the chat-formatted prompt then the target and EOS, labels only on the
    target; the prompt is cut from the left when the pair is too long."""
    prompt = tokenizer(chat_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target = target[: max_length // 2] if len(prompt) + len(target) > max_length else target
    prompt = prompt[-(max_length - len(target)):]
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), IGNORE)
    attention_mask = torch.zeros(len(pairs), length, dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _target_loss(model, input_ids, labels, attention_mask) -> torch.Tensor:
    """Mean over examples of each example's mean target-token loss: with equal shares per rank, the
    data-parallel average of gradients equals the single-process gradient of the whole batch. Logits
    are computed only from the first position that predicts a target token on (the vocabulary
    projection dominates the cost when prompts are long and targets short)."""
    targets = labels[:, 1:]
    predicting = (targets != IGNORE).any(0).nonzero()
    keep = targets.shape[1] - int(predicting[0]) if len(predicting) else 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep + 1).logits[:, :-1].float()
    targets = targets[:, -keep:]
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counted = (targets != IGNORE).sum(1).clamp(min=1)
    return (token_loss.sum(1) / counted).mean()


# --------------------------------------------------------------------------------------------------
# small helpers


def _seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() of str differs between processes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    return retained_sample(examples, min(1.0, count / len(examples)), seed)[:count]


def _write_json(path: Path, value) -> None:
    """Atomically: a reader (or a restart after kill -9) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _progress(iterable, description: str, **options):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, **options)


def _distributed_rank_and_size() -> tuple[int, int]:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def train(config: TrainConfig) -> dict[str, dict]:
    """Run (or continue) the stream; returns ``{method: results}`` as written to ``results.json``."""
    out = Path(config.out)
    if (out / CONFIG_FILE).is_file():
        saved = TrainConfig.load(out)
        if saved != config:
            changed = [f.name for f in dataclasses.fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); use another --out "
                             "or the same command to continue it")
    return Trainer(config).run()


# --------------------------------------------------------------------------------------------------
# `switchcit train`


def add_command(commands) -> None:
    defaults = TrainConfig(base="", tasks=[], out="")
    parser = commands.add_parser(
        "train", help="continual instruction tuning over a task stream, comparing methods",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model folder (transformers format)")
    parser.add_argument("--tasks", required=True, type=_comma_list,
                        help="tasks in stream order: DIR[,DIR...]; a DIR holds train.jsonl and test.jsonl; "
                             "hf:NAME[:CONFIG] names a Hugging Face dataset (with train and test splits)")
    parser.add_argument("--out", required=True, help="run folder (re-run the same command to continue it)")
    parser.add_argument("--methods", type=_comma_list, default=defaults.methods, help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA alpha")
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="LoRA dropout")
    parser.add_argument("--target-modules", type=_comma_list, default=defaults.target_modules)
    parser.add_argument("--retention", type=float, default=defaults.retention,
                        help="retained fraction of each task's train split (switch and replay)")
    parser.add_argument("--train-examples", type=int, default=None, help="use at most this many train examples per task")
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples, help="test examples per task")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="prompt + target tokens in training")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--switch-feature", default=defaults.switch_feature, help="last_token, mean, embeddings or layer:K")
    parser.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS",
                        help="map a field (prompt, target, references, source, label) to the files' key")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.set_defaults(run=_run_from_args)


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _run_from_args(args: argparse.Namespace) -> None:
    fields = {}
    for mapping in args.field:
        ours, sep, theirs = mapping.partition("=")
        if not sep:
            raise SystemExit(f"--field needs OURS=THEIRS, got {mapping!r}")
        fields[ours] = theirs
    config = TrainConfig(
        base=args.base, tasks=args.tasks, out=args.out, methods=args.methods, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=args.target_modules, retention=args.retention, train_examples=args.train_examples,
        eval_examples=args.eval_examples, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        eval_batch_size=args.eval_batch_size, checkpoint_every=args.checkpoint_every,
        switch_feature=args.switch_feature, fields=fields, seed=args.seed,
    )
    try:
        config.validate()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"switchcit train: {err}") from None
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        _log_to(Path(args.out) / "train.log")
    results = train(config)
    if main_process:
        print_summary(results, Path(args.out))


def print_summary(results: dict[str, dict], out: Path) -> None:
    print(f"\n{'method':12s} {'AP':>7s} {'BWT':>7s} {'FWT':>7s}  " + "  ".join(results[next(iter(results))]["tasks"]))
    for method, r in results.items():
        final = r["matrix"][-1]
        print(f"{method:12s} {_fmt(r['AP']):>7s} {_fmt(r['BWT']):>7s} {_fmt(r['FWT']):>7s}  "
              + "  ".join(_fmt(s) for s in final))
    print(f"report: {out / 'report.md'}; plots: {', '.join(str(p) for p in sorted(out.glob('*/*.png')))}")


def _log_to(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per message, whatever the root logger does
    if not logger.handlers:
        for handler in (logging.StreamHandler(), logging.FileHandler(path)):
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)

