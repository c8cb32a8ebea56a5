"""beets-crnn: a CRNN listens to your library; find tracks that sound alike.

This module is the beets glue: config, typed attributes, commands, import stage and
messages. The numeric work lives in the sibling modules, which never import beets.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sqlite3
import sys
import threading
import time

from beets import config as beets_config
from beets import ui
from beets.dbcore import types
from beets.dbcore.db import DBAccessError
from beets.plugins import BeetsPlugin
from beets.ui import Subcommand, UserError

from . import store
from .errors import CrnnError, StoreError, display_path

INDEX_NAME = "crnn_index.npz"


class CrnnPlugin(BeetsPlugin):
    def __init__(self, name="crnn"):
        super().__init__(name)
        self.config.add(
            {
                "auto": False,  # embed tracks as they are imported
                "model": "",  # folder with crnn.json + weights; empty = the shipped model
                "windows": 2,  # analysis windows (~32 s each) per track, one centred in each of as many parts
                "workers": 0,  # decoding threads; 0 = number of cores
                "batch_size": 4,  # windows per CRNN call (on CPU, 16 costs the same per window but ~0.55 GB more RAM)
                "precision": "auto",  # CRNN arithmetic: auto = bfloat16 where the CPU has it natively, else float32
                "timeout": 120.0,  # seconds one file may take to decode
                "tag_threshold": store.DEFAULT_TAG_THRESHOLD,  # crnn_tags keeps tags this probable (0.3: MSD tags are rare, so well above chance)
                "max_tags": store.DEFAULT_MAX_TAGS,  # at most this many in crnn_tags (0 = no cap)
                "write_genre": False,  # also set the `genre` field (and tags when import.write) to crnn_genre
                "index_path": "",  # empty = crnn_index.npz in the beets config directory
                "n_trees": 0,  # Annoy trees; 0 = the index module's default
                "search_k": -1,  # Annoy search_k; -1 = the index's default (grows with sqrt of the library size)
                "mode": "genre",  # genre (cosine + genre agreement) or cosine
                "genre_weight": 0.5,
                "max_per_artist": 0,  # 0 = no cap
                "playlist_dir": ".",
                "relative_to": None,  # None (absolute paths), playlist, library, or a directory
            }
        )
        self._card = None
        self.item_types = self._types()
        if self.config["auto"].get(bool):
            self.import_stages = [self.imported]

    # ---- model card (plain JSON: cheap enough for start-up) ----

    def card(self):
        if self._card is None:
            from .model import ModelCard

            try:
                self._card = ModelCard.load(self.config["model"].as_str() or None)
            except CrnnError as exc:
                raise UserError(str(exc)) from None
        return self._card

    def _types(self) -> dict:
        item_types = {
            store.EMBEDDING: types.STRING,
            store.GENRE: types.STRING,
            store.GENRE_PROB: types.FLOAT,
            store.MODEL: types.STRING,
            store.MTIME: types.FLOAT,
            store.STAMP: types.FLOAT,
            store.TAGS: types.STRING,
        }
        try:
            genres = self.card().genres
        except UserError:
            genres = []  # no model yet: the per-genre fields are typed once one is configured
        for genre in genres:
            item_types[store.prob_field(genre)] = types.FLOAT
        return item_types

    # ---- commands ----

    def commands(self):
        embed = Subcommand("crnnembed", help="compute CRNN embeddings and predicted genres")
        embed.parser.add_option("-f", "--force", action="store_true", default=False, help="recompute even if current")
        embed.parser.add_option("-q", "--quiet", action="store_true", default=False, help="no progress bar")
        embed.parser.add_option("-w", "--workers", type="int", default=None, help="decoding threads (default: cores)")
        embed.parser.add_option("--windows", type="int", default=None, help="analysis windows per track")
        embed.func = self.cmd_embed

        index = Subcommand("crnnindex", help="rebuild the similarity index from stored embeddings")
        index.func = self.cmd_index

        similar = Subcommand("similar", help="list tracks that sound like the query's tracks")
        similar.parser.add_option("-n", "--number", type="int", default=10, help="how many tracks (default 10)")
        similar.parser.add_option("--mode", choices=["genre", "cosine"], default=None,
                                  help="genre: cosine + genre agreement (default); cosine: plain cosine")
        similar.parser.add_option("--no-genre", dest="mode", action="store_const", const="cosine",
                                  help="same as --mode cosine")
        similar.parser.add_option("--genre-weight", type="float", default=None, help="weight of genre agreement")
        similar.parser.add_option("--max-per-artist", type="int", default=None, help="at most K tracks per artist")
        similar.parser.add_option("--genre", default=None, help="only tracks whose predicted genre is G")
        similar.parser.add_option("--m3u", default=None, help="write the result to this playlist")
        similar.parser.add_option("--m3u8", action="store_true", default=False, help="write the playlist as UTF-8 M3U8")
        similar.parser.add_option("--include-seed", action="store_true", default=False,
                                  help="put the query's tracks first in the playlist")
        similar.parser.add_format_option()
        similar.func = self.cmd_similar

        train = Subcommand("crnntrain", help="train the CRNN on labelled audio (manifest CSV or genre folders)")
        from .train import build_parser as train_parser

        _adopt_argparse(train.parser, train_parser())
        train.func = self.cmd_train

        evaluate = Subcommand("crnneval", help="evaluate a CRNN on a manifest's test split")
        from .evaluate import build_parser as eval_parser

        _adopt_argparse(evaluate.parser, eval_parser())
        evaluate.func = self.cmd_eval
        return [embed, index, similar, train, evaluate]

    # ---- crnnembed ----

    def embedder(self):
        import warnings

        from .model import PRECISIONS, Embedder

        try:
            # Keras reports weights it could not place as warnings and carries on with random ones:
            # for us that is a wrong model, so such a warning is an error.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                embedder = Embedder(self.card(), batch_size=self.config["batch_size"].get(int),
                                    precision=self.config["precision"].as_choice(list(PRECISIONS)))
        except CrnnError as exc:
            raise UserError(_one_line(str(exc))) from None
        for w in caught:
            text = str(w.message)
            if "saving" in str(w.filename) and re.search(r"skipp|freshly|could not|mismatch", text, re.I):
                raise UserError(f"weights {self.card().weights} do not fit the architecture in the card: "
                                f"{_one_line(text)}")
            self._log.debug("{}: {}", w.category.__name__, text)
        return embedder

    def cmd_embed(self, lib, opts, args):
        for name in ("workers", "windows"):
            value = getattr(opts, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1")
        items = list(lib.items(args))
        if args and not items:
            raise UserError(f"no tracks match the query {' '.join(args)!r}")
        stats: dict = {}
        try:
            failed = self.embed_items(
                lib,
                items,
                force=opts.force,
                quiet=opts.quiet,
                workers=opts.workers,
                windows=opts.windows,
                write=ui.should_write(),
                stats=stats,
            )
        except KeyboardInterrupt:
            raise UserError(f"interrupted: embedded {stats.get('done', 0)} of {stats.get('todo', 0)} "
                            "(each one is saved); run beet crnnembed again to do the rest") from None
        if failed:
            raise UserError(f"{failed} file(s) could not be analysed")

    def imported(self, session, task):
        self.embed_items(session.lib, task.imported_items(), quiet=True, write=ui.should_write())

    def embed_items(self, lib, items, force=False, quiet=False, workers=None, windows=None, write=False,
                    stats=None) -> int:
        """Analyse ``items`` and store each one as soon as it is done; returns how many failed.

        One line per file that fails ("path: reason"); such a file keeps no analysis that no longer
        describes it. ``stats`` (a dict, optional) gets the counts as they change.
        """
        from .pipeline import analyse

        stats = {} if stats is None else stats
        windows = windows or self.config["windows"].get(int)
        workers = workers or self.config["workers"].get(int) or None
        if windows < 1:
            raise UserError("windows must be at least 1")
        card = self.card()
        tag_options = self._tag_options()  # a bad setting stops the command before any work
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
                    self._log.warning("{}: stored {} is unusable ({}); analysing it again",
                                      display_path(item.path), store.EMBEDDING, exc)
                else:
                    current += 1
                    continue
            todo.append(item)
        stats.update(todo=len(todo), done=0, current=current, failed=0)
        if not todo:
            self._log.info("embedded 0, up to date {}, failed 0", current)
            return 0
        embedder = self.embedder()
        by_id = {item.id: item for item in todo}
        done = failed = 0
        bar = _progress(len(todo), quiet)
        timeout = self.config["timeout"].as_number() or None
        try:
            for result in analyse(((item.id, item.path) for item in todo), embedder, n_windows=windows,
                                  workers=workers, timeout=timeout, batch_windows=self.config["batch_size"].get(int)):
                item = by_id.pop(result.key)
                if result.error:
                    failed += 1
                    stats["failed"] = failed
                    self._log.error("{}{}", result.error, self._drop_stale(item, mtimes.get(item.id)))
                else:
                    if result.warning:
                        self._log.warning("{}", result.warning)
                    self._store(item, result, card, write, tag_options)
                    done += 1
                    stats["done"] = done
                bar.update(1)
        finally:
            bar.close()
        self._log.info("embedded {}, up to date {}, failed {}", done, current, failed)
        return failed

    def _drop_stale(self, item, mtime) -> str:
        """After a failure: remove an analysis made of an earlier version of the file (it changed since).

        A file that is missing or unreadable keeps its analysis: the audio it describes may come back.
        Returns text to append to the failure line.
        """
        keys = [k for k in item.keys() if k.startswith("crnn_")]
        stored = item.get(store.MTIME)
        if not keys or mtime is None or (stored is not None and abs(float(stored) - mtime) < 1e-3):
            return ""
        for key in keys:
            del item[key]
        self._save(item)
        return "; removed its analysis of an earlier version"

    def _store(self, item, result, card, write, tag_options=None):
        tags = result.tags if card.tags else None
        values = store.fields_for(result.embedding, result.probs, card.genres, card.model_id, result.mtime, time.time(),
                                  tags=tags, tag_names=card.tags, **(tag_options or self._tag_options()))
        item.update(values)
        for key in list(item.keys()):
            if (key.startswith(store.PROB_PREFIX) or key == store.TAGS) and key not in values:
                del item[key]  # a genre the current model does not have, or tags from a model that had them
        if self.config["write_genre"].get(bool):
            item.genre = values[store.GENRE]
            if write and item.try_write():
                # Writing tags changes the file's mtime: record the new one so the vector stays current.
                item[store.MTIME] = os.stat(item.path).st_mtime
        self._save(item)

    def _tag_options(self) -> dict:
        threshold = self.config["tag_threshold"].as_number()
        max_tags = self.config["max_tags"].get(int)
        if not 0 <= threshold <= 1:
            raise UserError(f"crnn.tag_threshold must be between 0 and 1, not {threshold}")
        if max_tags < 0:
            raise UserError(f"crnn.max_tags must be at least 0 (0 = no cap), not {max_tags}")
        return {"tag_threshold": float(threshold), "max_tags": max_tags}

    @staticmethod
    def _save(item):
        """Store an item's crnn attributes whole, or report a busy/read-only database in one line."""
        try:
            with _sigint_held():  # all the attributes or none: beets commits even when interrupted mid-way
                item.store()
        except (sqlite3.OperationalError, DBAccessError) as exc:
            raise UserError(f"cannot save the analysis of {display_path(item.path)} ({exc}); the library database is "
                            "busy or read-only. Tracks saved so far are kept: run beet crnnembed again later, "
                            "or raise beets' timeout option") from None

    # ---- index ----

    def index_path(self) -> str:
        configured = self.config["index_path"].as_str()
        if configured:
            return os.path.expanduser(configured)
        return os.path.join(beets_config.config_dir(), INDEX_NAME)

    def build_index(self, lib):
        from . import library
        from .index import DEFAULT_N_TREES, SimilarityIndex

        card = self.card()
        fp = library.fingerprint(lib, card.model_id)
        ids, vectors, probs, skipped = library.read_embeddings(lib, card.model_id, card.genres,
                                                               log=lambda m: self._log.warning("{}", m))
        if skipped:
            self._log.info("{} item(s) have no usable embedding from model {}; run beet crnnembed", skipped, card.model_id)
        n_trees = self.config["n_trees"].get(int) or DEFAULT_N_TREES
        try:
            index = SimilarityIndex.build(ids, vectors, probs, card.genres, fp, n_trees=n_trees)
            index.save(self.index_path())
        except CrnnError as exc:
            raise UserError(str(exc)) from None
        return index

    def load_index(self, lib):
        """The index, rebuilt first (with one line saying why) when missing, stale or unreadable."""
        from . import library
        from .errors import SimilarityIndexError
        from .index import SimilarityIndex

        path = self.index_path()
        try:
            index = SimilarityIndex.load(path)
        except SimilarityIndexError as exc:
            reason = "missing" if not os.path.exists(path) else f"unreadable ({exc})"
        else:
            if index.fingerprint == library.fingerprint(lib, self.card().model_id):
                return index
            reason = "out of date"
        self._log.info("similarity index {}: rebuilding", reason)
        return self.build_index(lib)

    def cmd_index(self, lib, opts, args):
        t = time.time()
        index = self.build_index(lib)
        self._log.info("indexed {} tracks in {:.1f} s: {}", len(index.ids), time.time() - t, self.index_path())

    # ---- similar ----

    def cmd_similar(self, lib, opts, args):
        import numpy as np

        from . import library, rank

        if opts.number < 1:
            raise UserError("-n must be at least 1")
        max_per_artist = opts.max_per_artist if opts.max_per_artist is not None else self.config["max_per_artist"].get(int)
        if max_per_artist is not None and max_per_artist < 0:
            raise UserError("--max-per-artist must be at least 0")
        mode = opts.mode or self.config["mode"].as_choice(list(rank.MODES))
        weight = opts.genre_weight if opts.genre_weight is not None else self.config["genre_weight"].as_number()
        card = self.card()
        query = " ".join(args)
        seeds = list(lib.items(args))
        if not seeds:
            raise UserError(f"no tracks match the query {query!r}")
        vectors, probs, seed_tags = [], [], set()
        for item in seeds:
            try:
                if item.get(store.MODEL) != card.model_id:
                    raise CrnnError("not embedded by the current model")
                vectors.append(store.decode_vector(item.get(store.EMBEDDING)))
                probs.append(store.probs_from(item, card.genres))
                seed_tags.update(store.split_tags(item.get(store.TAGS)))
            except StoreError as exc:  # garbage in the database: say so, use the other seeds
                self._log.warning("{}: stored {} is unusable ({}); not used as a seed. beet crnnembed analyses it "
                                  "again", display_path(item.path), store.EMBEDDING, exc)
            except CrnnError as exc:
                self._log.debug("seed {}: {}", item, exc)
        if not vectors:
            raise UserError(f"the {len(seeds)} track(s) matching {query!r} have no CRNN embedding: run beet crnnembed {query}".rstrip())
        if len(vectors) < len(seeds):
            self._log.warning("{} of {} seed tracks have no embedding and are ignored", len(seeds) - len(vectors), len(seeds))
        seed_vec = rank.centroid(np.array(vectors))
        seed_probs = np.mean(probs, axis=0)
        index = self.load_index(lib)
        seed_ids = {item.id for item in seeds}
        seed_keys = {rank.dedup_key(item.artist, item.title) for item in seeds}
        search_k = self.config["search_k"].get(int)
        want = max(10 * opts.number, 100)
        while True:
            ids, cos = index.query(seed_vec, want, search_k=search_k, exclude=seed_ids)
            scores = rank.scores(seed_vec, seed_probs, cand_cos=cos, cand_probs=index.probs[index.rows_of(ids)],
                                 mode=mode, genre_weight=weight)
            fields = library.candidate_fields(lib, ids)  # two queries, not one Item per candidate
            candidates = []
            for item_id, score, c in zip(ids.tolist(), scores, cos):
                if item_id not in fields:
                    continue  # removed since the index was built
                artist, title, genre = fields[item_id]
                candidates.append(rank.Candidate(item_id, float(score), float(c), artist, title, genre))
            chosen = rank.select(candidates, opts.number, seed_ids=seed_ids, seed_keys=seed_keys,
                                 max_per_artist=max_per_artist or None, genre=opts.genre)
            if len(chosen) >= opts.number or want >= len(index.ids):
                break
            want *= 4  # filters ate the candidates: look further
        items = [lib.get_item(c.item_id) for c in chosen]
        for cand, item in zip(chosen, items):
            if opts.format:
                ui.print_(format(item, opts.format))
            else:
                # Why it was chosen: its score, predicted genre, and the tags it shares with the seeds.
                shared = [t for t in store.split_tags(item.get(store.TAGS)) if t in seed_tags]
                why = f"; shared tags: {', '.join(shared)}" if shared else ""
                ui.print_(f"{format(item)}  [{cand.score:.3f} {cand.genre}{why}]")
        if opts.m3u:
            self._write_playlist(lib, opts, (seeds if opts.include_seed else []) + items)

    def _write_playlist(self, lib, opts, items):
        from . import playlist

        path = os.path.expanduser(opts.m3u)
        if not os.path.dirname(path):
            path = os.path.join(os.path.expanduser(self.config["playlist_dir"].as_str()), path)
        path = os.path.abspath(path)
        relative_to = self.config["relative_to"].get()
        if relative_to is None:
            base = None
        elif relative_to == "playlist":
            base = os.path.dirname(path)
        elif relative_to == "library":
            base = os.fsdecode(lib.directory)
        else:
            base = os.path.abspath(os.path.expanduser(str(relative_to)))
        entries = [playlist.Entry(item.path, item.length or None, item.artist, item.title) for item in items]
        try:
            playlist.write(path, entries, base_dir=base, utf8=playlist.is_m3u8(path, opts.m3u8))
        except CrnnError as exc:
            raise UserError(str(exc)) from None
        self._log.info("wrote {} tracks to {}", len(entries), path)

    # ---- training and evaluation ----

    def cmd_train(self, lib, opts, args):
        from .train import build_parser, run

        argv = _argv_from(opts, args)
        ns = build_parser().parse_args(argv)
        ns.command = "beet crnntrain " + " ".join(argv)
        try:
            run(ns, log=lambda m: self._log.info("{}", m))
        except CrnnError as exc:
            raise UserError(str(exc)) from None

    def cmd_eval(self, lib, opts, args):
        from .evaluate import build_parser, run

        argv = _argv_from(opts, args)
        ns = build_parser().parse_args(argv)
        try:
            ui.print_(run(ns))
        except CrnnError as exc:
            raise UserError(str(exc)) from None


