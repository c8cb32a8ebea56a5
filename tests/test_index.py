import json
import math
import os

import numpy as np
import pytest

from beetsplug.crnn import index as index_mod
from beetsplug.crnn.errors import SimilarityIndexError
from beetsplug.crnn.index import DEFAULT_N_TREES, SimilarityIndex, exact_neighbours

GENRES = ["blues", "jazz", "rock"]
ANGLES = [0, 10, 25, 50, 80, 120, 175]  # degrees from the x axis
IDS = [70, 12, 55, 3, 99, 41, 8]  # deliberately not row numbers


def _geometry():
    """Unit directions at ANGLES with unequal lengths, so normalisation matters."""
    rad = np.radians(ANGLES)
    vectors = np.stack([np.cos(rad), np.sin(rad)], axis=1) * np.arange(1, 8)[:, None]
    probs = np.random.default_rng(0).dirichlet(np.ones(3), len(IDS)).astype(np.float32)
    return np.array(IDS), vectors, probs


@pytest.fixture
def small():
    ids, vectors, probs = _geometry()
    return SimilarityIndex.build(ids, vectors, probs, GENRES, "fp-small", n_trees=4)


def _anns(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".ann"))


def test_query_order_and_cosines(small):
    ids, sims = small.query([3.0, 0.0], 7)
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    assert ids.tolist() == IDS  # angles ascend, so ids come in listed order
    np.testing.assert_allclose(sims, np.cos(np.radians(ANGLES)), atol=1e-5)
    ids, sims = small.query([math.cos(math.radians(62)), math.sin(math.radians(62))], 7)
    assert ids.tolist() == [3, 99, 55, 12, 41, 70, 8]  # 50, 80, 25, 10, 120, 0, 175 deg: 12, 18, 37 ... off
    np.testing.assert_allclose(sims, np.cos(np.radians([12, 18, 37, 52, 58, 62, 113])), atol=1e-5)


def test_query_limits_and_bad_vectors(small):
    assert small.query([1.0, 0.0], 2)[0].tolist() == [70, 12]
    assert len(small.query([1.0, 0.0], 100)[0]) == 7
    assert len(small.query([1.0, 0.0], 0)[0]) == 0
    with pytest.raises(SimilarityIndexError, match="dimension"):
        small.query([1.0, 0.0, 0.0], 3)
    with pytest.raises(SimilarityIndexError, match="zero"):
        small.query([0.0, 0.0], 3)


def test_exclude_keeps_answer_length(small):
    ids, sims = small.query([1.0, 0.0], 3, exclude=[70, 55])
    assert ids.tolist() == [12, 3, 99]
    np.testing.assert_allclose(sims, np.cos(np.radians([10, 50, 80])), atol=1e-5)


def test_row_of_and_vector(small):
    assert small.row_of(55) == 2 and small.row_of(12345) is None
    np.testing.assert_allclose(small.vector(41), [math.cos(math.radians(120)), math.sin(math.radians(120))], atol=1e-6)
    assert small.vector(12345) is None


def test_exact_neighbours_matches_geometry():
    _, vectors, _ = _geometry()
    assert exact_neighbours(vectors, [1.0, 0.2], 3).tolist() == [1, 0, 2]  # 11.3 deg: 10, 0, 25
    batch = exact_neighbours(vectors, [[1.0, 0.0], [-1.0, 0.0]], 2)
    assert batch.tolist() == [[0, 1], [6, 5]]


def test_save_load_round_trip(tmp_path, small):
    path = tmp_path / "crnn_index.npz"
    small.save(path)
    assert path.exists() and len(_anns(tmp_path)) == 1
    loaded = SimilarityIndex.load(path)
    assert loaded.ids.dtype == np.int64 and loaded.ids.tolist() == IDS
    np.testing.assert_array_equal(loaded.probs, small.probs)
    assert (loaded.genres, loaded.fingerprint, loaded.dim, len(loaded)) == (GENRES, "fp-small", 2, 7)
    for q in ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.3]):
        for got, want in zip(loaded.query(q, 5), small.query(q, 5)):
            np.testing.assert_array_equal(got, want)


def test_empty_index(tmp_path):
    empty = SimilarityIndex.build(np.empty(0, np.int64), np.empty((0, 68)), np.empty((0, 3)), GENRES, "fp0")
    ids, sims = empty.query(np.ones(68), 10)
    assert ids.shape == (0,) and sims.shape == (0,)
    empty.save(tmp_path / "i.npz")
    loaded = SimilarityIndex.load(tmp_path / "i.npz")
    assert len(loaded) == 0 and loaded.query(np.ones(68), 10)[0].shape == (0,)
    assert loaded.row_of(1) is None


