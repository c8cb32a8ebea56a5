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
- ``LibrarySource`` (in ``commands/radio.py``, with the command): the beets end: library lookups,
  the similarity index, filters and marks.
"""

from __future__ import annotations

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
