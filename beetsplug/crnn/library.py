"""Reading crnn attributes straight from the beets database, for the index.

Going through ``lib.items()`` builds a full Item per row, which costs minutes at a million
tracks; the index needs four attributes, so these functions read them with plain SQL.
"""

from __future__ import annotations

import re
import sqlite3

import numpy as np
from beets.dbcore.db import DBAccessError

from . import rank, store
from .errors import StoreError, display_path


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
    One pivoting query returns a row per item, and the vectors are checked as one array: at a
    million items this takes seconds and a few hundred MB, where a dict per item took 20 s and 2.5 GB.
    """
    prob_keys = [store.prob_field(g) for g in genres]
    fields = [store.EMBEDDING, store.MODEL] + prob_keys
    pick = ", ".join(["MAX(CASE WHEN key = ? THEN value END)"] * 2
                     + ["MAX(CASE WHEN key = ? THEN CAST(value AS REAL) END)"] * len(prob_keys))
    sql = (f"SELECT entity_id, {pick} FROM item_attributes WHERE key IN ({','.join('?' * len(fields))}) "
           "GROUP BY entity_id ORDER BY entity_id")
    ids, texts, probs, skipped = [], [], [], 0
    with lib.transaction() as tx:
        for row in tx.query(sql, fields + fields):
            if row[2] != model_id or not row[1]:
                skipped += 1
                continue
            ids.append(row[0])
            texts.append(row[1])
            probs.append(tuple(row[3:]))
    raws = [_b64(t) for t in texts]
    if dim is None:  # the first usable embedding sets the dimension, as before
        for i, raw in enumerate(raws):
            if raw is not None and len(raw) and len(raw) % 2 == 0:
                try:
                    dim = len(store.decode_vector(texts[i]))
                    break
                except StoreError:
                    continue
    keep = np.zeros(len(ids), dtype=bool)
    vectors = np.zeros((len(ids), dim or 0), dtype=np.float32)
    if dim:
        sized = np.array([raw is not None and len(raw) == 2 * dim for raw in raws], dtype=bool)
        block = np.frombuffer(b"".join(raw for raw, ok in zip(raws, sized) if ok), dtype="<f2")
        block = block.astype(np.float32).reshape(-1, dim)
        norms = np.linalg.norm(block, axis=1)
        good = np.isfinite(norms) & (np.abs(norms - 1.0) <= 0.01)
        where = np.flatnonzero(sized)
        vectors[where[good]] = block[good] / norms[good, None]
        keep[where[good]] = True
    for i in np.flatnonzero(~keep):  # the rare bad ones: decode_vector words the reason
        try:
            vectors[i] = store.decode_vector(texts[i], dim)
            keep[i] = True
        except (StoreError, ValueError) as exc:
            if log is not None:
                log(f"{_describe(lib, ids[i])}: stored {store.EMBEDDING} is unusable ({exc}); skipped. "
                    f"beet crnnembed analyses it again")
            skipped += 1
    n_genres = len(genres)
    probs = np.array(probs, dtype=np.float64).reshape(len(ids), n_genres)  # a missing genre (None) is nan
    return (
        np.array(ids, dtype=np.int64)[keep],
        vectors[keep].reshape(int(keep.sum()), dim or 0),
        np.nan_to_num(probs[keep], nan=0.0).astype(np.float32),
        skipped,
    )


def _b64(text):
    """The stored bytes, or None where there are none (decode_vector words the reason later)."""
    try:
        return store.vector_bytes(text)
    except StoreError:
        return None


def _describe(lib, item_id: int) -> str:
    """The item's path for a message (its id when the path cannot be read)."""
    try:
        with lib.transaction() as tx:
            rows = tx.query("SELECT path FROM items WHERE id = ?", (item_id,))
        path = rows[0][0] if rows else None
    except Exception:
        path = None
    if isinstance(path, (bytes, str)) and path:
        return f"item {item_id} ({display_path(path)})"
    return f"item {item_id}"


def _chunks(ids, size=500):
    """Lists of ids well under SQLite's limit on bound variables."""
    ids = [int(i) for i in ids]
    for s in range(0, len(ids), size):
        yield ids[s:s + size]