def _one_line(text: str) -> str:
    """A library's multi-line error (Keras prints whole tensors) as one line that keeps the gist."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text.strip()
    shapes = re.search(r"variable\.shape=\([^)]*\),? Received: value\.shape=\([^)]*\)", text)
    return lines[0].rstrip(":") + (f" ({shapes.group(0)})" if shapes else "")


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


def _progress(total, quiet):
    """tqdm on a terminal; a no-op in pipes, with -q, or when tqdm is absent."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="track", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _adopt_argparse(optparser, argparser):
    """Mirror an argparse parser's options on a beets (optparse) subcommand, so both CLIs share one definition."""
    for action in argparser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kwargs = {"dest": action.dest, "default": None, "help": action.help}
        if action.nargs == 0:
            kwargs["action"] = "store_true"
        elif isinstance(action, argparse._AppendAction):  # a repeatable option stays repeatable
            kwargs.update(action="append", type="string")
        else:
            kwargs["type"] = {int: "int", float: "float"}.get(action.type, "string")
        optparser.add_option(*action.option_strings, **kwargs)
    positionals = [a.dest.upper() for a in argparser._actions if not a.option_strings]
    optparser.usage = f"%prog [options] {' '.join(positionals)}"
    optparser._crnn_argparser = argparser


def _argv_from(opts, args):
    """Turn parsed optparse options back into argv for the argparse-based module entry point."""
    argv = list(args)
    for key, value in vars(opts).items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag] if value is True else [flag, str(value)]
    return argv
