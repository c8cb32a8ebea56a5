"""SQL reads of crnn attributes: the staleness fingerprint and its index, embeddings, candidate fields."""

from __future__ import annotations

import time

import numpy as np
import pytest

from beetsplug.crnn import library, store
from conftest import GENRES

MODEL = "test-model"


@pytest.fixture
def lib(tmp_path):
    from beets.library import Library

    lib = Library(str(tmp_path / "library.db"), str(tmp_path / "lib"))
    yield lib
    lib._close()


def add(lib, title, vec, probs=(0.7, 0.1, 0.1, 0.1), model=MODEL, stamp=None):
    from beets.library import Item

    item = Item(path=f"/m/{title}.mp3".encode(), title=title, artist=f"A {title}")
    lib.add(item)
    item.update(store.fields_for(np.asarray(vec, float), probs, GENRES, model, 0.0, stamp or time.time()))
    item.store()
    return item


def unit(i, d=8):
    v = np.zeros(d)
    v[i % d] = 1.0
    return v


def plan(lib):
    with lib.transaction() as tx:
        rows = tx.query("EXPLAIN QUERY PLAN SELECT COUNT(*), TOTAL(entity_id), TOTAL(CAST(value AS REAL)) "
                        f"FROM item_attributes WHERE key = '{store.STAMP}'")
    return " ".join(str(r[3]) for r in rows)


def test_fingerprint_creates_and_uses_stamp_index(lib):
    add(lib, "a", unit(0))
    assert library.STAMP_INDEX not in plan(lib)
    library.fingerprint(lib, MODEL)
    assert f"COVERING INDEX {library.STAMP_INDEX}" in plan(lib)
    assert library.ensure_stamp_index(lib)  # idempotent


def test_fingerprint_tracks_embed_reembed_remove(lib):
    a = add(lib, "a", unit(0), stamp=1000.0)
    fps = [library.fingerprint(lib, MODEL)]
    b = add(lib, "b", unit(1), stamp=1001.0)
    fps.append(library.fingerprint(lib, MODEL))
    b.update({store.STAMP: 1002.0})
    b.store()
    fps.append(library.fingerprint(lib, MODEL))
    a.remove()
    fps.append(library.fingerprint(lib, MODEL))
    b["title"] = "renamed"  # other fields do not make the index stale
    b.store()
    fps.append(library.fingerprint(lib, MODEL))
    assert len(set(fps)) == 4 and fps[-1] == fps[-2]
    assert library.fingerprint(lib, "other-model") != fps[-1]


def test_fingerprint_on_read_only_database_falls_back_to_a_scan(lib):
    add(lib, "a", unit(0))
    lib._connection().execute("PRAGMA query_only = 1")  # as if the file were read-only
    assert library.ensure_stamp_index(lib) is False
    fp = library.fingerprint(lib, MODEL)
    lib._connection().execute("PRAGMA query_only = 0")
    expected = library.fingerprint(lib, MODEL)  # now with the index
    assert fp == expected


def test_read_embeddings_skips_and_reports_bad_rows(lib):
    good = [add(lib, f"g{i}", unit(i), probs=(0.1, 0.2, 0.3, 0.4)) for i in range(3)]
    other = add(lib, "other", unit(3), model="old-model")
    bad_b64 = add(lib, "bad64", unit(4))
    bad_b64[store.EMBEDDING] = "!!not base64"
    bad_b64.store()
    short = add(lib, "short", unit(5))
    short[store.EMBEDDING] = store.encode_vector(np.ones(4) / 2)
    short.store()
    not_unit = add(lib, "notunit", unit(6))
    not_unit[store.EMBEDDING] = store.encode_vector(np.ones(8))
    not_unit.store()
    no_prob = add(lib, "noprob", unit(7))
    del no_prob[store.prob_field("rock")]
    no_prob.store()
    logged = []
    ids, vectors, probs, skipped = library.read_embeddings(lib, MODEL, GENRES, log=logged.append)
    assert ids.tolist() == [g.id for g in good] + [no_prob.id]
    np.testing.assert_allclose(vectors, [unit(0), unit(1), unit(2), unit(7)], atol=1e-6)
    assert vectors.dtype == np.float32 and probs.dtype == np.float32
    np.testing.assert_allclose(probs[:3], [[0.1, 0.2, 0.3, 0.4]] * 3, atol=1e-6)
    np.testing.assert_allclose(probs[3], [0.7, 0.1, 0.1, 0.0], atol=1e-6)  # a missing genre counts as 0
    assert skipped == 4  # other model + three unusable
    reasons = " | ".join(logged)
    assert len(logged) == 3 and "not valid base64" in reasons and "4 values, expected 8" in reasons
    assert "not a unit vector" in reasons and f"item {bad_b64.id}" in reasons
    assert other.id not in ids


def test_read_embeddings_empty(lib):
    ids, vectors, probs, skipped = library.read_embeddings(lib, MODEL, GENRES)
    assert ids.shape == (0,) and vectors.shape == (0, 0) and probs.shape == (0, 4) and skipped == 0


def test_candidate_fields(lib):
    a = add(lib, "a", unit(0), probs=(0.1, 0.1, 0.1, 0.7))
    b = add(lib, "b", unit(1), probs=(0.6, 0.2, 0.1, 0.1))
    got = library.candidate_fields(lib, np.array([b.id, a.id, 9999]))
    assert got == {a.id: ("A a", "a", "rock", ""), b.id: ("A b", "b", "classical", "")}
    ids = [add(lib, f"x{i}", unit(i)).id for i in range(600)]  # more than one chunk of bound variables
    assert set(library.candidate_fields(lib, ids)) == set(ids)
