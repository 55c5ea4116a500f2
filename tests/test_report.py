"""The run report: markdown numbers (with intervals and baselines) and valid PNG plots."""
import json

import pytest

from switchcit.cit.metrics import continual_figures, results_dict
from switchcit.cit.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["simplification", "explanation", "covidfact"]


@pytest.fixture
def method_results():
    # Through a JSON round trip, as the report reads results.json. For "switch" (the hand-computed
    # matrix of test_metrics): AP = (40 + 65 + 80)/3 = 61.67, BWT = −12.50,
    # FWT = ((10 − 8) + (30 − 25.5))/2 = 3.25, forgetting = 20.00.
    # "sequential" has no baseline (FWT —), no switch, and a task not evaluated before its stage.
    switch = results_dict("switch", TASKS, continual_figures([[60, 10, 20], [75, 70, 30], [40, 65, 80]],
                                                             [5, 8, 25.5]),
                          switch_accuracy=[100.0, 87.25, 75.0])
    sequential = results_dict("sequential", TASKS, continual_figures([[55, None, None], [30, 72, None], [12, 33, 81]]))
    return json.loads(json.dumps({"switch": switch, "sequential": sequential}))


def test_report_markdown_has_the_numbers(tmp_path, method_results):
    paths = write_report(tmp_path / "run", method_results)
    report = paths[0]
    assert report == tmp_path / "run" / "report.md"
    text = report.read_text()
    # switch: AP, BWT, FWT, forgetting, then the final scores per task
    assert "| switch | 61.67 | -12.50 | 3.25 | 20.00 | 40.00 | 65.00 | 80.00 |" in text
    # sequential: AP = (12 + 33 + 81)/3 = 42, BWT = ((12 − 55) + (33 − 72))/2 = −41,
    # forgetting = ((55 − 12) + (72 − 33))/2 = 41, no baseline so no FWT
    assert "| sequential | 42.00 | -41.00 | — | 41.00 | 12.00 | 33.00 | 81.00 |" in text
    assert "simplification (sari)" in text and "explanation (rougeL)" in text and "covidfact (accuracy)" in text
    # Switch accuracy only for the routed method.
    assert "| switch | 100.00 | 87.25 | 75.00 |" in text
    assert "| sequential | 100" not in text
    # The matrices, with the baseline row where there is one and — for entries not evaluated.
    assert "| base model | 5.00 | 8.00 | 25.50 |" in text
    assert "| after explanation | 75.00 | 70.00 | 30.00 |" in text
    assert "| after simplification | 55.00 | — | — |" in text


def test_report_shows_intervals_seeds_and_both_baselines(tmp_path):
    figures = continual_figures([[60, 10], [40, 65]], baseline=[5, 8], trivial_baseline=[30.5, 50])
    estimates = figures | {"AP_ci": [47.5, 57.5], "BWT_ci": [-30.0, -10.0], "FWT_ci": [0.5, 3.5],
                           "matrix_ci": [[[55, 65], [8, 12]], [[35, 45], [60, 70]]],
                           "baseline_ci": [[4, 6], [7, 9]], "trivial_baseline_ci": [[29, 32], [45, 55]]}
    tasks = ["simplification", "covidfact"]
    results = results_dict("sequential", tasks, estimates, seeds=[0, 1, 2],
                           trivial_rule={"simplification": "copy of the source", "covidfact": "majority class 'No'"})
    paths = write_report(tmp_path, json.loads(json.dumps({"sequential": results})))
    text = paths[0].read_text()
    # AP = (40 + 65)/2, BWT = 40 − 60, FWT = 10 − 8, forgetting = 60 − 40
    assert ("| sequential | 52.50 [47.50, 57.50] | -20.00 [-30.00, -10.00] | 2.00 [0.50, 3.50] | 20.00 | "
            "40.00 [35.00, 45.00] | 65.00 [60.00, 70.00] |") in text
    assert "| base model | — | — | — | — | 5.00 [4.00, 6.00] | 8.00 [7.00, 9.00] |" in text
    assert "| trivial baseline | — | — | — | — | 30.50 [29.00, 32.00] | 50.00 [45.00, 55.00] |" in text
    assert "simplification: copy of the source; covidfact: majority class 'No'" in text
    assert "Seeds: 0, 1, 2." in text and "95 % bootstrap interval" in text
    assert "| after simplification | 60.00 [55.00, 65.00] | 10.00 [8.00, 12.00] |" in text
    assert "](methods.png)" in text and paths[1] == tmp_path / "methods.png"


def test_report_writes_valid_pngs(tmp_path, method_results):
    paths = write_report(tmp_path, method_results)
    expected = [tmp_path / "methods.png"] + [tmp_path / method / plot for method in ("switch", "sequential")
                                             for plot in ("matrix.png", "curves.png")]
    assert paths[1:] == expected
    for path in expected:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def test_methods_plot_draws_a_bar_and_whisker_per_method_and_figure(tmp_path, monkeypatch):
    """methods.png: for each method, bars at AP, BWT, FWT (None: no bar) with whiskers from the intervals."""
    from matplotlib.axes import Axes

    drawn = []
    real_bar = Axes.bar

    def recording(self, x, height, width, **options):
        drawn.append((list(height), options["yerr"].tolist()))
        return real_bar(self, x, height, width, **options)

    monkeypatch.setattr(Axes, "bar", recording)
    estimates = continual_figures([[60, 10], [40, 65]], baseline=[5, 8]) | {"AP_ci": [50.0, 55.0]}
    single = continual_figures([[33.0]])
    write_report(tmp_path, {"a": results_dict("a", ["x", "y"], estimates), "b": results_dict("b", ["x"], single)})
    (heights_a, whiskers_a), (heights_b, whiskers_b) = drawn
    assert heights_a == [52.5, -20, 2] and whiskers_a == [[2.5, 0, 0], [2.5, 0, 0]]  # AP 52.5 in [50, 55]
    assert heights_b[0] == 33 and heights_b[1] != heights_b[1]  # one task: no BWT (NaN, no bar)


def test_report_single_task_and_no_methods(tmp_path):
    paths = write_report(tmp_path, {"only": results_dict("only", ["haiku"], continual_figures([[33.3]]))})
    assert "| only | 33.30 | — | — | — | 33.30 |" in paths[0].read_text()
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in paths[1:])
    with pytest.raises(ValueError, match="no method results"):
        write_report(tmp_path, {})
