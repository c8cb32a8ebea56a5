"""Song paths and smooth order as pure functions: waypoints, the greedy tour, a walk over a real index."""

from __future__ import annotations

import math

import numpy as np
import pytest

from beetsplug.crnn import rank, search, songpath
from beetsplug.crnn.index import SimilarityIndex


def at(deg, axis=1, dim=4):
    v = np.zeros(dim)
    v[0], v[axis] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return v


def angle(u, v):
    return math.degrees(math.acos(float(np.clip(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))


# --- smooth_order ---------------------------------------------------------------------------------------------------

def test_smooth_order_hand_made():
    # Points on a line in 2-d, given in a scrambled order; the tour from the left end walks right.
    xs = [3.0, 1.0, 4.0, 2.0, 5.0]
    vectors = [at(x * 10) for x in xs]
    assert songpath.smooth_order(at(0), vectors) == [1, 3, 0, 2, 4]


def test_smooth_order_two_arms():
    vectors = [at(10, 1), at(12, 2), at(20, 1), at(22, 2)]
    assert songpath.smooth_order(at(0), vectors) == [0, 2, 1, 3]
    # Brute force: at each step the next is the closest remaining one to the previous.
    order = songpath.smooth_order(at(0), vectors)
    prev, left = at(0), set(range(4))
    for i in order:
        assert angle(prev, vectors[i]) == pytest.approx(min(angle(prev, vectors[j]) for j in left))
        left.remove(i)
        prev = vectors[i]


def test_smooth_order_ties_keep_rank_and_edge_cases():
    assert songpath.smooth_order(at(0), [at(10, 1), at(10, 2)]) == [0, 1]
    assert songpath.smooth_order(at(0), []) == []
    assert songpath.smooth_order(at(0), [at(5)]) == [0]


# --- waypoints ------------------------------------------------------------------------------------------------------

def test_waypoints_even_in_angle_with_both_ends():
    pts = songpath.waypoints(at(0), at(90), 4)
    assert pts.shape == (4, 4)
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 1.0)
    assert [round(angle(at(0), p), 6) for p in pts] == [0.0, 30.0, 60.0, 90.0]
    assert angle(at(0), songpath.waypoints(at(0), at(90), 1)[0]) == pytest.approx(45.0)
    assert np.allclose(songpath.waypoints(at(10), at(10), 3), at(10))


def test_waypoints_errors():
    with pytest.raises(ValueError, match="opposite"):
        songpath.waypoints(at(0), -at(0), 3)
    with pytest.raises(ValueError):
        songpath.waypoints(at(0), at(90), 0)
    with pytest.raises(ValueError):
        songpath.waypoints(np.zeros(4), at(90), 3)


# --- walk over a real index -----------------------------------------------------------------------------------------

def _line_index(degrees, genres=("a", "b")):
    ids = np.arange(1, len(degrees) + 1)
    vectors = np.array([at(d) for d in degrees])
    probs = np.full((len(ids), len(genres)), 0.5, np.float32)
    return SimilarityIndex.build(ids, vectors, probs, list(genres), "fp", n_trees=4)


def _catalogue(index, artists=None):
    def lookup(ids):
        return {i: ((artists or {}).get(i, f"artist {i}"), f"t{i}", "a", "") for i in ids}

    return search.Catalogue(lookup)


def test_walk_straight_line_is_monotone():
    degrees = list(range(0, 91, 5))  # ids 1..19; id 1 at 0 deg (FROM), id 19 at 90 deg (TO)
    index = _line_index(degrees)
    settings = search.Settings(mode="cosine")
    picker = rank.Picker(seed_ids={1, 19})
    steps = songpath.walk(index, at(0), at(90), None, None, 6, picker, _catalogue(index), settings, exclude={1, 19})
    got = [degrees[c.item_id - 1] for c in steps]
    assert got[0] == 5 and got[-1] == 85  # the nearest unused tracks to FROM and to TO
    assert got == sorted(got) and len(set(got)) == 6
    dist_to = [angle(at(90), at(d)) for d in got]
    assert all(x > y for x, y in zip(dist_to, dist_to[1:]))


def test_walk_keeps_artist_cap_and_skips_dry_steps():
    degrees = [0, 10, 20, 30, 40, 90]
    index = _line_index(degrees)
    artists = {2: "same", 3: "same", 4: "same", 5: "other"}
    picker = rank.Picker(seed_ids={1, 6}, max_per_artist=1)
    steps = songpath.walk(index, at(0), at(90), None, None, 3, picker, _catalogue(index, artists),
                       search.Settings(mode="cosine"), exclude={1, 6})
    assert [c.item_id for c in steps] == [2, 5]  # the third step has nothing left
