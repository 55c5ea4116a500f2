"""Task metrics against hand-computed values and direct library calls; continual metrics on a hand-
computed 3 × 3 matrix."""
import json

import numpy as np
import pytest
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu import corpus_bleu

from switchcit.data import Example
from switchcit.metrics import (
    bleu, continual_metrics, corpus_sari, main_metric, results_dict, rouge, sari, score_task, yes_no_accuracy,
)

# Source "a b c", prediction "a c d", one reference "a d" (one reference: no count weighting).
#   n=1  added {d}, references add {d}, correct {d}             → add P = 1, R = 1, F1 = 1
#        kept {a, c}, correct {a} (c not in the reference)       → keep P = mean(1/1, 0/1) = 1/2
#        the reference keeps {a}, all of it kept correctly       → keep R = 1/1 → F1 = 2/3
#        deleted {b}, not in the reference                       → delete P = 1
#   n=2  added {"a c", "c d"}, references add {"a d"}, none shared → add P = 0, R = 0, F1 = 0
#        nothing kept and nothing to keep (0/0 = 1)              → keep F1 = 1
#        deleted {"a b", "b c"}, neither in the reference       → delete P = 1
#   n=3  added {"a c d"}, the reference has no trigram          → add P = 0, R = 0/0 = 1, F1 = 0
#        keep F1 = 1 (0/0), deleted {"a b c"}                    → delete P = 1
#   n=4  no 4-grams anywhere: every ratio is 0/0 = 1            → add 1, keep 1, delete 1
#   add = (1 + 0 + 0 + 1)/4 = 1/2, keep = (2/3 + 1 + 1 + 1)/4 = 11/12, delete = 1
#   SARI = 100 · (1/2 + 11/12 + 1)/3 = 100 · 29/36
CASE_A = ("a b c", "a c d", ["a d"])
SARI_A = 100 * 29 / 36

# Source "a b", prediction "a", references "a" and "b": r = 2, so source and prediction counts are
# doubled against the pooled reference counts {a: 1, b: 1} (each unigram kept by half the references).
#   n=1  nothing added, nothing added by the references          → add F1 = 1
#        kept {a: 2}, correct min(2, 1) = {a: 1}                  → keep P = 1/2
#        the references keep min({a: 2, b: 2}, {a: 1, b: 1}) = 2 → keep R = 1/2 → F1 = 1/2
#        deleted {b: 2}, correct 2 − 1 = 1                        → delete P = 1/2
#   n=2  source bigram "a b" deleted, no reference has it        → add 1, keep 1 (0/0), delete P = 2/2 = 1
#   n=3, n=4  empty                                               → 1, 1, 1
#   add = 1, keep = (1/2 + 3)/4 = 7/8, delete = (1/2 + 3)/4 = 7/8
#   SARI = 100 · (1 + 7/8 + 7/8)/3 = 100 · 11/12
CASE_B = ("a b", "a", ["a", "b"])
SARI_B = 100 * 11 / 12


def test_sari_hand_computed_single_reference():
    assert sari(*CASE_A) == pytest.approx(SARI_A)


def test_sari_weights_kept_and_deleted_ngrams_by_reference_count():
    assert sari(*CASE_B) == pytest.approx(SARI_B)


def test_sari_lowercases_and_tokenises_13a():
    # "A B C." tokenises to "a b c ." — the same as writing the period apart.
    assert sari("A B C.", "a C d.", ["A d ."]) == pytest.approx(sari("a b c .", "a c d .", ["a d ."]))
    assert sari("A B C", "a c D", ["A D"]) == pytest.approx(SARI_A)


def test_sari_published_example():
    # The example of the SARI reference code, with the value published on the Hugging Face `evaluate`
    # SARI metric card and in EASSE's README: 26.953601953601954.
    references = ["About 95 species are currently known.", "About 95 species are now accepted.",
                  "95 species are now accepted."]
    score = sari("About 95 species are currently accepted.", "About 95 you now get in.", references)
    assert score == pytest.approx(26.953601953601954, abs=1e-9)


def test_sari_prediction_identical_to_source_and_reference_is_perfect():
    # Nothing added or deleted by anyone (add and delete are 0/0 = 1); every kept n-gram is kept by
    # the reference (keep P = R = 1).
    sentence = "the cat sat on the mat"
    assert sari(sentence, sentence, [sentence]) == pytest.approx(100)


