"""The continual training loop end to end on a tiny random Llama and real offline dialogues
(chatterbot-corpus categories as tasks): results and serving folder, fast-failing configs, a run
killed with SIGKILL and restarted ends exactly like an uninterrupted one (a cosine schedule with
warm-up and gradient accumulation included, and its step log), and the 2-process DDP step (gloo)
trains the same adapter as one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("chatterbot_corpus")

from serve_fixtures import tiny_llama_base  # noqa: E402

from switchcit.cit.config import TrainConfig  # noqa: E402
from switchcit.cit.data import write_chatterbot_tasks  # noqa: E402
from switchcit.cit.trainer import train  # noqa: E402

TASKS = ["greetings", "science"]
SMALL = ["--steps", "8", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--eval-examples", "3",
         "--max-new-tokens", "3", "--checkpoint-every", "2", "--retention", "0.5", "--max-length", "96",
         "--switch-layer", "1", "--lr-scheduler", "cosine", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return tiny_llama_base(root / "base"), write_chatterbot_tasks(root / "tasks", TASKS)


def command(base, tasks, out, methods="switchcit,sequential", extra=()):
    return [sys.executable, "-m", "switchcit.cli", "train", "--base", str(base), "--tasks", ",".join(map(str, tasks)),
            "--methods", methods, "--out", str(out), *SMALL, *extra]


def run(cmd, **options):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **options)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(run_dir.glob("*/adapters/*/adapter_model.safetensors")):
        tensors |= {f"{path.parent.name}/{k}": v for k, v in load_file(str(path)).items()}
    for path in sorted(run_dir.glob("*/checkpoint.safetensors")):  # single-adapter methods' final weights
        tensors |= {f"{path.parent.name}/{k}": v for k, v in load_file(str(path)).items() if k.startswith("param/")}
    return tensors


def log_history(method_dir: Path) -> list[dict]:
    """The step log, less its timings."""
    rows = [json.loads(line) for line in (method_dir / "log_history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_second"} for row in rows]


def results(run_dir: Path) -> dict:
    return {m.name: json.loads((m / "results.json").read_text()) for m in sorted(run_dir.iterdir())
            if (m / "results.json").is_file()}


@pytest.fixture(scope="module")
def uninterrupted(stream, tmp_path_factory):
    base, tasks = stream
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    done = run(command(base, tasks, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_run_writes_results_report_plots_and_a_servable_folder(uninterrupted, stream):
    out, stdout = uninterrupted
    for method in ("switchcit", "sequential"):
        r = json.loads((out / method / "results.json").read_text())
        assert r["tasks"] == TASKS and len(r["matrix"]) == 2 and all(len(row) == 2 for row in r["matrix"])
        assert {"AP", "BWT", "FWT", "forgetting"} <= set(r)
        assert (out / method / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "switchcit" / "results.json").read_text())["switch_accuracy"]) == 2
    assert "| switchcit |" in (out / "report.md").read_text()
    assert "AP" in stdout and "report.md" in stdout

    from switchcit.adapters import adapter_layers
    from switchcit.pipeline import SwitchModel

    for task in TASKS:  # --switch-layer 1: below it the base model, so the switch routes inside the forward
        assert adapter_layers(out / "switchcit" / "adapters" / task) == {1}
    model = SwitchModel.from_run(out)
    assert model.switch.tasks == TASKS and model.switch.layer == 1 and model.one_pass
    texts, routed = model.generate(["Hello", "What is physics?"], max_new_tokens=2)
    assert len(texts) == 2 and all(t in (*TASKS, None) for t in routed)


def test_eval_predictions_are_what_the_server_answers(uninterrupted):
    """``switchcit eval RUN_DIR --predictions FILE`` rebuilds every method's final stage from what the run
    saved and gets the last row of R again; each switchcit prediction (adapter and text) is what
    ``switchcit serve`` answers to the same prompt with model "auto", temperature 0 and that max_tokens."""
    import httpx
    from serve_fixtures import serving

    from switchcit.pipeline import SwitchModel
    from switchcit.serving.app import create_app

    out, _ = uninterrupted
    predictions_file = out / "predictions.jsonl"
    done = run([sys.executable, "-m", "switchcit.cli", "eval", str(out), "--predictions", str(predictions_file)])
    assert done.returncode == 0, done.stderr[-3000:]
    for method in ("switchcit", "sequential"):
        final = json.loads((out / method / "results.json").read_text())["matrix"][-1]
        assert json.loads((out / method / "eval.json").read_text()) == dict(zip(TASKS, final))
        assert method in done.stdout
    predictions = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert len(predictions) == 2 * len(TASKS) * 3  # methods × tasks × eval examples
    assert {p["adapter"] for p in predictions if p["method"] == "sequential"} == {"sequential"}
    routed = [p for p in predictions if p["method"] == "switchcit"]
    assert set(routed[0]) == {"method", "task", "prompt", "adapter", "max_tokens", "output", "reference", "score"}

    with serving(create_app(SwitchModel.from_run(out))) as (url, _):
        for p in routed:
            body = {"model": "auto", "temperature": 0, "max_tokens": p["max_tokens"],
                    "messages": [{"role": "user", "content": p["prompt"]}]}
            choice = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
            assert (choice["adapter"], choice["message"]["content"].strip()) == (p["adapter"], p["output"]), p


def test_killed_run_resumes_to_the_same_adapters_and_results(uninterrupted, stream, tmp_path):
    """SIGKILL mid-training (after a checkpoint) and again mid-way through the second method; the same
    command then finishes the run, and everything equals the uninterrupted run."""
    base, tasks = stream
    out = tmp_path / "killed"
    cmd = command(base, tasks, out)
    for marker in (out / "switchcit" / "checkpoint.safetensors", out / "sequential" / "checkpoint.safetensors"):
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=os.environ | {"OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while not marker.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in (out / "train.log").read_text()

    expected_dir, _ = uninterrupted
    assert results(out) == results(expected_dir)
    expected, got = adapter_tensors(expected_dir), adapter_tensors(out)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    for method in ("switchcit", "sequential"):  # one row per step, none lost or repeated, the same numbers
        steps = [(row["stage"], row["step"]) for row in log_history(expected_dir / method)]
        assert steps == [(stage, step) for stage in range(len(TASKS)) for step in range(1, 9)]
        assert log_history(out / method) == log_history(expected_dir / method)


def test_bad_configs_fail_before_training(stream, tmp_path):
    base, tasks = stream
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    (empty / "test.jsonl").write_text("")
    cases = {
        "does not exist": dict(tasks=[str(tmp_path / "nowhere")]),
        "has no examples": dict(tasks=[str(empty)]),
        "unknown field name": dict(fields={"answer": "reply"}),
        "unknown method": dict(methods=["switchcit", "finetune"]),
        "neither a model folder": dict(base=str(tmp_path)),
        "steps must be at least 1": dict(steps=0),
        r"--switch-layer 2 is outside \[0, 2\)": dict(switch_layer=2),
    }
    for message, change in cases.items():
        config = TrainConfig(base=str(base), tasks=[str(t) for t in tasks], out=str(tmp_path / "out"), switch_layer=1)
        for key, value in change.items():
            setattr(config, key, value)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(config)
        assert not (tmp_path / "out").exists(), "nothing written before the config is checked"
    failed = run(command(base, [tmp_path / "nowhere"], tmp_path / "cli"))
    assert failed.returncode != 0 and "does not exist" in failed.stderr and "Traceback" not in failed.stderr
    failed = run(command(base, tasks, tmp_path / "cli", extra=["--switch-layer", "-1"]))
    assert failed.returncode != 0 and "--switch-layer -1 is outside [0, 2)" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "cli").exists()


def test_two_process_ddp_step_matches_one_process(stream, tmp_path):
    """torchrun, 2 CPU processes on gloo, each half of every batch: the same adapter as one process
    with the whole batch (dropout off, so both see the same function)."""
    base, tasks = stream
    extra = ["--dropout", "0", "--steps", "4"]
    single = run(command(base, tasks[:1], tmp_path / "single", "sequential", extra))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "switchcit.cli", *command(base, tasks[:1], tmp_path / "ddp", "sequential", extra)[3:]]
    ddp = run(ddp_cmd)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "ddp")
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
    lora_b = [one[key] for key in one if ".lora_B." in key]
    assert lora_b and max(float(b.abs().max()) for b in lora_b) > 0, "B starts at zero: it trained"


def test_target_loss_reads_only_the_logits_it_needs(generator):
    """The loss from logits of the target positions only equals the loss from all logits (ragged
    prompts and targets, right padding)."""
    import transformers

    from switchcit.cit.trainer import IGNORE, target_loss

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    input_ids = torch.randint(0, 100, (3, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :7] = labels[1, :9] = labels[2, :5] = IGNORE  # prompts
    labels[2, 10:] = IGNORE  # padding
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                                   reduction="none")
    expected = (token_loss.sum(1) / (targets != IGNORE).sum(1)).mean()
    torch.testing.assert_close(target_loss(model, input_ids, labels, torch.ones_like(input_ids)), expected)


def test_a_collated_batch_gives_each_example_its_own_loss_and_gradient(generator):
    """Left padding (targets end-aligned, logits of the target span only) changes nothing: the batch's
    loss and gradient equal the mean of each example's loss and gradient computed alone, unpadded."""
    import transformers

    from switchcit.cit.trainer import IGNORE, collate, target_loss

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, dtype=torch.float64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    pairs = []
    for prompt_length, target_length in ((9, 3), (2, 6), (5, 1)):  # ragged prompts and targets
        ids = torch.randint(0, 100, (prompt_length + target_length,), generator=generator).tolist()
        pairs.append((ids, [IGNORE] * prompt_length + ids[prompt_length:]))

    def loss_and_grad(batch):
        model.zero_grad()
        loss = target_loss(model, **batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    batch = collate(pairs, pad_id=0)
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["labels"][:, -1] != IGNORE).all()
    loss, grads = loss_and_grad(batch)
    alone = [loss_and_grad(collate([pair], pad_id=0)) for pair in pairs]
    torch.testing.assert_close(loss, sum(a[0] for a in alone) / len(pairs))
    for index, grad in enumerate(grads):
        torch.testing.assert_close(grad, sum(a[1][index] for a in alone) / len(pairs))


