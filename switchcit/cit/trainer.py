"""The continual instruction tuning loop: every method of :mod:`switchcit.cit.methods` on the same
task stream, read top to bottom:

    run → for each method, for each task of the stream: stage → train_adapter, then evaluate

Evaluation generates through the one pipeline (:class:`switchcit.pipeline.SwitchModel`) that
``switchcit serve`` runs, filling row t of R[t][i], and saving every prediction. From those,
``RUN_DIR/<method>/results.json`` holds R, AP, BWT, FWT, forgetting with their 95 % intervals, the
baselines (and the switch's accuracy per stage) (:mod:`switchcit.cit.results`); ``RUN_DIR/report.md``
and PNG plots compare the methods; ``RUN_DIR/switchcit/`` is what ``switchcit serve`` loads. With
``--seeds``, a whole run per seed in ``RUN_DIR/seed-<s>/``, and the results over all of them.

The switch reads the input of decoder layer K (``switch_layer``) and every method's LoRA covers
layers K…L−1 (PEFT ``layers_to_transform``), so training and the routed forward compute the same
function.

Training is a plain loop (AdamW; transformers' LR schedules per task stage; gradient accumulation and
clipping; bfloat16 autocast): each optimizer step appends a row to ``RUN_DIR/<method>/log_history.jsonl``
(and TensorBoard with ``--report-to tensorboard``). Replay draws ``--replay-rate`` of each batch from the
earlier tasks' retained examples.

Restartable: the same command continues a killed run (:mod:`switchcit.cit.checkpoint`); batches,
dropout and initialisation are seeded per (stage, step), so a resumed run ends with the same adapters
and results. Under ``torchrun`` the training steps run with DistributedDataParallel (each rank takes its
share of every batch); rank 0 evaluates and writes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn

from switchcit.cit.checkpoint import (
    STATE_FILE,
    append_log_row,
    load_state,
    resume,
    save_checkpoint,
    trim_log_history,
    write_json_atomic,
)
from switchcit.cit.config import LR_SCHEDULERS, TrainConfig
from switchcit.cit.data import Example, load_task, retained_sample
from switchcit.cit.evaluation import (
    BASE_PREDICTIONS,
    FrozenAnswers,
    evaluate_tasks,
    load_eval_sets,
    routing_accuracy,
    stage_predictions,
    task_metrics,
    write_predictions,
)
from switchcit.cit.methods import METHODS, Method
from switchcit.pretrained import resolve_model
from switchcit.prompts import prompt_tokens

__all__ = ["Trainer", "collate", "draw_batch", "encode_example", "lr_schedule", "target_loss", "train"]

logger = logging.getLogger("switchcit")

IGNORE = -100  # label of tokens outside the target (prompt, padding)


class Trainer:
    """Holds the base model with every method's adapters (one accelerated PEFT model), the data, the
    switch and the pipeline that evaluates through them."""

    def __init__(self, config: TrainConfig):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from switchcit.peft_patch import accelerate
        from switchcit.pipeline import SwitchModel

        config.validate()
        self.config, self.out = config, Path(config.out)
        self.rank, self.world = _distributed_rank_and_size()
        self.device = _device(config.device)
        base_folder = resolve_model(config.base)
        self.tokenizer = AutoTokenizer.from_pretrained(base_folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The frozen base in --dtype; PEFT keeps the adapters in float32.
        base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=getattr(torch, config.dtype)).to(self.device)
        layers = range(config.switch_layer, base.config.num_hidden_layers)  # below K: the base model
        self.lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=list(config.target_modules), layers_to_transform=list(layers),
                               task_type="CAUSAL_LM")
        torch.manual_seed(config.seed)
        self.model = accelerate(get_peft_model(base, self.lora, adapter_name="unused"))
        self.model.delete_adapter("unused")  # adapters are added per method and task below
        self.pipeline = SwitchModel(self.model, self.tokenizer)
        self.tasks = config.task_names
        self.metrics = task_metrics(config)
        for task, declared in config.declared_metrics().items():
            if declared is None:
                logger.info("task %s declares no metric (task.json or --metric): scored by %s, chosen by its name",
                            task, self.metrics[task])
        self.train_sets = {n: load_task(t, "train", config.fields, config.train_examples)
                           for n, t in zip(self.tasks, config.tasks)}
        self.eval_sets = load_eval_sets(config)
        self.retained = {n: retained_sample(examples, config.retention, config.seed)
                         for n, examples in self.train_sets.items()}
        self.answers = FrozenAnswers(self.tasks)  # per-task adapters are named after their tasks

    # ------------------------------------------------------------------ the stream

    def run(self) -> dict[str, dict]:
        """Train and evaluate every method through the whole stream (continuing a killed run), then
        write the results and the report (:func:`switchcit.cit.results.write_results`); returns them
        (``{}`` on ranks other than 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.config.save()
        self.baseline()
        for name in self.config.methods:
            method = METHODS[name]
            state = load_state(self.out / name)
            for stage in range(state["stages_done"], len(self.tasks)):
                row, switch_accuracy = self.stage(method, stage)
                state["matrix"].append(row)
                if method.routing == "switch":
                    state["switch_accuracy"].append(switch_accuracy)
                state["stages_done"] = stage + 1
                if self.rank == 0:
                    write_json_atomic(self.out / name / STATE_FILE, state)
        if self.rank != 0:
            return {}
        from switchcit.cit.results import write_results

        return write_results(self.config)

    def stage(self, method: Method, stage: int) -> tuple[list[float | None], float | None]:
        """Train ``method`` on task ``stage`` (resuming from its checkpoint), then evaluate every task:
        row ``stage`` of R and, for a switch-routed method, the switch's accuracy."""
        if not method.trains_at(self.tasks, stage):
            return [None] * len(self.tasks), None
        logger.info("[%s] stage %d/%d: %s", method.name, stage + 1, len(self.tasks), self.tasks[stage])
        trains = not method.per_task_adapters or method.name == self._per_task_owner()  # per-task adapters: once
        adapter = self._prepare_adapter(method, stage, trains)
        if trains:
            examples, replayed = method.training_examples(self.tasks, stage, self.train_sets, self.retained)
            self.train_adapter(method, adapter, stage, examples, replayed)
            if method.per_task_adapters and self.rank == 0:
                self._save_serving_folder(stage)
        _barrier()
        if method.routing == "switch":
            self.pipeline.switch = self._train_switch(stage)
        return self.evaluate(method, stage)

    def _per_task_owner(self) -> str:
        return next(m for m in self.config.methods if METHODS[m].per_task_adapters)

    def _prepare_adapter(self, method: Method, stage: int, trains: bool = True) -> str:
        """Make sure every adapter ``method`` needs at ``stage`` is in the model: saved per-task adapters
        from their folders (after a restart, or trained by the other per-task method), the one to
        train seeded-fresh (its checkpoint, if any, is loaded when training starts)."""
        name = method.adapter(self.tasks, stage)
        if method.per_task_adapters:
            for task in self.tasks[: stage + (0 if trains else 1)]:
                if task not in self.model.peft_config:
                    self.model.load_adapter(str(self._adapter_folder(task)), adapter_name=task)
        if name not in self.model.peft_config:
            torch.manual_seed(_seed(self.config.seed, "init", name))
            self.model.add_adapter(name, self.lora)
        return name

    # ------------------------------------------------------------------ training

    def train_adapter(self, method: Method, adapter: str, stage: int, examples: list[Example],
                      replayed: list[Example]) -> None:
        """``steps`` optimizer steps on ``adapter`` alone (base and other adapters frozen), loss on the
        target tokens only: AdamW on this stage's LR schedule, ``gradient_accumulation_steps``
        micro-batches per step, the gradient clipped to ``max_grad_norm``, the forward under bfloat16
        autocast with ``--dtype bfloat16``. Starts from the method's checkpoint when it has one for this
        stage. Each step appends its row to ``log_history.jsonl`` (and TensorBoard)."""
        config, method_dir = self.config, self.out / method.name
        steps = method.steps(config.steps, self.tasks)
        self.model.set_adapter(adapter)  # active and the only trainable one
        params = self._adapter_params(adapter)
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
        scheduler = lr_schedule(optimizer, config, steps)
        start = resume(method_dir, adapter, stage, params, optimizer, scheduler)
        logged = trim_log_history(method_dir, stage, start) if self.rank == 0 else 0  # the rows to redo go
        if start >= steps:
            return
        network = self.model
        if self.world > 1:
            network = nn.parallel.DistributedDataParallel(self.model)
        tensorboard = self._tensorboard(method)
        self.model.train()
        progress = _progress(range(start, steps), f"{method.name}/{self.tasks[stage]}", initial=start, total=steps,
                             disable=self.rank != 0)
        for step in progress:
            started = time.perf_counter()
            torch.manual_seed(_seed(config.seed, method.name, stage, step, self.rank))  # dropout
            batch_seed = _seed(config.seed, "batch", method.name, stage, step)
            micro_batches = self._micro_batches(examples, replayed, batch_seed)
            optimizer.zero_grad(set_to_none=True)
            loss, tokens = 0.0, 0
            for number, batch in enumerate(micro_batches):
                accumulating = self.world > 1 and number < len(micro_batches) - 1
                with network.no_sync() if accumulating else contextlib.nullcontext():  # all-reduce once per step
                    with self._autocast():
                        micro_loss = target_loss(network, **{k: v.to(self.device) for k, v in batch.items()})
                    (micro_loss / len(micro_batches)).backward()
                loss += micro_loss.item() / len(micro_batches)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm or math.inf)  # inf: measure only
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            progress.set_postfix(loss=f"{loss:.3f}")
            if self.rank == 0:
                seconds = time.perf_counter() - started
                row = {"method": method.name, "task": self.tasks[stage], "stage": stage, "step": step + 1, "loss": loss,
                       "learning_rate": learning_rate, "grad_norm": float(grad_norm),
                       "tokens_per_second": tokens * self.world / seconds}  # the ranks' shares are equal
                append_log_row(method_dir, row)
                logged += 1
                if tensorboard is not None:
                    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
                        tensorboard.add_scalar(f"train/{key}", row[key], logged)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
                if self.rank == 0:
                    save_checkpoint(method_dir, adapter, stage, step + 1, params, optimizer, scheduler)
                _barrier()
        if tensorboard is not None:
            tensorboard.close()
        self.model.eval()

    def _adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if f".{adapter}." in n}

    def _micro_batches(self, examples: list[Example], replayed: list[Example],
                       seed: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of each micro-batch of one optimizer step, drawn by ``seed``
        (:func:`draw_batch`) — the same on every rank and after a restart."""
        config, size = self.config, self.config.batch_size
        if size % self.world:
            raise ValueError(f"batch size {size} does not split over {self.world} processes")
        picks = draw_batch(examples, replayed, size * config.gradient_accumulation_steps, config.replay_rate, seed)
        shares = [picks[first : first + size][self.rank :: self.world] for first in range(0, len(picks), size)]
        return [collate([encode_example(self.tokenizer, example, config.max_length) for example in share],
                        self.tokenizer.pad_token_id) for share in shares]

    def _autocast(self):
        """bfloat16 autocast for ``--dtype bfloat16`` (matmuls in bfloat16, the adapters' weights stay float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bfloat16")

    def _tensorboard(self, method: Method):
        """A TensorBoard writer for ``method``'s steps (``--report-to tensorboard``, rank 0), else None."""
        if self.config.report_to != "tensorboard" or self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard" / method.name))

    # ------------------------------------------------------------------ evaluation (through the pipeline)

    def baseline(self) -> list[float]:
        """The base model's score on every task (b_i of FWT), computed once per run; its predictions
        go to ``RUN_DIR/predictions/base-model.jsonl``."""
        path = self.out / "baseline.json"
        if not (path.is_file() and (self.out / BASE_PREDICTIONS).is_file()):
            if self.rank == 0:
                scores, predictions = self._evaluate(lambda prompt_tasks: [None] * len(prompt_tasks))
                write_predictions(self.out / BASE_PREDICTIONS, predictions)
                write_json_atomic(path, scores)
            _barrier()
        scores = json.loads(path.read_text())
        return [scores[t] for t in self.tasks]

    def evaluate(self, method: Method, stage: int) -> tuple[list[float | None], float | None]:
        """Every task's score with the adapters ``method`` has after ``stage``, and the switch's accuracy
        (percent of the seen tasks' prompts sent to their own adapter) when the switch routes; the
        predictions go to ``RUN_DIR/<method>/predictions/stage-<stage + 1>.jsonl``."""
        if self.rank != 0:
            _barrier()
            return [None] * len(self.tasks), None  # rank 0 holds the results
        ahead = len(self.tasks) if self.config.eval_ahead < 0 else self.config.eval_ahead
        scores, predictions = self._evaluate(lambda prompt_tasks: method.eval_adapters(self.tasks, stage, prompt_tasks),
                                             self.tasks[: stage + 1 + ahead])
        write_predictions(stage_predictions(self.out, method.name, stage), predictions)
        accuracy = None
        if method.routing == "switch":
            accuracy = routing_accuracy(predictions, self.tasks[: stage + 1])
            logger.info("[%s] switch accuracy %.2f%%", method.name, accuracy)
        logger.info("[%s] after %s: %s", method.name, self.tasks[stage],
                    ", ".join(f"{t} {s:.2f}" for t, s in scores.items()))
        _barrier()
        return [scores.get(t) for t in self.tasks], accuracy

    def _evaluate(self, adapters_of, tasks: list[str] | None = None):
        """Scores and predictions of ``tasks`` (default: all), reusing the answers of adapters that are
        never trained again (the per-task ones, named after their tasks, and the base model)."""
        eval_sets = {t: self.eval_sets[t] for t in tasks or self.tasks}
        return evaluate_tasks(self.pipeline, eval_sets, adapters_of, max_new_tokens=self.config.max_new_tokens,
                              batch_size=self.config.eval_batch_size, metrics=self.metrics, answers=self.answers)

    def evaluate_saved(self, name: str) -> tuple[dict[str, float], list[dict]]:
        """The final stage of method ``name`` from its saved adapters (``switchcit eval``): scores and
        one prediction record per test example."""
        method, last = METHODS[name], len(self.tasks) - 1
        self._prepare_adapter(method, last, trains=False)
        if not method.per_task_adapters:  # its final weights are in its last checkpoint
            resume(self.out / name, name, last + 1, self._adapter_params(name), optimizer=None)
        if method.routing == "switch":
            from switchcit.switch import Switch

            self.pipeline.switch = Switch.load(self.out / "switchcit" / "switch", self.pipeline.network, self.tokenizer)
        return self._evaluate(lambda prompt_tasks: method.eval_adapters(self.tasks, last, prompt_tasks))

    def _train_switch(self, stage: int):
        """The switch over the tasks seen so far, from their retained prompts only."""
        from switchcit.switch import Switch

        seen = self.tasks[: stage + 1]
        prompts = [e.prompt for t in seen for e in self.retained[t]]
        labels = [t for t in seen for _ in self.retained[t]]
        switch = Switch.train(prompts, labels, encoder=self.pipeline.network, tokenizer=self.tokenizer,
                              layer=self.config.switch_layer, seed=self.config.seed)
        if self.rank == 0:
            switch.save(self.out / "switchcit" / "switch")
        return switch

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
        write_run_manifest(self.out / "switchcit", resolve_model(self.config.base).resolve(),
                           {t: self._adapter_folder(t) for t in seen}, self.out / "switchcit" / "switch",
                           self.config.switch_layer)


def encode_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the chat-formatted prompt then the target and EOS, labels only on the
    target; the prompt is cut from the left when the pair is too long."""
    prompt = prompt_tokens(tokenizer, example.prompt)[0]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target = target[: max_length // 2] if len(prompt) + len(target) > max_length else target
    prompt = prompt[-(max_length - len(target)):]
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded: every row's target ends at the last position, so the loss needs the logits of the
    longest target's positions only (:func:`target_loss`), not of the longest prompt's."""
    length = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), IGNORE)
    attention_mask = torch.zeros(len(pairs), length, dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        labels[row, length - len(lab) :] = torch.tensor(lab)
        attention_mask[row, length - len(ids) :] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def draw_batch(examples: list[Example], replayed: list[Example], size: int, replay_rate: float,
               seed: int) -> list[Example]:
    """``size`` examples drawn with replacement by ``seed``, a share ``replay_rate`` of them from
    ``replayed`` when there are any (the count rounded up or down at random, so that the rate holds on
    average for any size), at random places in the batch."""
    rng = random.Random(seed)
    count = 0
    if replayed:
        count = int(replay_rate * size)
        count += rng.random() < replay_rate * size - count
    batch = rng.choices(examples, k=size - count) + rng.choices(replayed, k=count)
    rng.shuffle(batch)  # replayed examples in every micro-batch and every rank's share
    return batch


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``--lr-scheduler`` over a stage of ``steps`` optimizer steps after a linear warm-up from 0 of
    ``--warmup-steps`` (else ``ceil(--warmup-ratio × steps)``) steps: transformers' schedules."""
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * steps)
    return get_scheduler(LR_SCHEDULERS[config.lr_scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=steps)


def target_loss(model, input_ids, labels, attention_mask) -> torch.Tensor:
    """Mean over examples of each example's mean target-token loss: with equal shares per rank, the
    data-parallel average of gradients equals the single-process gradient of the whole batch. Logits
    are computed only from the first position that predicts a target token on (the vocabulary
    projection dominates the cost when prompts are long and targets short)."""
    targets = labels[:, 1:]
    predicting = (targets != IGNORE).any(0).nonzero()
    keep = targets.shape[1] - int(predicting[0]) if len(predicting) else 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first token
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep + 1).logits[:, :-1].float()
    targets = targets[:, -keep:]
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counted = (targets != IGNORE).sum(1).clamp(min=1)
    return (token_loss.sum(1) / counted).mean()


def train(config: TrainConfig) -> dict[str, dict]:
    """Run (or continue) the stream — with ``seeds``, once per seed in ``RUN_DIR/seed-<s>/``, then the
    results over all of them; returns ``{method: results}`` as written to ``results.json`` (``{}`` on
    ranks other than 0)."""
    from switchcit.cit.results import seed_runs, write_results

    runs = seed_runs(config)
    if runs == [config]:
        return Trainer(config).run()
    config.validate()
    rank, _ = _distributed_rank_and_size()
    if rank == 0:
        config.save()  # the run's settings: the same command continues it, other settings are refused
    for run in runs:
        Trainer(run).run()
    return write_results(config) if rank == 0 else {}


# --------------------------------------------------------------------------------------------------
# small helpers


def _seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() of str differs between processes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _progress(iterable, description: str, **options):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, **options)


def _device(name: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu); under torchrun, cuda is this process's GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
