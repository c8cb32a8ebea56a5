"""`beet crnnradio`: an endless radio in MPD, steered by what has been playing.

The radio keeps MPD's queue ``ahead`` tracks past the playing song. When it runs short it appends
the library's tracks nearest the last few played ones (the newest weigh most), ranked as `beet
similar` ranks, never one queued or played in this session, with an artist cap over the end of
the queue and the play marks beets' mpdstats keeps (recently played, skipped, rated).

Three parts, so each can be tested on its own:

- ``Mpd``: one connection to MPD that comes back after MPD restarts or the network drops
  (python-mpd2 underneath, imported only when the radio runs).
- ``Radio``: the loop. It reads MPD's status and queue, follows the playing song, and appends;
  it never removes, moves or replaces an entry, the user's or its own. It knows the library only
  through a ``source`` (``pick`` and ``item_ids``), so nothing here needs beets.
- ``LibrarySource``: the beets end: library lookups, the similarity index, filters and marks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import CrnnError, display_path

# crnn.radio in the beets config; options override each.
DEFAULTS = {
    "ahead": 5,  # tracks kept queued past the playing song
    "history": 5,  # played tracks (newest first) that steer the next picks
    "decay": 0.5,  # each older played track weighs this much of the one after it
    "max_per_artist": 2,  # at most this many tracks by one artist ...
    "artist_window": 10,  # ... among the last this many queue entries (0 = no cap)
    "recent_hours": 4.0,  # keep out tracks mpdstats saw played this recently (0 = off)
    "max_skips": None,  # keep out tracks mpdstats counted more skips than this (None = off)
    "min_rating": None,  # keep out tracks whose mpdstats rating is below this (unrated kept; None = off)
    "prefer_rated": 0.0,  # add this times (rating - 0.5) to a rated track's score
    "poll": 1.0,  # seconds between looks at MPD's status
}

# beets' `mpd` section, with the defaults beets' mpdstats gives it (either plugin may set them first).
MPD_DEFAULTS = {
    "host": os.environ.get("MPD_HOST", "localhost"),
    "port": int(os.environ.get("MPD_PORT", 6600)),
    "password": "",
}

MARK_FIELDS = ("last_played", "skip_count", "rating")  # what beets' mpdstats writes
INSTALL_HINT = "crnnradio needs python-mpd2: pip install 'beets-crnn[mpd]'"


class RadioError(CrnnError):
    """The radio cannot go on: MPD unreachable or refusing us, or its folder does not match beets'."""


class Reconnected(Exception):
    """The connection dropped and came back: what the loop knew of MPD's state is stale."""


# ---- MPD: address, paths, connection ----


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    password: str = ""

    def __str__(self) -> str:
        return self.host if self.host.startswith(("/", "@")) else f"{self.host}:{self.port}"


def address(host: str, port, password: str = "") -> Address:
    """An MPD address; ``PASSWORD@HOST`` in host (the MPD_HOST convention) gives the password too."""
    host = str(host or "localhost")
    if "@" in host and not host.startswith("@"):
        secret, host = host.rsplit("@", 1)
        password = password or secret
    if host.startswith("~"):
        host = os.path.expanduser(host)
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise RadioError(f"MPD port must be a number, not {port!r}") from None
    return Address(host, port, password or "")


class PathMap:
    """beets paths <-> MPD URIs, which are relative to MPD's music_directory."""

    def __init__(self, music_directory):
        self.root = os.path.abspath(os.path.expanduser(os.fsdecode(music_directory)))

    def uri(self, path) -> str | None:
        """The MPD URI of a beets path; None when it lies outside the music directory."""
        rel = os.path.relpath(os.path.abspath(os.fsdecode(path)), self.root)
        if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            return None
        return rel.replace(os.sep, "/")

    def path(self, uri: str) -> bytes | None:
        """The file an MPD URI names; None for a stream (``http://...``)."""
        if not uri or "://" in uri:
            return None
        return os.fsencode(os.path.join(self.root, *uri.split("/")))


