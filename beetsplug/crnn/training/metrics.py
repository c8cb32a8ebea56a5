"""Evaluation metrics: the paper's per-genre tables and recommender precision@k.

Pure numpy (no scikit-learn at runtime); results are plain Python types so a
report can be written straight to JSON next to the model weights.
"""

from __future__ import annotations

import math

import numpy as np

from ..rank import DEFAULT_GENRE_WEIGHT, norm_text, scores


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with tied values sharing their mean rank (as Mann-Whitney needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def roc_auc(target, score) -> float:
    """ROC-AUC as the Mann-Whitney probability that a positive outranks a negative
    (ties count half); nan when either class is absent, since AUC is undefined then."""
    target = np.asarray(target).astype(bool).reshape(-1)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    n_pos = int(target.sum())
    n_neg = target.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(score)
    u = ranks[target].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _nanmean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def top_genre_macro_f1(truth, pred, labels) -> float:
    """Macro-F1 of single-genre decisions over ``labels``, per genre 2tp / (2tp + fp + fn).

    A true genre outside ``labels`` (a clip whose genre its set's head cannot name) is no genre's
    false negative, but its wrong decision still counts as a false positive of the genre chosen.
    """
    f1s = []
    for g in labels:
        tp = sum(a == g and b == g for a, b in zip(truth, pred))
        fp = sum(a != g and b == g for a, b in zip(truth, pred))
        fn = sum(a == g and b != g for a, b in zip(truth, pred))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s)) if f1s else math.nan


def confusion_macro_f1(confusion) -> float:
    """``top_genre_macro_f1`` from an argmax confusion matrix (rows true, columns chosen)."""
    C = np.asarray(confusion, np.float64)
    if C.size == 0:
        return math.nan
    tp = np.diag(C)
    den = C.sum(axis=0) + C.sum(axis=1)
    return float(np.mean(np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)))


def classification_report(y_true, probs, labels, threshold: float = 0.5) -> dict:
    """Per-genre precision/recall/F1/TPR/FPR/ROC-AUC/support, macro averages, top-1
    accuracy and the argmax confusion matrix.

    Thresholded metrics treat the sigmoid outputs as independent (multi-label) genre
    detectors with one-hot targets; accuracy and confusion use the single best genre.
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    P = np.asarray(probs, dtype=np.float64)
    labels = [str(l) for l in labels]
    if P.ndim != 2 or P.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n, g) with n = {y.shape[0]}; got {P.shape}")
    g = P.shape[1]
    if len(labels) != g:
        raise ValueError(f"{len(labels)} labels for {g} probability columns")
    if y.size and (y.min() < 0 or y.max() >= g):
        raise ValueError("y_true holds class indices outside range(len(labels))")

    Y = np.zeros_like(P, dtype=bool)
    Y[np.arange(y.size), y] = True
    pred = P >= threshold

    per_genre: dict[str, dict] = {}
    for j, name in enumerate(labels):
        t, p = Y[:, j], pred[:, j]
        tp = int(np.sum(t & p))
        fp = int(np.sum(~t & p))
        fn = int(np.sum(t & ~p))
        tn = int(np.sum(~t & ~p))
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        per_genre[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "tpr": recall,
            "fpr": _ratio(fp, fp + tn),
            "roc_auc": roc_auc(t, P[:, j]),
            "support": tp + fn,
        }

    macro = {
        key: _nanmean(per_genre[name][key] for name in labels)
        for key in ("precision", "recall", "f1", "roc_auc")
    }
    top1 = P.argmax(axis=1) if y.size else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((g, g), dtype=np.int64)
    np.add.at(confusion, (y, top1), 1)
    return {
        "labels": labels,
        "threshold": float(threshold),
        "n": int(y.size),
        "per_genre": per_genre,
        "macro": macro,
        "accuracy": _ratio(int(np.sum(top1 == y)), y.size),
        "confusion": confusion.tolist(),
    }


def precision_at_k(
    vectors,
    probs,
    genres,
    artists,
    k: int = 5,
    mode: str = "genre",
    genre_weight: float = DEFAULT_GENRE_WEIGHT,
) -> float:
    """Mean fraction of each clip's top-k recommendations sharing its true genre.

    Same-artist clips are excluded, otherwise the score would reward recognising an
    artist's production rather than recommending. Clips with no eligible candidate
    are skipped; nan if none has one.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    V = np.asarray(vectors, dtype=np.float64)
    P = np.asarray(probs, dtype=np.float64)
    genres = np.asarray(genres)
    artist_keys = np.array([norm_text(a) for a in artists])
    n = V.shape[0]
    if not (P.shape[0] == genres.shape[0] == artist_keys.shape[0] == n):
        raise ValueError("vectors, probs, genres and artists must have the same length")
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    U = np.divide(V, norms, out=np.zeros_like(V), where=norms > 0)
    cos = U @ U.T
    eligible = artist_keys[None, :] != artist_keys[:, None]  # also drops j == i

    precisions = []
    for i in range(n):
        cand = np.flatnonzero(eligible[i])
        if cand.size == 0:
            continue
        s = scores(U[i], P[i], cand_cos=cos[i, cand], cand_probs=P[cand], mode=mode,
                   genre_weight=genre_weight)
        top = cand[np.argsort(-s, kind="stable")[:k]]
        precisions.append(float(np.mean(genres[top] == genres[i])))
    return float(np.mean(precisions)) if precisions else math.nan


