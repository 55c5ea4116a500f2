"""The continual instruction tuning loop: every method of :mod:`switchcit.cit.methods` on the same
task stream, read top to bottom:

    run → for each method, for each task of the stream: stage → train_adapter, then evaluate

Evaluation generates through the one pipeline (:class:`switchcit.pipeline.SwitchModel`) that
``switchcit serve`` runs, filling row t of R[t][i]. ``RUN_DIR/<method>/results.json`` holds R, AP, BWT,
FWT, forgetting (and the switch's accuracy per stage); ``RUN_DIR/report.md`` and PNG plots compare the
methods; ``RUN_DIR/switchcit/`` is what ``switchcit serve`` loads.

The switch reads the input of decoder layer K (``switch_layer``) and every method's LoRA covers
layers K…L−1 (PEFT ``layers_to_transform``), so training and the routed forward compute the same
function.

Restartable: the same command continues a killed run (:mod:`switchcit.cit.checkpoint`); batches,
dropout and initialisation are seeded per (stage, step), so a resumed run ends with the same adapters
and results. Under ``torchrun`` the training steps run with DistributedDataParallel (each rank takes its
share of every batch); rank 0 evaluates and writes.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
from torch import nn

from switchcit.cit.checkpoint import STATE_FILE, load_state, resume, save_checkpoint, write_json_atomic
from switchcit.cit.config import TrainConfig
from switchcit.cit.data import Example, load_task, retained_sample
from switchcit.cit.evaluation import evaluate_tasks, routing_accuracy
from switchcit.cit.methods import METHODS, Method
from switchcit.cit.metrics import results_dict
from switchcit.prompts import prompt_tokens

__all__ = ["Trainer", "collate", "encode_example", "target_loss", "train"]

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
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(config.base)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(config.base).to(self.device)
        layers = range(config.switch_layer, base.config.num_hidden_layers)  # below K: the base model
        self.lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=list(config.target_modules), layers_to_transform=list(layers),
                               task_type="CAUSAL_LM")
        torch.manual_seed(config.seed)
        self.model = accelerate(get_peft_model(base, self.lora, adapter_name="unused"))
        self.model.delete_adapter("unused")  # adapters are added per method and task below
        self.pipeline = SwitchModel(self.model, self.tokenizer)
        self.tasks = config.task_names
        self.train_sets = {n: load_task(t, "train", config.fields, config.train_examples)
                           for n, t in zip(self.tasks, config.tasks)}
        self.eval_sets = {n: _sample(load_task(t, "test", config.fields), config.eval_examples, config.seed)
                          for n, t in zip(self.tasks, config.tasks)}
        self.retained = {n: retained_sample(examples, config.retention, config.seed)
                         for n, examples in self.train_sets.items()}

    # ------------------------------------------------------------------ the stream

    def run(self) -> dict[str, dict]:
        """Train and evaluate every method through the whole stream (continuing a killed run)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.config.save()
        baseline = self.baseline()
        results = {}
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
            results[name] = results_dict(name, self.tasks, state["matrix"], baseline,
                                         state["switch_accuracy"] if method.routing == "switch" else None)
            if self.rank == 0:
                write_json_atomic(self.out / name / "results.json", results[name])
                logger.info("%s: AP %.2f, BWT %s", name, results[name]["AP"], _fmt(results[name]["BWT"]))
        if self.rank == 0:
            from switchcit.cit.report import write_report

            paths = write_report(self.out, results)
            logger.info("report: %s", ", ".join(map(str, paths)))
        return results

    def stage(self, method: Method, stage: int) -> tuple[list[float | None], float | None]:
        """Train ``method`` on task ``stage`` (resuming from its checkpoint), then evaluate every task:
        row ``stage`` of R and, for a switch-routed method, the switch's accuracy."""
        if not method.trains_at(self.tasks, stage):
            return [None] * len(self.tasks), None
        logger.info("[%s] stage %d/%d: %s", method.name, stage + 1, len(self.tasks), self.tasks[stage])
        trains = not method.per_task_adapters or method.name == self._per_task_owner()  # per-task adapters: once
        adapter = self._prepare_adapter(method, stage, trains)
        if trains:
            examples = method.training_examples(self.tasks, stage, self.train_sets, self.retained)
            self.train_adapter(method, adapter, stage, examples)
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

    def train_adapter(self, method: Method, adapter: str, stage: int, examples: list[Example]) -> None:
        """``steps`` AdamW steps on ``adapter`` alone (base and other adapters frozen), loss on the
        target tokens only, from the method's checkpoint when it has one for this stage."""
        config = self.config
        steps = method.steps(config.steps, self.tasks)
        self.model.set_adapter(adapter)  # active and the only trainable one
        params = self._adapter_params(adapter)
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
        start = resume(self.out / method.name, adapter, stage, params, optimizer)
        if start >= steps:
            return
        network = self.model
        if self.world > 1:
            network = nn.parallel.DistributedDataParallel(self.model)
        self.model.train()
        progress = _progress(range(start, steps), f"{method.name}/{self.tasks[stage]}", initial=start, total=steps,
                             disable=self.rank != 0)
        for step in progress:
            torch.manual_seed(_seed(config.seed, method.name, stage, step, self.rank))  # dropout
            batch = self._batch(examples, _seed(config.seed, "batch", method.name, stage, step))
            loss = target_loss(network, **{k: v.to(self.device) for k, v in batch.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
                if self.rank == 0:
                    save_checkpoint(self.out / method.name, adapter, stage, step + 1, params, optimizer)
                _barrier()
        self.model.eval()

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

    # ------------------------------------------------------------------ evaluation (through the pipeline)

    def baseline(self) -> list[float]:
        """The base model's score on every task (b_i of FWT), computed once per run."""
        path = self.out / "baseline.json"
        if not path.is_file():
            if self.rank == 0:
                scores, _ = self._evaluate(lambda prompt_tasks: [None] * len(prompt_tasks))
                write_json_atomic(path, scores)
            _barrier()
        scores = json.loads(path.read_text())
        return [scores[t] for t in self.tasks]

    def evaluate(self, method: Method, stage: int) -> tuple[list[float | None], float | None]:
        """Every task's score with the adapters ``method`` has after ``stage``, and the switch's accuracy
        (percent of the seen tasks' prompts sent to their own adapter) when the switch routes."""
        if self.rank != 0:
            _barrier()
            return [None] * len(self.tasks), None  # rank 0 holds the results
        scores, predictions = self._evaluate(lambda prompt_tasks: method.eval_adapters(self.tasks, stage, prompt_tasks))
        accuracy = None
        if method.routing == "switch":
            accuracy = routing_accuracy(predictions, self.tasks[: stage + 1])
            logger.info("[%s] switch accuracy %.2f%%", method.name, accuracy)
        logger.info("[%s] after %s: %s", method.name, self.tasks[stage],
                    ", ".join(f"{t} {s:.2f}" for t, s in scores.items()))
        _barrier()
        return [scores[t] for t in self.tasks], accuracy

    def _evaluate(self, adapters_of):
        return evaluate_tasks(self.pipeline, self.eval_sets, adapters_of, max_new_tokens=self.config.max_new_tokens,
                              batch_size=self.config.eval_batch_size)

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
        write_run_manifest(self.out / "switchcit", Path(self.config.base).resolve(),
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
    length = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), IGNORE)
    attention_mask = torch.zeros(len(pairs), length, dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def target_loss(model, input_ids, labels, attention_mask) -> torch.Tensor:
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


def train(config: TrainConfig) -> dict[str, dict]:
    """Run (or continue) the stream; returns ``{method: results}`` as written to ``results.json``."""
    return Trainer(config).run()


# --------------------------------------------------------------------------------------------------
# small helpers


def _seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() of str differs between processes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    return retained_sample(examples, min(1.0, count / len(examples)), seed)[:count]


def _sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    return retained_sample(examples, min(1.0, count / len(examples)), seed)[:count]


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
