"""The training loop as users of transformers expect it, on a tiny random Llama and small synthetic
tasks: one log row per optimizer step, transformers' LR schedules (checked against hand-computed
values), gradient accumulation equal to the whole batch, bfloat16 autocast with float32 adapters,
TensorBoard, replay at its rate, and a task's declared metric."""
import importlib.util
import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from serve_fixtures import tiny_llama_base  # noqa: E402

from switchcit.cit.checkpoint import LOG_HISTORY_FILE, append_log_row, trim_log_history  # noqa: E402
from switchcit.cit.config import TrainConfig  # noqa: E402
from switchcit.cit.data import Example  # noqa: E402
from switchcit.cit.trainer import Trainer, draw_batch, lr_schedule  # noqa: E402

SHARED_SIMPLIFICATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "cit" / "simplification"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_base(tmp_path_factory.mktemp("base") / "base")


def write_task(folder: Path, rows: int = 12) -> Path:
    folder.mkdir(parents=True)
    for split, count in (("train", rows), ("test", 2)):
        lines = [json.dumps({"prompt": f"{folder.name} question {i}?", "target": f"answer {i}"}) for i in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def small_config(base, tasks, out, **settings) -> TrainConfig:
    defaults = dict(methods=["sequential"], steps=4, batch_size=2, eval_examples=1, max_new_tokens=1,
                    switch_layer=1, device="cpu")
    return TrainConfig(base=str(base), tasks=[str(t) for t in tasks], out=str(out), **defaults | settings)


def log_rows(method_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (method_dir / LOG_HISTORY_FILE).read_text().splitlines()]


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The single-adapter method's final weights, from its checkpoint."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run_dir / "sequential" / "checkpoint.safetensors")).items()
            if k.startswith("param/")}


# Hand-computed factors of lr for 6 steps: the LR each step uses, after a linear warm-up from 0 (transformers').
SCHEDULES = {
    "linear, 2 warm-up steps": (dict(lr_scheduler="linear", warmup_steps=2), [0, 0.5, 1, 0.75, 0.5, 0.25]),
    "cosine, warm-up ratio 1/3": (dict(lr_scheduler="cosine", warmup_ratio=1 / 3),
                                  [0, 0.5, 1, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                   (1 + math.cos(3 * math.pi / 4)) / 2]),
    "constant, 1 warm-up step": (dict(lr_scheduler="constant", warmup_steps=1), [0, 1, 1, 1, 1, 1]),
    "constant, no warm-up": (dict(lr_scheduler="constant"), [1, 1, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_lr_schedules_match_hand_computed_values(name):
    settings, factors = SCHEDULES[name]
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=2e-3)
    schedule = lr_schedule(optimizer, TrainConfig(base="", tasks=[], out="", **settings), steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([2e-3 * f for f in factors], abs=1e-12)


def test_one_log_row_per_step_and_the_schedule_restarts_each_task(base, tmp_path):
    tasks = [write_task(tmp_path / "alpha"), write_task(tmp_path / "beta")]
    settings, factors = SCHEDULES["linear, 2 warm-up steps"]
    Trainer(small_config(base, tasks, tmp_path / "run", steps=6, lr=1e-3, **settings)).run()
    rows = log_rows(tmp_path / "run" / "sequential")
    assert [(r["task"], r["stage"], r["step"]) for r in rows] == [(t, s, k) for s, t in enumerate(("alpha", "beta"))
                                                                  for k in range(1, 7)]
    assert [r["learning_rate"] for r in rows] == pytest.approx([1e-3 * f for f in factors] * 2, abs=1e-12)
    assert set(rows[0]) == {"method", "task", "stage", "step", "loss", "learning_rate", "grad_norm",
                            "tokens_per_second"}
    assert all(r["method"] == "sequential" and r["loss"] > 0 and r["tokens_per_second"] > 0 for r in rows)


def test_gradient_accumulation_trains_like_the_whole_batch(base, tmp_path):
    """2 micro-batches of 2 examples per step give the adapter that 1 batch of 4 gives (the same draws;
    the loss is each example's mean target loss, averaged), gradient clipping included."""
    task = write_task(tmp_path / "alpha")
    Trainer(small_config(base, [task], tmp_path / "whole", batch_size=4, dropout=0.0, max_grad_norm=0.05)).run()
    Trainer(small_config(base, [task], tmp_path / "accumulated", batch_size=2, gradient_accumulation_steps=2,
                         dropout=0.0, max_grad_norm=0.05)).run()
    one, two = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "accumulated")
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
    rows_one, rows_two = log_rows(tmp_path / "whole" / "sequential"), log_rows(tmp_path / "accumulated" / "sequential")
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], rel=1e-4)
    assert all(r["grad_norm"] > 0.05 for r in rows_one), "the clipping bound was below every step's norm"


