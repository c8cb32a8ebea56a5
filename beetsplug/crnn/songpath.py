"""Song paths (`beet crnnpath`) and smooth order (`--order smooth`): playlists without jarring jumps.

A path from one sound to another visits points evenly spaced along the great circle between
the two seeds' embeddings and takes, at each, the nearest track the list has not used yet
(through the same search, filters, duplicate check and artist cap as `beet similar`), so a
playlist drifts from the first seed's sound to the second's. Smooth order re-orders a list
so each track is the closest remaining one to the track before it. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from . import rank, search


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError("a path end has no direction (zero vector)")
    return v / norm


def waypoints(start, end, n: int) -> np.ndarray:
    """``n`` unit vectors evenly spaced in angle from ``start`` to ``end``, both included.

    One point is the midpoint. Spherical interpolation, because the index measures angles: equal
    steps in angle are equal steps in cosine distance. Raises ValueError for opposite ends, which
    have no single path between them.
    """
    if n < 1:
        raise ValueError("a path needs at least one step")
    a, b = _unit(start), _unit(end)
    ts = np.array([0.5]) if n == 1 else np.linspace(0.0, 1.0, n)
    cos = float(np.clip(a @ b, -1.0, 1.0))
    omega = np.arccos(cos)
    if omega < 1e-6:
        return np.repeat(a[None, :], n, axis=0)
    if np.pi - omega < 1e-6:
        raise ValueError("the two ends sound exactly opposite: there is no single path between them")
    s = np.sin(omega)
    points = (np.sin((1 - ts) * omega)[:, None] * a + np.sin(ts * omega)[:, None] * b) / s
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def step_fractions(n: int) -> np.ndarray:
    """Where each of ``n`` steps lies between the ends (0 = start, 1 = end), as in :func:`waypoints`."""
    return np.array([0.5]) if n == 1 else np.linspace(0.0, 1.0, n)


def walk(index, start, end, start_probs, end_probs, n: int, picker: rank.Picker, catalogue: search.Catalogue,
         settings: search.Settings, exclude=()) -> list[rank.Candidate]:
    """One track per waypoint: the best the list still allows, scored against that point.

    The genre profile a step is scored against moves from the start's to the end's with it. A
    step that finds nothing (filters that match too little) is skipped, so the path may be shorter.
    """
    out = []
    points = waypoints(start, end, n)
    for t, point in zip(step_fractions(n), points):
        probs = None
        if start_probs is not None and end_probs is not None:
            probs = (1 - t) * np.asarray(start_probs, np.float64) + t * np.asarray(end_probs, np.float64)
        chosen, _ = search.nearest(index, point, probs, 1, picker, catalogue, settings, exclude=exclude)
        if chosen:
            picker.take(chosen[0])
            out.append(chosen[0])
    return out


def smooth_order(start, vectors) -> list[int]:
    """Positions of ``vectors`` as a greedy nearest-neighbour tour from ``start``.

    Each next one is the remaining vector with the highest cosine to the previous one (to
    ``start`` for the first); ties go to the earlier position, so a ranked list stays in rank
    order where it can.
    """
    v = np.asarray(vectors, dtype=np.float64)
    if len(v) == 0:
        return []
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    left = list(range(len(v)))
    order = []
    current = _unit(start)
    while left:
        sims = v[left] @ current
        best = left[int(np.argmax(sims))]  # argmax takes the first of equal maxima
        order.append(best)
        left.remove(best)
        current = v[best]
    return order


def reorder(chosen, start, index) -> list:
    """``chosen`` (candidates in ``index``) in smooth order from ``start``; see :func:`smooth_order`."""
    if len(chosen) < 2:
        return list(chosen)
    vectors = [index.vector(c.item_id) for c in chosen]
    return [chosen[i] for i in smooth_order(start, vectors)]
