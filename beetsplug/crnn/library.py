"""Reading crnn attributes straight from the beets database, for the index.

Going through ``lib.items()`` builds a full Item per row, which costs minutes at a million
tracks; the index needs four attributes, so these functions read them with plain SQL.
"""

from __future__ import annotations

import re
import sqlite3

import numpy as np
from beets.dbcore.db import DBAccessError

from . import store
from .errors import StoreError


# The staleness check reads every crnn_stamp row. item_attributes holds ~10 rows per embedded
# item and beets indexes it by entity only, so at a million items the check scanned ~10M rows
# (0.6 s). A partial index holding just the stamp rows, covering the columns the aggregate reads,
# makes it a scan of 1M small index entries (~0.12 s) and costs nothing on writes of other
# attributes. It is created once, by the first check that finds it missing (~1 s at 1M items);
# where the database cannot be written the check still works, only slower. The key is spelled as
# a literal in both statements: SQLite uses a partial index only for a WHERE it can match as text.
STAMP_INDEX = "crnn_stamp_idx"
_STAMP_WHERE = f"key = '{store.STAMP}'"
assert re.fullmatch(r"[a-z_]+", store.STAMP)


def ensure_stamp_index(lib) -> bool:
    """Create the staleness check's SQL index if it is missing; False when it cannot be created."""
    try:
        with lib.transaction() as tx:
            if tx.query("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (STAMP_INDEX,)):
                return True
            tx.mutate(f"CREATE INDEX IF NOT EXISTS {STAMP_INDEX} ON item_attributes (key, entity_id, value) "
                      f"WHERE {_STAMP_WHERE}")
        return True
    except (sqlite3.Error, DBAccessError):  # read-only or busy database: the check scans instead
        return False


def fingerprint(lib, model_id: str) -> str:
    """Changes whenever an item is embedded, re-embedded or removed (one aggregate query).

    Every (re-)embedding writes a new, later stamp, so the stamps' sum changes with it; the
    count and the sum of item ids catch removals. (A MAX of the stamps would add nothing and
    cost a third more.)
    """
    ensure_stamp_index(lib)
    with lib.transaction() as tx:
        count, id_sum, stamp_sum = tx.query(
            f"SELECT COUNT(*), TOTAL(entity_id), TOTAL(CAST(value AS REAL)) FROM item_attributes WHERE {_STAMP_WHERE}"
        )[0]
    return f"{model_id}|{count}|{int(id_sum)}|{stamp_sum:.6f}"


def read_embeddings(lib, model_id: str, genres, dim: int | None = None, log=None):
    """(ids, unit vectors, genre probabilities, skipped) of every item embedded by ``model_id``.

    Items whose stored embedding is garbage are reported through ``log`` and skipped.
    """
    fields = [store.EMBEDDING, store.MODEL] + [store.prob_field(g) for g in genres]
    placeholders = ",".join("?" * len(fields))
    rows: dict[int, dict] = {}
    with lib.transaction() as tx:
        for entity_id, key, value in tx.query(
            f"SELECT entity_id, key, value FROM item_attributes WHERE key IN ({placeholders})", fields
        ):
            rows.setdefault(entity_id, {})[key] = value
    ids, vectors, probs, skipped = [], [], [], 0
    for item_id in sorted(rows):
        values = rows[item_id]
        if values.get(store.MODEL) != model_id or not values.get(store.EMBEDDING):
            skipped += 1
            continue
        try:
            vec = store.decode_vector(values[store.EMBEDDING], dim)
        except StoreError as exc:
            if log is not None:
                log(f"item {item_id}: stored {store.EMBEDDING} is unusable ({exc}); run beet crnnembed --force on it")
            skipped += 1
            continue
        dim = dim or len(vec)
        ids.append(item_id)
        vectors.append(vec)
        probs.append(store.probs_from(values, genres))
    n_genres = len(genres)
    return (
        np.array(ids, dtype=np.int64),
        np.array(vectors, dtype=np.float32).reshape(len(ids), dim or 0),
        np.array(probs, dtype=np.float32).reshape(len(ids), n_genres),
        skipped,
    )
