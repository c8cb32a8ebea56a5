"""``beet crnnradio``: the library end of the MPD radio (``radio.py`` has MPD and the loop).

``LibrarySource`` answers the radio's questions from the beets library: which items MPD's files
are, and the next tracks to queue (the similarity index, the --filter queries, mpdstats' marks).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace

from beets import config as beets_config
from beets import ui
from beets.ui import UserError

from .. import library
from ..radio import (MARK_FIELDS, MPD_DEFAULTS, Marks, Mpd, Options, PathMap, Radio, RadioError, Track, address,
                     weighted_centroid)
from . import similar
from .index import load_index
from .similar import ranking_options

HELP = "keep MPD's queue going with tracks that sound like what has been playing"


def add_options(parser) -> None:
    """`beet crnnradio`'s options; each one left out comes from crnn.radio (or beets' mpd section)."""
    parser.usage = "%prog [QUERY] [options]"
    parser.add_option("--ahead", type="int", default=None, metavar="N",
                      help="keep N tracks queued past the playing one (default 5)")
    parser.add_option("--host", default=None, help="MPD's host or socket (default: mpd.host, else localhost)")
    parser.add_option("--port", type="int", default=None, help="MPD's port (default: mpd.port, else 6600)")
    parser.add_option("--password", default=None, help="MPD's password (default: mpd.password)")
    parser.add_option("--music-directory", default=None, metavar="DIR",
                      help="the folder MPD's music_directory names (default: mpd.music_directory, else beets' "
                           "directory)")
    ranking_options(parser)
    parser.add_option("--max-per-artist", type="int", default=None, metavar="K",
                      help="at most K tracks by one artist among the last --artist-window queue entries "
                           "(default 2; 0 = no cap)")
    parser.add_option("--artist-window", type="int", default=None, metavar="W",
                      help="queue entries the artist cap looks back over (default 10)")
    parser.add_option("--recent", type="float", default=None, metavar="HOURS",
                      help="keep out tracks mpdstats saw played in the last HOURS (default 4; 0 = off)")
    parser.add_option("--max-skips", type="int", default=None, metavar="N",
                      help="keep out tracks mpdstats counted more than N skips for")
    parser.add_option("--min-rating", type="float", default=None, metavar="R",
                      help="keep out tracks mpdstats rated below R (0..1; unrated ones stay)")
    parser.add_option("--prefer-rated", type="float", default=None, metavar="W",
                      help="add W x (rating - 0.5) to a rated track's score (default 0)")
    parser.add_option("--stop-after", type="int", default=None, metavar="N",
                      help="stop once N tracks were added (for scripts and cron; default: run until Ctrl-C)")
    parser.set_defaults(number=1, order=None)  # what `similar`'s settings read; the radio neither lists nor orders


def run(plugin, lib, opts, args) -> None:
    """Run the radio for `beet crnnradio`; every failure is one UserError line."""
    conf = plugin.config["radio"]

    def setting(name, kind, minimum=None, option=None):
        """The option ``option`` (default: the key's name) when given, else crnn.radio.NAME, checked."""
        value = getattr(opts, option or name, None) if option is not False else None
        label = f"--{(option or name).replace('_', '-')}" if option is not False else f"crnn.radio.{name}"
        if value is None:
            value = conf[name].get()
            if value is not None:
                try:
                    value = kind(value)
                except (TypeError, ValueError):
                    raise UserError(f"crnn.radio.{name} must be a number, not {value!r}") from None
        if value is not None and minimum is not None and value < minimum:
            raise UserError(f"{label} must be at least {minimum}")
        return value

    options = Options(ahead=setting("ahead", int, 1), history=setting("history", int, 1, option=False),
                      decay=setting("decay", float, 0, option=False), artist_window=setting("artist_window", int, 0),
                      poll=setting("poll", float, 0.05, option=False))
    if opts.stop_after is not None:
        if opts.stop_after < 1:
            raise UserError("--stop-after must be at least 1")
        options.stop_after = opts.stop_after
    marks = Marks(recent_hours=setting("recent_hours", float, 0, option="recent"),
                  max_skips=setting("max_skips", int, 0), min_rating=setting("min_rating", float),
                  prefer_rated=setting("prefer_rated", float) or 0.0)
    cap = setting("max_per_artist", int, 0)
    settings = replace(similar.settings(plugin, opts), max_per_artist=None)  # the radio's cap looks at the queue

    mpd_conf = beets_config["mpd"]
    mpd_conf.add(MPD_DEFAULTS)
    mpd_conf.add({"music_directory": beets_config["directory"].as_filename()})
    mpd_conf["password"].redact = True
    try:
        where = address(opts.host if opts.host is not None else mpd_conf["host"].as_str(),
                        opts.port if opts.port is not None else mpd_conf["port"].get(),
                        opts.password if opts.password is not None else mpd_conf["password"].as_str())
    except RadioError as exc:
        raise UserError(str(exc)) from None
    paths = PathMap(opts.music_directory or mpd_conf["music_directory"].as_filename())

    def say(line):
        ui.print_(line)
        sys.stdout.flush()

    card = plugin.card()
    source = LibrarySource(lib, lambda: load_index(plugin, lib), lambda: similar.catalogue(lib, settings), settings,
                           cap, marks, fingerprint=lambda: library.fingerprint(lib, card.model_id))
    seeds = [item.id for item in similar.track_seed(plugin, lib, args)[0]] if args else []
    mpd = Mpd(where, say)
    try:
        mpd.open()
        first = source.representative(seeds) if seeds else None
        radio = Radio(mpd, source, paths, options, say, warn=lambda line: plugin._log.warning("{}", line),
                      seeds=seeds, first=first)
        session = radio.run()
    except RadioError as exc:
        mpd.close()
        raise UserError(str(exc)) from None
    skipped = f"; skipped {session.skipped} that MPD could not play" if session.skipped else ""
    say(f"crnnradio added {len(session.added)} track{'s' if len(session.added) != 1 else ''} to MPD's queue"
        f"{skipped}")


class LibrarySource:
    """The library as the radio sees it: files -> ids, and the next tracks to queue.

    ``load_index()`` gives the current similarity index (rebuilt when stale), ``catalogue()`` a
    fresh search.Catalogue with the --filter queries; both are the plugin's own. Each pick reads
    the catalogue and marks afresh: mpdstats updates them as songs play.
    """

    def __init__(self, lib, load_index, catalogue, settings, max_per_artist: int | None, marks: Marks,
                 fingerprint=None, clock=time.time):
        self.lib = lib
        self._load_index = load_index
        self._catalogue = catalogue
        self._fingerprint = fingerprint
        self.settings = settings
        self.max_per_artist = max_per_artist or None
        self.marks = marks
        self._clock = clock
        self._index = None
        self._fields: dict[int, tuple] = {}

    def index(self):
        if self._index is None or (self._fingerprint is not None and self._fingerprint() != self._index.fingerprint):
            self._index = self._load_index()
        return self._index

    def item_ids(self, paths) -> dict:
        from beets.dbcore.query import OrQuery

        try:
            from beets.dbcore.query import PathQuery
        except ImportError:  # older beets (2.0) keep it in beets.library
            from beets.library import PathQuery

        out = {}
        paths = list(dict.fromkeys(paths))
        for start in range(0, len(paths), 50):
            chunk = paths[start:start + 50]
            wanted = {os.path.normpath(p): p for p in chunk}
            for item in self.lib.items(OrQuery([PathQuery("path", p) for p in chunk])):
                p = wanted.get(os.path.normpath(item.path))
                if p is not None:
                    out[p] = item.id
        return out

    def sample_paths(self, k: int) -> list:
        import itertools

        return [item.path for item in itertools.islice(self.lib.items(), k)]

    def _known(self, ids) -> dict:
        new = [i for i in dict.fromkeys(ids) if i not in self._fields]
        if new:
            self._fields.update(library.candidate_fields(self.lib, new))
        return {i: self._fields[i] for i in ids if i in self._fields}

    def artists(self, ids) -> list[str]:
        known = self._known(ids)
        return [known[i][0] for i in ids if i in known]

    def read_marks(self, ids) -> dict:
        """{id: {field: number}} of mpdstats' marks on these items (one query per 500 ids)."""
        out: dict[int, dict] = {}
        ids = list(ids)
        with self.lib.transaction() as tx:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = tx.query(f"SELECT entity_id, key, value FROM item_attributes WHERE key IN "
                                f"({','.join('?' * len(MARK_FIELDS))}) AND entity_id IN ({marks})",
                                [*MARK_FIELDS, *chunk])
                for item_id, key, value in rows:
                    try:
                        number = float(value)
                    except (TypeError, ValueError):
                        continue
                    if math.isfinite(number):
                        out.setdefault(item_id, {})[key] = number
        return out

    def pick(self, steer, used: set, recent_artists: list, n: int):
        import numpy as np

        from .. import rank, search

        index = self.index()
        vectors, probs, weights = [], [], []
        for ids, weight in steer:
            rows = [r for r in index.rows_of(list(ids)).tolist() if r >= 0]
            if not rows:
                continue
            try:
                vectors.append(rank.centroid([index.vector(int(index.ids[r])) for r in rows]))
            except ValueError:
                continue
            probs.append(index.probs[rows].mean(axis=0))
            weights.append(weight)
        if not vectors:
            return None
        try:
            vec = weighted_centroid(vectors, weights)
        except ValueError:
            vec = vectors[-1]  # opposite sounds cancel: follow the newest
        mean_probs = np.average(np.asarray(probs), axis=0, weights=weights)
        known = self._known(sorted(used))
        picker = rank.Picker(used, [(a, t) for a, t, _, _ in known.values()], [m for _, _, _, m in known.values()],
                             max_per_artist=self.max_per_artist, genre=self.settings.genre)
        if self.max_per_artist:
            for artist in recent_artists:
                key = rank.dedup_key(artist, "")[0]
                if key:
                    picker.per_artist[key] = picker.per_artist.get(key, 0) + 1
        catalogue = self._marked(self._catalogue())
        pool_size = max(4 * n, 20) if self.marks.prefer_rated else n
        chosen, _ = search.nearest(index, vec, mean_probs, pool_size, picker, catalogue, self.settings,
                                   exclude=sorted(used))
        if self.marks.prefer_rated and chosen:
            marks = self.read_marks([c.item_id for c in chosen])
            for c in chosen:
                c.score += self.marks.bonus(marks.get(c.item_id, {}))
            chosen = picker.choose(chosen, n)
        tracks = []
        for c in chosen[:n]:
            item = self.lib.get_item(c.item_id)
            if item is not None:
                tracks.append(Track(item.id, item.path, item.artist or "", item.title or ""))
        return tracks

    def _marked(self, base):
        """The catalogue, less the tracks mpdstats' marks keep out."""
        from .. import search

        if not self.marks.active():
            return base
        now = self._clock()

        def lookup(ids):
            found = base.fields(ids)
            marks = self.read_marks(list(found))
            return {i: f for i, f in found.items() if self.marks.keeps(marks.get(i, {}), now)}

        return search.Catalogue(lookup)

    def representative(self, ids) -> Track | None:
        """Of these tracks, the analysed one nearest their centroid (a QUERY's first track in an empty queue)."""
        import numpy as np

        from .. import rank

        index = self.index()
        rows = [r for r in index.rows_of(list(ids)).tolist() if r >= 0]
        if not rows:
            return None
        vectors = np.array([index.vector(int(index.ids[r])) for r in rows])
        try:
            centre = rank.centroid(vectors)
        except ValueError:
            centre = vectors[0]
        best = int(index.ids[rows[int(np.argmax(vectors @ centre))]])
        item = self.lib.get_item(best)
        return None if item is None else Track(item.id, item.path, item.artist or "", item.title or "")
