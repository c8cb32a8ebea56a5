"""The softmax probe: a per-row mask keeps a clip's softmax to its own set's genres."""

import numpy as np
import pytest

from beetsplug.crnn.training.probe import Probe, fit_probe

LABELS = ["rock", "pop", "metal"]


def _two_sets(n=200, seed=0):
    """Set A labels rock and pop (no metal: its loud clips are rock); set B may name all three, and its loud
    clips are metal."""
    rng = np.random.default_rng(seed)
    loud = rng.random(n) < 0.5
    X = np.where(loud, 1.0, -1.0)[:, None] + 0.1 * rng.standard_normal((n, 1))
    in_a = np.arange(n) < n // 2
    y = np.where(loud, np.where(in_a, 0, 2), 1)
    mask = np.ones((n, 3))
    mask[in_a, 2] = 0.0
    return X, y, mask


def test_masked_rows_do_not_argue_against_genres_their_set_lacks():
    X, y, mask = _two_sets()
    loud = np.array([[1.0]])
    masked = Probe(LABELS, l2=1e-3).fit(X, y, mask=mask).predict_proba(loud)[0]
    plain = Probe(LABELS, l2=1e-3).fit(X, y).predict_proba(loud)[0]
    # with the mask: loud is metal among all genres, and rock among set A's
    assert masked[2] > 0.6 and masked[0] > masked[1]
    # without it the two sets pull loud clips between rock and metal
    assert plain[0] < 0.6 and plain[2] < 0.6


def test_fit_probe_takes_masks_for_both_splits_and_checks_their_shape():
    X, y, mask = _two_sets()
    order = np.random.default_rng(1).permutation(len(y))  # both sets in both splits
    X, y, mask = X[order], y[order], mask[order]
    probe, info = fit_probe(LABELS, X[:150], y[:150], X[150:], y[150:], mask_train=mask[:150], mask_val=mask[150:])
    assert info["l2"] > 0 and info["train"] == 150 and info["val"] == 50
    # the val loss counts each row over its own set's genres: strictly less than over all three
    assert probe.log_loss(X[150:], y[150:], mask[150:]) < probe.log_loss(X[150:], y[150:])
    with pytest.raises(ValueError, match="mask must be"):
        Probe(LABELS).fit(X, y, mask=mask[:10])