def test_bfloat16_runs_the_forward_under_autocast_and_keeps_the_adapters_float32(base, tmp_path, monkeypatch):
    import switchcit.cit.trainer as trainer_module

    seen = []
    real_loss = trainer_module.target_loss

    def recording(model, **batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_loss(model, **batch)

    monkeypatch.setattr(trainer_module, "target_loss", recording)
    trainer = Trainer(small_config(base, [write_task(tmp_path / "alpha")], tmp_path / "run", dtype="bfloat16"))
    trainer.run()
    assert seen == [(True, torch.bfloat16)] * 4
    adapter = {n: p for n, p in trainer.model.named_parameters() if ".sequential." in n}
    assert adapter and {p.dtype for p in adapter.values()} == {torch.float32}
    assert any(float(p.detach().abs().max()) > 0 for n, p in adapter.items() if "lora_B" in n), "B starts at 0"
    frozen = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16} and trainer.device == torch.device("cpu")
    assert all(math.isfinite(r["loss"]) for r in log_rows(tmp_path / "run" / "sequential"))


def test_report_to_tensorboard_writes_every_step(base, tmp_path, monkeypatch):
    """With a stand-in SummaryWriter (tensorboard need not be installed): each row's numbers, the
    method's step count as the x axis, under RUN_DIR/tensorboard/<method>."""
    scalars, folders = [], []

    class SummaryWriter:
        def __init__(self, folder):
            folders.append(folder)

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: object() if name == "tensorboard" else real_find_spec(name, *rest))
    tasks = [write_task(tmp_path / "alpha"), write_task(tmp_path / "beta")]
    Trainer(small_config(base, tasks, tmp_path / "run", steps=2, report_to="tensorboard")).run()
    assert folders == [str(tmp_path / "run" / "tensorboard" / "sequential")] * 2  # one writer per stage
    rows = log_rows(tmp_path / "run" / "sequential")
    assert [(tag, step) for tag, _, step in scalars if tag == "train/loss"] == [("train/loss", k) for k in (1, 2, 3, 4)]
    assert [value for tag, value, _ in scalars if tag == "train/learning_rate"] == [r["learning_rate"] for r in rows]


def test_a_restart_keeps_the_rows_up_to_its_checkpoint_and_drops_the_rest(tmp_path):
    """Rows written after the checkpoint a restart resumes from (and a line torn by the kill) go: the
    restart writes them again, so the history ends with one row per step."""
    for stage, step in [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]:
        append_log_row(tmp_path, {"stage": stage, "step": step, "loss": 1.0})
    with (tmp_path / LOG_HISTORY_FILE).open("a") as log:
        log.write('{"stage": 1, "st')
    assert trim_log_history(tmp_path, stage=1, step=2) == 4
    assert [(r["stage"], r["step"]) for r in log_rows(tmp_path)] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert trim_log_history(tmp_path, stage=1, step=0) == 2


