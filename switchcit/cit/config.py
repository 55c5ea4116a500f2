"""The settings of a continual run: one dataclass; ``switchcit train``'s flags are derived from its
fields (name, type, default, help), so each setting is written once."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from switchcit.cit.checkpoint import CONFIG_FILE, write_json_atomic
from switchcit.cit.data import load_task, task_name
from switchcit.cit.methods import METHODS
from switchcit.serving.openai import AUTO, BASE_MODEL_NAME
from switchcit.switch import DEFAULT_LAYER

# A task's name names its adapter: neither a method's own adapter nor a model name the server reserves.
RESERVED_TASK_NAMES = (*METHODS, AUTO, BASE_MODEL_NAME)

__all__ = ["TrainConfig", "add_config_arguments", "config_from_args"]


def _setting(default, help: str, **extra):
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    base: str = _setting("", "base model folder (transformers format)", required=True)
    tasks: list[str] = _setting([], "tasks in stream order: DIR[,DIR...]; a DIR holds train.jsonl and test.jsonl; "
                                    "hf:NAME[:CONFIG] names a Hugging Face dataset (train and test splits)",
                                required=True)
    out: str = _setting("", "run folder (re-run the same command to continue it)", required=True)
    methods: list[str] = _setting(["switchcit", "sequential"], f"comma-separated, of: {', '.join(METHODS)}")
    steps: int = _setting(100, "optimizer steps per task (multitask: steps × tasks)")
    batch_size: int = _setting(8, "examples per optimizer step")
    lr: float = _setting(5e-4, "AdamW learning rate")
    rank: int = _setting(8, "LoRA rank")
    alpha: float = _setting(16.0, "LoRA alpha")
    dropout: float = _setting(0.05, "LoRA dropout")
    target_modules: list[str] = _setting(["q_proj", "v_proj"], "LoRA target modules, comma-separated")
    switch_layer: int = _setting(DEFAULT_LAYER, "K: the switch reads the input of decoder layer K (0: the input "
                                                "embeddings) and every method's adapters cover layers K…L−1, so "
                                                "routing needs no extra pass")
    retention: float = _setting(0.01, "retained fraction of each task's train split (switch and replay)")
    train_examples: int | None = _setting(None, "use at most this many train examples per task (default: all)")
    eval_examples: int = _setting(50, "test examples per task evaluated at every stage")
    max_length: int = _setting(256, "prompt + target tokens in training")
    max_new_tokens: int = _setting(64, "longest answer in evaluation")
    eval_batch_size: int = _setting(16, "prompts generated together in evaluation")
    checkpoint_every: int = _setting(25, "optimizer steps between checkpoints")
    fields: dict[str, str] = field(default_factory=dict)  # our field name → the files' key (--field OURS=THEIRS)
    seed: int = _setting(0, "seed of sampling, initialisation and batches")

    def validate(self) -> None:
        """Fail fast, before any model is loaded: unknown methods, bad numbers, missing or empty task
        folders, task names that cannot name an adapter, unknown field names, any bad row of any data
        file (``FILE:LINE: what is wrong``), a switch layer the base model does not have, a run folder
        holding other settings."""
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
            raise ValueError(f"need lr > 0, 0 < retention ≤ 1, 0 ≤ dropout < 1 "
                             f"(got {self.lr}, {self.retention}, {self.dropout})")
        model_config = Path(self.base) / "config.json"
        if not model_config.is_file():
            raise FileNotFoundError(f"base model folder {self.base} has no config.json")
        layers = json.loads(model_config.read_text()).get("num_hidden_layers")
        if layers is not None and not 0 <= self.switch_layer < layers:
            raise ValueError(f"--switch-layer {self.switch_layer} is outside [0, {layers}) "
                             f"for this {layers}-layer model")
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError(f"task folder names must differ (they name the adapters): {names}")
        for name, folder in zip(names, self.tasks):
            _check_task_name(name, folder)
        for folder in self.tasks:
            for split in ("train", "test"):
                load_task(folder, split, self.fields)  # every row: none may fail after the model loaded
        self._check_run_folder()

    def _check_run_folder(self) -> None:
        """An existing run in ``out`` continues only with the same settings."""
        path = Path(self.out) / CONFIG_FILE
        if not path.is_file():
            return
        try:
            previous = TrainConfig(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            raise ValueError(f"{path} holds no settings of a run; use another --out") from None
        if previous != self:
            changed = [f.name for f in dataclasses.fields(self) if getattr(previous, f.name) != getattr(self, f.name)]
            raise ValueError(f"{self.out} holds a run with other settings ({', '.join(changed)}); use another --out "
                             "or the same command to continue it")

    @property
    def task_names(self) -> list[str]:
        return [task_name(t) for t in self.tasks]

    def save(self) -> None:
        write_json_atomic(Path(self.out) / CONFIG_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder: {CONFIG_FILE} is missing")
        return cls(**json.loads(path.read_text()))


def _check_task_name(name: str, folder: str) -> None:
    """``name`` must be a name PEFT can give an adapter's modules and parameters (torch's rules: no
    ".", not empty, no attribute of ``ModuleDict`` or ``ParameterDict`` such as ``train``) and no
    reserved name."""
    from torch import nn

    problem = f"{name!r} is reserved ({', '.join(RESERVED_TASK_NAMES)})" if name in RESERVED_TASK_NAMES else None
    try:
        for container in (nn.ModuleDict(), nn.ParameterDict()):
            container.add_module(name, None)
    except KeyError as err:
        problem = err.args[0]
    if problem:
        raise ValueError(f"task name {name!r} (from {folder}) can't name an adapter: {problem}; rename the folder")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--batch-size`` for ``batch_size``), defaults shown in ``--help``."""
    for setting in dataclasses.fields(TrainConfig):
        if setting.name == "fields":
            parser.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS",
                                help="map a field (prompt, target, references, source, label) to the files' key")
            continue
        default = setting.default_factory() if setting.default_factory is not dataclasses.MISSING else setting.default
        kind = {"list[str]": _comma_list, "int": int, "float": float, "str": str, "int | None": int}[setting.type]
        required = setting.metadata.get("required", False)
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=kind, required=required,
                            default=None if required else default,
                            help=setting.metadata["help"] + ("" if required else " (default: %(default)s)"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {}
    for mapping in args.field:
        ours, sep, theirs = mapping.partition("=")
        if not sep:
            raise ValueError(f"--field needs OURS=THEIRS, got {mapping!r}")
        fields[ours] = theirs
    values = {s.name: getattr(args, s.name) for s in dataclasses.fields(TrainConfig) if s.name != "fields"}
    return TrainConfig(**values, fields=fields)


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
