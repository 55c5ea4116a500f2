"""Task metrics against hand-computed values and direct library calls; continual metrics on a hand-
computed 3 × 3 matrix; the bootstrap intervals against cases whose interval is known."""
import json

import numpy as np
import pytest
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu import corpus_bleu

from switchcit.cit.data import Example
from switchcit.cit.metrics import (
    bleu,
    bootstrap_intervals,
    continual_figures,
    continual_metrics,
    corpus_sari,
    example_statistics,
    main_metric,
    results_dict,
    rouge,
    sari,
    score_of_statistics,
    score_task,
    yes_no_accuracy,
)

# Counts per order n: (correct, by the prediction, by the references); P = correct / by prediction,
# R = correct / by references, 0/0 = 0; per order add F1, keep F1, delete P, each averaged over n = 1..4.
#
# Case A: source "a b c", prediction "a c d", one reference "a d" (r = 1: no weighting).
#   n=1  add: {d} added, the reference adds {d}               (1, 1, 1) → F1 = 1
#        keep: {a, c} kept, the reference keeps {a}          (1, 2, 1) → P = 1/2, R = 1 → F1 = 2/3
#        delete: {b} deleted, the reference deletes {b, c}   (1, 1, 2) → P = 1
#   n=2  add: {"a c", "c d"} added, reference adds {"a d"}   (0, 2, 1) → F1 = 0
#        keep: nothing kept, nothing to keep                 (0, 0, 0) → F1 = 0
#        delete: {"a b", "b c"}, both deleted by the ref.    (2, 2, 2) → P = 1
#   n=3  add (0, 1, 0) → 0; keep (0, 0, 0) → 0; delete {"a b c"} (1, 1, 1) → P = 1
#   n=4  no 4-grams: all 0
#   add = 1/4, keep = (2/3)/4 = 1/6, delete = 3/4 → SARI = 100 · (1/4 + 1/6 + 3/4)/3 = 100 · 7/18
CASE_A = ("a b c", "a c d", ["a d"])
SARI_A = 100 * 7 / 18

# Case B: source "a b", prediction "a", references "a" and "b": r = 2, source and prediction counts are
# doubled against the pooled reference counts {a: 1, b: 1} (each unigram kept by half the references).
#   n=1  add: nothing added by anyone                        (0, 0, 0) → F1 = 0
#        keep: {a: 2} kept, refs keep min({a: 2, b: 2}, {a: 1, b: 1}) = {a: 1, b: 1},
#              correct min({a: 2}, {a: 1, b: 1}) = {a: 1}     (1, 2, 2) → P = R = 1/2 → F1 = 1/2
#        delete: {b: 2} deleted, refs delete {a: 1, b: 1}    (1, 2, 2) → P = 1/2
#   n=2  delete: {"a b": 2}, no reference has it             (2, 2, 2) → P = 1; add, keep 0
#   n=3, n=4  empty: all 0
#   add = 0, keep = (1/2)/4 = 1/8, delete = (1/2 + 1)/4 = 3/8 → SARI = 100 · (1/8 + 3/8)/3 = 100/6
CASE_B = ("a b", "a", ["a", "b"])
SARI_B = 100 / 6


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


def test_sari_prediction_equal_to_the_reference_is_perfect():
    # Adds "f" and deletes "e" (and every n-gram through them) exactly as the reference, keeps the rest:
    # at every order P = R = 1 for add and keep, P = 1 for delete.
    assert sari("a b c d e", "a b c d f", ["a b c d f"]) == pytest.approx(100)


def test_sari_unchanged_sentence_scores_only_on_keep():
    # Nothing added or deleted by anyone: add and delete are 0/0 = 0; everything kept correctly.
    sentence = "the cat sat on the mat"
    assert sari(sentence, sentence, [sentence]) == pytest.approx(100 / 3)
    # Copying the source "a b c" when the reference is "a d": only the keep F1 of unigrams is non-zero —
    # kept {a, b, c}, the reference keeps {a} (1, 3, 1) → P = 1/3, R = 1 → F1 = 1/2; bigram and
    # trigram keeps have P = 0. keep = (1/2)/4 → SARI = 100 · (1/8)/3 = 100/24.
    assert sari("a b c", "a b c", ["a d"]) == pytest.approx(100 / 24)


def test_sari_empty_prediction():
    # The reference keeps the whole source: nothing added (0), nothing kept (keep R = 0), and every
    # deletion wrong (delete P = 0).
    assert sari("a b c d", "", ["a b c d"]) == 0


