"""Metrics: hand-computed per-genre table, AUC ties, sklearn cross-check, precision@k."""

import json
import math

import numpy as np
import pytest

from beetsplug.crnn.training.metrics import (
    classification_report,
    confusion_macro_f1,
    format_report,
    precision_at_k,
    roc_auc,
    top_genre_macro_f1,
)

# Tiny case: 4 clips, 2 genres.
#   clip  true  p(rock) p(jazz)   >=0.5 rock/jazz   argmax
#    0    rock   0.9     0.2        1 / 0           rock
#    1    rock   0.4     0.7        0 / 1           jazz
#    2    jazz   0.6     0.8        1 / 1           jazz
#    3    jazz   0.3     0.6        0 / 1           jazz
Y_TINY = [0, 0, 1, 1]
P_TINY = [[0.9, 0.2], [0.4, 0.7], [0.6, 0.8], [0.3, 0.6]]
LABELS = ["rock", "jazz"]


def test_tiny_case_by_hand():
    r = classification_report(Y_TINY, P_TINY, LABELS)
    rock, jazz = r["per_genre"]["rock"], r["per_genre"]["jazz"]
    # rock: targets 1100, predictions 1010 -> tp=1 (0), fp=1 (2), fn=1 (1), tn=1 (3)
    #   precision 1/2, recall 1/2, F1 1/2, TPR 1/2, FPR 1/2
    #   AUC: positives {.9,.4} vs negatives {.6,.3}: .9>.6, .9>.3, .4<.6, .4>.3 -> 3/4
    assert rock["precision"] == pytest.approx(0.5)
    assert rock["recall"] == pytest.approx(0.5)
    assert rock["f1"] == pytest.approx(0.5)
    assert rock["tpr"] == pytest.approx(0.5)
    assert rock["fpr"] == pytest.approx(0.5)
    assert rock["roc_auc"] == pytest.approx(0.75)
    assert rock["support"] == 2
    # jazz: targets 0011, predictions 0111 -> tp=2, fp=1 (1), fn=0, tn=1 (0)
    #   precision 2/3, recall 1, F1 = 2*(2/3)*1/(2/3+1) = 0.8, TPR 1, FPR 1/2
    #   AUC: positives {.8,.6} vs negatives {.2,.7}: .8 beats both, .6 beats .2 only -> 3/4
    assert jazz["precision"] == pytest.approx(2 / 3)
    assert jazz["recall"] == pytest.approx(1.0)
    assert jazz["f1"] == pytest.approx(0.8)
    assert jazz["tpr"] == pytest.approx(1.0)
    assert jazz["fpr"] == pytest.approx(0.5)
    assert jazz["roc_auc"] == pytest.approx(0.75)
    assert jazz["support"] == 2
    # macro: precision (1/2 + 2/3)/2 = 7/12, recall 3/4, F1 0.65, AUC 0.75
    assert r["macro"]["precision"] == pytest.approx(7 / 12)
    assert r["macro"]["recall"] == pytest.approx(0.75)
    assert r["macro"]["f1"] == pytest.approx(0.65)
    assert r["macro"]["roc_auc"] == pytest.approx(0.75)
    # argmax: rock, jazz, jazz, jazz -> 3 of 4 right; confusion rows = true
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["confusion"] == [[1, 1], [0, 2]]
    assert r["labels"] == LABELS


def test_report_is_plain_json():
    r = classification_report(np.array(Y_TINY), np.array(P_TINY, dtype=np.float32), LABELS)
    back = json.loads(json.dumps(r))
    assert back["confusion"] == [[1, 1], [0, 2]]
    for v in r["per_genre"]["rock"].values():
        assert type(v) in (float, int)
    assert type(r["accuracy"]) is float


def test_threshold_and_no_predicted_positives():
    # threshold above every probability: nothing predicted -> precision 0, not nan
    r = classification_report(Y_TINY, P_TINY, LABELS, threshold=0.95)
    for g in LABELS:
        assert r["per_genre"][g]["precision"] == 0.0
        assert r["per_genre"][g]["recall"] == 0.0
        assert r["per_genre"][g]["f1"] == 0.0
        assert r["per_genre"][g]["fpr"] == 0.0