def test_sari_prediction_equal_to_the_reference_is_perfect():
    # Deletes exactly what the reference deletes ("e" and the n-grams through it), keeps the rest.
    assert sari("a b c d e", "a b c d", ["a b c d"]) == pytest.approx(100)


def test_sari_empty_prediction():
    # The reference keeps the whole 4-token source. At every order: nothing added anywhere (add = 1),
    # nothing kept of what should be kept (keep P = 0/0 = 1, R = 0 → F1 = 0), every deletion wrong
    # (delete P = 0). SARI = 100 · (1 + 0 + 0)/3.
    assert sari("a b c d", "", ["a b c d"]) == pytest.approx(100 / 3)


def test_sari_identical_references_count_once():
    # r copies of one reference scale every weighted count by r: the ratios do not change.
    source, prediction, references = CASE_A
    assert sari(source, prediction, references * 3) == pytest.approx(SARI_A)


def test_sari_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        sari("a b", "a", [])


def test_corpus_sari_is_the_mean_of_sentence_scores():
    sources, predictions, references = zip(CASE_A, CASE_B)
    assert corpus_sari(sources, predictions, references) == pytest.approx((SARI_A + SARI_B) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1 sources"):
        corpus_sari(sources[:1], predictions, references)


def test_rouge_takes_the_best_reference():
    # "the cat sat" vs "the cat": P = 2/3, R = 2/2 → F = 0.8; vs "cat sat down": P = R = 2/3 → F = 2/3.
    # Unigram overlap and longest common subsequence agree here, so ROUGE-1 = ROUGE-L = 80.
    references = [["the cat", "cat sat down"]]
    assert rouge(["the cat sat"], references, "rouge1") == pytest.approx(80)
    assert rouge(["the cat sat"], references) == pytest.approx(80)


def test_rouge_matches_rouge_score_on_a_corpus():
    predictions = ["a man is playing a guitar", "nobody is outside"]
    references = [["a man plays guitar", "someone plays an instrument"], ["people are outside"]]
    scorer = RougeScorer(["rougeL"])
    expected = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]
    assert rouge(predictions, references) == pytest.approx(100 * np.mean(expected))


def test_bleu_matches_sacrebleu_with_one_reference_each():
    predictions = ["the quick brown fox jumps over the dog", "a man is playing a guitar on stage"]
    references = ["the quick brown fox jumps over the lazy dog", "a man is playing guitar on a stage"]
    expected = corpus_bleu(predictions, [references]).score
    assert expected > 0
    assert bleu(predictions, [[r] for r in references]) == pytest.approx(expected)


def test_bleu_handles_ragged_reference_counts():
    # Repeating an example's only reference changes neither its clipped n-gram counts nor its closest
    # reference length, so a missing second reference must score like a repeated one.
    predictions = ["the quick brown fox jumps over the dog", "a man is playing a guitar on stage"]
    ragged = [["the quick brown fox jumps over the lazy dog"],
              ["a man is playing guitar on a stage", "a man plays a guitar on the stage"]]
    repeated = [[ragged[0][0], ragged[1][0]], [ragged[0][0], ragged[1][1]]]
    assert bleu(predictions, ragged) == pytest.approx(corpus_bleu(predictions, repeated).score)


def test_yes_no_accuracy_reads_the_first_yes_or_no_word():
    predictions = ["Yes.", "no way", "Not sure", "NO", "I think yes, no", "Maybe"]
    labels = ["Yes", "No", "No", "Yes", "Yes", "No"]
    # right, right, wrong ("not" is not "no"), wrong, right (first word wins), wrong → 3/6
    assert yes_no_accuracy(predictions, labels) == pytest.approx(50)


def _example(task, target, label=None, source=None, references=None):
    return Example(task=task, prompt="p", target=target, references=references or [], source=source, label=label)


def test_score_task_uses_the_task_metrics_main_metric_first():
    simplification = [_example("simplification", "a d", source="a b c", references=["a d"])]
    assert score_task("simplification", simplification, ["a c d"]) == pytest.approx({"sari": SARI_A})

    covidfact = [_example("covidfact", "Yes", label="Yes"), _example("covidfact", "No", label="No")]
    assert score_task("covidfact", covidfact, ["yes, it is", "Yes"]) == {"accuracy": 50.0}

    explanation = [_example("explanation", "the cat", references=["the cat", "cat sat down"])]
    assert list(score_task("explanation", explanation, ["the cat sat"])) == ["rougeL", "bleu"]
    assert [main_metric(task) for task in ("simplification", "explanation", "haiku", "covidfact")] == [
        "sari", "rougeL", "rouge1", "accuracy"]