def test_sari_identical_references_count_once():
    # r copies of one reference scale every weighted count by r and leave the added sets alone.
    source, prediction, references = CASE_A
    assert sari(source, prediction, references * 3) == pytest.approx(SARI_A)


def test_sari_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        sari("a b", "a", [])


def test_corpus_sari_pools_counts_over_sentences():
    # Case A + case B counts:  n=1 add (1, 1, 1) → 1; keep (2, 4, 3) → P = 1/2, R = 2/3, F1 = 4/7;
    #                               delete (2, 3, ·) → P = 2/3
    #                          n=2 add (0, 2, 1) → 0; keep 0; delete (4, 4, ·) → 1
    #                          n=3 add (0, 1, 0) → 0; keep 0; delete (1, 1, ·) → 1;  n=4 all 0
    # add = 1/4, keep = 1/7, delete = (2/3 + 2)/4 = 2/3 → 100 · (1/4 + 1/7 + 2/3)/3 = 100 · 89/252
    # (the mean of the sentence scores would be 100 · (7/18 + 1/6)/2 = 100 · 5/18).
    sources, predictions, references = zip(CASE_A, CASE_B)
    assert corpus_sari(sources, predictions, references) == pytest.approx(100 * 89 / 252)
    assert corpus_sari(sources[:1], predictions[:1], references[:1]) == pytest.approx(SARI_A)
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
    results = results_dict("switch", tasks, continual_figures(matrix, BASELINE), seeds=[0],
                           switch_accuracy=[1.0, 0.75, 0.5])
    assert list(results) == ["method", "tasks", "metric", "seeds", "matrix", "matrix_ci", "baseline", "baseline_ci",
                             "trivial_baseline", "trivial_baseline_ci", "AP", "AP_ci", "BWT", "BWT_ci", "FWT", "FWT_ci",
                             "forgetting", "forgetting_ci", "trivial_rule", "switch_accuracy"]
    assert results["metric"] == {"simplification": "sari", "explanation": "rougeL", "covidfact": "accuracy"}
    assert results["BWT"] == pytest.approx(-12.5) and results["FWT"] == pytest.approx(3.5)
    assert results["AP_ci"] is None  # one run's figures carry no interval
    assert json.loads(json.dumps(results))["matrix"] == MATRIX   # numpy scalars became floats
    assert results_dict("seq", ["haiku"], continual_figures([[30.0]]))["switch_accuracy"] is None
    with pytest.raises(ValueError, match="switch accuracies"):
        results_dict("switch", tasks, continual_figures(MATRIX, BASELINE), switch_accuracy=[1.0])


# --- per-example statistics and the bootstrap ------------------------------------------------------

def test_corpus_scores_are_scores_of_summed_example_statistics():
    """Each metric's corpus score is the score of its examples' statistics summed; one example's row
    scores that example alone (SARI of the corpus is not the mean of the sentence scores)."""
    sources, predictions, references = zip(CASE_A, CASE_B)
    examples = [_example("simplification", r[0], source=s, references=r) for s, r in zip(sources, references)]
    rows = example_statistics("sari", examples, predictions)
    assert score_of_statistics("sari", rows.sum(0)) == pytest.approx(100 * 89 / 252)
    assert score_of_statistics("sari", rows) == pytest.approx([SARI_A, SARI_B])
    bleu_predictions = ["the quick brown fox jumps over the dog", "a man is playing a guitar on stage"]
    bleu_examples = [_example("haiku", "x", references=["the quick brown fox jumps over the lazy dog"]),
                     _example("haiku", "x", references=["a man is playing guitar on a stage", "a man plays"])]
    bleu_rows = example_statistics("bleu", bleu_examples, bleu_predictions)
    assert score_of_statistics("bleu", bleu_rows.sum(0)) == pytest.approx(
        bleu(bleu_predictions, [e.references for e in bleu_examples]))
    labelled = [_example("covidfact", "Yes", label="Yes"), _example("covidfact", "No", label="No")]
    assert score_of_statistics("accuracy", example_statistics("accuracy", labelled, ["yes", "yes"])).tolist() == [
        100, 0]


def _hits(hits, label="Yes"):
    """Statistics of yes/no answers: hit → the label, miss → the other answer."""
    other = {"Yes": "No", "No": "Yes"}[label]
    examples = [_example("covidfact", label, label=label) for _ in hits]
    return example_statistics("accuracy", examples, [label if hit else other for hit in hits])


def _one_task(table):
    """Figures of one task's one-stage table: its score is AP."""
    return continual_figures(table)


