"""`switchcit train` input checks that run before any model loads: every row of every data file, task
names that must name PEFT adapters, task.json, metrics, settings and config files, and CLI errors as
one line with exit code 2 that leave an existing run alone; ``--config``; ``--help`` shows every default."""
import dataclasses
import importlib.util
import json
import re
import shutil

import pytest
import torch

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


def refused(capsys, *arguments) -> str:
    """The error of a refused ``switchcit train ARGUMENTS``: one line, exit code 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *map(str, arguments)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert error.startswith("switchcit train: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


# name: (rows of the task folder (write_task's ``bad``), files to write {path under tmp: text}, flags, message)
BAD_INPUT = {
    "a bad JSONL line": (("train", 3, '{"prompt": "x"'), {}, [], r"task/train\.jsonl:3: malformed JSON"),
    "a missing field": (("test", 2, '{"prompt": "x"}'), {}, [], r"task/test\.jsonl:2: has no 'target' field"),
    "an empty split": (None, {"task/test.jsonl": ""}, [], r"task \(test\) has no examples"),
    "an unknown metric": (None, {}, ["--metric", "task=blue"], r"--metric task=blue: unknown metric 'blue'; known: "),
    "a metric for no task": (None, {}, ["--metric", "task=bleu,other=bleu"], r"--metric names other: no task of"),
    "a metric whose field is missing": (None, {}, ["--metric", "task=sari"],
                                        r"its metric sari needs 'source' in every test example; test example 1"),
    "an unknown metric in task.json": (None, {"task/task.json": '{"metric": "f1"}'}, [],
                                       r"task/task\.json: unknown metric 'f1'"),
    "malformed task.json": (None, {"task/task.json": '{"metric": '}, [], r"task/task\.json: malformed JSON"),
    "an unknown task.json key": (None, {"task/task.json": '{"metrics": "sari"}'}, [],
                                 r"task/task\.json: unknown key 'metrics'; known: metric"),
    "an unknown config key": (None, {"run.yaml": "steps: 3\nbatch_sise: 4\n"}, ["--config", "{tmp}/run.yaml"],
                              r"run\.yaml: unknown key 'batch_sise'"),
    "a config value of the wrong type": (None, {"run.yaml": "steps: many\n"}, ["--config", "{tmp}/run.yaml"],
                                         r'run\.yaml: steps: "many" is no int'),
    "a config file that is no YAML": (None, {"run.yaml": "steps: 3\nlr: [1e-3\n"}, ["--config", "{tmp}/run.yaml"],
                                      r"run\.yaml:3: not YAML"),
    "a missing config file": (None, {}, ["--config", "{tmp}/nowhere.yaml"], r"--config .*nowhere\.yaml does not exist"),
    "an unknown choice": (None, {}, ["--lr-scheduler", "cyclic"],
                          r"--lr-scheduler cyclic: choose one of linear, cosine, constant"),
    "a replay rate of 1.5": (None, {}, ["--replay-rate", "1.5"], r"need 0 ≤ replay rate < 1"),
    "an unknown device": (None, {}, ["--device", "gpu0"], r"--device gpu0: "),
    "a field mapping without =": (None, {}, ["--field", "prompt"], r"--field needs OURS=THEIRS, got 'prompt'"),
}
if not torch.cuda.is_available():
    BAD_INPUT["a device this machine lacks"] = (None, {}, ["--device", "cuda"], r"--device cuda: no cuda device here")
if importlib.util.find_spec("tensorboard") is None:
    BAD_INPUT["TensorBoard without tensorboard"] = (None, {}, ["--report-to", "tensorboard"],
                                                    r"--report-to tensorboard needs the tensorboard package")


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_line_naming_its_file_line_or_flag_and_leaves_the_run_alone(base, tmp_path, capsys, name):
    bad, files, flags, message = BAD_INPUT[name]
    task = write_task(tmp_path / "task", train_rows=4, test_rows=2, bad=bad)
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    out = tmp_path / "run"
    (out / "sequential").mkdir(parents=True)
    (out / "config.json").write_text("an earlier run's settings")
    (out / "sequential" / "state.json").write_text('{"stages_done": 1}')
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    error = refused(capsys, "--base", base, "--tasks", task, "--out", out,
                    *(flag.replace("{tmp}", str(tmp_path)) for flag in flags))
    assert re.search(message, error), error
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


class Captured(Exception):
    """What ``train`` was called with, in place of training."""


def test_a_config_file_gives_settings_by_flag_name_and_the_command_line_wins(base, tmp_path, monkeypatch):
    import switchcit.cit.trainer as trainer_module

    def capture(config):
        raise Captured(config)

    monkeypatch.setattr(trainer_module, "train", capture)
    task = write_task(tmp_path / "task")
    (tmp_path / "run.yaml").write_text(
        f"base: {base}\ntasks: [{task}]\nout: {tmp_path / 'run'}\nsteps: 5\nbatch-size: 3\n"
        "gradient_accumulation_steps: 2\nlr: 1.0e-3\ntarget-modules: q_proj,k_proj\nmetric: {task: bleu}\n"
        "field: [label=gold]\ndevice: cpu\nseeds: [3, 4]\n")
    with pytest.raises(Captured) as captured:
        cli.main(["train", "--config", str(tmp_path / "run.yaml"), "--steps", "9", "--metric", "task=rougeL"])
    config = captured.value.args[0]
    assert (config.base, config.tasks, config.out) == (str(base), [str(task)], str(tmp_path / "run"))
    assert (config.steps, config.batch_size, config.gradient_accumulation_steps, config.lr) == (9, 3, 2, 1e-3)
    assert config.target_modules == ["q_proj", "k_proj"] and config.device == "cpu" and config.seeds == [3, 4]
    assert config.metric == {"task": "rougeL"} and config.fields == {"label": "gold"}
    assert (tmp_path / "run" / "train.log").is_file(), "--out from the file: the log goes there"


def test_a_missing_required_setting_is_named(base, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"tasks: {write_task(tmp_path / 'task')}\n")
    error = refused(capsys, "--config", tmp_path / "run.yaml", "--out", tmp_path / "run")
    assert "--base: required (on the command line or in --config)" in error and not (tmp_path / "run").exists()


def test_help_shows_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]  # past the usage line
    for setting in dataclasses.fields(TrainConfig):
        flag = setting.metadata.get("flag", setting.name).replace("_", "-")
        start = re.search(rf"--{flag} [A-Z]", text)
        assert start, flag
        described = text[start.start():]
        following = re.search(r" --[a-z-]+ [A-Z]", described[2:])
        described = described[: following.start() + 2] if following else described
        default = setting.default_factory() if setting.default_factory is not dataclasses.MISSING else setting.default
        if setting.metadata.get("required"):
            assert "(required" in described, described
        elif isinstance(default, (list, dict)):
            shown = ",".join(map(str, default)) or "none"  # no dict setting has entries by default
            assert f"(default: {shown})" in described, described
        elif default is None:
            assert "default: " in described, described  # its help says what None means
        else:
            assert f"(default: {default})" in described, described


def test_base_is_a_folder_or_a_hub_id_in_the_local_cache_never_a_download(base, tmp_path, monkeypatch, capsys):
    """A hub id resolves to its snapshot in the local Hugging Face cache; an id that is not cached is
    refused in one line (nothing is fetched)."""
    from switchcit.pretrained import resolve_model

    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(base, snapshot)
    (hub / "models--someone--tiny-llama" / "refs").mkdir()
    (hub / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(pytest.importorskip("huggingface_hub").constants, "HF_HUB_CACHE", str(hub))
    assert resolve_model("someone/tiny-llama") == snapshot and resolve_model(base) == base
    task = write_task(tmp_path / "task")
    config("someone/tiny-llama", [task], tmp_path / "run").validate()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--base", "someone/not-cached", "--tasks", str(task), "--out", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("switchcit train: someone/not-cached is neither a model folder") and "\n" not in error
