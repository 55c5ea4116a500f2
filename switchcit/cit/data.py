"""Task data: JSONL task folders (``<folder>/{train,test}.jsonl``) or Hugging Face datasets
(``hf:NAME[:CONFIG]``), retained samples, and real offline
dialogues from ``chatterbot-corpus`` (an unseen task for the switch, or a default task stream).

One example per JSONL line (a JSON object) with at least ``prompt`` and ``target`` (strings);
``references`` (all reference outputs, a list of strings; default: the target), ``source``
(simplification: the original sentence) and ``label`` (Yes/No tasks) are used by the metrics when
present (strings, or null). ``fields`` maps these names onto other datasets' column names.

A task folder may hold ``task.json``, a JSON object declaring the task (keys: ``TASK_FILE_KEYS``):
``{"metric": "sari"}`` names its main metric (see :mod:`switchcit.cit.metrics`).
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from switchcit.prompts import is_text

__all__ = ["Example", "TASK_FILE", "TASK_FILE_KEYS", "chatterbot_dialogues", "load_task", "retained_sample",
           "task_file", "task_name", "write_chatterbot_tasks"]

FIELDS = ("prompt", "target", "references", "source", "label")
TASK_FILE = "task.json"
TASK_FILE_KEYS = {"metric": "the task's main metric (a name of switchcit.cit.metrics.METRIC_NAMES)"}


@dataclass
class Example:
    task: str
    prompt: str
    target: str
    references: list[str] = field(default_factory=list)
    source: str | None = None
    label: str | None = None


HF_PREFIX = "hf:"  # a Hugging Face dataset instead of a task folder: hf:NAME or hf:NAME:CONFIG


def task_name(source: str | Path) -> str:
    """A task's name: its folder's name, or the dataset's (``hf:org/name`` → ``name``)."""
    source = str(source)
    return Path(source[len(HF_PREFIX):].split(":")[0] if source.startswith(HF_PREFIX) else source).name


def task_file(source: str | Path) -> dict[str, str]:
    """What a task folder's ``task.json`` declares (``{}`` without one, or for a Hugging Face dataset);
    ``FILE: what is wrong`` (ValueError) for malformed JSON, an unknown key or a value that is no string."""
    path = Path(source) / TASK_FILE
    if str(source).startswith(HF_PREFIX) or not path.is_file():
        return {}
    try:
        declared = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: malformed JSON: {str(err)[:100]}") from None
    if not isinstance(declared, dict):
        raise ValueError(f"{path}: must be a JSON object, got {_short(declared)}")
    for key, value in declared.items():
        if key not in TASK_FILE_KEYS:
            raise ValueError(f"{path}: unknown key {key!r}; known: {', '.join(TASK_FILE_KEYS)}")
        if not isinstance(value, str):
            raise ValueError(f"{path}: {key!r} must be a string, got {_short(value)}")
    return declared


def load_task(source: str | Path, split: str = "train", fields: Mapping[str, str] | None = None,
              limit: int | None = None) -> list[Example]:
    """The examples of a task: ``<folder>/<split>.jsonl``, or ``hf:NAME[:CONFIG]``, a Hugging Face
    dataset (a hub name or a local dataset folder; needs ``datasets``). ``fields`` maps our names
    (prompt, target, references, source, label) to the data's keys. Clear errors for a missing folder
    or file, an empty task, an unknown field name, and ``FILE:LINE: what is wrong`` (ValueError) for a
    row that is no UTF-8, no JSON or no object, lacks a needed key or has a value of the wrong type."""
    fields = dict(fields or {})
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown field name(s) {sorted(unknown)} in the field mapping; known: {', '.join(FIELDS)}")
    key = {name: fields.get(name, name) for name in FIELDS}
    name = task_name(source)
    examples = []
    for where, row in _rows(source, split):
        examples.append(_example(name, where, row, key))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"task {source} ({split}) has no examples")
    return examples


