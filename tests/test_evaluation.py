"""The evaluation side of a continual run on a tiny random Llama: test sets of 200 examples by default,
every stage's predictions saved per example, the trivial baseline, intervals in results.json, and
multi-seed runs (``--seeds``) that continue after an interruption to the same results."""
import argparse
import json

import pytest

pytest.importorskip("peft")

from serve_fixtures import tiny_llama_base  # noqa: E402

from switchcit.cit import commands  # noqa: E402
from switchcit.cit.config import TrainConfig  # noqa: E402
from switchcit.cit.data import load_task  # noqa: E402
from switchcit.cit.evaluation import load_eval_sets, read_predictions, trivial_baseline  # noqa: E402
from switchcit.cit.metrics import corpus_sari, sari  # noqa: E402
from switchcit.cit.trainer import Trainer, train  # noqa: E402

# covidfact (Yes/No accuracy): "No" is the train split's majority; simplification (SARI) has sources.
FACTS_TRAIN = [("Masks reduce spread?", "Yes")] * 4 + [("Garlic cures it?", "No"), ("5G spreads it?", "No"),
                                                       ("Bleach is a drink?", "No"), ("Cold kills it?", "No"),
                                                       ("Sun cures it?", "No")]
FACTS_TEST = [("Vaccines help?", "Yes"), ("Hot tea cures it?", "No"), ("Hand washing helps?", "Yes"),
              ("Onions cure it?", "No"), ("Vitamin C cures it?", "No")]
SENTENCES = ["the committee deliberated at considerable length", "the physician prescribed a medication",
             "the weather was exceptionally inclement", "he purchased an automobile", "she commenced her employment",
             "the residence was enormous", "they utilised the apparatus"]
SIMPLER = ["the group talked for a long time", "the doctor gave a drug", "the weather was very bad",
           "he bought a car", "she started her job", "the house was huge", "they used the tool"]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    facts = root / "tasks" / "covidfact"
    facts.mkdir(parents=True)
    for split, rows in (("train", FACTS_TRAIN), ("test", FACTS_TEST)):
        (facts / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"True or false: {claim}", "target": label, "label": label}) + "\n"
            for claim, label in rows))
    simplification = root / "tasks" / "simplification"
    simplification.mkdir(parents=True)
    pairs = list(zip(SENTENCES, SIMPLER))
    for split, rows in (("train", pairs[:4]), ("test", pairs[4:])):
        (simplification / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"Simplify: {source}", "target": simple, "source": source, "references": [simple]})
            + "\n" for source, simple in rows))
    return tiny_llama_base(root / "base"), [facts, simplification]


def small_config(stream, out, **changes) -> TrainConfig:
    base, tasks = stream
    settings = dict(base=str(base), tasks=[str(t) for t in tasks], out=str(out), switch_layer=1, steps=2,
                    batch_size=2, max_new_tokens=3, checkpoint_every=1, methods=["sequential"])
    return TrainConfig(**(settings | changes))


def test_eval_sets_take_200_examples_by_default_or_all_of_a_smaller_task(tmp_path):
    for name, count in (("large", 250), ("small", 30)):
        folder = tmp_path / name
        folder.mkdir()
        for split in ("train", "test"):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "target": "a"}) + "\n"
                                                           for i in range(count)))
    config = TrainConfig(base="unused", tasks=[str(tmp_path / "large"), str(tmp_path / "small")], out="unused")
    eval_sets = load_eval_sets(config)
    assert len({e.prompt for e in eval_sets["large"]}) == 200
    assert sorted(e.prompt for e in eval_sets["small"]) == sorted(f"q{i}" for i in range(30))
    assert len(load_eval_sets(TrainConfig(base="", tasks=config.tasks, out="", eval_examples=50))["large"]) == 50


def test_trivial_baseline_is_the_majority_class_or_a_copy_of_the_input(stream):
    _, (facts, simplification) = stream
    rule, answers = trivial_baseline("accuracy", load_task(facts, "train"), load_task(facts, "test"))
    assert rule == "majority class 'No'" and answers == ["No"] * len(FACTS_TEST)
    rule, answers = trivial_baseline("sari", load_task(simplification, "train"), load_task(simplification, "test"))
    assert rule == "copy of the source" and answers == SENTENCES[4:]
    rule, answers = trivial_baseline("rougeL", [], load_task(facts, "test"))
    assert rule == "copy of the prompt" and answers[0] == "True or false: Vaccines help?"


