"""Ranking: genre agreement, cosine/genre scores, centroid and result selection."""

import math

import numpy as np
import pytest

from beetsplug.crnn.rank import (
    DEFAULT_GENRE_WEIGHT,
    MODES,
    Candidate,
    Picker,
    centroid,
    dedup_key,
    genre_agreement,
    identity_keys,
    scores,
    select,
)


# --- genre_agreement ---------------------------------------------------------

def test_agreement_identical_is_one():
    p = np.array([0.1, 0.7, 0.2, 0.05])
    assert genre_agreement(p, p[None, :])[0] == pytest.approx(1.0, abs=1e-9)


def test_agreement_is_scale_invariant_for_sigmoid_outputs():
    # Sigmoid outputs need not sum to 1; [0.2, 0.4] and [0.4, 0.8] are the same profile.
    assert genre_agreement([0.2, 0.4], [[0.4, 0.8]])[0] == pytest.approx(1.0, abs=1e-6)


def test_agreement_disjoint_one_hot_is_zero():
    assert genre_agreement([1.0, 0.0, 0.0], [[0.0, 1.0, 0.0]])[0] == pytest.approx(0.0, abs=1e-5)


def test_agreement_hand_computed_value():
    # P = [1, 0], Q = [.5, .5], M = [.75, .25]
    # KL(P||M) = log2(1/.75) = 0.4150375
    # KL(Q||M) = .5*log2(.5/.75) + .5*log2(.5/.25) = .5*(-0.5849625) + .5 = 0.2075187
    # JSD = (0.4150375 + 0.2075187) / 2 = 0.3112781; distance = sqrt = 0.5579230
    assert genre_agreement([1.0, 0.0], [[0.5, 0.5]])[0] == pytest.approx(1 - 0.5579230, abs=1e-6)


def test_agreement_symmetric_bounded_and_vectorised():
    rng = np.random.default_rng(0)
    Q = rng.random((20, 6))
    p = rng.random(6)
    a = genre_agreement(p, Q)
    assert a.shape == (20,)
    assert np.all((a >= 0) & (a <= 1))
    back = np.array([genre_agreement(q, p[None, :])[0] for q in Q])
    np.testing.assert_allclose(a, back, atol=1e-12)


def test_agreement_length_mismatch():
    with pytest.raises(ValueError):
        genre_agreement([0.5, 0.5], [[0.2, 0.3, 0.5]])


# --- scores ------------------------------------------------------------------

def test_constants():
    assert MODES == ("genre", "cosine")
    assert DEFAULT_GENRE_WEIGHT == 0.5


def test_cosine_mode_from_vectors_normalises():
    seed = np.array([2.0, 0.0])
    cands = np.array([[3.0, 0.0], [0.0, 5.0], [1.0, 1.0], [0.0, 0.0]])
    s = scores(seed, None, cand_vecs=cands, mode="cosine")
    np.testing.assert_allclose(s, [1.0, 0.0, math.sqrt(0.5), 0.0], atol=1e-12)


def test_cosine_mode_passes_given_cosines_through():
    cos = np.array([0.9, 0.1, -0.3])
    np.testing.assert_allclose(scores(None, None, cand_cos=cos, mode="cosine"), cos)


def test_genre_mode_adds_weighted_agreement():
    cos = np.array([0.9, 0.8])
    seed_p = np.array([1.0, 0.0])
    cand_p = np.array([[0.0, 1.0], [1.0, 0.0]])
    s = scores(None, seed_p, cand_cos=cos, cand_probs=cand_p, mode="genre", genre_weight=0.25)
    np.testing.assert_allclose(s, [0.9 + 0.0, 0.8 + 0.25], atol=1e-5)


def test_genre_mode_reorders_versus_cosine():
    # Candidate 0 is nearer in embedding space but predicted to be another genre.
    seed = np.array([1.0, 0.0])
    cands = np.array([[0.95, 0.31], [0.80, 0.60]])  # cos 0.95 vs 0.80
    seed_p = np.array([0.9, 0.1])
    cand_p = np.array([[0.05, 0.95], [0.9, 0.1]])
    by_cos = scores(seed, seed_p, cand_vecs=cands, cand_probs=cand_p, mode="cosine")
    by_genre = scores(seed, seed_p, cand_vecs=cands, cand_probs=cand_p, mode="genre")
    assert list(np.argsort(-by_cos)) == [0, 1]
    assert list(np.argsort(-by_genre)) == [1, 0]


def test_scores_errors():
    with pytest.raises(ValueError):
        scores([1, 0], [1, 0], cand_cos=[0.5], cand_probs=[[1, 0]], mode="jaccard")
    with pytest.raises(ValueError):
        scores([1, 0], [1, 0], mode="cosine")  # neither vectors nor cosines
    with pytest.raises(ValueError):
        scores([1, 0], None, cand_cos=[0.5], mode="genre")  # genre mode without probabilities


# --- centroid ----------------------------------------------------------------