def _fmt(x) -> str:
    return "   n/a" if isinstance(x, float) and math.isnan(x) else f"{x:6.3f}"


def format_report(report: dict, p_at_k: dict | None = None) -> str:
    """Fixed-width text rendering of ``classification_report`` for the terminal/log.

    ``p_at_k`` may hold "cosine" and "genre" precision@k values and optionally "k".
    """
    labels = report["labels"]
    w = max([len("genre"), len("macro")] + [len(l) for l in labels])
    cols = ("prec", "recall", "F1", "TPR", "FPR", "AUC")
    lines = [f"{'genre':<{w}}  " + " ".join(f"{c:>6}" for c in cols) + f" {'support':>7}"]
    lines.append("-" * len(lines[0]))
    keys = ("precision", "recall", "f1", "tpr", "fpr", "roc_auc")
    for name in labels:
        row = report["per_genre"][name]
        lines.append(f"{name:<{w}}  " + " ".join(_fmt(row[k]) for k in keys)
                     + f" {row['support']:>7d}")
    lines.append("-" * len(lines[0]))
    m = report["macro"]
    macro_cells = [_fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]),
                   " " * 6, " " * 6, _fmt(m["roc_auc"])]
    total = sum(report["per_genre"][name]["support"] for name in labels)
    lines.append(f"{'macro':<{w}}  " + " ".join(macro_cells) + f" {total:>7d}")
    lines.append("")
    lines.append(f"top-1 accuracy: {report['accuracy']:.3f}")
    lines.append("")
    lines.append("confusion (rows = true, columns = predicted):")
    cw = max([len(l) for l in labels] + [len(str(v)) for row in report["confusion"] for v in row])
    lines.append(" " * (w + 2) + " ".join(f"{l:>{cw}}" for l in labels))
    for name, row in zip(labels, report["confusion"]):
        lines.append(f"{name:<{w}}  " + " ".join(f"{v:>{cw}d}" for v in row))
    if p_at_k is not None:
        k = p_at_k.get("k", 5)
        lines.append("")
        lines.append(f"precision@{k} cosine: {format_score(p_at_k.get('cosine'))}"
                     f" / genre-aware: {format_score(p_at_k.get('genre'))}")
    return "\n".join(lines)


def format_score(x) -> str:
    """A score as reports print it: three decimals, n/a when there is none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}"
