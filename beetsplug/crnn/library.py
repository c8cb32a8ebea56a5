"""Reading crnn attributes straight from the beets database, for the index.

Going through ``lib.items()`` builds a full Item per row, which costs minutes at a million
tracks; the index needs four attributes, so these functions read them with plain SQL.
"""

from __future__ import annotations

import numpy as np

from . import store
from .errors import StoreError


def fingerprint(lib, model_id: str) -> str:
    """Changes whenever an item is embedded, re-embedded or removed (one aggregate query)."""
    with lib.transaction() as tx:
        row = tx.query(
            "SELECT COUNT(*), TOTAL(entity_id), TOTAL(CAST(value AS REAL)), MAX(CAST(value AS REAL)) "
            "FROM item_attributes WHERE key = ?",
            (store.STAMP,),
        )[0]
    count, id_sum, stamp_sum, stamp_max = row
    return f"{model_id}|{count}|{int(id_sum)}|{stamp_sum:.6f}|{stamp_max or 0:.6f}"


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
