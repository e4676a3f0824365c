"""Metrics of vtoken.eval against hand-computed cases (official VQA examples included)."""

import pytest

from vtoken.eval.metrics import (
    exact_match,
    mme_answer,
    mme_scores,
    multiple_choice_accuracy,
    normalize_answer,
    parse_choice,
    pope_answer,
    pope_metrics,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("a dog", "dog"),  # articles
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions get their apostrophe
        ("isnt", "isn't"),
        ("yes.", "yes"),  # trailing period
        ("3.5", "3.5"),  # a decimal point survives
        ("1,000", "1000"),  # comma between digits
        ("Yes, it is!", "yes it is"),
        ("red/blue", "red blue"),  # punctuation glued to words becomes a space
        ("hot-dog", "hot dog"),
        ("  left\n", "left"),
        ("(yes)", "yes"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out_values():
    # 10 annotators; k of them gave the predicted answer. Averaging min(matches among the other 9 / 3, 1)
    # over the ten leave-one-out subsets gives 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4.
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("three", answers) == pytest.approx(1.0)
    # annotation dicts as in v2_mscoco_*_annotations.json
    dicts = [{"answer": "a tennis racket", "answer_id": i} for i in range(4)] + [{"answer": "racket"}] * 6
    assert vqa_accuracy("tennis racket", dicts) == pytest.approx(1.0)
    assert vqa_accuracy("racket", dicts) == pytest.approx(1.0)
    assert vqa_accuracy("ball", dicts) == 0.0


def test_vqa_accuracy_edge_cases():
    assert vqa_accuracy("yes", ["yes"]) == 1.0  # single reference: normalised exact match
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("yes", []) == 0.0
    assert vqa_accuracy(None, ["yes", "yes", "yes"]) == 0.0


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("the red circle", ["red circle"]) == 1.0
    assert exact_match("left", ["right", "left"]) == 1.0
    assert exact_match("rightish", ["right"]) == 0.0


def test_pope_answer_reading():
    assert pope_answer("Yes") == "yes"
    assert pope_answer("No, there is not.") == "no"
    assert pope_answer("There is not a dog in the image.") == "no"
    assert pope_answer("Yes. There is no cat.") == "yes"  # only the first sentence counts


def test_pope_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", "No."]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    # TP=2 (0, 4), FP=1 (1), FN=1 (2), TN=2 (3, 5)
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["n"] == 6
    z = pope_metrics(["no", "no"], ["yes", "no"])  # no positive prediction: precision 0, no division error
    assert z["precision"] == 0.0 and z["f1"] == 0.0 and z["accuracy"] == 0.5
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])


def test_multiple_choice():
    assert parse_choice("B", 4) == 1
    assert parse_choice("(C) a fish", 4) == 2
    assert parse_choice("A. dog", 2) == 0
    assert parse_choice("The answer is D.", 4) == 3
    assert parse_choice("E", 4) == -1  # beyond the options
    assert parse_choice("a cat", 2) == -1  # a lower-case article is not an option letter
    assert parse_choice("Paris", 2, ["London", "paris"]) == 1  # the option's text
    preds = ["A", "B.", "(A)", "I think C", "zebra"]
    answers = [0, "B", "B", 2, "A"]
    choices = [["x", "y"], ["x", "y"], ["x", "y"], ["x", "y", "z"], ["zebra", "lion"]]
    # right: 0 (A), 1 (B), 4 (text 'zebra' = option A); wrong: 2; 3 is unreadable
    assert multiple_choice_accuracy(preds, answers, choices) == pytest.approx(3 / 5)


def test_mme_scores():
    assert mme_answer("Yes") == "yes" and mme_answer("No.") == "no" and mme_answer("maybe") == "other"
    recs = [
        ("existence", "img1", "Yes", "yes"), ("existence", "img1", "No", "no"),  # image 1: both right
        ("existence", "img2", "Yes", "yes"), ("existence", "img2", "Yes", "no"),  # image 2: one right
        ("code_reasoning", "c1", "no", "yes"), ("code_reasoning", "c1", "no", "no"),
    ]
    s = mme_scores(recs)
    ex = s["categories"]["existence"]
    assert ex["acc"] == pytest.approx(75.0) and ex["acc_plus"] == pytest.approx(50.0)
    assert ex["score"] == pytest.approx(125.0)
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == pytest.approx(50.0 + 0.0)