@pytest.mark.parametrize("vectors, ids, match", [
    ([[1.0, 0.0], [0.0, 0.0]], [1, 2], "zero"),
    ([[1.0, 0.0], [np.nan, 1.0]], [1, 2], "not finite"),
    ([[1.0, 0.0], [0.0, 1.0]], [1, 1], "unique"),
    ([[1.0, 0.0], [0.0, 1.0]], [1, 2, 3], "ids"),
    ([1.0, 0.0], [1], "2-d"),
])
def test_build_rejects_bad_input(vectors, ids, match):
    with pytest.raises(SimilarityIndexError, match=match):
        SimilarityIndex.build(ids, vectors, np.zeros((len(ids), 3)), GENRES, "fp")


def test_build_rejects_probs_mismatch():
    with pytest.raises(SimilarityIndexError, match="probs"):
        SimilarityIndex.build([1, 2], [[1.0, 0.0], [0.0, 1.0]], np.zeros((2, 2)), GENRES, "fp")


def test_build_is_deterministic():
    x = np.random.default_rng(3).standard_normal((3000, 16))
    a, b = (SimilarityIndex.build(np.arange(3000), x, np.zeros((3000, 0)), [], "fp") for _ in range(2))
    for q in x[:20]:
        assert a.query(q, 10, search_k=200)[0].tolist() == b.query(q, 10, search_k=200)[0].tolist()


@pytest.fixture
def saved(tmp_path, small):
    path = tmp_path / "crnn_index.npz"
    small.save(path)
    return path, tmp_path / _anns(tmp_path)[0]


def test_missing_metadata(tmp_path):
    with pytest.raises(SimilarityIndexError, match="does not exist"):
        SimilarityIndex.load(tmp_path / "nothing.npz")


def test_garbage_metadata(saved):
    path, _ = saved
    path.write_bytes(b"this is not an npz file at all")
    with pytest.raises(SimilarityIndexError, match="unreadable"):
        SimilarityIndex.load(path)


def test_truncated_metadata(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SimilarityIndexError, match="unreadable"):
        SimilarityIndex.load(path)


def test_truncated_ann(saved):
    path, ann = saved
    ann.write_bytes(ann.read_bytes()[:-50])
    with pytest.raises(SimilarityIndexError, match="truncated"):
        SimilarityIndex.load(path)


