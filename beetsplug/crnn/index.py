"""Approximate nearest-neighbour index over track embeddings (Annoy, angular metric = cosine).

On disk an index is two files: ``path`` (e.g. ``crnn_index.npz``) holds the item ids, the
genre probabilities and a JSON header; the Annoy trees live beside it in
``<stem>.<token>.ann`` and are memory-mapped on load, so opening a million-track index costs
milliseconds. The ``.npz`` is written last and atomically: it is the commit point, so a crash
mid-save leaves the previous index intact. One writer at a time is assumed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from .errors import SimilarityIndexError

FORMAT_VERSION = 1

# How many candidates a query inspects (Annoy's search_k) sets recall; Annoy's own default
# (k * n_trees, ~160 for k = 10) gives about 0.5. A fixed search_k loses recall as the library
# grows, so the default grows with sqrt(n). Measured with bench/similar.py (68-d, 2000 gaussian
# clusters with centres N(0, I) and noise sigma 1, i.e. within-cluster cosine ~0.5; 16 trees;
# recall@10 against exact cosine, the query item excluded):
#   n = 10k:  search_k  5000 -> 0.95           n = 1M:  search_k   5000 -> 0.75
#             search_k 20000 -> 1.00  (1 ms)            search_k  20000 -> 0.90
#   n = 100k: search_k  5000 -> 0.85                    search_k  50000 -> 0.965 (7 ms)
#             search_k 20000 -> 0.98                    search_k 100000 -> 0.989 (13 ms)
#             search_k 31623 -> 0.99  (3 ms)            search_k 200000 -> 0.997 (23 ms)
# The default, max(SEARCH_K_MIN, SEARCH_K_PER_SQRT_N * sqrt(n)), is 20000 at 10k-40k items,
# ~32000 at 100k and 100000 at 1M: recall@10 ~0.99 at every size for at most ~15 ms per query,
# which is small next to a `beet similar` process's start-up (~0.3 s).
DEFAULT_N_TREES = 16
SEARCH_K_MIN = 20000
SEARCH_K_PER_SQRT_N = 100


def default_search_k(n_items: int, n_trees: int, k: int) -> int:
    """Candidates inspected per query when none is configured (see SEARCH_K_PER_SQRT_N)."""
    return int(max(SEARCH_K_MIN, SEARCH_K_PER_SQRT_N * np.sqrt(max(n_items, 0)), k * n_trees))


# Annoy seeds each build thread with seed + thread number, so the trees depend on the thread
# count: a fixed count (not n_jobs=-1) makes the same input give the same index on any machine.
# 8 threads build as fast as 2 on a 2-core box and still use up to 8 cores.
BUILD_THREADS = 8
SEED = 20240601
_BLOCK = 65536  # rows normalised at a time while building


def _unit(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms > 0, norms, 1)


class SimilarityIndex:
    """Annoy row ``i`` is the track with beets id ``ids[i]``; ``probs[i]`` are its genre probabilities."""

    def __init__(self, ids, probs, genres, fingerprint, dim, n_trees, annoy):
        self.ids = ids
        self.probs = probs
        self.genres = list(genres)
        self.fingerprint = fingerprint
        self.dim = dim
        self.n_trees = n_trees
        self._annoy = annoy
        self._rows = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, ids, vectors, probs, genres, fingerprint, n_trees=DEFAULT_N_TREES) -> SimilarityIndex:
        """Index ``vectors`` (n, d); rows must be finite and non-zero (a zero vector has no direction)."""
        ids = np.asarray(ids)
        vectors = np.asarray(vectors)
        if vectors.dtype not in (np.float32, np.float64):
            vectors = vectors.astype(np.float64)
        probs = np.asarray(probs, dtype=np.float32)
        genres = [str(g) for g in genres]
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise SimilarityIndexError(f"vectors must be a 2-d (n, d) array, got shape {vectors.shape}")
        n, dim = vectors.shape
        if ids.shape != (n,) or (n and not np.issubdtype(ids.dtype, np.integer)):
            raise SimilarityIndexError(f"ids must be {n} integers, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != n:
            raise SimilarityIndexError("ids are not unique")
        if probs.shape != (n, len(genres)):
            raise SimilarityIndexError(f"probs shape {probs.shape} does not match ({n}, {len(genres)} genres)")
        # In float64 like before, but a block at a time: a million 68-d float64 copies were 1 GB.
        norms = np.empty(n, dtype=np.float64)
        unit = np.empty((n, dim), dtype=np.float32)
        for s in range(0, n, _BLOCK):
            block = vectors[s:s + _BLOCK].astype(np.float64)
            norms[s:s + _BLOCK] = np.linalg.norm(block, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                unit[s:s + _BLOCK] = block / norms[s:s + _BLOCK, None]
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            raise SimilarityIndexError(f"{int(bad.sum())} vectors are zero or not finite (first: item {ids[bad][0]})")
        if int(n_trees) < 1:
            raise SimilarityIndexError(f"n_trees must be at least 1, got {n_trees}")
        annoy = AnnoyIndex(dim, "angular")
        annoy.set_seed(SEED)
        for row, v in enumerate(unit):
            annoy.add_item(row, v)
        del unit  # Annoy holds its own copy
        annoy.build(int(n_trees), n_jobs=BUILD_THREADS)
        return cls(ids, probs, genres, str(fingerprint), dim, int(n_trees), annoy)

    def save(self, path) -> None:
        """Write the trees, then commit by atomically replacing the metadata file, then drop old trees."""
        path = Path(os.fsdecode(path))
        folder = path.parent
        ann_name = f"{path.stem}.{secrets.token_hex(8)}.ann"
        ann_path, ann_tmp = folder / ann_name, folder / f".{ann_name}.tmp"
        meta_tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._annoy.save(str(ann_tmp))
            os.replace(ann_tmp, ann_path)
            _fsync(ann_path)
            header = {
                "format": FORMAT_VERSION,
                "fingerprint": self.fingerprint,
                "genres": self.genres,
                "dim": self.dim,
                "n_trees": self.n_trees,
                "ann": ann_name,
                "ann_bytes": ann_path.stat().st_size,
            }
            fd, meta_tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:  # a file object, so np.savez appends no ".npz"
                np.savez(f, ids=self.ids, probs=self.probs, meta=np.array(json.dumps(header)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, path)
        except OSError as e:
            for p in (meta_tmp, ann_tmp, ann_path):
                if p is not None:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
            raise SimilarityIndexError(f"cannot save similarity index {path}: {e}") from e
        _fsync(folder)
        stale = re.compile(rf"\.?{re.escape(path.stem)}\.[0-9a-f]{{16}}\.ann(\.tmp)?")
        for p in folder.iterdir():
            if p.name != ann_name and stale.fullmatch(p.name):
                try:
                    p.unlink()
                except OSError:
                    pass  # e.g. still mapped by another process on Windows; removed next save

    @classmethod
    def load(cls, path) -> SimilarityIndex:
        """Open an index written by :meth:`save`; the trees are memory-mapped, not read."""
        path = Path(os.fsdecode(path))
        if not path.exists():
            raise SimilarityIndexError(f"similarity index {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, probs = z["ids"], z["probs"]
                header = json.loads(str(z["meta"][()]))
            version = header["format"]
            genres, dim, n_trees = header["genres"], int(header["dim"]), int(header["n_trees"])
            ann_name, ann_bytes = str(header["ann"]), int(header["ann_bytes"])
            fingerprint = str(header["fingerprint"])
        except Exception as e:
            raise SimilarityIndexError(f"similarity index {path} unreadable: {type(e).__name__}: {e}") from e

        def bad(reason):
            return SimilarityIndexError(f"similarity index {path} inconsistent: {reason}")

        if version != FORMAT_VERSION:
            raise bad(f"format {version}, expected {FORMAT_VERSION}")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise bad(f"ids have shape {ids.shape} dtype {ids.dtype}")
        if not isinstance(genres, list) or probs.shape != (len(ids), len(genres)):
            raise bad(f"probs shape {probs.shape} does not match {len(ids)} items x {len(genres)} genres")
        if dim < 1:
            raise bad(f"dimension {dim}")
        if os.path.basename(ann_name) != ann_name or not ann_name.endswith(".ann"):
            raise bad(f"tree file name {ann_name!r}")
        ann_path = path.parent / ann_name
        try:
            size = ann_path.stat().st_size
        except OSError as e:
            raise bad(f"tree file {ann_path} missing ({e.strerror})") from e
        if size != ann_bytes:
            raise bad(f"tree file {ann_path} has {size} bytes, expected {ann_bytes} (truncated or replaced)")
        annoy = AnnoyIndex(dim, "angular")
        try:
            annoy.load(str(ann_path))
        except OSError as e:
            raise SimilarityIndexError(f"similarity index tree file {ann_path} unreadable: {e}") from e
        if annoy.get_n_items() != len(ids):
            raise bad(f"tree file has {annoy.get_n_items()} items, metadata {len(ids)}")
        return cls(ids.astype(np.int64, copy=False), probs.astype(np.float32, copy=False),
                   [str(g) for g in genres], fingerprint, dim, n_trees, annoy)

    def _lookup(self):
        """(sorted ids, their rows): a binary search replaces a million-entry dict built per process."""
        if self._rows is None:
            ids = self.ids
            if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
                self._rows = (ids, None)  # the plugin writes ids ascending: nothing to build
            else:
                order = np.argsort(ids, kind="stable")
                self._rows = (ids[order], order)
        return self._rows

    def rows_of(self, item_ids) -> np.ndarray:
        """Annoy rows of beets item ids, -1 where an id is not indexed."""
        keys = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        sorted_ids, order = self._lookup()
        if len(sorted_ids) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, keys), len(sorted_ids) - 1)
        found = sorted_ids[pos] == keys
        rows = pos if order is None else order[pos]
        return np.where(found, rows, -1).astype(np.int64)

    def row_of(self, item_id) -> int | None:
        """Annoy row of a beets item id, or None if it is not indexed."""
        row = int(self.rows_of([int(item_id)])[0])
        return None if row < 0 else row

    def vector(self, item_id) -> np.ndarray | None:
        """The stored unit vector of an item, or None if it is not indexed."""
        row = self.row_of(item_id)
        return None if row is None else np.asarray(self._annoy.get_item_vector(row), dtype=np.float32)

    def query(self, vector, n, search_k=-1, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` (item ids, cosine similarities) nearest to ``vector``, best first, ids in ``exclude`` skipped.

        ``search_k=-1`` means :func:`default_search_k`: Annoy's own default is far too small
        for good recall, and a fixed value loses recall as the library grows.
        """
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (self.dim,):
            raise SimilarityIndexError(f"query vector has shape {v.shape}, index dimension is {self.dim}")
        norm = np.linalg.norm(v)
        if not np.isfinite(norm) or norm == 0:
            raise SimilarityIndexError("query vector is zero or not finite")
        exclude = {int(i) for i in exclude}
        n = int(n)
        if n <= 0 or len(self.ids) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        k = n + len(exclude)
        if search_k == -1:
            search_k = default_search_k(len(self.ids), self.n_trees, k)
        rows, dists = self._annoy.get_nns_by_vector((v / norm).tolist(), k, int(search_k), True)
        ids = self.ids[np.asarray(rows, dtype=np.int64)]
        sims = np.clip(1 - np.square(np.asarray(dists, dtype=np.float32)) / 2, -1, 1)
        if exclude:
            keep = ~np.isin(ids, list(exclude))
            ids, sims = ids[keep], sims[keep]
        return ids[:n], sims[:n]