def _example(task: str, where: str, row, key: Mapping[str, str]) -> Example:
    """``row`` as an example, its types checked (``str(None)`` would train on the text "None", and a
    string's characters would become its references)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    missing = [key[n] for n in ("prompt", "target") if key[n] not in row]
    if missing:
        raise ValueError(f"{where}: has no {' or '.join(map(repr, missing))} field")

    def text(name: str, optional: bool = False) -> str | None:
        value = row.get(key[name])
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key[name]!r} must be a string, got {_short(value)}")
        if not is_text(value):
            raise ValueError(f"{where}: {key[name]!r} is no valid Unicode (a lone surrogate): {_short(value)}")
        return value

    target, references = text("target"), row.get(key["references"])
    if references is not None and not (isinstance(references, list)
                                       and all(isinstance(r, str) and is_text(r) for r in references)):
        raise ValueError(f"{where}: {key['references']!r} must be a list of strings, got {_short(references)}")
    return Example(task=task, prompt=text("prompt"), target=target, references=references or [target],
                   source=text("source", optional=True), label=text("label", optional=True))


def _short(value) -> str:
    """A value as JSON, cut short: an error quotes a prefix of what it rejects."""
    quoted = json.dumps(value, default=str)
    return quoted if len(quoted) <= 40 else quoted[:40] + "…"



def _rows(source: str | Path, split: str) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for each example of a JSONL task folder or a Hugging Face dataset."""
    if str(source).startswith(HF_PREFIX):
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"{source} needs the datasets package: pip install datasets") from err
        name, _, config = str(source)[len(HF_PREFIX):].partition(":")
        try:
            dataset = datasets.load_dataset(name, config or None, split=split)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"dataset {name!r} (split {split!r}) cannot be loaded: {err}") from None
        for number, row in enumerate(dataset):
            yield f"{source} [{split}] row {number}", row
        return
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"task folder {folder} does not exist")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task folder {folder} has no {split}.jsonl")
    with path.open("rb") as lines:  # bytes: a line that is no UTF-8 is reported with its number
        for number, raw in enumerate(lines, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode()
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
            except (ValueError, RecursionError) as err:  # an integer of too many digits, too deep a nesting
                raise ValueError(f"{where}: malformed JSON: {str(err)[:100]}") from None
            yield where, row


def retained_sample(items: Sequence, fraction: float, seed: int = 0) -> list:
    """``round(fraction · len)`` items (at least one), drawn without replacement. Samples of one seed
    are nested: a smaller fraction keeps a subset of what a larger one keeps."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the retained fraction must be in (0, 1], got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[: max(1, round(fraction * len(items)))]]


def chatterbot_dialogues(categories: Sequence[str] | None = None,
                         language: str = "english") -> dict[str, list[tuple[str, str]]]:
    """``{category: [(utterance, reply), ...]}`` from chatterbot-corpus's YAML files (real dialogues,
    offline). Multi-turn conversations give one pair per consecutive turn."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as err:
        raise ImportError("chatterbot-corpus and PyYAML are needed: pip install chatterbot-corpus") from err
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    dialogues = {}
    for path in sorted(folder.glob("*.yml")):
        if categories is not None and path.stem not in categories:
            continue
        pairs = []
        for conversation in yaml.safe_load(path.read_text())["conversations"]:
            turns = [str(turn).strip() for turn in conversation if isinstance(turn, (str, int, float))]
            pairs += [(a, b) for a, b in zip(turns, turns[1:]) if a and b]
        dialogues[path.stem] = pairs
    return dialogues


def write_chatterbot_tasks(folder: str | Path, categories: Sequence[str], test_fraction: float = 0.2,
                           seed: int = 0) -> list[Path]:
    """A small offline task stream: one task folder per chatterbot-corpus category (prompt: an
    utterance, target: its reply), split into train/test. Returns the task folders in order."""
    dialogues = chatterbot_dialogues(categories)
    missing = [c for c in categories if c not in dialogues]
    if missing:
        raise ValueError(f"no chatterbot-corpus category {missing}; known: {sorted(chatterbot_dialogues())}")
    folders = []
    for category in categories:
        pairs = list(dialogues[category])
        random.Random(seed).shuffle(pairs)
        cut = max(1, round(test_fraction * len(pairs)))
        task = Path(folder) / category
        task.mkdir(parents=True, exist_ok=True)
        for split, rows in (("test", pairs[:cut]), ("train", pairs[cut:])):
            lines = [json.dumps({"task": category, "prompt": a, "target": b, "references": [b]}) for a, b in rows]
            (task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        folders.append(task)
    return folders
