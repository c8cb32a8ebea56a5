"""``beet crnnindex`` and the index files: the track index and, beside it, the album index.

Searches call ``load_index``, which rebuilds an index that is missing, unreadable or out of date
(its fingerprint no longer matches the library's stored analyses).
"""

from __future__ import annotations

import os
import time

from beets import config as beets_config

from .common import user_errors

HELP = "rebuild the similarity index from stored embeddings"
INDEX_NAME = "crnn_index.npz"


def add_options(parser) -> None:
    pass


def run(plugin, lib, opts, args) -> None:
    t = time.time()
    index = build_index(plugin, lib)
    plugin._log.info("indexed {} tracks in {:.1f} s: {}", len(index.ids), time.time() - t, index_path(plugin))


def index_path(plugin) -> str:
    configured = plugin.config["index_path"].as_str()
    if configured:
        return os.path.expanduser(configured)
    return os.path.join(beets_config.config_dir(), INDEX_NAME)


def album_index_path(plugin) -> str:
    """The album index lives beside the track index: ``crnn_index_albums.npz``."""
    stem, ext = os.path.splitext(index_path(plugin))
    return f"{stem}_albums{ext or '.npz'}"


def build_index(plugin, lib, albums=False):
    """Build and save the track index and, from the same read, the album index; return the one asked for."""
    from .. import library
    from ..index import DEFAULT_N_TREES, SimilarityIndex, album_vectors

    card = plugin.card()
    fp = library.fingerprint(lib, card.model_id)
    ids, vectors, probs, skipped = library.read_embeddings(lib, card.model_id, card.genres,
                                                           log=lambda m: plugin._log.warning("{}", m))
    if skipped:
        plugin._log.info("{} item(s) have no usable embedding from model {}; run beet crnnembed", skipped,
                         card.model_id)
    n_trees = plugin.config["n_trees"].get(int) or DEFAULT_N_TREES
    with user_errors():
        index = SimilarityIndex.build(ids, vectors, probs, card.genres, fp, n_trees=n_trees)
        album_ids, album_vecs, album_probs, _ = album_vectors(ids, vectors, probs, *library.album_membership(lib))
        del vectors
        album_index = SimilarityIndex.build(album_ids, album_vecs, album_probs, card.genres,
                                            f"{fp}|{library.album_fingerprint(lib)}", n_trees=n_trees)
        album_index.save(album_index_path(plugin))
        index.save(index_path(plugin))
    return album_index if albums else index


def load_index(plugin, lib, albums=False):
    """The track (or album) index, rebuilt first (with one line saying why) when missing, stale or unreadable."""
    from .. import library
    from ..errors import SimilarityIndexError
    from ..index import SimilarityIndex

    path = album_index_path(plugin) if albums else index_path(plugin)
    try:
        index = SimilarityIndex.load(path)
    except SimilarityIndexError as exc:
        reason = "missing" if not os.path.exists(path) else f"unreadable ({exc})"
    else:
        current = library.fingerprint(lib, plugin.card().model_id)
        if albums:
            current += f"|{library.album_fingerprint(lib)}"
        if index.fingerprint == current:
            return index
        reason = "out of date"
    plugin._log.info("similarity index {}: rebuilding", reason)
    return build_index(plugin, lib, albums=albums)