class Mpd:
    """One connection to MPD that comes back.

    ``call`` runs a command; when the connection has dropped it reconnects, waiting longer
    between tries (``backoff`` doubling up to ``max_backoff`` s), says so once when it goes and
    once when it is back, then raises ``Reconnected``: the caller starts over from a fresh look
    at MPD, and no command is ever sent twice (an ``addid`` whose answer was lost may have run).
    ``open`` fails with one RadioError line: MPD unreachable, password refused, or not allowed
    to add and play.
    """

    NEEDED = ("status", "playlistinfo", "addid", "playid", "lsinfo")

    def __init__(self, where: Address, say: Callable[[str], None], timeout: float = 10.0,
                 backoff: float = 0.5, max_backoff: float = 15.0, client_factory=None, sleep=time.sleep):
        self.where = where
        self.say = say
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._factory = client_factory
        self._sleep = sleep
        self._client = None

    def _new_client(self):
        if self._factory is not None:
            return self._factory()
        try:
            import mpd
        except ImportError:
            raise RadioError(INSTALL_HINT) from None
        return mpd.MPDClient()

    def open(self) -> None:
        """Connect and log in; any failure is a RadioError that says what to fix."""
        errors = _mpd_errors()
        client = self._new_client()
        client.timeout = self.timeout
        try:
            client.connect(self.where.host, self.where.port)
        except (OSError, errors.ConnectionError) as exc:
            raise RadioError(f"cannot reach MPD at {self.where}: {_reason(exc)} "
                             "(mpd.host and mpd.port in the beets config, or --host and --port)") from None
        try:
            if self.where.password:
                try:
                    client.password(self.where.password)
                except errors.CommandError as exc:
                    raise RadioError(f"MPD at {self.where} refused the password ({_reason(exc)}): "
                                     "check mpd.password or --password") from None
            allowed = set(client.commands())
        except RadioError:
            _close(client)
            raise
        except (OSError, errors.ConnectionError) as exc:
            _close(client)
            raise RadioError(f"MPD at {self.where} closed the connection: {_reason(exc)}") from None
        missing = [c for c in self.NEEDED if c not in allowed]
        if missing:
            _close(client)
            how = "the password it was given" if self.where.password else "no password"
            raise RadioError(f"MPD at {self.where} does not let a client with {how} run {', '.join(missing)}: "
                             "set mpd.password (or --password) to one with add and control permissions")
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            _close(self._client)
            self._client = None

    def call(self, command: str, *args):
        """Run an MPD command; CommandError (MPD said no) passes through, a dropped connection
        reconnects and raises Reconnected."""
        errors = _mpd_errors()
        if self._client is not None:
            try:
                return getattr(self._client, command)(*args)
            except errors.CommandError:
                raise
            except (OSError, errors.ConnectionError, errors.ProtocolError) as exc:
                lost = exc
        else:
            lost = "not connected"
        self._reconnect(lost)
        raise Reconnected()

    def _reconnect(self, reason) -> None:
        self.close()
        self.say(f"lost the connection to MPD at {self.where} ({_reason(reason)}); reconnecting")
        started = time.monotonic()
        delay = self.backoff
        while True:
            try:
                self.open()
            except RadioError as exc:
                if "refused the password" in str(exc) or "does not let" in str(exc):
                    raise  # MPD is back but will not have us: waiting does not help
                self._sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            self.say(f"reconnected to MPD at {self.where} after {time.monotonic() - started:.0f} s")
            return


def _mpd_errors():
    try:
        import mpd
    except ImportError:
        raise RadioError(INSTALL_HINT) from None
    return mpd


def _close(client) -> None:
    for step in ("close", "disconnect"):
        try:
            getattr(client, step)()
        except Exception:  # noqa: BLE001 - a half-dead connection fails in any way; it is gone either way
            pass


def _reason(exc) -> str:
    text = str(exc).strip() if not isinstance(exc, str) else exc
    return text or type(exc).__name__


def _no_such_song(exc) -> bool:
    return "No such song" in str(exc) or "Not found" in str(exc) or "[50@" in str(exc)


# ---- steering and play marks (pure) ----


def steering_weights(n: int, decay: float) -> list[float]:
    """Weights of ``n`` history entries, oldest first: the newest weighs 1, each older ``decay`` times less."""
    return [decay ** (n - 1 - i) for i in range(n)]


