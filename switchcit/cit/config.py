"""The settings of a continual run: one dataclass; ``switchcit train``'s flags are derived from its
fields (name, type, default, help), so each setting is written once. ``--config FILE`` (YAML or JSON)
gives settings under their flags' names (``batch-size`` or ``batch_size``); flags on the command line
win over it."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from switchcit.cit.checkpoint import CONFIG_FILE, write_json_atomic
from switchcit.cit.data import TASK_FILE, load_task, task_file, task_name
from switchcit.cit.methods import METHODS
from switchcit.cit.metrics import METRIC_FIELDS, METRIC_NAMES, main_metric
from switchcit.pretrained import resolve_model
from switchcit.serving.openai import AUTO, BASE_MODEL_NAME
from switchcit.switch import DEFAULT_LAYER

# A task's name names its adapter: neither a method's own adapter nor a model name the server reserves.
RESERVED_TASK_NAMES = (*METHODS, AUTO, BASE_MODEL_NAME)

# --lr-scheduler → the name transformers' get_scheduler knows (constant: after the warm-up, if any).
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DTYPES = ("float32", "bfloat16")

__all__ = ["DTYPES", "LR_SCHEDULERS", "TrainConfig", "add_config_arguments", "config_from_args"]


def _setting(default, help: str, **extra):
    """A field and its flag: ``help``, and in ``extra`` ``required``, ``choices``, ``flag`` (the flag's
    name when it is not the field's), ``metavar``, ``runtime`` (may change when a run continues)."""
    mutable = isinstance(default, (list, dict))
    factory = {"default_factory": lambda: copy.copy(default)} if mutable else {"default": default}
    return field(**factory, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    base: str = _setting("", "base model: a folder (transformers format) or a hub id already in the local "
                             "Hugging Face cache", required=True)
    tasks: list[str] = _setting([], "tasks in stream order: DIR[,DIR...]; a DIR holds train.jsonl and test.jsonl; "
                                    "hf:NAME[:CONFIG] names a Hugging Face dataset (train and test splits)",
                                required=True)
    out: str = _setting("", "run folder (re-run the same command to continue it)", required=True)
    methods: list[str] = _setting(["switchcit", "sequential"], f"comma-separated, of: {', '.join(METHODS)}")
    steps: int = _setting(100, "optimizer steps per task (multitask: steps × tasks)")
    batch_size: int = _setting(8, "examples per micro-batch (over all processes); an optimizer step takes "
                                  "--gradient-accumulation-steps micro-batches")
    lr: float = _setting(5e-4, "AdamW learning rate (the peak of --lr-scheduler's schedule)")
    rank: int = _setting(8, "LoRA rank")
    alpha: float = _setting(16.0, "LoRA alpha")
    dropout: float = _setting(0.05, "LoRA dropout")
    target_modules: list[str] = _setting(["q_proj", "v_proj"], "LoRA target modules, comma-separated")
    switch_layer: int = _setting(DEFAULT_LAYER, "K: the switch reads the input of decoder layer K (0: the input "
                                                "embeddings) and every method's adapters cover layers K…L−1, so "
                                                "routing needs no extra pass")
    retention: float = _setting(0.01, "retained fraction of each task's train split (switch and replay)")
    train_examples: int | None = _setting(None, "use at most this many train examples per task (default: all)")
    eval_examples: int = _setting(200, "test examples per task evaluated at every stage (all of a task that has "
                                       "fewer)")
    max_length: int = _setting(256, "prompt + target tokens in training")
    max_new_tokens: int = _setting(64, "longest answer in evaluation")
    eval_batch_size: int = _setting(16, "prompts generated together in evaluation")
    eval_ahead: int = _setting(-1, "tasks after the one just trained that each stage also evaluates (-1: all); "
                                   "1 gives every cell a metric reads (FWT needs R[t][t+1]), the others stay empty")
    checkpoint_every: int = _setting(25, "optimizer steps between checkpoints")
    replay_rate: float = _setting(0.25, "replay: the fraction of each batch drawn from the earlier tasks' retained "
                                        "examples")
    lr_scheduler: str = _setting("constant", "learning-rate schedule over each task's steps, after the warm-up",
                                 choices=tuple(LR_SCHEDULERS))
    warmup_steps: int = _setting(0, "steps of linear warm-up from 0 at the start of each task (0: --warmup-ratio)")
    warmup_ratio: float = _setting(0.0, "warm-up as a fraction of each task's steps, when --warmup-steps is 0")
    max_grad_norm: float = _setting(1.0, "clip the gradient's norm to this before each step (0: no clipping)")
    gradient_accumulation_steps: int = _setting(1, "micro-batches per optimizer step")
    dtype: str = _setting("float32", "the base model's weights and the autocast of training's forward; adapters stay "
                                     "float32", choices=DTYPES)
    device: str | None = _setting(None, "where the model trains and evaluates: cpu, cuda, cuda:1, … "
                                        "(default: cuda if available, else cpu)", runtime=True)
    report_to: str = _setting("none", "also log every step to TensorBoard (RUN_DIR/tensorboard/<method>)",
                              choices=("none", "tensorboard"), runtime=True)
    metric: dict[str, str] = _setting({}, "a task's main metric (repeat the flag or separate by commas), one of "
                                          f"{', '.join(METRIC_NAMES)}; else the task folder's task.json names it, "
                                          "else the folder's name picks one (logged)", metavar="TASK=METRIC")
    fields: dict[str, str] = _setting({}, "read our field (prompt, target, references, source, label) from the files' "
                                          "key THEIRS", flag="field", metavar="OURS=THEIRS")
    seed: int = _setting(0, "seed of sampling, initialisation and batches")
    seeds: list[int] = _setting([], "run the whole stream once per seed (instead of --seed), each in "
                                    "RUN_DIR/seed-<s>/; results.json and report.md in RUN_DIR then give means and "
                                    "intervals over the seeds", metavar="SEED[,SEED...]")

    def validate(self) -> None:
        """Fail fast, before any model is loaded: unknown methods, bad numbers or choices, a device or
        TensorBoard this machine lacks, missing or empty task folders, task names that cannot name an
        adapter, unknown field names, any bad row of any data file (``FILE:LINE: what is wrong``), a bad
        ``task.json``, an unknown metric or one whose field the test examples lack, a switch layer the
        base model does not have, a run folder holding other settings."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if not self.tasks:
            raise ValueError("the task stream is empty: give --tasks DIR[,DIR...]")
        for name in ("steps", "batch_size", "rank", "eval_examples", "max_length", "max_new_tokens", "eval_batch_size",
                     "checkpoint_every", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_ahead < -1:
            raise ValueError(f"--eval-ahead must be -1 (all tasks) or at least 0, got {self.eval_ahead}")
        if not (self.lr > 0 and 0 < self.retention <= 1 and 0 <= self.dropout < 1):
            raise ValueError(f"need lr > 0, 0 < retention ≤ 1, 0 ≤ dropout < 1 "
                             f"(got {self.lr}, {self.retention}, {self.dropout})")
        if not (0 <= self.replay_rate < 1 and self.warmup_steps >= 0 and 0 <= self.warmup_ratio <= 1
                and self.max_grad_norm >= 0):
            raise ValueError(f"need 0 ≤ replay rate < 1, warm-up steps ≥ 0, 0 ≤ warm-up ratio ≤ 1, max grad norm ≥ 0 "
                             f"(got {self.replay_rate}, {self.warmup_steps}, {self.warmup_ratio}, "
                             f"{self.max_grad_norm})")
        for setting in dataclasses.fields(self):
            choices, value = setting.metadata.get("choices"), getattr(self, setting.name)
            if choices and value not in choices:
                raise ValueError(f"--{_flag(setting)} {value}: choose one of {', '.join(choices)}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        self._check_device()
        if not all(type(seed) is int for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds needs distinct integers separated by commas, got "
                             f"{','.join(map(str, self.seeds))}")
        model_config = resolve_model(self.base) / "config.json"
        layers = json.loads(model_config.read_text()).get("num_hidden_layers")
        if layers is not None and not 0 <= self.switch_layer < layers:
            raise ValueError(f"--switch-layer {self.switch_layer} is outside [0, {layers}) "
                             f"for this {layers}-layer model")
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError(f"task folder names must differ (they name the adapters): {names}")
        for name, folder in zip(names, self.tasks):
            _check_task_name(name, folder)
        declared = self.declared_metrics()
        for name, folder in zip(names, self.tasks):
            load_task(folder, "train", self.fields)  # every row: none may fail after the model loaded
            metric = main_metric(name, declared[name])
            needed = METRIC_FIELDS.get(metric)  # scoring must not fail after the training
            missing = [i for i, e in enumerate(load_task(folder, "test", self.fields), 1)
                       if needed and getattr(e, needed) is None]
            if missing:
                raise ValueError(f"task {folder}: its metric {metric} needs {self.fields.get(needed, needed)!r} in "
                                 f"every test example; test example {missing[0]} has none")
        self._check_run_folder()

    def declared_metrics(self) -> dict[str, str | None]:
        """Each task's main metric as declared — ``--metric`` over its folder's ``task.json`` — or None
        (then the task's name picks one: :func:`switchcit.cit.metrics.main_metric`). An unknown metric
        or task is refused, naming the flag or file that gave it."""
        names = self.task_names
        strays = sorted(set(self.metric) - set(names))
        if strays:
            raise ValueError(f"--metric names {', '.join(strays)}: no task of the stream ({', '.join(names)})")
        declared = {}
        for name, folder in zip(names, self.tasks):
            from_file = task_file(folder).get("metric")
            metric = self.metric.get(name, from_file)
            where = f"--metric {name}={metric}" if name in self.metric else str(Path(folder) / TASK_FILE)
            if metric is not None and metric not in METRIC_NAMES:
                raise ValueError(f"{where}: unknown metric {metric!r}; known: {', '.join(METRIC_NAMES)}")
            declared[name] = metric
        return declared

    def _check_device(self) -> None:
        """``--device`` names a device type torch knows and this machine has."""
        import torch

        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"--device {self.device}: {err}") from None
        backend = getattr(torch, device.type, None)
        if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
            raise ValueError(f"--device {self.device}: no {device.type} device here")

    def _check_run_folder(self) -> None:
        """An existing run in ``out`` continues only with the same settings."""
        path = Path(self.out) / CONFIG_FILE
        if not path.is_file():
            return
        try:
            previous = TrainConfig(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            raise ValueError(f"{path} holds no settings of a run; use another --out") from None
        changed = [f.name for f in dataclasses.fields(self)
                   if not f.metadata.get("runtime") and getattr(previous, f.name) != getattr(self, f.name)]
        if changed:
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
    """``--config FILE`` and one flag per setting (``--batch-size`` for ``batch_size``), each help with
    its default. Every flag defaults to None (not given), so that it can win over ``--config``."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="settings in a YAML or JSON file, keyed by these flags' names (dashes or underscores); "
                             "flags given here win")
    for setting in dataclasses.fields(TrainConfig):
        meta = setting.metadata
        if meta.get("required"):
            shown = " (required, here or in --config)"
        elif setting.default is None:
            shown = ""  # the help says what None means
        else:
            shown = f" (default: {_shown(_default(setting))})"
        choices = f" (one of: {', '.join(meta['choices'])})" if "choices" in meta else ""
        parser.add_argument(f"--{_flag(setting)}", dest=setting.name, type=str if _maps(setting) else _kind(setting),
                            action="append" if _maps(setting) else "store", metavar=meta.get("metavar"),
                            help=meta["help"] + choices + shown)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings: flags given on the command line, over ``--config FILE``'s, over the defaults."""
    values = _read_config_file(args.config) if args.config is not None else {}
    for setting in dataclasses.fields(TrainConfig):
        given = getattr(args, setting.name)
        if given is None:
            continue
        if _maps(setting):  # one mapping from all the flag's uses, over the file's
            given = values.get(setting.name, {}) | _pairs(given, f"--{_flag(setting)}", setting.metadata["metavar"])
        values[setting.name] = given
    missing = [f"--{_flag(s)}" for s in dataclasses.fields(TrainConfig) if s.metadata.get("required")
               and not values.get(s.name)]
    if missing:
        raise ValueError(f"{', '.join(missing)}: required (on the command line or in --config)")
    return TrainConfig(**values)


def _read_config_file(path: Path) -> dict:
    """The settings of a YAML (or JSON) file keyed by the flags' names; ``FILE: what is wrong`` for an
    unreadable file, an unknown key or a value of the wrong type."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{line}: not YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:  # an empty file
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: needs `flag-name: value` settings, got a {type(data).__name__}")
    settings = {_flag(s).replace("-", "_"): s for s in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        setting = settings.get(str(key).replace("-", "_"))
        if setting is None:
            raise ValueError(f"{path}: unknown key {key!r}; the keys are `switchcit train`'s flags (see --help)")
        values[setting.name] = _file_value(setting, value, f"{path}: {key}")
    return values


def _file_value(setting: dataclasses.Field, value, where: str):
    """A config file's value for ``setting``, as its flag would give it."""
    if _maps(setting):
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return _pairs(map(str, value if isinstance(value, list) else [value]), where, setting.metadata["metavar"])
    if value is None and setting.default is None:
        return None
    if setting.type.startswith("list[") and isinstance(value, list):  # a YAML list: as the flag's comma list
        value = ",".join(map(str, value))
    try:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ValueError
        return _kind(setting)(str(value))
    except ValueError:
        raise ValueError(f"{where}: {json.dumps(value, default=str)[:40]} is no {setting.type}") from None


def _flag(setting: dataclasses.Field) -> str:
    return setting.metadata.get("flag", setting.name).replace("_", "-")


def _maps(setting: dataclasses.Field) -> bool:
    return setting.type == "dict[str, str]"


def _kind(setting: dataclasses.Field):
    """How a flag's text becomes the setting's value."""
    return {"list[str]": _comma_list, "list[int]": _int_list, "int": int, "float": float, "str": str, "int | None": int,
            "str | None": str}[setting.type]


def _default(setting: dataclasses.Field):
    return setting.default_factory() if setting.default_factory is not dataclasses.MISSING else setting.default


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def _pairs(texts, flag: str, metavar: str) -> dict[str, str]:
    """``{KEY: VALUE}`` from ``KEY=VALUE`` texts, each may hold several separated by commas."""
    pairs = {}
    for text in texts:
        for pair in _comma_list(text):
            key, sep, value = (part.strip() for part in pair.partition("="))
            if not (sep and key and value):
                raise ValueError(f"{flag} needs {metavar}, got {pair!r}")
            pairs[key] = value
    return pairs


def _int_list(text: str) -> list[int | str]:
    """Comma-separated integers; a part that is none stays text, for :meth:`TrainConfig.validate` to
    refuse in one line (an argparse type error would print the usage too)."""
    return [int(part) if part.lstrip("-").isdigit() else part for part in _comma_list(text)]


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