def test_score_task_unknown_task_falls_back_to_rouge_and_exact_match():
    # No references given: the target is the reference.
    labelled = [_example("other", "Blue", label="Blue"), _example("other", "red", label="red")]
    scores = score_task("other", labelled, [" blue ", "green"])
    assert scores["rougeL"] == pytest.approx(50) and scores["exact_match"] == pytest.approx(50)
    assert list(score_task("other", [_example("other", "blue")], ["blue"])) == ["rougeL"]
    assert main_metric("other") == "rougeL"


def test_score_task_rejects_missing_fields_and_length_mismatch():
    with pytest.raises(ValueError, match="source"):
        score_task("simplification", [_example("simplification", "a")], ["a"])
    with pytest.raises(ValueError, match="labels"):
        score_task("covidfact", [_example("covidfact", "Yes")], ["Yes"])
    with pytest.raises(ValueError, match="1 predictions but 2 examples"):
        score_task("haiku", [_example("haiku", "a"), _example("haiku", "b")], ["a"])


# R[t][i], every task evaluated at every stage, and the untrained model's scores b.
MATRIX = [[60, 10, 20],
          [75, 70, 30],
          [40, 65, 80]]
BASELINE = [5, 8, 25]


def test_continual_metrics_full_matrix():
    metrics = continual_metrics(MATRIX, BASELINE)
    assert metrics["AP"] == pytest.approx((40 + 65 + 80) / 3)
    assert metrics["BWT"] == pytest.approx(((40 - 60) + (65 - 70)) / 2)      # −12.5
    assert metrics["FWT"] == pytest.approx(((10 - 8) + (30 - 25)) / 2)       # 3.5
    # task 1: max(60, 75) − 40 = 35; task 2: max(10, 70) − 65 = 5
    assert metrics["forgetting"] == pytest.approx((35 + 5) / 2)
    assert metrics["final"] == [40, 65, 80]
    assert continual_metrics(MATRIX)["FWT"] is None


def test_continual_metrics_skip_missing_entries():
    # Future tasks not evaluated: no R[i-1][i], so no FWT; the rest is unchanged.
    lower = [[60, None, None], [75, 70, None], [40, 65, 80]]
    metrics = continual_metrics(lower, BASELINE)
    assert metrics["FWT"] is None
    assert metrics["BWT"] == pytest.approx(-12.5) and metrics["forgetting"] == pytest.approx(20)
    # Only R[0][1] present: FWT = (10 − 8)/1.
    assert continual_metrics([[60, 10, None], [75, 70, None], [40, 65, 80]], BASELINE)["FWT"] == pytest.approx(2)
    # Task 2 missing at the end: AP = (40 + 80)/2, BWT = 40 − 60, forgetting = 75 − 40.
    partial_final = continual_metrics([[60, 10, 20], [75, 70, 30], [40, None, 80]])
    assert (partial_final["AP"], partial_final["BWT"], partial_final["forgetting"]) == pytest.approx((60, -20, 35))


def test_continual_metrics_single_task():
    assert continual_metrics([[42.0]], [10.0]) == {"AP": 42.0, "BWT": None, "FWT": None, "forgetting": None,
                                                  "final": [42.0]}


def test_continual_metrics_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[1, 2], [3]])
    with pytest.raises(ValueError, match="baseline"):
        continual_metrics(MATRIX, [1, 2])


def test_results_dict_schema():
    tasks = ["simplification", "explanation", "covidfact"]
    matrix = [[np.float32(v) for v in row] for row in MATRIX]
    results = results_dict("switch", tasks, matrix, BASELINE, [1.0, 0.75, 0.5])
    assert list(results) == ["method", "tasks", "metric", "matrix", "baseline", "AP", "BWT", "FWT",
                             "forgetting", "switch_accuracy"]
    assert results["metric"] == {"simplification": "sari", "explanation": "rougeL", "covidfact": "accuracy"}
    assert results["BWT"] == pytest.approx(-12.5) and results["FWT"] == pytest.approx(3.5)
    assert json.loads(json.dumps(results))["matrix"] == MATRIX   # numpy scalars became floats
    assert results_dict("seq", ["haiku"], [[30.0]])["switch_accuracy"] is None
    with pytest.raises(ValueError, match="switch accuracies"):
        results_dict("switch", tasks, MATRIX, BASELINE, [1.0])