def test_each_method_routes_evaluation_prompts_to_the_adapters_it_has(stream, tmp_path, monkeypatch):
    """At stage t: oracle sends a task's prompts to its adapter only once that task was trained (the
    base model before), sequential sends every prompt to its one adapter, and the base row uses none."""
    import switchcit.cit.trainer as trainer

    base, tasks = stream
    calls = []
    real = trainer.evaluate_tasks

    def recording(pipeline, eval_sets, adapters_of, **options):
        names = [t for t, examples in eval_sets.items() for _ in examples]
        calls.append(dict(zip(names, adapters_of(names))))
        return real(pipeline, eval_sets, adapters_of, **options)

    monkeypatch.setattr(trainer, "evaluate_tasks", recording)
    config = TrainConfig(base=str(base), tasks=[str(t) for t in tasks], out=str(tmp_path / "run"), switch_layer=1,
                         methods=["oracle", "sequential"], steps=2, batch_size=2, eval_examples=2, max_new_tokens=2)
    train(config)
    baseline, oracle_0, oracle_1, sequential_0, sequential_1 = calls
    assert baseline == {"greetings": None, "science": None}
    assert oracle_0 == {"greetings": "greetings", "science": None}
    assert oracle_1 == {"greetings": "greetings", "science": "science"}
    assert sequential_0 == sequential_1 == {"greetings": "sequential", "science": "sequential"}


def test_restart_between_methods_loads_the_shared_per_task_adapters(stream, tmp_path):
    """A restart after switchcit finished and before oracle began: oracle evaluates the per-task
    adapters switchcit saved (loaded from their folders, nothing retrained) and gets its full matrix."""
    import shutil

    base, tasks = stream
    config = TrainConfig(base=str(base), tasks=[str(t) for t in tasks], out=str(tmp_path / "run"), switch_layer=1,
                         methods=["switchcit", "oracle"], steps=2, batch_size=2, eval_examples=2, max_new_tokens=2)
    first = train(config)
    adapters = adapter_tensors(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "oracle")  # as if killed right after switchcit's last stage
    again = train(config)
    assert again["oracle"]["matrix"] == first["oracle"]["matrix"] and len(again["oracle"]["matrix"]) == 2
    assert adapter_tensors(tmp_path / "run").keys() == adapters.keys()
    for key, value in adapters.items():
        assert torch.equal(adapter_tensors(tmp_path / "run")[key], value), key