def weighted_centroid(vectors, weights) -> "np.ndarray":
    """Unit-length weighted mean direction of unit-normalised vectors (ValueError when they cancel)."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1, 1)
    if v.ndim != 2 or len(v) == 0 or len(w) != len(v):
        raise ValueError("need one weight per vector, and at least one vector")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    mean = (v * w).sum(axis=0)
    norm = np.linalg.norm(mean)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError("the steering vectors cancel out")
    return mean / norm


@dataclass
class Marks:
    """What beets' mpdstats wrote about tracks, as the radio uses it.

    Kept out: played in the last ``recent_hours`` (``last_played``), skipped more than
    ``max_skips`` times, rated below ``min_rating``. Preferred: ``prefer_rated`` times
    (rating - 0.5) added to a rated track's score (mpdstats' ratings lie in [0, 1], 0.5 neutral).
    """

    recent_hours: float = 4.0
    max_skips: int | None = None
    min_rating: float | None = None
    prefer_rated: float = 0.0

    def active(self) -> bool:
        return bool(self.recent_hours) or self.max_skips is not None or self.min_rating is not None

    def keeps(self, marks: dict, now: float) -> bool:
        played = marks.get("last_played")
        if self.recent_hours and played is not None and now - played < self.recent_hours * 3600:
            return False
        skips = marks.get("skip_count")
        if self.max_skips is not None and skips is not None and skips > self.max_skips:
            return False
        rating = marks.get("rating")
        return not (self.min_rating is not None and rating is not None and rating < self.min_rating)

    def bonus(self, marks: dict) -> float:
        rating = marks.get("rating")
        return 0.0 if not self.prefer_rated or rating is None else self.prefer_rated * (rating - 0.5)


# ---- the loop ----


@dataclass
class Track:
    """A library track the source offers: its beets id, file, and what the listener is told."""

    item_id: int
    path: bytes
    artist: str = ""
    title: str = ""

    def __str__(self) -> str:
        return f"{self.artist} - {self.title}" if self.artist or self.title else display_path(self.path)


@dataclass
class Options:
    ahead: int = 5
    history: int = 5
    decay: float = 0.5
    artist_window: int = 10
    poll: float = 1.0
    stop_after: int | None = None  # stop once this many tracks were added (for scripts)


@dataclass
class _Entry:
    song_id: str
    uri: str
    item_id: int | None


@dataclass
class Session:
    """What the radio did and saw: its additions, the songs played, every item queued or played."""

    added: list = field(default_factory=list)  # [Track]
    history: list = field(default_factory=list)  # [[item ids]]: a QUERY's tracks, then each played song
    used: set = field(default_factory=set)
    skipped: int = 0


class Radio:
    """Keeps MPD's queue ``ahead`` tracks past the playing song, appending only.

    ``source.item_ids(paths)`` maps files to library ids ({path: id}, unknown ones left out);
    ``source.pick(steer, used, recent_artists, n)`` gives up to n Tracks for a steer of
    [(item ids, weight)], or None when none of the steering tracks is analysed.
    ``source.sample_paths(k)`` gives some library files, to tell a folder mismatch from a missing file.
    """

    def __init__(self, mpd: Mpd, source, paths: PathMap, options: Options, say: Callable[[str], None],
                 warn: Callable[[str], None] | None = None, seeds: Sequence[int] = (), first: Track | None = None,
                 sleep=time.sleep):
        self.mpd = mpd
        self.source = source
        self.paths = paths
        self.options = options
        self.say = say
        self.warn = warn or say
        self.session = Session()
        if seeds:
            self.session.history.append(list(seeds))
            self.session.used.update(seeds)
        self._sleep = sleep
        self._queue: list[_Entry] = []
        self._version = None
        self._song_id = None
        self._ids: dict[str, int | None] = {}  # uri -> library id (None: not in the library)
        self._mapping_checked = False
        self._dry = None  # (history, queue length) when nothing was left to add: no new search till either changes
        self._steered_by_query = bool(seeds)
        self._first_look = True
        self._start_playing = False
        self._first = first  # a QUERY's track to start an empty queue with

    # -- one look at MPD --

    def run(self) -> Session:
        """Until Ctrl-C (or ``stop_after`` additions): look, top up, wait. Returns the session."""
        try:
            while True:
                try:
                    self.step()
                except Reconnected:
                    self._version = self._song_id = None  # a restarted MPD numbers everything anew
                    continue
                if self.done():
                    break
                self._sleep(self.options.poll)
        except KeyboardInterrupt:
            pass
        finally:
            self.mpd.close()
        return self.session

    def done(self) -> bool:
        stop = self.options.stop_after
        return stop is not None and len(self.session.added) >= stop

    def step(self) -> None:
        status = self.mpd.call("status")
        if status.get("playlist") != self._version:
            self._read_queue()
            self._version = status.get("playlist")
        if self._first_look:
            self._first_look = False
            self._start_playing = not self._queue and status.get("state") == "stop"
            if self._queue:
                self._first = None  # a QUERY only steers a queue that has songs
            if self._steered_by_query:
                self._song_id = status.get("songid")  # the QUERY steers, not what happened to play when it was given
        song_id = status.get("songid")
        if song_id is not None and song_id != self._song_id:
            self._song_id = song_id
            self._played(song_id)
        position = int(status["song"]) if "song" in status else -1
        ahead = len(self._queue) - (position + 1)
        if ahead < self.options.ahead:
            self._top_up(self.options.ahead - ahead)

    def _read_queue(self) -> None:
        entries = self.mpd.call("playlistinfo")
        uris = [e.get("file", "") for e in entries]
        unknown = [u for u in dict.fromkeys(uris) if u not in self._ids]
        if unknown:
            paths = {u: self.paths.path(u) for u in unknown}
            found = self.source.item_ids([p for p in paths.values() if p is not None])
            for u, p in paths.items():
                self._ids[u] = found.get(p) if p is not None else None
        self._queue = [_Entry(str(e.get("id")), u, self._ids.get(u)) for e, u in zip(entries, uris)]
        self.session.used.update(e.item_id for e in self._queue if e.item_id is not None)

    def _played(self, song_id: str) -> None:
        entry = next((e for e in self._queue if e.song_id == song_id), None)
        if entry is None or entry.item_id is None:
            return  # a stream, or a file the library does not have: it cannot steer
        history = self.session.history
        if not history or history[-1] != [entry.item_id]:
            history.append([entry.item_id])
        self.session.used.add(entry.item_id)

    # -- appending --

    def _steer(self) -> list:
        history = self.session.history[-self.options.history:] if self.options.history > 0 else []
        if not history:
            # nothing played yet: the last queued track the library knows
            last = next((e.item_id for e in reversed(self._queue) if e.item_id is not None), None)
            if last is None:
                raise RadioError("nothing that is playing or queued in MPD is in the library: "
                                 "give a QUERY to start from (beet crnnradio QUERY)")
            history = [[last]]
        return list(zip(history, steering_weights(len(history), self.options.decay)))

    def _recent_artists(self) -> list[str]:
        """Artists of the last ``artist_window`` queue entries (the radio's own just appended ones included)."""
        window = self.options.artist_window
        if window <= 0:
            return []
        return self.source.artists([e.item_id for e in self._queue[-window:] if e.item_id is not None])

    def _top_up(self, need: int) -> None:
        if self._dry is not None and self._dry == (len(self.session.history), len(self._queue)):
            return  # nothing was left to add, and nothing has changed since
        self._dry = None
        if self._first is not None:
            first, self._first = self._first, None
            self.session.used.add(first.item_id)
            if self._append(first):
                need -= 1
        while need > 0 and not self.done():
            picks = self.source.pick(self._steer(), set(self.session.used), self._recent_artists(), need)
            if picks is None and not self.session.added:
                raise RadioError("none of the tracks steering the radio has a CRNN analysis: run beet crnnembed")
            if not picks:
                why = ("none of the last songs has a CRNN analysis (beet crnnembed)" if picks is None
                       else "nothing more under these limits (filters, artist cap, marks)")
                self.say(f"nothing to add: {why}; waiting for the next song")
                self._dry = (len(self.session.history), len(self._queue))
                return
            for track in picks:
                if need <= 0 or self.done():
                    break
                self.session.used.add(track.item_id)
                if self._append(track):
                    need -= 1

    def _append(self, track: Track) -> bool:
        errors = _mpd_errors()
        uri = self.paths.uri(track.path)
        if uri is None:
            self._check_mapping(display_path(track.path))
            self._skip(f"{display_path(track.path)}: not under MPD's music directory {self.paths.root}; skipped")
            return False
        try:
            song_id = self.mpd.call("addid", uri)
        except errors.CommandError as exc:
            if not _no_such_song(exc):
                raise RadioError(f"MPD at {self.mpd.where} would not add {uri}: {_reason(exc)}") from None
            self._check_mapping(uri)
            self._skip(f"{display_path(track.path)}: not in MPD's database (as {uri}); skipped")
            return False
        self._mapping_checked = True
        self._ids[uri] = track.item_id
        self._queue.append(_Entry(str(song_id), uri, track.item_id))
        self.session.added.append(track)
        self.say(f"+ {track}")
        if self._start_playing:
            self._start_playing = False
            self.mpd.call("playid", song_id)
        return True

    def _skip(self, line: str) -> None:
        self.session.skipped += 1
        self.warn(line)

    def _check_mapping(self, failed: str) -> None:
        """Before anything was added: does MPD know any library track at all? If not, the folders differ."""
        if self._mapping_checked:
            return
        self._mapping_checked = True
        top = {u.split("/", 1)[0] for u in (self.paths.uri(p) for p in self.source.sample_paths(50)) if u}
        names = set()
        for entry in self.mpd.call("lsinfo"):
            for kind in ("directory", "file"):
                if kind in entry:
                    names.add(entry[kind].split("/", 1)[0])
        if not top & names:
            try:  # MPD names its folder only to clients on its local socket
                theirs = self.mpd.call("config").get("music_directory")
            except _mpd_errors().CommandError:
                theirs = None
            holds = _some(names) or "nothing (is its database empty? mpc update)"
            mpd_side = f"MPD's music_directory is {theirs}, which holds {holds}" if theirs else \
                f"MPD's music_directory holds {holds}"
            raise RadioError(
                f"MPD does not know {failed}, nor any other library track: beets' files are given to MPD "
                f"relative to {self.paths.root} (mpd.music_directory, else beets' directory), but {mpd_side}. "
                "Set mpd.music_directory (or --music-directory) to the folder MPD's music_directory names")


def _some(names, k=3) -> str:
    names = sorted(names)
    if not names:
        return ""
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# ---- the beets end ----


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
        from . import library

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

        from . import rank, search

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
        from . import search

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

        from . import rank

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


# ---- the command ----


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
    parser.add_option("--mode", choices=["genre", "cosine"], default=None,
                      help="genre: cosine + genre agreement (default); cosine: plain cosine")
    parser.add_option("--no-genre", dest="mode", action="store_const", const="cosine", help="same as --mode cosine")
    parser.add_option("--genre-weight", type="float", default=None, help="weight of genre agreement")
    parser.add_option("--genre", default=None, help="only tracks whose predicted genre is G")
    parser.add_option("--filter", action="append", default=None, metavar="QUERY",
                      help="only tracks that also match this beets query (repeatable; all must match)")
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


def command(plugin, lib, opts, args) -> None:
    """Run the radio for `beet crnnradio`; every failure is one UserError line."""
    import sys
    from dataclasses import replace

    from beets import config as beets_config
    from beets import ui
    from beets.ui import UserError

    from . import library

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
    settings = replace(plugin._settings(opts), max_per_artist=None)  # the radio's cap looks at the queue

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
    source = LibrarySource(lib, lambda: plugin.load_index(lib), lambda: plugin._catalogue(lib, settings), settings,
                           cap, marks, fingerprint=lambda: library.fingerprint(lib, card.model_id))
    seeds = [item.id for item in plugin._track_seed(lib, args)[0]] if args else []
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