def test_auc_with_ties():
    # positives {.8, .5}, negatives {.5, .2}:
    # .8 beats both (2), .5 ties .5 (1/2) and beats .2 (1) -> 3.5 / 4 = 0.875
    assert roc_auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)
    # all scores tied -> 0.5
    assert roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    # perfect and inverted separation
    assert roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)
    assert roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == pytest.approx(0.0)


def test_auc_nan_when_class_missing():
    r = classification_report([0, 0, 0], [[0.9, 0.1], [0.8, 0.3], [0.6, 0.7]], LABELS)
    assert math.isnan(r["per_genre"]["rock"]["roc_auc"])  # no negatives
    assert math.isnan(r["per_genre"]["jazz"]["roc_auc"])  # no positives
    assert math.isnan(r["macro"]["roc_auc"])
    assert r["per_genre"]["jazz"]["support"] == 0
    # nan-ignoring macro: one defined AUC is the macro AUC
    r = classification_report([0, 1, 0], [[0.9, 0.1, 0.2], [0.2, 0.7, 0.1], [0.6, 0.4, 0.3]],
                              ["a", "b", "c"])
    assert math.isnan(r["per_genre"]["c"]["roc_auc"])
    assert r["macro"]["roc_auc"] == pytest.approx(1.0)


def test_input_validation():
    with pytest.raises(ValueError):
        classification_report([0, 2], [[0.5, 0.5], [0.5, 0.5]], LABELS)
    with pytest.raises(ValueError):
        classification_report([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["only one"])


def test_matches_sklearn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(42)
    n, g = 300, 6
    y = rng.integers(0, g, n)
    probs = np.round(rng.random((n, g)), 1)  # rounding forces many ties
    probs[np.arange(n), y] = np.minimum(1.0, probs[np.arange(n), y] + 0.3)
    labels = [f"g{i}" for i in range(g)]
    r = classification_report(y, probs, labels)
    Y = np.eye(g, dtype=int)[y]
    pred = (probs >= 0.5).astype(int)
    prec, rec, f1, sup = sk.precision_recall_fscore_support(Y, pred, average=None, zero_division=0)
    for j, name in enumerate(labels):
        row = r["per_genre"][name]
        assert row["precision"] == pytest.approx(prec[j])
        assert row["recall"] == pytest.approx(rec[j])
        assert row["f1"] == pytest.approx(f1[j])
        assert row["support"] == sup[j]
        assert row["roc_auc"] == pytest.approx(sk.roc_auc_score(Y[:, j], probs[:, j]))
        tn, fp, fn, tp = sk.confusion_matrix(Y[:, j], pred[:, j], labels=[0, 1]).ravel()
        assert row["fpr"] == pytest.approx(fp / (fp + tn))
    assert r["macro"]["f1"] == pytest.approx(sk.f1_score(Y, pred, average="macro", zero_division=0))
    assert r["macro"]["roc_auc"] == pytest.approx(sk.roc_auc_score(Y, probs, average="macro"))
    assert r["accuracy"] == pytest.approx(sk.accuracy_score(y, probs.argmax(1)))
    assert r["confusion"] == sk.confusion_matrix(y, probs.argmax(1), labels=range(g)).tolist()


def test_top_genre_macro_f1_by_hand_and_from_confusion():
    # argmax decisions of the tiny case: rock, jazz, jazz, jazz.
    # rock: tp 1, fp 0, fn 1 -> 2/3; jazz: tp 2, fp 1, fn 0 -> 4/5.
    truth, pred = ["rock", "rock", "jazz", "jazz"], ["rock", "jazz", "jazz", "jazz"]
    assert top_genre_macro_f1(truth, pred, LABELS) == pytest.approx((2 / 3 + 4 / 5) / 2)
    report = classification_report(Y_TINY, P_TINY, LABELS)
    assert confusion_macro_f1(report["confusion"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    sk = pytest.importorskip("sklearn.metrics")
    assert top_genre_macro_f1(truth, pred, LABELS) == pytest.approx(
        sk.f1_score(truth, pred, labels=LABELS, average="macro"))


def test_top_genre_macro_f1_true_genre_outside_labels_still_costs():
    # "blues" cannot be named: no genre's miss, but choosing rock for it is rock's false positive.
    assert top_genre_macro_f1(["rock", "blues"], ["rock", "rock"], ["rock"]) == pytest.approx(2 / 3)
    assert math.isnan(top_genre_macro_f1([], [], []))


# --- precision@k -------------------------------------------------------------

def _angles(*deg):
    rad = np.radians(deg)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


# Four clips on the unit circle: A rock 0deg, B rock 20deg, C jazz 25deg, D jazz 60deg.
VECS = _angles(0, 20, 25, 60)
GENRES = ["rock", "rock", "jazz", "jazz"]
PROBS = np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.01, 0.99]])