def album_vectors(ids, vectors, probs, member_items, member_albums):
    """(album ids, vectors, genre profiles, track counts) of the albums that have analysed tracks.

    An album's vector is the normalised mean of its tracks' unit embeddings and its genre
    profile the mean of theirs: the same as seeding `beet similar` with the whole album. Made
    from the arrays a track index build already holds, so albums cost no second database pass.
    Albums whose tracks point every way (a mean of length ~0) have no direction and are left out.
    """
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.asarray(vectors)
    probs = np.asarray(probs, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    empty = (np.empty(0, np.int64), np.empty((0, dim), np.float32), np.empty((0, probs.shape[-1]), np.float32),
             np.empty(0, np.int64))
    member_items = np.asarray(member_items, dtype=np.int64)
    member_albums = np.asarray(member_albums, dtype=np.int64)
    if len(ids) == 0 or len(member_items) == 0:
        return empty
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], member_items), len(ids) - 1)
    found = ids[order][pos] == member_items
    rows, albums = order[pos[found]], member_albums[found]
    if len(rows) == 0:
        return empty
    by_album = np.lexsort((rows, albums))
    rows, albums = rows[by_album], albums[by_album]
    starts = np.flatnonzero(np.r_[True, albums[1:] != albums[:-1]])
    counts = np.diff(np.r_[starts, len(rows)])
    sums = np.empty((len(starts), dim), dtype=np.float64)
    mean_probs = np.empty((len(starts), probs.shape[-1]), dtype=np.float64)
    step = max(1, _BLOCK // 16)  # albums at a time: a million tracks are not copied in float64 at once
    for s in range(0, len(starts), step):
        lo, hi = starts[s], (starts[s + step] if s + step < len(starts) else len(rows))
        block = rows[lo:hi]
        sums[s:s + step] = np.add.reduceat(_unit(vectors[block].astype(np.float64)), starts[s:s + step] - lo, axis=0)
        mean_probs[s:s + step] = np.add.reduceat(probs[block].astype(np.float64), starts[s:s + step] - lo, axis=0)
    mean_probs /= counts[:, None]
    norms = np.linalg.norm(sums, axis=1)
    keep = norms > 1e-6 * counts
    return (albums[starts][keep], (sums[keep] / norms[keep, None]).astype(np.float32),
            mean_probs[keep].astype(np.float32), counts[keep])


def exact_neighbours(vectors, query, n) -> np.ndarray:
    """Brute-force cosine top-``n`` row indices, best first: the ground truth for recall.

    ``query`` (d,) gives shape (n,); (m, d) gives (m, n), computed in chunks to bound memory.
    """
    v = _unit(np.asarray(vectors, dtype=np.float32))
    q = np.asarray(query, dtype=np.float32)
    single = q.ndim == 1
    q = _unit(np.atleast_2d(q))
    n = min(int(n), len(v))
    out = np.empty((len(q), max(n, 0)), dtype=np.int64)
    if n > 0:
        for s in range(0, len(q), 256):
            sims = q[s:s + 256] @ v.T
            top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
            out[s:s + 256] = np.take_along_axis(top, order, axis=1)
    return out[0] if single else out


def _fsync(path) -> None:
    """Flush a file's or a folder's entry to disk; best effort where the OS cannot (Windows folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