def test_centroid_of_orthogonal_vectors():
    c = centroid([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(c, [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], atol=1e-12)
    assert np.linalg.norm(c) == pytest.approx(1.0)


def test_centroid_weights_directions_not_lengths():
    # Long vectors must not dominate: each seed counts once.
    c = centroid([[10.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(c, [1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-12)


def test_centroid_single_vector_and_errors():
    np.testing.assert_allclose(centroid([[0.0, 3.0]]), [0.0, 1.0])
    with pytest.raises(ValueError):
        centroid([[1.0, 0.0], [-1.0, 0.0]])
    with pytest.raises(ValueError):
        centroid(np.zeros((0, 4)))


# --- dedup_key / select ------------------------------------------------------

def C(item_id, score, artist="A", title=None, genre="rock", mbid=""):
    return Candidate(item_id=item_id, score=score, cosine=score, artist=artist,
                     title=title if title is not None else f"song {item_id}", genre=genre, mbid=mbid)


def test_dedup_key():
    assert dedup_key("  The  Beatles ", "Let It\tBe") == ("the beatles", "let it be")
    assert dedup_key("STRASSE", "x") == dedup_key("strasse", "X")


def test_select_sorts_by_score_ties_by_item_id():
    cands = [C(5, 0.5, "a"), C(3, 0.9, "b"), C(2, 0.5, "c"), C(9, 0.7, "d")]
    assert [c.item_id for c in select(cands, 10)] == [3, 9, 2, 5]
    assert [c.item_id for c in select(cands, 2)] == [3, 9]
    assert select(cands, 0) == []


def test_select_drops_seed_ids_and_seed_keys():
    cands = [C(1, 0.9, "x", "Seed"), C(2, 0.8, "X ", " seed "), C(3, 0.7, "y", "Other")]
    out = select(cands, 10, seed_ids={1})
    assert [c.item_id for c in out] == [2, 3]
    out = select(cands, 10, seed_ids={1}, seed_keys=[dedup_key("x", "seed")])
    assert [c.item_id for c in out] == [3]
    # seed_keys given raw still match
    out = select(cands, 10, seed_keys=[("X", "SEED")])
    assert [c.item_id for c in out] == [3]


def test_select_drops_later_duplicates_case_and_space_insensitive():
    cands = [C(1, 0.9, "Nina  Simone", "Feeling Good"),
             C(2, 0.8, "nina simone", "feeling   good "),
             C(3, 0.7, "NINA SIMONE", "Sinnerman")]
    assert [c.item_id for c in select(cands, 10)] == [1, 3]


def test_select_caps_each_artist():
    cands = [C(1, 0.9, "A"), C(2, 0.8, " a "), C(3, 0.7, "B"), C(4, 0.6, "A"), C(5, 0.5, "b")]
    assert [c.item_id for c in select(cands, 10, max_per_artist=1)] == [1, 3]
    assert [c.item_id for c in select(cands, 10, max_per_artist=2)] == [1, 2, 3, 5]
    assert [c.item_id for c in select(cands, 3, max_per_artist=2)] == [1, 2, 3]
    with pytest.raises(ValueError):
        select(cands, 3, max_per_artist=0)


def test_select_genre_filter_case_insensitive():
    cands = [C(1, 0.9, "a", genre="Jazz"), C(2, 0.8, "b", genre="rock"),
             C(3, 0.7, "c", genre="jazz"), C(4, 0.6, "d", genre="Rock")]
    assert [c.item_id for c in select(cands, 10, genre="ROCK")] == [2, 4]
    assert [c.item_id for c in select(cands, 1, genre="jazz")] == [1]


def test_select_filtered_genre_does_not_use_up_artist_cap():
    cands = [C(1, 0.9, "a", genre="jazz"), C(2, 0.8, "a", genre="rock")]
    assert [c.item_id for c in select(cands, 10, genre="rock", max_per_artist=1)] == [2]


# --- identity: untagged tracks and MusicBrainz ids ---------------------------------------------------------------

def test_identity_keys_need_a_title_or_an_id():
    assert identity_keys("", "") == set()
    assert identity_keys("Some Artist", "  ") == set()  # a title-less file is no known recording
    assert identity_keys(" The  Band", "Song") == {("tags", "the band", "song")}
    assert identity_keys("", "", "ABC-1") == {("mbid", "abc-1")}


def test_select_keeps_untagged_tracks_apart():
    cands = [C(i, 1 - i / 10, artist="", title="") for i in range(1, 6)]
    assert [c.item_id for c in select(cands, 10, seed_ids={9}, seed_keys=[("", "")])] == [1, 2, 3, 4, 5]
    assert [c.item_id for c in select(cands, 3, max_per_artist=1)] == [1, 2, 3]  # unknown artist: not capped


def test_select_merges_equal_musicbrainz_ids():
    cands = [C(1, 0.9, "a", "x", mbid="m1"), C(2, 0.8, "b", "y", mbid="M1"), C(3, 0.7, "c", "z", mbid="m2"),
             C(4, 0.6, "d", "", mbid="")]
    assert [c.item_id for c in select(cands, 10)] == [1, 3, 4]
    assert [c.item_id for c in select(cands, 10, seed_mbids=["m2"])] == [1, 4]


def test_picker_spans_several_choices():
    picker = Picker(seed_ids={1}, max_per_artist=1)
    first = picker.choose([C(1, 0.99, "s"), C(2, 0.9, "a"), C(3, 0.8, "a")], 1)
    assert [c.item_id for c in first] == [2]
    assert [c.item_id for c in picker.choose([C(2, 0.9, "a")], 1)] == [2]  # choose alone takes nothing
    picker.take(first[0])
    assert picker.choose([C(2, 0.9, "a"), C(3, 0.8, "a"), C(4, 0.1, "b")], 2) == [C(4, 0.1, "b")]
