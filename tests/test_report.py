"""The run report: markdown numbers and valid PNG plots for each method."""
import json

import pytest

from switchcit.cit.metrics import results_dict
from switchcit.cit.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["simplification", "explanation", "covidfact"]


@pytest.fixture
def method_results():
    # Through a JSON round trip, as the report reads results.json. For "switch" (the hand-computed
    # matrix of test_metrics): AP = (40 + 65 + 80)/3 = 61.67, BWT = −12.50,
    # FWT = ((10 − 8) + (30 − 25.5))/2 = 3.25, forgetting = 20.00.
    # "sequential" has no baseline (FWT —), no switch, and a task not evaluated before its stage.
    switch = results_dict("switch", TASKS, [[60, 10, 20], [75, 70, 30], [40, 65, 80]], [5, 8, 25.5],
                          [100.0, 87.25, 75.0])
    sequential = results_dict("sequential", TASKS, [[55, None, None], [30, 72, None], [12, 33, 81]])
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


def test_report_writes_valid_pngs(tmp_path, method_results):
    paths = write_report(tmp_path, method_results)
    expected = [tmp_path / method / plot for method in ("switch", "sequential")
                for plot in ("matrix.png", "curves.png")]
    assert paths[1:] == expected
    for path in expected:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def test_report_single_task_and_no_methods(tmp_path):
    paths = write_report(tmp_path, {"only": results_dict("only", ["haiku"], [[33.3]])})
    assert "| only | 33.30 | — | — | — | 33.30 |" in paths[0].read_text()
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in paths[1:])
    with pytest.raises(ValueError, match="no method results"):
        write_report(tmp_path, {})