def test_ann_size_differs_from_metadata(saved):
    path, ann = saved
    with open(ann, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(SimilarityIndexError, match="expected"):
        SimilarityIndex.load(path)


def test_missing_ann(saved):
    path, ann = saved
    ann.unlink()
    with pytest.raises(SimilarityIndexError, match="missing"):
        SimilarityIndex.load(path)


def test_item_count_mismatch(saved):
    path, _ = saved
    with np.load(path) as z:
        ids, probs, meta = z["ids"], z["probs"], z["meta"]
    with open(path, "wb") as f:
        np.savez(f, ids=ids[:-1], probs=probs[:-1], meta=meta)
    with pytest.raises(SimilarityIndexError, match="7 items, metadata 6"):
        SimilarityIndex.load(path)


def test_unsupported_format(saved):
    path, _ = saved
    with np.load(path) as z:
        ids, probs, header = z["ids"], z["probs"], json.loads(str(z["meta"][()]))
    header["format"] = 99
    with open(path, "wb") as f:
        np.savez(f, ids=ids, probs=probs, meta=np.array(json.dumps(header)))
    with pytest.raises(SimilarityIndexError, match="format 99"):
        SimilarityIndex.load(path)


def test_resave_removes_old_trees(tmp_path, small):
    path = tmp_path / "crnn_index.npz"
    small.save(path)
    first = _anns(tmp_path)
    (tmp_path / "other.0123456789abcdef.ann").write_bytes(b"not ours")  # another index's file survives
    SimilarityIndex.load(path).save(path)  # re-save while the old trees are mapped
    small.save(path)
    anns = _anns(tmp_path)
    assert len(anns) == 2 and "other.0123456789abcdef.ann" in anns and first[0] not in anns
    assert SimilarityIndex.load(path).query([1.0, 0.0], 1)[0].tolist() == [70]
    assert sorted(os.listdir(tmp_path)) == sorted(anns + ["crnn_index.npz"])  # no temp files


def test_interrupted_save_keeps_old_index(tmp_path, small, monkeypatch):
    path = tmp_path / "crnn_index.npz"
    small.save(path)
    before = sorted(os.listdir(tmp_path))
    x = np.random.default_rng(1).standard_normal((50, 2))
    newer = SimilarityIndex.build(np.arange(1000, 1050), x, np.zeros((50, 3)), GENRES, "fp-new")
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(path):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(index_mod.os, "replace", replace)
    with pytest.raises(SimilarityIndexError, match="cannot save similarity index .*No space left"):
        newer.save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # new trees and temp metadata removed
    old = SimilarityIndex.load(path)
    assert old.fingerprint == "fp-small" and old.ids.tolist() == IDS


def test_interrupted_save_leftover_ann_is_harmless(tmp_path, small, monkeypatch):
    """A crash (no cleanup at all) after the trees are written leaves the old index loadable."""
    path = tmp_path / "crnn_index.npz"
    small.save(path)
    newer = SimilarityIndex.build([5, 6], [[1.0, 1.0], [1.0, -1.0]], np.zeros((2, 3)), GENRES, "fp-new")

    def crash(*a, **k):
        raise KeyboardInterrupt  # not an OSError: nothing is cleaned up, as after a kill

    monkeypatch.setattr(index_mod.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        newer.save(path)
    monkeypatch.undo()
    assert len(_anns(tmp_path)) == 2
    assert SimilarityIndex.load(path).ids.tolist() == IDS
    newer.save(path)  # the next good save sweeps the orphan
    assert len(_anns(tmp_path)) == 1 and SimilarityIndex.load(path).ids.tolist() == [5, 6]


def _clustered(n, d=68, k=200, sigma=1.0, seed=0):
    """k gaussian clusters; sigma 1 puts within-cluster cosine near 0.5, across clusters near 0."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    return centres[rng.integers(0, k, n)] + sigma * rng.standard_normal((n, d))


def test_recall_at_10_on_clustered_vectors():
    n = 20_000
    x = _clustered(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    idx = SimilarityIndex.build(ids, x, np.zeros((n, 0)), [], "fp", n_trees=DEFAULT_N_TREES)
    queries = np.random.default_rng(1).choice(n, 300, replace=False)
    truth = exact_neighbours(x, x[queries], 10)
    hits = sum(len(set(idx.query(x[q], 10)[0].tolist()) & set(ids[t].tolist())) for q, t in zip(queries, truth))
    recall = hits / (10 * len(queries))
    assert recall >= 0.95, recall


def test_default_search_k_grows_with_the_library():
    from beetsplug.crnn.index import SEARCH_K_MIN, default_search_k

    sizes = [0, 10_000, 100_000, 1_000_000, 10_000_000]
    ks = [default_search_k(n, DEFAULT_N_TREES, 10) for n in sizes]
    assert ks[0] == ks[1] == SEARCH_K_MIN and ks == sorted(ks) and ks[3] > 3 * ks[2] / 2
    assert default_search_k(100, 16, 5000) == 5000 * 16  # never below Annoy's own k * n_trees


def test_rows_of_with_unsorted_ids():
    x = np.random.default_rng(2).standard_normal((5, 3))
    idx = SimilarityIndex.build([40, 10, 30, 20, 50], x, np.zeros((5, 0)), [], "fp")
    assert idx.rows_of([10, 20, 30, 40, 50, 60, 0]).tolist() == [1, 3, 2, 0, 4, -1, -1]
    assert idx.row_of(30) == 2 and idx.row_of(35) is None
    assert idx.rows_of([]).tolist() == []


# --- album vectors -------------------------------------------------------------------------------------------------

def test_album_vectors_are_normalised_means():
    ids = np.array([10, 3, 7, 5, 8])
    vectors = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 1], [3, 0, 0], [0, 1, 0]], dtype=np.float32)  # lengths differ
    probs = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]], dtype=np.float32)
    # Album 40: items 10 and 3; album 20: items 7, 5 and 99 (99 has no embedding); item 8 is a singleton.
    members_items, members_albums = [10, 3, 7, 5, 99], [40, 40, 20, 20, 20]
    album_ids, vecs, mean_probs, counts = index_mod.album_vectors(ids, vectors, probs, members_items, members_albums)
    assert album_ids.tolist() == [20, 40] and counts.tolist() == [2, 2]
    np.testing.assert_allclose(vecs, [[0.70710677, 0, 0.70710677], [0.70710677, 0.70710677, 0]], atol=1e-6)
    np.testing.assert_allclose(mean_probs, [[0.35, 0.65], [0.5, 0.5]], atol=1e-6)


def test_album_vectors_leave_out_directionless_and_empty():
    ids = np.array([1, 2, 3])
    vectors = np.array([[1, 0], [-1, 0], [0, 1]], dtype=np.float32)
    probs = np.ones((3, 2), np.float32)
    album_ids, vecs, _, _ = index_mod.album_vectors(ids, vectors, probs, [1, 2, 3], [5, 5, 6])
    assert album_ids.tolist() == [6]  # album 5's tracks cancel out
    album_ids, vecs, mean_probs, counts = index_mod.album_vectors(ids, vectors, probs, [], [])
    assert vecs.shape == (0, 2) and mean_probs.shape == (0, 2) and len(album_ids) == len(counts) == 0