def test_run_saves_every_stage_s_predictions_and_results_with_intervals(stream, tmp_path):
    out = tmp_path / "run"
    results = train(small_config(stream, out, methods=["sequential", "multitask"]))
    tasks = ["covidfact", "simplification"]
    for method in ("sequential", "multitask"):
        stages = sorted(p.name for p in (out / method / "predictions").iterdir())
        assert stages == (["stage-1.jsonl", "stage-2.jsonl"] if method == "sequential" else ["stage-2.jsonl"])
    records = read_predictions(out / "sequential" / "predictions" / "stage-2.jsonl")
    assert [r["task"] for r in records] == ["covidfact"] * 5 + ["simplification"] * 3
    assert set(records[0]) == {"task", "prompt", "adapter", "max_tokens", "output", "reference", "score"}
    assert {r["adapter"] for r in records} == {"sequential"}
    facts, simple = records[:5], records[5:]  # the test examples in the eval set's (drawn) order
    assert sorted((r["prompt"], r["reference"]) for r in facts) == sorted((f"True or false: {claim}", label)
                                                                          for claim, label in FACTS_TEST)
    # Per-example scores: the metric on that example alone; the cell is the corpus metric.
    sequential = results["sequential"]
    assert sum(r["score"] for r in facts) / 5 == pytest.approx(sequential["matrix"][1][0])
    simpler_of = {f"Simplify: {source}": (source, simpler) for source, simpler in zip(SENTENCES, SIMPLER)}
    sources, references = zip(*(simpler_of[r["prompt"]] for r in simple))
    for r, source, simpler in zip(simple, sources, references):
        assert r["reference"] == simpler and r["score"] == pytest.approx(sari(source, r["output"], [simpler]))
    assert sequential["matrix"][1][1] == pytest.approx(
        corpus_sari(sources, [r["output"] for r in simple], [[s] for s in references]))
    base_records = read_predictions(out / "predictions" / "base-model.jsonl")
    assert {r["adapter"] for r in base_records} == {"base"} and len(base_records) == 8
    assert sequential["baseline"] == pytest.approx(list(json.loads((out / "baseline.json").read_text()).values()))

    on_disk = json.loads((out / "sequential" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(sequential)) and on_disk["seeds"] == [0]
    for name in ("AP", "BWT", "FWT", "forgetting"):
        low, high = on_disk[f"{name}_ci"]
        assert low <= on_disk[name] <= high, name
    assert len(on_disk["matrix_ci"]) == 2 and on_disk["matrix_ci"][1][0][0] <= on_disk["matrix"][1][0]
    assert results["multitask"]["matrix"][0] == [None, None] and results["multitask"]["matrix_ci"][0] == [None, None]
    # Trivial baseline: 3 of the 5 test facts are "No"; the copied sources score SARI of a copy.
    assert on_disk["trivial_baseline"][0] == pytest.approx(60)
    assert on_disk["trivial_baseline"][1] == pytest.approx(corpus_sari(SENTENCES[4:], SENTENCES[4:],
                                                                       [[s] for s in SIMPLER[4:]]))
    assert on_disk["trivial_rule"] == {"covidfact": "majority class 'No'", "simplification": "copy of the source"}
    report = (out / "report.md").read_text()
    assert "| trivial baseline | — | — | — | — | 60.00 [" in report and "| base model |" in report
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["tasks"] == tasks


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (p.suffix == ".jsonl" and "predictions" in p.parts or p.name == "results.json")}


def test_seeds_run_the_stream_per_seed_and_continue_after_an_interruption(stream, tmp_path, monkeypatch):
    """--seeds 0,1: one whole run per seed in RUN/seed-<s>/, results over both in RUN/. Interrupted in
    seed 1's first evaluation, the same call finishes it: every results.json and prediction file equals
    the uninterrupted run's."""
    whole = train(small_config(stream, tmp_path / "whole", seeds=[0, 1]))
    sequential = whole["sequential"]
    assert sequential["seeds"] == [0, 1]
    per_seed = [json.loads((tmp_path / "whole" / f"seed-{s}" / "sequential" / "results.json").read_text())
                for s in (0, 1)]
    assert [r["seeds"] for r in per_seed] == [[0], [1]]
    assert sequential["AP"] == pytest.approx((per_seed[0]["AP"] + per_seed[1]["AP"]) / 2)
    assert sequential["matrix"][0][1] == pytest.approx((per_seed[0]["matrix"][0][1] + per_seed[1]["matrix"][0][1]) / 2)
    low, high = sequential["AP_ci"]
    assert low <= sequential["AP"] <= high
    assert (tmp_path / "whole" / "report.md").is_file() and (tmp_path / "whole" / "seed-1" / "report.md").is_file()
    assert "Seeds: 0, 1." in (tmp_path / "whole" / "report.md").read_text()

    calls = []
    real = Trainer.evaluate

    def interrupted(self, method, stage):
        calls.append(self.config.seed)
        if len(calls) == 3:  # seed 1, after its first stage's training
            raise KeyboardInterrupt
        return real(self, method, stage)

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    config = small_config(stream, tmp_path / "resumed", seeds=[0, 1])
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert not (tmp_path / "resumed" / "sequential" / "results.json").exists()
    monkeypatch.setattr(Trainer, "evaluate", real)
    assert train(config) == whole
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole") and _files(tmp_path / "whole")

    with pytest.raises(ValueError, match=r"other settings \(seeds\)"):
        train(small_config(stream, tmp_path / "whole", seeds=[0, 2]))


