"""`switchcit train` input checks that run before any model loads: every row of every data file, task
names that must name PEFT adapters, and CLI errors as one line with exit code 2."""
import json

import pytest

from switchcit import cli
from switchcit.cit.config import TrainConfig


def write_task(folder, train_rows=3, test_rows=2, bad=None):
    """A task folder of good rows; ``bad = (split, line, text)`` replaces one line."""
    folder.mkdir(parents=True)
    for split, count in (("train", train_rows), ("test", test_rows)):
        lines = [json.dumps({"prompt": f"Q{i}?", "target": f"A{i}"}) for i in range(count)]
        if bad and bad[0] == split:
            lines[bad[1] - 1] = bad[2]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def base(tmp_path):
    """A base model folder with nothing but its config: validation must not need the weights."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    return tmp_path / "base"


def config(base, tasks, out) -> TrainConfig:
    return TrainConfig(base=str(base), tasks=[str(t) for t in tasks], out=str(out))


@pytest.mark.parametrize("bad, message", [
    (("train", 40, '{"prompt": "x", "target": '), r"train\.jsonl:40: malformed JSON"),
    (("test", 3, '{"prompt": null, "target": "x"}'), r"test\.jsonl:3: 'prompt' must be a string, got null"),
])
def test_validate_checks_every_row_of_every_file(base, tmp_path, bad, message):
    good = write_task(tmp_path / "good")
    task = write_task(tmp_path / "task", train_rows=50, test_rows=5, bad=bad)
    with pytest.raises(ValueError, match=message):
        config(base, [good, task], tmp_path / "out").validate()


@pytest.mark.parametrize("name", ["good.v2", "..", "train", "items", "auto", "base", "sequential"])
def test_task_names_that_cannot_name_an_adapter_are_refused(base, tmp_path, name):
    if name == "..":  # a folder given as good/sub/..: its files are good's, its name is ".."
        (write_task(tmp_path / "data" / "good") / "sub").mkdir()
        folder = tmp_path / "data" / "good" / "sub" / ".."
    else:
        folder = write_task(tmp_path / "data" / name)
    with pytest.raises(ValueError, match=f"task name '{name}' .* can't name an adapter"):
        config(base, [folder], tmp_path / "out").validate()


def test_names_peft_takes_are_accepted(base, tmp_path):
    config(base, [write_task(tmp_path / "good-v2"), write_task(tmp_path / "über_task")], tmp_path / "out").validate()


def test_cli_errors_are_one_line_exit_code_2_and_leave_an_existing_run_alone(base, tmp_path, capsys):
    task = write_task(tmp_path / "task", train_rows=8, bad=("train", 7, "[1, 2]"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("an earlier run's settings")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--base", str(base), "--tasks", str(task), "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("switchcit train: ") and "train.jsonl:7: a row must be a JSON object" in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "an earlier run's settings"

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("switchcit eval: ")


def test_a_run_folder_with_other_settings_is_refused_before_any_work(base, tmp_path, capsys):
    task = write_task(tmp_path / "task")
    first = config(base, [task], tmp_path / "run")
    first.validate()
    first.save()
    saved = (tmp_path / "run" / "config.json").read_text()
    first.validate()  # the same settings: continue the run
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--base", str(base), "--tasks", str(task), "--out", str(tmp_path / "run"), "--steps", "7"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds a run with other settings (steps)" in error
    assert (tmp_path / "run" / "config.json").read_text() == saved
