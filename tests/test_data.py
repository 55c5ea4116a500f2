"""Task data: JSONL task folders and Hugging Face datasets with field mapping, clear errors, nested
retained samples."""
import json

import pytest

from switchcit.cit.data import load_task, retained_sample, task_name


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [{"question": f"Is {n} even? Yes or no?", "answer": "Yes" if n % 2 == 0 else "No", "gold": n % 2 == 0}
        for n in range(7)]
MAPPING = {"prompt": "question", "target": "answer"}


def test_jsonl_folder_with_field_mapping(tmp_path):
    write_jsonl(tmp_path / "parity" / "train.jsonl", ROWS)
    examples = load_task(tmp_path / "parity", "train", MAPPING)
    assert [e.prompt for e in examples] == [r["question"] for r in ROWS]
    assert [e.target for e in examples] == [r["answer"] for r in ROWS]
    assert examples[0].task == "parity" and examples[0].references == ["Yes"]
    assert len(load_task(tmp_path / "parity", "train", MAPPING, limit=3)) == 3


def test_hugging_face_dataset_with_field_mapping(tmp_path):
    """``hf:NAME`` goes through ``datasets.load_dataset`` (here a local dataset folder; a hub name
    works the same with a network)."""
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "parity-ds" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "parity-ds" / "test.jsonl", ROWS[:2])
    source = f"hf:{tmp_path / 'parity-ds'}"
    assert task_name(source) == "parity-ds"
    train = load_task(source, "train", MAPPING)
    assert [(e.prompt, e.target, e.task) for e in train] == [(r["question"], r["answer"], "parity-ds") for r in ROWS]
    assert len(load_task(source, "test", MAPPING)) == 2
    with pytest.raises(FileNotFoundError, match="cannot be loaded"):
        load_task(f"hf:{tmp_path / 'nowhere'}", "train", MAPPING)


@pytest.mark.parametrize("case, message", [
    ("missing folder", "does not exist"), ("missing split", "has no test.jsonl"), ("empty", "has no examples"),
    ("unknown field", "unknown field name"), ("missing key", "has no 'answer' field"),
])
def test_bad_tasks_raise_clear_errors(tmp_path, case, message):
    folder = tmp_path / "task"
    write_jsonl(folder / "train.jsonl", [] if case == "empty" else ROWS[:2] + ([{"question": "?"}] if case == "missing key" else []))
    fields = {"answer": "x"} if case == "unknown field" else MAPPING
    source, split = (tmp_path / "nowhere", "train") if case == "missing folder" else (folder, "test" if case == "missing split" else "train")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        load_task(source, split, fields)


def test_retained_samples_are_nested_and_never_empty():
    items = list(range(1000))
    one, tenth = retained_sample(items, 0.01, seed=3), retained_sample(items, 0.001, seed=3)
    assert len(one) == 10 and len(tenth) == 1 and set(tenth) <= set(one)
    assert len(set(one)) == 10 and one != retained_sample(items, 0.01, seed=4)
    assert len(retained_sample(items, 0.00001)) == 1
    with pytest.raises(ValueError, match="fraction"):
        retained_sample(items, 0)