def test_eval_of_a_multi_seed_run_gives_each_seed_and_their_mean(stream, tmp_path):
    out = tmp_path / "run"
    results = train(small_config(stream, out, seeds=[3, 4], methods=["oracle"]))
    predictions = tmp_path / "predictions.jsonl"
    final = commands.reevaluate(out, predictions)
    for seed in (3, 4):
        last = json.loads((out / f"seed-{seed}" / "oracle" / "results.json").read_text())["matrix"][-1]
        assert json.loads((out / f"seed-{seed}" / "oracle" / "eval.json").read_text()) == dict(
            zip(["covidfact", "simplification"], last))
    assert list(final["oracle"].values()) == pytest.approx(results["oracle"]["matrix"][-1])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert {r["seed"] for r in records} == {3, 4} and len(records) == 2 * 8


def test_seeds_that_are_not_integers_fail_in_one_line(stream, tmp_path, capsys):
    base, tasks = stream
    parser = argparse.ArgumentParser()
    commands.add_command(parser.add_subparsers())
    args = parser.parse_args(["train", "--base", str(base), "--tasks", ",".join(map(str, tasks)), "--out",
                              str(tmp_path / "run"), "--seeds", "0,one,2"])
    with pytest.raises(SystemExit) as exit_:
        args.run(args)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1 and "--seeds" in error and "0,one,2" in error
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--seeds needs distinct integers"):
        small_config(stream, tmp_path / "run", seeds=[1, 1]).validate()


def test_frozen_adapters_answer_each_prompt_once_and_change_no_prediction(stream, tmp_path, monkeypatch):
    """switchcit and oracle share per-task adapters that are never trained again: each (frozen adapter,
    prompt) is generated once per run, sequential's changing adapter at every stage, and every saved
    prediction equals that of a run that generates everything."""
    import switchcit.cit.trainer as trainer_module
    from switchcit.pipeline import SwitchModel

    generated = []
    real_generate = SwitchModel.generate

    def recording(self, prompts, adapters=None, **options):
        texts, chosen = real_generate(self, prompts, adapters, **options)
        generated.extend(zip(chosen, prompts))
        return texts, chosen

    monkeypatch.setattr(SwitchModel, "generate", recording)
    methods = ["switchcit", "oracle", "sequential"]
    train(small_config(stream, tmp_path / "cached", methods=methods))
    frozen = [pair for pair in generated if pair[0] != "sequential"]
    assert len(frozen) == len(set(frozen)), "a frozen adapter's answer was generated twice"
    assert len([pair for pair in generated if pair[0] == "sequential"]) == 2 * 8  # 2 stages × 8 test prompts
    assert {adapter for adapter, _ in frozen} >= {None, "covidfact", "simplification"}

    class EverythingAnew(trainer_module.FrozenAnswers):
        def generate(self, pipeline, prompts, adapters, **options):
            return pipeline.generate(prompts, adapters, **options)

    monkeypatch.setattr(trainer_module, "FrozenAnswers", EverythingAnew)
    generated.clear()
    train(small_config(stream, tmp_path / "anew", methods=methods))
    assert len(generated) == 8 * (1 + 2 + 2 + 2)  # the base model, then 2 stages of each method
    assert _files(tmp_path / "cached") == _files(tmp_path / "anew")


def test_eval_ahead_leaves_the_cells_of_later_tasks_empty(stream, tmp_path):
    """--eval-ahead 0: a stage evaluates the tasks trained so far only; the matrix's later cells are
    empty (FWT, which reads them, too) and every other figure is computed."""
    out = tmp_path / "run"
    results = train(small_config(stream, out, eval_ahead=0))["sequential"]
    first = read_predictions(out / "sequential" / "predictions" / "stage-1.jsonl")
    assert {r["task"] for r in first} == {"covidfact"}
    assert results["matrix"][0][1] is None and results["matrix_ci"][0][1] is None
    assert results["matrix"][0][0] is not None and None not in results["matrix"][1]
    assert results["FWT"] is None and results["AP"] is not None and results["BWT"] is not None
    with pytest.raises(ValueError, match="--eval-ahead must be -1"):
        small_config(stream, tmp_path / "bad", eval_ahead=-2).validate()