def test_precision_at_1_cosine_half_genre_aware_full():
    artists = ["a", "b", "c", "d"]
    # cosine nearest: A->B (20 vs 25deg) right, B->C (5deg) wrong, C->B (5deg) wrong,
    # D->C (35 vs 40deg) right -> 2/4 = 0.5
    assert precision_at_k(VECS, PROBS, GENRES, artists, k=1, mode="cosine") == pytest.approx(0.5)
    # genre-aware adds .5*agreement: 0.5 within a genre, 0.5*0.041 across these profiles.
    # B: A = cos20 + .5 = 1.44 > C = cos5 + .02 = 1.02; C: D = cos35 + .5 = 1.32 > B -> all right
    assert precision_at_k(VECS, PROBS, GENRES, artists, k=1, mode="genre") == pytest.approx(1.0)


def test_precision_at_k_excludes_same_artist():
    # A and B share an artist, so neither may recommend the other:
    # A->C wrong, B->C wrong, C->B wrong (5deg), D->C right -> 1/4
    artists = ["Same", " same ", "c", "d"]
    assert precision_at_k(VECS, PROBS, GENRES, artists, k=1, mode="cosine") == pytest.approx(0.25)


def test_precision_at_k_uses_what_is_available_and_skips_lonely_clips():
    # k larger than the candidate pool: each clip sees the other 3, one of which shares its genre
    artists = ["a", "b", "c", "d"]
    assert precision_at_k(VECS, PROBS, GENRES, artists, k=5, mode="cosine") == pytest.approx(1 / 3)
    # everyone is the same artist: no clip has candidates -> nan
    assert math.isnan(precision_at_k(VECS, PROBS, GENRES, ["x"] * 4, k=1))
    # A, B (rock, same artist) and E (jazz): A and B may only recommend E (wrong genre),
    # E may only recommend A and B (both wrong) -> 0 everywhere
    vecs = _angles(0, 10, 90)
    probs = PROBS[[0, 1, 2]]
    r = precision_at_k(vecs, probs, ["rock", "rock", "jazz"], ["x", "x", "y"], k=2, mode="cosine")
    assert r == pytest.approx(0.0)


def test_precision_at_k_rejects_bad_k():
    with pytest.raises(ValueError):
        precision_at_k(VECS, PROBS, GENRES, ["a", "b", "c", "d"], k=0)


# --- format_report -----------------------------------------------------------

def test_format_report_contents():
    r = classification_report(Y_TINY, P_TINY, LABELS)
    text = format_report(r, {"cosine": 0.5, "genre": 1.0})
    assert "rock" in text and "jazz" in text and "macro" in text
    assert "top-1 accuracy: 0.750" in text
    assert "precision@5 cosine: 0.500 / genre-aware: 1.000" in text
    rock_line = next(l for l in text.splitlines() if l.startswith("rock"))
    assert "0.500" in rock_line and "0.750" in rock_line and rock_line.rstrip().endswith("2")
    # the confusion matrix rows appear with the label in front
    conf_rows = [l.split() for l in text.splitlines() if l.split()[:1] in (["rock"], ["jazz"])]
    assert ["rock", "1", "1"] in conf_rows and ["jazz", "0", "2"] in conf_rows
    assert "precision@" not in format_report(r)


def test_format_report_shows_nan_auc():
    r = classification_report([0, 0], [[0.9, 0.1], [0.8, 0.3]], LABELS)
    assert "n/a" in format_report(r)
