"""Task data: JSONL task folders and Hugging Face datasets with field mapping, clear errors, nested
retained samples."""
import json

import pytest

from switchcit.cit.data import load_task, retained_sample, task_file, task_name


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
    rows = [] if case == "empty" else ROWS[:2] + ([{"question": "?"}] if case == "missing key" else [])
    write_jsonl(folder / "train.jsonl", rows)
    fields = {"answer": "x"} if case == "unknown field" else MAPPING
    source, split = (folder, "test" if case == "missing split" else "train")
    if case == "missing folder":
        source = tmp_path / "nowhere"
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


GOOD = {"prompt": "Is 2 even?", "target": "Yes"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "target": ', r"train\.jsonl:4: malformed JSON: Expecting value"),
    ('"just a string"', r"train\.jsonl:4: a row must be a JSON object, got str"),
    ("42", r"train\.jsonl:4: a row must be a JSON object, got int"),
    ('["a", "b"]', r"train\.jsonl:4: a row must be a JSON object, got list"),
    ('{"prompt": null, "target": "x"}', r"train\.jsonl:4: 'prompt' must be a string, got null"),
    ('{"prompt": "x", "target": 3}', r"train\.jsonl:4: 'target' must be a string, got 3"),
    ('{"prompt": "x", "target": "y", "references": "abc"}', r"train\.jsonl:4: 'references' must be a list of str"),
    ('{"prompt": "x", "target": "y", "references": ["a", 1]}', r"train\.jsonl:4: 'references' must be a list of str"),
    ('{"prompt": "x", "target": "y", "label": true}', r"train\.jsonl:4: 'label' must be a string, got true"),
    ('{"prompt": "x", "target": "y", "source": ["s"]}', r"train\.jsonl:4: 'source' must be a string"),
    ('{"prompt": "a \\ud800 b", "target": "y"}', r"train\.jsonl:4: 'prompt' is no valid Unicode"),
    ('{"prompt": "x"}', r"train\.jsonl:4: has no 'target' field"),
])
def test_every_row_is_checked_and_errors_name_file_and_line(tmp_path, line, message):
    folder = tmp_path / "task"
    write_jsonl(folder / "train.jsonl", [GOOD] * 3)
    with (folder / "train.jsonl").open("a") as file:
        file.write(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_task(folder, "train")


def test_bytes_that_are_no_utf8_are_reported_with_their_line(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "train.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not UTF-8 text"):
        load_task(tmp_path / "task", "train")


def test_references_default_to_the_target_and_keep_a_list_of_strings(tmp_path):
    write_jsonl(tmp_path / "task" / "train.jsonl", [GOOD, GOOD | {"references": ["Yes", "Yes."]},
                                                    GOOD | {"references": None}])
    assert [e.references for e in load_task(tmp_path / "task", "train")] == [["Yes"], ["Yes", "Yes."], ["Yes"]]


def test_task_json_declares_a_task_and_bad_ones_name_the_file(tmp_path):
    folder = tmp_path / "mysimp"
    write_jsonl(folder / "train.jsonl", ROWS)
    assert task_file(folder) == {} and task_file(f"hf:{folder}") == {}
    (folder / "task.json").write_text('{"metric": "sari"}')
    assert task_file(folder) == {"metric": "sari"}
    bad = {b"[1]": r"must be a JSON object, got \[1\]", b'{"metric": 3}': "'metric' must be a string",
           b'{"metric": "sari"': "malformed JSON", b"\xff": "malformed JSON",
           b'{"split": "x"}': "unknown key 'split'; known: metric"}
    for content, message in bad.items():
        (folder / "task.json").write_bytes(content)
        with pytest.raises(ValueError, match=r"mysimp/task\.json: " + message):
            task_file(folder)