def candidate_fields(lib, item_ids) -> dict:
    """{item id: (artist, title, crnn_genre, mb_trackid)} for the ids that still exist.

    What ranking and the duplicate check need, in two queries per 500 ids, not one Item per candidate.
    """
    out: dict[int, list] = {}
    with lib.transaction() as tx:
        for chunk in _chunks(item_ids):
            marks = ",".join("?" * len(chunk))
            for item_id, artist, title, mbid in tx.query(
                f"SELECT id, artist, title, mb_trackid FROM items WHERE id IN ({marks})", chunk
            ):
                out[item_id] = [artist or "", title or "", "", mbid or ""]
            for item_id, genre in tx.query(
                f"SELECT entity_id, value FROM item_attributes WHERE key = ? AND entity_id IN ({marks})",
                [store.GENRE, *chunk],
            ):
                if item_id in out:
                    out[item_id][2] = genre or ""
    return {k: tuple(v) for k, v in out.items()}


def album_fields(lib, album_ids, va_name=rank.DEFAULT_VA_NAME) -> dict:
    """{album id: (albumartist, album, mb_albumid)} for the albums that still exist; a compilation's
    album artist is "" (``rank.is_compilation``: it names no one artist)."""
    out = {}
    with lib.transaction() as tx:
        for chunk in _chunks(album_ids):
            marks = ",".join("?" * len(chunk))
            for album_id, artist, title, mbid, comp in tx.query(
                f"SELECT id, albumartist, album, mb_albumid, comp FROM albums WHERE id IN ({marks})", chunk
            ):
                artist = "" if rank.is_compilation(artist, comp, va_name) else artist
                out[album_id] = (artist or "", title or "", mbid or "")
    return out


# Album vectors are built with the track index; they go stale when tracks move between albums
# (a re-import that merges albums) without being re-analysed, which the stamps do not see. This
# covering index makes the check a scan of small index entries, like STAMP_INDEX; it is only run
# by `beet similar -a`.
ALBUM_INDEX = "crnn_album_idx"


def album_membership(lib) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, album ids) of every item that belongs to an album."""
    with lib.transaction() as tx:
        rows = tx.query("SELECT id, album_id FROM items WHERE album_id IS NOT NULL")
    pairs = np.array([(r[0], r[1]) for r in rows], dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def album_fingerprint(lib) -> str:
    """Changes when a track joins, leaves or changes album (one aggregate over an index)."""
    try:
        with lib.transaction() as tx:
            if not tx.query("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (ALBUM_INDEX,)):
                tx.mutate(f"CREATE INDEX IF NOT EXISTS {ALBUM_INDEX} ON items (album_id, id)")
    except (sqlite3.Error, DBAccessError):  # read-only or busy database: the aggregate scans instead
        pass
    with lib.transaction() as tx:
        count, album_sum, pair_sum = tx.query(
            "SELECT COUNT(*), TOTAL(album_id), TOTAL(CAST(album_id AS REAL) * id) FROM items WHERE album_id IS NOT NULL"
        )[0]
    return f"albums|{count}|{int(album_sum)}|{pair_sum:.0f}"


def matching_ids(lib, query, model_cls, ids) -> set:
    """The ids among ``ids`` whose item (or album) matches a parsed beets ``query``.

    Only the candidates are checked, never the whole library: a query SQLite can answer is
    run on them as SQL (joined with the other table where beets would join it), and one it
    cannot (a flexible attribute, a regexp beets checks in Python) is matched on the objects
    of these ids only. beets itself would scan the whole table for the latter.
    """
    from beets.dbcore import query as beets_query

    table = model_cls._table
    clause, subvals = query.clause()
    other_fields = getattr(model_cls, "other_db_fields", set())  # album fields in item queries (beets >= 2.1)
    out: set = set()
    for chunk in _chunks(ids):
        if clause is not None:
            source = table
            if other_fields and query.field_names & other_fields:
                source += f" {model_cls.relation_join}"
            marks = ",".join("?" * len(chunk))
            with lib.transaction() as tx:
                rows = tx.query(f"SELECT {table}.id FROM ({source}) WHERE {table}.id IN ({marks}) AND ({clause})",
                                [*chunk, *subvals])
            out.update(r[0] for r in rows)
        else:
            fetch = lib.albums if table == "albums" else lib.items
            if hasattr(beets_query, "InQuery"):
                these = beets_query.InQuery("id", chunk)
            else:
                these = beets_query.OrQuery([beets_query.MatchQuery("id", i) for i in chunk])
            out.update(obj.id for obj in fetch(these) if query.match(obj))
    return out