def test_draw_batch_replays_at_its_rate_for_any_batch_size():
    current = [Example("new", f"q{i}", "a") for i in range(1000)]
    replayed = [Example("old", f"r{i}", "a") for i in range(10)]  # a 1 % sample: by size, 1 % of the draws
    for seed in range(50):
        batch = draw_batch(current, replayed, 8, 0.25, seed)
        assert len(batch) == 8 and sum(e.task == "old" for e in batch) == 2
    small = [sum(e.task == "old" for e in draw_batch(current, replayed, 2, 0.25, seed)) for seed in range(4000)]
    assert set(small) == {0, 1} and sum(small) / (2 * len(small)) == pytest.approx(0.25, abs=0.02)
    assert draw_batch(current, [], 8, 0.25, 0) == draw_batch(current, [], 8, 0.25, 0)  # seeded
    assert all(e.task == "new" for e in draw_batch(current, [], 8, 0.25, 0))


def test_replay_draws_its_rate_of_each_batch_from_the_earlier_tasks(base, tmp_path, monkeypatch):
    """The training batches of the second task: exactly a quarter of each 8-example batch comes from
    the first task's retained examples (2 of 200 examples), where drawing from the pooled data gave 1 %."""
    import switchcit.cit.trainer as trainer_module

    drawn = []
    real_encode = trainer_module.encode_example

    def recording(tokenizer, example, max_length):
        drawn.append(example.task)
        return real_encode(tokenizer, example, max_length)

    monkeypatch.setattr(trainer_module, "encode_example", recording)
    tasks = [write_task(tmp_path / "alpha", rows=200), write_task(tmp_path / "beta", rows=200)]
    trainer = Trainer(small_config(base, tasks, tmp_path / "run", methods=["replay"], steps=3, batch_size=4,
                                   gradient_accumulation_steps=2, retention=0.01, replay_rate=0.25))
    trainer.run()
    assert len(trainer.retained["alpha"]) == 2
    second_task = drawn[3 * 8:]
    assert len(second_task) == 3 * 8 and second_task.count("alpha") == 3 * 2


@pytest.mark.skipif(not SHARED_SIMPLIFICATION.is_dir(), reason="needs ../shared/data/cit")
def test_a_task_json_metric_scores_a_renamed_simplification_task_with_sari(base, tmp_path, monkeypatch):
    """``mysimp``, a copy of simplification whose name the fallback does not know, says
    ``{"metric": "sari"}``: results.json names SARI, and the score is the corpus SARI of its outputs.
    Without task.json it falls back to ROUGE-L, and the run says so."""
    import switchcit.cit.trainer as trainer_module
    from switchcit.cit.metrics import corpus_sari

    folder = tmp_path / "mysimp"
    folder.mkdir()
    for split, count in (("train", 8), ("test", 3)):
        lines = (SHARED_SIMPLIFICATION / f"{split}.jsonl").read_text().splitlines()[:count]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    test_rows = {row["prompt"]: row for row in map(json.loads, (folder / "test.jsonl").read_text().splitlines())}
    calls = []
    real_evaluate = trainer_module.evaluate_tasks

    def recording(*args, **options):
        scores, predictions = real_evaluate(*args, **options)
        calls.append((scores, predictions))
        return scores, predictions

    monkeypatch.setattr(trainer_module, "evaluate_tasks", recording)
    messages, logger = [], logging.getLogger("switchcit")
    handler, level = logging.Handler(), logger.level
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for declared in (True, False):
            if declared:
                (folder / "task.json").write_text(json.dumps({"metric": "sari"}))
            else:
                (folder / "task.json").unlink()
            out = tmp_path / f"run-{declared}"
            Trainer(small_config(base, [folder], out, steps=1, eval_examples=3, max_new_tokens=4)).run()
            results = json.loads((out / "sequential" / "results.json").read_text())
            assert results["metric"] == {"mysimp": "sari" if declared else "rougeL"}
            fallback_logged = any("mysimp declares no metric" in m and "rougeL" in m for m in messages)
            assert fallback_logged != declared
            messages.clear()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    scores, predictions = calls[1]  # the declared run, after its training (calls[0]: the base model)
    rows = [test_rows[p["prompt"]] for p in predictions]
    expected = corpus_sari([r["source"] for r in rows], [p["output"] for p in predictions],
                           [r["references"] for r in rows])
    assert scores["mysimp"] == pytest.approx(expected)

