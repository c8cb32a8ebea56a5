"""The training losses: the genre loss masked per source, the teacher's, and the pairs' contrastive loss.

Keras losses take ``y_true`` packed as [target | mask] (or [target | has]) so that a clip's
source decides which genres count; ``_bce`` is the same genre loss in numpy, for validation.
"""

from __future__ import annotations

import numpy as np


def _bce(y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Binary cross-entropy; with a mask, the mean over each clip's labelled genres, then over clips."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    if mask is None:
        return float(np.mean(per))
    return float(np.mean((per * mask).sum(-1) / np.maximum(mask.sum(-1), 1)))


def masked_bce(y_true, y_pred):
    """Keras loss: ``y_true`` is [labels | mask] side by side; genres a clip's source never labels do not count.

    Per clip: the mean BCE over its masked-in genres (0 for a clip with no labels, such as
    unlabelled audio that only the teacher speaks for).
    """
    from keras import ops

    n = ops.shape(y_pred)[-1]
    y, mask = y_true[..., :n], y_true[..., n:]
    p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
    per = -(y * ops.log(p) + (1 - y) * ops.log(1 - p))
    return ops.sum(per * mask, axis=-1) / ops.maximum(ops.sum(mask, axis=-1), 1.0)


def teacher_emb_loss(y_true, y_pred):
    """Keras loss: 1 - cosine between the student's projection and the teacher embedding; [target | has] packed."""
    from keras import ops

    n = ops.shape(y_pred)[-1]
    t, has = y_true[..., :n], y_true[..., n]
    t = t / ops.maximum(ops.norm(t, axis=-1, keepdims=True), 1e-6)
    p = y_pred / ops.maximum(ops.norm(y_pred, axis=-1, keepdims=True), 1e-6)
    return has * (1.0 - ops.sum(t * p, axis=-1))


PAIR_TEMPERATURE = 0.1


def pair_loss(y_true, y_pred):
    """Keras loss on the embedding: rows 2j and 2j + 1 are two views of one place in one clip (a codec
    version, other edits); each row's partner must be its nearest row in the batch by cosine.

    The contrastive loss of SimCLR (NT-Xent, temperature ``PAIR_TEMPERATURE``): cross-entropy of the
    partner among all other rows of the batch. It asks for what the robustness report measures,
    versions of a clip nearer to each other than to any other clip. ``y_true`` is unused.
    """
    from keras import ops

    z = y_pred / ops.maximum(ops.norm(y_pred, axis=-1, keepdims=True), 1e-6)
    n = ops.shape(z)[0]
    logits = ops.matmul(z, ops.transpose(z)) / PAIR_TEMPERATURE - 1e9 * ops.eye(n)  # never itself
    idx = ops.arange(n)
    partner = idx + 1 - 2 * (idx % 2)
    return -ops.sum(ops.one_hot(partner, n) * ops.log_softmax(logits, axis=-1), axis=-1)


def _masked_argmax(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Top genre among those the clip's source labels (a GTZAN clip cannot be 'right' as electronic)."""
    return np.where(mask > 0, p, -1.0).argmax(1)
