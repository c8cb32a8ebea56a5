"""``beet crnnembed`` and the import stage: analyse tracks and store the results as item attributes.

Each track is stored as soon as it is analysed (all of its attributes or none), a track whose
stored analysis is current is skipped, and a file that fails is one line that leaves no
analysis of an earlier version of it behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import threading
import time

from beets import ui
from beets.dbcore.db import DBAccessError
from beets.ui import UserError

from .. import store
from ..errors import CrnnError, display_path
from .common import one_line, progress

HELP = "compute CRNN embeddings and predicted genres"


def add_options(parser) -> None:
    parser.add_option("-f", "--force", action="store_true", default=False, help="recompute even if current")
    parser.add_option("-q", "--quiet", action="store_true", default=False, help="no progress bar")
    parser.add_option("-w", "--workers", type="int", default=None, help="decoding threads (default: cores)")
    parser.add_option("--windows", type="int", default=None, help="analysis windows per track")


def run(plugin, lib, opts, args) -> None:
    for name in ("workers", "windows"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    items = list(lib.items(args))
    if args and not items:
        raise UserError(f"no tracks match the query {' '.join(args)!r}")
    stats: dict = {}
    try:
        failed = embed_items(plugin, lib, items, force=opts.force, quiet=opts.quiet, workers=opts.workers,
                             windows=opts.windows, write=ui.should_write(), stats=stats)
    except KeyboardInterrupt:
        raise UserError(f"interrupted: embedded {stats.get('done', 0)} of {stats.get('todo', 0)} "
                        "(each one is saved); run beet crnnembed again to do the rest") from None
    if failed:
        raise UserError(f"{failed} file(s) could not be analysed")


def imported(plugin, session, task) -> None:
    """The import stage (crnn.auto): analyse what was just imported."""
    embed_items(plugin, session.lib, task.imported_items(), quiet=True, write=ui.should_write())


def embedder(plugin, workers=None):
    """The CRNN for crnnembed and the import stage; ``workers`` decoding threads share the cores with it."""
    import warnings

    from ..model import PRECISIONS, RUNTIMES, embedder_for
    from ..pipeline import default_workers

    card = plugin.card()
    try:
        # Keras reports weights it could not place as warnings and carries on with random ones:
        # for us that is a wrong model, so such a warning is an error.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # ONNX runs in the decoding threads: each call gets the cores the workers leave it
            threads = max(1, default_workers() // (workers or default_workers()))
            model = embedder_for(card, batch_size=plugin.config["batch_size"].get(int),
                                 precision=plugin.config["precision"].as_choice(list(PRECISIONS)),
                                 runtime=plugin.config["runtime"].as_choice(list(RUNTIMES)), threads=threads)
    except CrnnError as exc:
        raise UserError(one_line(str(exc))) from None
    for w in caught:
        text = str(w.message)
        if "saving" in str(w.filename) and re.search(r"skipp|freshly|could not|mismatch", text, re.I):
            raise UserError(f"weights {card.weights} do not fit the architecture in the card: {one_line(text)}")
        plugin._log.debug("{}: {}", w.category.__name__, text)
    return model


def embed_items(plugin, lib, items, force=False, quiet=False, workers=None, windows=None, write=False,
                stats=None) -> int:
    """Analyse ``items`` and store each one as soon as it is done; returns how many failed.

    One line per file that fails ("path: reason"); such a file keeps no analysis that no longer
    describes it. ``stats`` (a dict, optional) gets the counts as they change.
    """
    from ..pipeline import analyse

    log = plugin._log
    stats = {} if stats is None else stats
    windows = windows or plugin.config["windows"].get(int)
    workers = workers or plugin.config["workers"].get(int) or None
    if windows < 1:
        raise UserError("windows must be at least 1")
    card = plugin.card()
    tag_options = _tag_options(plugin)  # a bad setting stops the command before any work
    genre_mode = _write_genre_mode(plugin)
    todo, current, mtimes = [], 0, {}
    for item in items:
        try:
            mtime = os.stat(item.path).st_mtime
        except OSError:
            mtime = None
        mtimes[item.id] = mtime
        if not force and store.is_current(item, card.model_id, mtime):
            try:
                store.decode_vector(item.get(store.EMBEDDING))
            except CrnnError as exc:
                log.warning("{}: stored {} is unusable ({}); analysing it again",
                            display_path(item.path), store.EMBEDDING, exc)
            else:
                current += 1
                continue
        todo.append(item)
    stats.update(todo=len(todo), done=0, current=current, failed=0)
    if not todo:
        log.info("embedded 0, up to date {}, failed 0", current)
        return 0
    model = embedder(plugin, workers)
    by_id = {item.id: item for item in todo}
    done = failed = 0
    bar = progress(len(todo), quiet)
    timeout = plugin.config["timeout"].as_number() or None
    try:
        for result in analyse(((item.id, item.path) for item in todo), model, n_windows=windows,
                              workers=workers, timeout=timeout, batch_windows=plugin.config["batch_size"].get(int)):
            item = by_id.pop(result.key)
            if result.error:
                failed += 1
                stats["failed"] = failed
                log.error("{}{}", result.error, _drop_stale(item, mtimes.get(item.id)))
            else:
                if result.warning:
                    log.warning("{}", result.warning)
                _store(item, result, card, write, tag_options, genre_mode)
                done += 1
                stats["done"] = done
            bar.update(1)
    finally:
        bar.close()
    log.info("embedded {}, up to date {}, failed {}", done, current, failed)
    return failed


def _drop_stale(item, mtime) -> str:
    """After a failure: remove an analysis made of an earlier version of the file (it changed since).

    A file that is missing or unreadable keeps its analysis: the audio it describes may come back.
    Returns text to append to the failure line.
    """
    keys = _keys(item, lambda k: k.startswith("crnn_"))
    stored = item.get(store.MTIME)
    if not keys or mtime is None or (stored is not None and abs(float(stored) - mtime) < 1e-3):
        return ""
    for key in keys:
        del item[key]
    _save(item)
    return "; removed its analysis of an earlier version"


def _store(item, result, card, write, tag_options, genre_mode):
    tags = result.tags if card.tags else None
    previous = item.get(store.GENRE)
    values = store.fields_for(result.embedding, result.probs, card.genres, card.model_id, result.mtime, time.time(),
                              tags=tags, tag_names=card.tags, **tag_options)
    item.update(values)
    for key in _keys(item, lambda k: (k.startswith(store.PROB_PREFIX) or k == store.TAGS) and k not in values):
        del item[key]  # a genre the current model does not have, or tags from a model that had them
    has_genres = "genres" in type(item)._fields  # beets 2.14 and later: `genre` became the list `genres`
    if has_genres and "genre" in item._values_flex and store.is_stale_genre(item["genre"], previous, card.genres):
        del item["genre"]  # the flexible copy an earlier write_genre made on 2.14: beets never reads it
    if genre_mode:
        if has_genres:
            genres, added = store.written_genres(values[store.GENRE], item.get("genres"),
                                                 item.get(store.GENRE_ADDED) or "", replace=genre_mode == "replace")
            item.genres = genres
            if added:
                item[store.GENRE_ADDED] = added
            elif store.GENRE_ADDED in item:
                del item[store.GENRE_ADDED]
        else:
            item.genre = values[store.GENRE]
        if write and item.try_write():
            # Writing tags changes the file's mtime: record the new one so the vector stays current.
            item[store.MTIME] = os.stat(item.path).st_mtime
    _save(item)


def _write_genre_mode(plugin):
    """crnn.write_genre: False, True (the prediction first, the user's genres kept) or "replace"."""
    mode = plugin.config["write_genre"].get()
    if isinstance(mode, str) and mode.strip().lower() == "replace":
        return "replace"
    if mode in (None, False, True):  # YAML reads yes/no/on/off as booleans
        return bool(mode)
    raise UserError(f"crnn.write_genre must be yes, no or replace, not {mode!r}")


def _tag_options(plugin) -> dict:
    threshold = plugin.config["tag_threshold"].as_number()
    max_tags = plugin.config["max_tags"].get(int)
    if not 0 <= threshold <= 1:
        raise UserError(f"crnn.tag_threshold must be between 0 and 1, not {threshold}")
    if max_tags < 0:
        raise UserError(f"crnn.max_tags must be at least 0 (0 = no cap), not {max_tags}")
    return {"tag_threshold": float(threshold), "max_tags": max_tags}


def _keys(item, wanted) -> list:
    """The item's attribute names that ``wanted`` accepts, each once (beets 2.0 lists a flexible attribute
    twice once its value has been read)."""
    return [k for k in dict.fromkeys(item.keys()) if wanted(k)]


def _save(item):
    """Store an item's crnn attributes whole, or report a busy/read-only database in one line."""
    try:
        with _sigint_held():  # all the attributes or none: beets commits even when interrupted mid-way
            item.store()
    except (sqlite3.OperationalError, DBAccessError) as exc:
        raise UserError(f"cannot save the analysis of {display_path(item.path)} ({exc}); the library database is "
                        "busy or read-only. Tracks saved so far are kept: run beet crnnembed again later, "
                        "or raise beets' timeout option") from None


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C until the block is done (main thread only), then raise it.

    beets' Transaction commits whatever ran when an exception passes through it, so a
    KeyboardInterrupt between two attribute writes would save half an item.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt here