def test_bootstrap_of_constant_scores_has_zero_width():
    tables = [[[_hits([True] * 30)]], [[_hits([True] * 20)]]]
    estimates = bootstrap_intervals(tables, ["accuracy"], _one_task, replicates=200)
    assert estimates["AP"] == 100 and estimates["AP_ci"] == [100, 100]
    assert estimates["matrix_ci"] == [[[100, 100]]] and estimates["BWT_ci"] is None  # one task: no BWT


def test_bootstrap_matches_the_normal_approximation_of_a_mean():
    rng = np.random.default_rng(1)
    hits = rng.random(2000) < 0.3
    estimates = bootstrap_intervals([[[_hits(hits)]]], ["accuracy"], _one_task, replicates=2000)
    mean = 100 * hits.mean()
    half_width = 1.96 * 100 * np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits))
    assert estimates["AP"] == pytest.approx(mean)
    low, high = estimates["AP_ci"]
    assert low == pytest.approx(mean - half_width, abs=0.12 * half_width)
    assert high == pytest.approx(mean + half_width, abs=0.12 * half_width)


def test_bootstrap_interval_covers_the_population_mean():
    """Samples of 100 answers from a population 60 % right: the 95 % interval holds 60 about 95 % of
    the time."""
    rng = np.random.default_rng(2)
    trials = 100
    covered = 0
    for trial in range(trials):
        low, high = bootstrap_intervals([[[_hits(rng.random(100) < 0.6)]]], ["accuracy"], _one_task,
                                        replicates=300, seed=trial)["AP_ci"]
        covered += low <= 60 <= high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_resamples_seeds():
    """Two seeds, each constant within itself (all right, all wrong): the examples add no spread, the
    seeds do — a replicate is 0, 50 or 100."""
    estimates = bootstrap_intervals([[[_hits([True] * 10)]], [[_hits([False] * 10)]]], ["accuracy"], _one_task,
                                    replicates=1000)
    assert estimates["AP"] == 50 and estimates["AP_ci"] == [0, 100]


def test_bootstrap_recomputes_the_corpus_metric_per_replicate():
    """Two sentences, A and B: a replicate is AA, AB or BB (1/4, 1/2, 1/4); its corpus SARI pools the
    counts, so the central 40 % is exactly corpus SARI of A and B (a mean of sentence SARIs would give
    100 · 5/18 there)."""
    sources, predictions, references = zip(CASE_A, CASE_B)
    examples = [_example("simplification", r[0], source=s, references=r) for s, r in zip(sources, references)]
    rows = example_statistics("sari", examples, predictions)
    estimates = bootstrap_intervals([[[rows]]], ["sari"], _one_task, replicates=4000, level=0.4)
    assert estimates["AP"] == pytest.approx(100 * 89 / 252)
    assert estimates["AP_ci"] == pytest.approx([100 * 89 / 252] * 2)


def test_bootstrap_pairs_the_stages_of_a_task():
    """Rows of one task share each replicate's draw: a stage equal to the one before it gives a BWT of
    exactly 0 in every replicate, and every figure of the matrix gets its interval."""
    rng = np.random.default_rng(3)
    first, second = _hits(rng.random(50) < 0.5), _hits(rng.random(40) < 0.7)
    table = [[first, second], [first, _hits(rng.random(40) < 0.2)]]  # task 1 unchanged after stage 2
    estimates = bootstrap_intervals([table], ["accuracy", "accuracy"], continual_figures, replicates=300)
    assert estimates["BWT"] == 0 and estimates["BWT_ci"] == [0, 0]
    low, high = estimates["AP_ci"]
    assert low < estimates["AP"] < high
    assert [[cell is not None and cell[0] <= mean <= cell[1] for cell, mean in zip(cis, means)]
            for cis, means in zip(estimates["matrix_ci"], estimates["matrix"])] == [[True, True], [True, True]]


def test_bootstrap_is_seeded_and_rejects_ragged_tables():
    table = [[_hits([True, False, True, True])]]
    assert bootstrap_intervals([table], ["accuracy"], _one_task) == bootstrap_intervals([table], ["accuracy"],
                                                                                       _one_task)
    with pytest.raises(ValueError, match="rows"):
        bootstrap_intervals([[[table[0][0]]], [[table[0][0]], [table[0][0]]]], ["accuracy"], _one_task)
    with pytest.raises(ValueError, match="different numbers of examples"):
        bootstrap_intervals([[[table[0][0]], [_hits([True])]]], ["accuracy"], _one_task)
