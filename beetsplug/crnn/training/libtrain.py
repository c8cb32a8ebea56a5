"""Train and evaluate on the user's own beets library: ``beet crnntrain [QUERY]``, ``beet crnneval [QUERY]``.

The library's tracks are the labelled data and their ``genre`` field (or another) the labels:

- genre strings are normalised (case, spaces, hyphens: "Hip-Hop", "hip hop" and "HipHop" are
  one genre), split on beets' separators ("; ", ", ", " / ") into several labels, and merged
  through the user's ``crnn.genre_aliases``;
- the taxonomy is the user's ``--genres`` or every genre with at least ``--min-tracks`` tracks
  (at most ``--max-genres``, the largest);
- the split is by artist (album artist where set; the track artist on compilations), stratified
  by genre, with a fixed seed: validation and test artists never reach training;
- log-mels of the spans ``crnnembed`` analyses (plus a margin for random crops) are decoded on
  ``pipeline``'s parallel, time-limited decoder and cached, with a size cap;
- training is ``train.run``: the same Trainer, augmentation and card as manifest training.

No beets import here: the plugin glue (``__init__``) reads the items and passes plain values.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np

from .. import audio
from . import dataset
from ..audio import HOP_LENGTH, SAMPLE_RATE, TRUNCATION_SLACK, WINDOW_FRAMES, WINDOW_SAMPLES
from ..errors import AudioError, CrnnError, display_path
from ..features import PARAMS, log_mel
from ..rank import DEFAULT_VA_NAME, is_compilation

SOURCE = "library"  # the one labelled set a library is: every taxonomy genre is labelled for every track
UNLABELLED = "unlabelled:library"  # tracks without a usable genre, taught by the teacher alone (train.unlabelled_records)
# beets' separators for several values in one string field (its multi-value delimiter too)
SEPARATORS = ("\\␀", "; ", ", ", " / ")
MODELS_DIR = "crnn_models"
CACHE_DIR = "crnn_cache"
TEACHER_DIR = "teacher"  # teacher outputs, beside the log-mels in CACHE_DIR (keyed by file, not by windows)
MARGIN_S = 5.0  # seconds decoded on each side of an analysis window, so training crops can move
DEFAULT_CACHE_GB = 5.0
DEFAULT_MAX_MINUTES = 60.0
SHOWN = 5  # genre names shown per left-out reason

# Options that only mean something when training on (or evaluating) the library.
LIBRARY_OPTIONS = ("library", "field", "genres", "min_tracks", "max_genres", "from_scratch", "val_fraction",
                   "test_fraction", "cache_max_gb", "dry_run")


# ---- genres ----

def genre_key(name: str) -> str:
    """The identity of a genre string: case, spaces, hyphens, underscores and dots do not count."""
    return re.sub(r"[\s\-_.]+", "", str(name).casefold())


def split_genres(value, separators=SEPARATORS) -> list[str]:
    """The genres in a field's value: a list (beets' multi-valued ``genres``) or a string with separators."""
    if value is None:
        return []
    parts = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    for sep in separators:
        parts = [p for part in parts for p in part.split(sep)]
    return [p.strip() for p in parts if p.strip()]


class GenreNames:
    """Raw genre strings -> canonical labels, through normalisation and the user's aliases.

    ``aliases`` maps a canonical genre to the names that mean it (a list, or one string), as
    ``crnn.genre_aliases`` does: ``{electronic: [electronica, edm]}``. Names are compared
    normalised, so an alias covers its spellings too.
    """

    def __init__(self, aliases=None):
        self.to_key: dict[str, str] = {}
        self.alias_names: dict[str, str] = {}
        for canonical, names in (aliases or {}).items():
            key = genre_key(canonical)
            if not key:
                continue
            self.alias_names[key] = str(canonical).strip().casefold()
            for name in [names] if isinstance(names, str) else list(names or []):
                other = genre_key(name)
                if other and other != key:
                    if self.to_key.get(other, key) != key:
                        raise CrnnError(f"crnn.genre_aliases: {name!r} is an alias of two genres")
                    self.to_key[other] = key
        self.spellings: dict[str, Counter] = {}

    def keys(self, raw_values) -> list[str]:
        """Canonical keys of a track's raw values, in order, without repeats; remembers the spellings seen."""
        out = []
        for raw in raw_values:
            key = genre_key(raw)
            if not key:
                continue
            key = self.to_key.get(key, key)
            self.spellings.setdefault(key, Counter())[str(raw).strip().casefold()] += 1
            if key not in out:
                out.append(key)
        return out

    def label(self, key: str) -> str:
        """The genre's display name: the alias target as configured, else the commonest spelling (lower case)."""
        if key in self.alias_names:
            return self.alias_names[key]
        seen = self.spellings.get(key)
        if not seen:
            return key
        return sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def artist_key(name) -> str:
    return " ".join(str(name or "").casefold().split())


def split_artist(artist, albumartist, comp=False, va_name=DEFAULT_VA_NAME) -> tuple[str, bool]:
    """(the artist a track is split by, whether it is a compilation's track).

    The album artist where set, else the artist; but on a compilation (``rank.is_compilation``: beets'
    ``comp`` flag, or an album artist equal to the configured ``va_name``) the album artist names no
    one, so the track artist is the artist ("" when the track has none: it then counts with its folder).
    """
    if is_compilation(albumartist, comp, va_name):
        return str(artist or ""), True
    return str(albumartist or artist or ""), False


@dataclass
class Track:
    """One library item as training sees it (the glue fills these from beets items, through ``split_artist``)."""

    id: int
    path: str
    artist: str  # the split key: album artist where set, else artist; the track artist on compilations
    values: list  # the raw genre strings of the chosen field, before splitting
    compilation: bool = False  # a compilation's track, split by its track artist


@dataclass
class Plan:
    """What a library run trains on, decided before any audio is decoded."""

    genres: list  # the taxonomy (display labels)
    records: list  # dataset.Record per usable track (split, artist, primary genre + more)
    track_ids: list  # beets item id per record
    counts: dict  # genre -> {"train": n, "val": n, "test": n}
    left_out: dict  # reason -> {"tracks": n, "genres": {label: tracks}}
    artists: dict  # split -> sorted artist keys
    field: str = "genre"
    query: str = ""
    settings: dict = dc_field(default_factory=dict)
    unlabelled: list = dc_field(default_factory=list)  # with a teacher: left-out tracks as genre-less records

    def summary(self) -> dict:
        out = {"query": self.query, "field": self.field, "genres": self.genres, "tracks_per_genre": self.counts,
               "tracks": {s: sum(r.split == s for r in self.records) for s in dataset.SPLITS},
               "left_out": self.left_out, "split": {**self.settings, "artists": self.artists}}
        if self.unlabelled:
            out["unlabelled"] = {s: sum(r.split == s for r in self.unlabelled) for s in dataset.SPLITS}
        return out


def plan(tracks, field="genre", aliases=None, genres=None, min_tracks=30, max_genres=20, val_fraction=0.1,
         test_fraction=0.1, seed=0, query="", unlabelled=False) -> Plan:
    """The taxonomy, the labelled records and the artist split of a library's tracks.

    With ``unlabelled`` (a teacher), the tracks left out for their genre become genre-less records
    (``Plan.unlabelled``) in their artist's split, so an artist held out never trains, not even
    through the teacher; artists with no labelled track are split among themselves the same way.
    The labelled split is the same with or without them.
    """
    if not tracks:
        raise CrnnError(f"no tracks match the query {query!r}" if query else "the library has no tracks")
    names = GenreNames(aliases)
    keyed = [(t, names.keys(split_genres(t.values))) for t in tracks]
    n_tagged = sum(bool(k) for _, k in keyed)
    if not n_tagged:
        where = f"matching {query!r}" if query else "in the library"
        raise CrnnError(f"none of the {len(tracks)} tracks {where} has a {field!r}: tag them (MusicBrainz, "
                        f"lastgenre) or choose another field with --field")
    size = Counter(k for _, ks in keyed for k in ks)
    if genres:
        chosen = []
        for g in genres:
            key = names.to_key.get(genre_key(g), genre_key(g))
            if not size.get(key):
                raise CrnnError(f"--genres: no track has the genre {g!r} in {field!r}")
            if key not in chosen:
                chosen.append(key)
        reason_of = lambda key: "of genres not in --genres"  # noqa: E731
    else:
        common = sorted((k for k in size if size[k] >= min_tracks), key=lambda k: (-size[k], names.label(k)))
        chosen = common[:max_genres]
        beyond = set(common[max_genres:])
        reason_of = lambda key: (f"of genres beyond the {max_genres} largest (--max-genres)" if key in beyond  # noqa: E731
                                 else f"of rare genres (fewer than {min_tracks} tracks, --min-tracks)")
    label = {k: names.label(k) for k in size}
    if len({label[k] for k in chosen}) < len(chosen):
        raise CrnnError("two genres have the same name after normalising: " + ", ".join(label[k] for k in chosen))
    left_out: dict = {}

    def leave(reason, keys):
        entry = left_out.setdefault(reason, {"tracks": 0, "genres": Counter()})
        entry["tracks"] += 1
        for k in keys:
            entry["genres"][label[k]] += 1

    usable, spare = [], []
    for t, ks in keyed:
        mine = [k for k in ks if k in chosen]
        if not ks:
            leave("without a genre", ())
            spare.append(t)
        elif not mine:
            reasons = Counter(reason_of(k) for k in ks)
            leave(sorted(reasons, key=lambda r: -reasons[r])[0], ks)
            spare.append(t)
        else:
            usable.append((t, mine))
    for entry in left_out.values():
        entry["genres"] = dict(sorted(entry["genres"].items(), key=lambda kv: (-kv[1], kv[0])))
    if len(chosen) < 2:
        if genres:
            raise CrnnError(f"--genres must name at least two genres, not {len(chosen)}")
        found = ", ".join(f"{label[k]} {size[k]}" for k in sorted(size, key=lambda k: (-size[k], label[k]))[:SHOWN])
        raise CrnnError(f"training needs at least two genres with {min_tracks} or more tracks (--min-tracks); "
                        f"{field!r} has {len(chosen)} ({found}{', ...' if len(size) > SHOWN else ''} tracks)")
    split_of = split_artists([(artist_key(t.artist) or _no_artist(t), mine[0]) for t, mine in usable],
                             val_fraction, test_fraction, seed)
    records, ids = [], []
    for t, mine in usable:
        a = artist_key(t.artist) or _no_artist(t)
        records.append(dataset.Record(Path(os.fsdecode(t.path)), label[mine[0]], split_of[a], a, SOURCE,
                                      tuple(label[k] for k in mine[1:])))
        ids.append(t.id)
    genre_less = []
    if unlabelled and spare:
        keys = [artist_key(t.artist) or _no_artist(t) for t in spare]
        split_of.update(split_artists([(a, "") for a in keys if a not in split_of], val_fraction, test_fraction, seed))
        genre_less = [dataset.Record(Path(os.fsdecode(t.path)), "", split_of[a], a, UNLABELLED)
                      for t, a in zip(spare, keys)]
    taxonomy = sorted(label[k] for k in chosen)
    counts = {g: {s: sum(1 for r in records if r.split == s and g in (r.genre, *r.more)) for s in dataset.SPLITS}
              for g in taxonomy}
    artists = {s: sorted({a for a, sp in split_of.items() if sp == s}) for s in dataset.SPLITS}
    compilations = sum(t.compilation for t, _ in usable) + sum(t.compilation for t in spare if genre_less)
    settings = {"by": "album artist, else artist; track artist on compilations", "seed": seed,
                "val_fraction": val_fraction, "test_fraction": test_fraction,
                "stratified_by": "each artist's commonest genre", "compilation_tracks": compilations}
    return Plan(taxonomy, records, ids, counts, left_out, artists, field, query, settings, genre_less)


def _no_artist(track) -> str:
    """Tracks without any artist: those in one folder count as one artist (never split across train and test)."""
    return "(no artist) " + os.path.dirname(os.fsdecode(track.path))


def split_artists(pairs, val_fraction=0.1, test_fraction=0.1, seed=0) -> dict:
    """{artist: split} from (artist, primary genre) per track; artist-disjoint and stratified by genre.

    Each artist belongs to its commonest genre; within a genre, artists in a seeded random order
    fill test, then val, up to their fraction of the genre's tracks, without ever taking a
    genre's last training artist. An artist too big for a split (more than twice its share)
    is passed over unless nothing else fills it.
    """
    per_artist: dict[str, Counter] = {}
    for a, g in pairs:
        per_artist.setdefault(a, Counter())[g] += 1
    groups: dict[str, list] = {}
    for a, c in per_artist.items():
        top = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        groups.setdefault(top, []).append(a)
    rng = np.random.default_rng(seed)
    out = {}
    for g in sorted(groups):
        artists = sorted(groups[g])
        order = [artists[i] for i in rng.permutation(len(artists))]
        n = {a: sum(per_artist[a].values()) for a in artists}
        total = sum(n.values())
        target = {"test": test_fraction * total, "val": val_fraction * total}
        held = {"test": 0, "val": 0}
        train = []
        for k, a in enumerate(order):
            left = len(order) - k - 1  # artists still to place after this one
            dest = "train"
            if train or left:  # a genre's last artist, with none in train yet, trains
                for s in ("test", "val"):
                    if held[s] < target[s] and held[s] + n[a] <= max(2 * target[s], 1):
                        dest = s
                        held[s] += n[a]
                        break
            out[a] = dest
            if dest == "train":
                train.append(a)
        # Nothing fitted a split (every artist big): give it the smallest artist, if train keeps one.
        for s in ("test", "val"):
            if target[s] > 0 and not held[s] and len(train) > 1 and len(artists) >= 3:
                a = min(train, key=lambda x: (n[x], x))
                train.remove(a)
                out[a] = s
                held[s] += n[a]
    return out


def format_plan(p: Plan) -> str:
    """The taxonomy with tracks per split, and what was left out and why (printed before any decoding)."""
    w = max([len("genre"), len("total")] + [len(g) for g in p.genres])
    lines = [f"{'genre':<{w}}  {'train':>6} {'val':>6} {'test':>6}"]
    for g in p.genres:
        c = p.counts[g]
        lines.append(f"{g:<{w}}  {c['train']:>6} {c['val']:>6} {c['test']:>6}")
    tot = {s: sum(r.split == s for r in p.records) for s in dataset.SPLITS}
    lines.append(f"{'tracks':<{w}}  {tot['train']:>6} {tot['val']:>6} {tot['test']:>6}")
    arts = {s: len({r.artist for r in p.records if r.split == s}) for s in dataset.SPLITS}
    lines.append(f"{'artists':<{w}}  {arts['train']:>6} {arts['val']:>6} {arts['test']:>6}")
    comp = p.settings.get("compilation_tracks", 0)
    if comp:
        lines.append(f"{comp} compilation track(s) (comp, or album artist = va_name) split by their track artist")
    multi = sum(bool(r.more) for r in p.records)
    if multi:
        lines.append(f"{multi} track(s) have several of these genres and learn each of them")
    if p.left_out:
        parts = []
        for reason, entry in sorted(p.left_out.items(), key=lambda kv: -kv[1]["tracks"]):
            shown = list(entry["genres"].items())[:SHOWN]
            names = ", ".join(f"{g} {n}" for g, n in shown) + (", ..." if len(entry["genres"]) > SHOWN else "")
            parts.append(f"{entry['tracks']} {reason}" + (f": {names}" if names else ""))
        lines.append("left out: " + "; ".join(parts))
    else:
        lines.append("left out: none")
    if p.unlabelled:
        n = {s: sum(r.split == s for r in p.unlabelled) for s in dataset.SPLITS}
        lines.append(f"teacher only (no usable genre): {n['train']} left-out track(s) by training artists train "
                     f"unlabelled; {n['val'] + n['test']} by val/test artists stay out")
    return "\n".join(lines)


# ---- log-mel excerpts, cached ----

def excerpt_spans(n_samples: int, n_windows: int, margin: int) -> list[tuple[int, int]]:
    """Sample spans to decode: each analysis window (as crnnembed plans them) widened by ``margin``
    on both sides, starts on the hop grid, overlapping spans merged. A short track is one span."""
    if n_samples <= WINDOW_SAMPLES:
        return [(0, n_samples)]
    spans: list[list[int]] = []
    for s in audio.plan_windows(n_samples, n_windows):
        a = max(0, s - margin)
        a -= a % HOP_LENGTH
        b = min(n_samples, s + WINDOW_SAMPLES + margin)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [(a, b) for a, b in spans]


class ExcerptCache(dataset.MelCache):
    """Log-mels of the parts of each track that training and evaluation use, cached on disk (float16).

    A track is cut into spans around the windows crnnembed analyses (``excerpt_spans``), so a
    five-minute track costs about 0.7 MB, not 3 MB; a track whose spans cover it (a short one, or
    a 60 s clip at two windows) is cached whole, exactly as manifest training caches it.
    ``get`` gives what training crops from (one array, or a list of spans), ``serving`` the
    windows crnnembed would analyse. With ``max_bytes`` the folder is kept under that size by
    removing the entries used longest ago (``prune``).
    """

    VERSION = "excerpt-1"

    def __init__(self, folder, n_windows=audio.DEFAULT_WINDOWS, margin_s=MARGIN_S, max_bytes=None):
        super().__init__(folder)
        self.n_windows = int(n_windows)
        self.margin = int(margin_s * SAMPLE_RATE)
        self.max_bytes = max_bytes

    def _key(self, path: Path) -> Path:
        st = Path(path).stat()
        ident = json.dumps([str(Path(path).resolve()), st.st_size, int(st.st_mtime), PARAMS, self.VERSION,
                            self.n_windows, self.margin], sort_keys=True)
        return self.folder / (hashlib.sha1(ident.encode()).hexdigest() + ".npz")

    def has(self, path) -> bool:
        try:
            return self._key(Path(path)).is_file()
        except OSError:
            return False

    def _load(self, key: Path):
        try:
            with np.load(key) as data:
                parts = [data[f"mel{i}"] for i in range(int(data["parts"]))]
                entry = parts, [int(s) for s in data["starts"]], int(data["n_samples"])
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is decoded again
        try:
            os.utime(key)  # the size cap removes the entries used longest ago
        except OSError:
            pass
        return entry

    def entry(self, path, timeout=None, opened=None):
        """(spans' log-mels float16, their start frames, track length in samples), decoded if not cached."""
        path = Path(path)
        key = self._key(path)
        if key.is_file():
            entry = self._load(key)
            if entry is not None:
                return entry
        f = audio.AudioFile(path, timeout)
        if opened is not None:
            opened(f)
        try:
            parts, starts, n = self._decode(f)
        finally:
            f.close()
        tmp = key.with_name(key.stem + ".tmp.npz")
        np.savez(tmp, parts=np.int64(len(parts)), starts=np.array(starts, np.int64), n_samples=np.int64(n),
                 **{f"mel{i}": m for i, m in enumerate(parts)})
        os.replace(tmp, key)
        return parts, starts, n

    def _decode(self, f: audio.AudioFile):
        n = f.length
        while True:
            spans = excerpt_spans(n, self.n_windows, self.margin)
            if spans == [(0, n)]:  # the whole track, as MelCache decodes it
                y = f.read(0, n + SAMPLE_RATE)
                if not len(y):
                    raise AudioError(f"{f.name}: no audio could be decoded")
                mel = log_mel(audio.fit_window(y) if len(y) < WINDOW_SAMPLES else y)
                return [mel.astype(np.float16)], [0], len(y)
            parts, end = [], None
            for a, b in spans:
                try:
                    y = f.read(a, b - a)
                except AudioError:
                    if a == 0:
                        raise
                    end = a  # this part does not decode: treat the audio as ending before it
                    break
                if len(y) < (b - a) - TRUNCATION_SLACK:
                    end = a + len(y)
                    break
                parts.append(log_mel(audio.fit_window(y) if len(y) < WINDOW_SAMPLES else y).astype(np.float16))
            if end is None:
                return parts, [a // HOP_LENGTH for a, _ in spans], n
            if end <= 0:
                raise AudioError(f"{f.name}: no audio could be decoded")
            n = end  # truncated: plan again inside the audio that is really there

    def get(self, path):
        """(what training crops from: one log-mel, or a list of spans, float16; track length in samples)."""
        parts, _, n = self.entry(path)
        return (parts[0] if len(parts) == 1 else list(parts)), n

    def part_starts(self, path) -> list[int]:
        """The start frame in the track of each span ``get`` gives (one span alone may start after 0)."""
        try:
            with np.load(self._key(Path(path))) as data:  # only the starts, not the log-mels
                return [int(s) for s in data["starts"]]
        except (OSError, ValueError, KeyError):
            return self.entry(path)[1]

    def serving(self, path, n_windows: int) -> np.ndarray:
        """The windows crnnembed would analyse, cut from the cached spans: (k, 96, 1366) float32."""
        parts, starts, n = self.entry(path)
        out = []
        for s in audio.plan_windows(n, n_windows):
            f = s // HOP_LENGTH
            for mel, first in zip(parts, starts):
                if first <= f and f - first + WINDOW_FRAMES <= mel.shape[1]:
                    out.append(mel[:, f - first : f - first + WINDOW_FRAMES].astype(np.float32))
                    break
            else:
                raise CrnnError(f"{display_path(path)}: cached excerpt does not hold window {s} (cache made "
                                f"for {self.n_windows} windows)")
        return np.stack(out)

    def fill(self, records, workers=2, progress=None) -> None:
        """Decode what is not cached yet (``decode`` has normally done it, in parallel and time-limited)."""
        for r in records:
            self.entry(r.path)
            if progress is not None:
                progress()

    def size(self) -> int:
        return sum(p.stat().st_size for p in self._entries())

    def _entries(self):
        return [p for p in self.folder.glob("*.npz") if re.fullmatch(r"[0-9a-f]{40}\.npz", p.name)]

    def prune(self, keep=()) -> tuple[int, int]:
        """Remove the entries used longest ago until the folder is under ``max_bytes``; never one in ``keep``
        (this run's tracks). Returns (entries removed, bytes left)."""
        entries = []
        for p in self._entries():
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        if self.max_bytes is None or total <= self.max_bytes:
            return 0, total
        keep_keys = set()
        for path in keep:
            try:
                keep_keys.add(self._key(Path(path)).name)
            except OSError:
                pass
        removed = 0
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p.name in keep_keys:
                continue
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            removed += 1
        return removed, total


def decode(records, cache: ExcerptCache, workers=None, timeout=audio.DEFAULT_TIMEOUT, progress=None,
           on_error=None) -> list:
    """Fill the cache for ``records`` on crnnembed's decoder pool (parallel, each file time-limited).

    Returns the records whose audio is ready; each file that fails is reported once through
    ``on_error(message)`` and left out. ``progress()`` is called once per record.
    """
    from ..pipeline import decode_all, decode_step

    ready, todo = [], []
    for r in records:
        (ready if cache.has(r.path) else todo).append(r)
    for _ in ready:
        if progress is not None:
            progress()
    if not todo:
        return list(records)
    failed = set()

    def work(task):
        decode_step(task.path, lambda: cache.entry(task.path, timeout=timeout,
                                                   opened=lambda f: setattr(task, "audio", f)))

    with contextlib.closing(decode_all(((k, r.path) for k, r in enumerate(todo)), work, workers, timeout)) as decoded:
        for task, error in decoded:
            if error is not None:
                failed.add(task.key)
                if on_error is not None:
                    on_error(error)
            if progress is not None:
                progress()
    bad = {id(todo[k]) for k in failed}
    return [r for r in records if id(r) not in bad]


# ---- the two commands (argparse; the glue adopts them as beets options) ----

def add_library_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("training on the library (beet crnntrain [QUERY])")
    g.add_argument("--library", action="store_true",
                   help="the arguments are a beets query even if they name existing files or folders")
    g.add_argument("--field", default="genre",
                   help="item field holding the genres (default: genre; a flexible attribute works too)")
    g.add_argument("--genres", default=None, help="comma-separated genres to learn (default: the common ones)")
    g.add_argument("--min-tracks", type=int, default=30, help="genres need at least this many tracks (default 30)")
    g.add_argument("--max-genres", type=int, default=20, help="at most this many genres, the largest (default 20)")
    g.add_argument("--from-scratch", action="store_true",
                   help="start from random weights instead of fine-tuning the shipped model")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of each genre's tracks (by artist) for val")
    g.add_argument("--test-fraction", type=float, default=0.1, help="share of each genre's tracks (by artist) for test")
    g.add_argument("--cache-max-gb", type=float, default=DEFAULT_CACHE_GB,
                   help=f"keep the log-mel cache under this size (default {DEFAULT_CACHE_GB:g} GB; this run's "
                        "tracks are always kept)")
    g.add_argument("--dry-run", action="store_true", help="print the genres and the split, then stop")
    return p


def build_train_parser() -> argparse.ArgumentParser:
    """`beet crnntrain [QUERY]`: the training options of ``train`` with library defaults, and the library's own."""
    from . import train

    p = argparse.ArgumentParser(prog="beet crnntrain", description="Train the CRNN on your beets library's genres.")
    p.add_argument("query", nargs="*", help="a beets query (default: the whole library)")
    train.add_options(p)
    add_library_options(p)
    # Library defaults: a model folder and a cache under the beets config directory, an hour's budget.
    p.set_defaults(out=None, cache=None, version_cache=None, teacher_cache=None, max_minutes=DEFAULT_MAX_MINUTES,
                   name="crnn-library", windows=None)
    library_defaults = {"out": f"{MODELS_DIR}/<model id> in the beets config directory",
                        "cache": f"{CACHE_DIR}/mels in the beets config directory",
                        "teacher_cache": f"{CACHE_DIR}/{TEACHER_DIR} in the beets config directory",
                        "max_minutes": f"{DEFAULT_MAX_MINUTES:g}", "windows": "crnn.windows", "name": "crnn-library"}
    for action in p._actions:
        if action.dest in library_defaults:
            action.help = f"{action.help or action.dest} (with a QUERY: default {library_defaults[action.dest]})"
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    from ..rank import DEFAULT_GENRE_WEIGHT

    p = argparse.ArgumentParser(prog="beet crnneval", description="Evaluate on your library's held-out artists.")
    p.add_argument("query", nargs="*", help="a beets query (default: the whole library)")
    p.add_argument("--model", default=None,
                   help="model folder (default: crnn.model if set, else the newest under crnn_models/)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test: tracks by artists the model neither trained nor validated on (default); "
                        "val: its validation artists")
    p.add_argument("--cache", default=None, help="log-mel cache folder (default: crnn_cache in the beets config dir)")
    p.add_argument("--windows", type=int, default=None, help="analysis windows per track (default: crnn.windows)")
    p.add_argument("--k", type=int, default=5, help="neighbours for precision@k")
    p.add_argument("--genre-weight", type=float, default=DEFAULT_GENRE_WEIGHT)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--library", action="store_true",
                   help="the arguments are a beets query even if they name existing files or folders")
    p.add_argument("--field", default=None, help="item field holding the genres (default: the model's, else genre)")
    return p


def eval_only_options() -> argparse.ArgumentParser:
    """The options `beet crnneval` has for a library beside those of evaluating DATA (``evaluate``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--library", action="store_true",
                   help="the arguments are a beets query even if they name existing files or folders")
    p.add_argument("--field", default=None, help="library: item field holding the genres (default: the model's)")
    return p


def names_data(args, library_flag=False) -> bool:
    """The one rule for `beet crnntrain ARGS` / `beet crnneval ARGS`: arguments that all name existing files
    or folders are labelled data sets (manifest or genre folders); anything else, or none, is a library query
    (``--library`` makes it a query whatever it names)."""
    return bool(args) and not library_flag and all(os.path.exists(os.path.expanduser(a)) for a in args)


# ---- training ----

def library_paths(config_dir, args) -> tuple[Path, Path]:
    """(cache folder, models folder) for a library run."""
    base = Path(config_dir)
    cache = Path(os.path.expanduser(args.cache)) if args.cache else base / CACHE_DIR / "mels"
    return cache, base / MODELS_DIR


def resolve_init(args) -> str | None:
    """Where training starts: --init-from, else random weights with --from-scratch, else the shipped model."""
    from ..model import default_weights_dir

    if args.from_scratch and args.init_from:
        raise CrnnError("--from-scratch and --init-from exclude each other")
    if args.from_scratch:
        return None
    return args.init_from or str(default_weights_dir())


def check_args(args) -> None:
    if args.min_tracks < 1:
        raise CrnnError("--min-tracks must be at least 1")
    if args.max_genres < 2:
        raise CrnnError("--max-genres must be at least 2")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(args, name)
        if not 0 <= v < 0.5:
            raise CrnnError(f"--{name.replace('_', '-')} must be from 0 to 0.5")
    if args.unlabelled:  # a folder's files have no artist: the split could not keep held-out artists out
        raise CrnnError("--unlabelled DIR is for training on DATA (its files have no artist to split by); on a "
                        "library, --teacher trains the matching tracks without a usable genre, split by artist")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise CrnnError("--max-minutes must be above 0")


def time_budget(minutes):
    """A Keras callback that ends an epoch early once ``minutes`` have passed since the first training
    batch: the epoch is then validated as it stands, and ``fit``'s own time check ends training.

    The clock starts at the first batch, as ``fit``'s does, not when the callback is made: what the
    Trainer does first (codec versions, the teacher over every training file) can take long, and a
    deadline already past would cut every epoch to one batch.
    """
    from ..model import import_tensorflow

    import_tensorflow()
    import keras

    class TimeBudget(keras.callbacks.Callback):
        deadline = None

        def on_train_batch_end(self, batch, logs=None):
            now = time.time()
            if self.deadline is None:  # the same callback serves every epoch's Keras fit
                self.deadline = now + minutes * 60
            if now > self.deadline:
                self.model.stop_training = True

    return TimeBudget()


def epoch_line(row, epochs, max_minutes) -> str:
    """One progress line per epoch: loss, val metrics, and how long is left at most."""
    done = row["minutes"]
    per = done / row["epoch"]
    left = per * (epochs - row["epoch"])
    if max_minutes is not None:
        left = min(left, max(max_minutes - done, 0.0))
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}"]
    if "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.4f}", f"val acc {row['val_acc']:.3f}"]
    parts.append("best so far" if row.get("best") else "")
    parts.append(f"{per:.1f} min/epoch, at most {left:.0f} min left" if left >= 1 else
                 f"{per * 60:.0f} s/epoch, at most {left * 60:.0f} s left")
    return "  ".join(p for p in parts if p)


def train_library(args, tracks, config_dir, aliases=None, query="", log=print, say=print, warn=None, progress=None,
                  workers=None, timeout=audio.DEFAULT_TIMEOUT, windows=audio.DEFAULT_WINDOWS) -> dict:
    """`beet crnntrain [QUERY]`: plan, decode, train with ``train.run``, evaluate, and file the model.

    ``say`` prints what the user must see (the taxonomy, progress per epoch); ``warn`` a file that
    cannot be decoded (one line each); ``log`` the rest.
    ``progress(total)`` gives an object with ``update(n)``/``close()`` (a progress bar) or None.
    Returns {"card", "folder", "plan", "failed"} (only "plan" with --dry-run).
    """
    from . import train

    check_args(args)
    init_from = resolve_init(args)
    args.windows = args.windows or windows
    genres = [g.strip() for g in args.genres.split(",") if g.strip()] if args.genres else None
    p = plan(tracks, args.field, aliases, genres, args.min_tracks, args.max_genres, args.val_fraction,
             args.test_fraction, args.seed, query, unlabelled=bool(args.teacher))
    say(f"{len(p.records)} of {len(tracks)} tracks, {len(p.genres)} genres from {args.field!r}, split by artist "
        f"(seed {args.seed}):")
    say(format_plan(p))
    if not any(r.split == "train" for r in p.records):
        raise CrnnError("no training tracks after the artist split")
    if init_from is not None:  # a starting model that cannot be read stops the run before any decoding
        from ..model import ModelCard

        try:
            start = ModelCard.load(init_from)
            start.verify()
        except CrnnError as exc:
            raise CrnnError(f"cannot fine-tune from {init_from} ({exc}); --from-scratch or --init-from DIR "
                            "start elsewhere") from None
        say(f"fine-tuning {start.model_id}: its layers, a new output for these {len(p.genres)} genres")
    else:
        say("training from scratch")
    if args.teacher:  # a missing extra stops the run before any decoding, in one line
        from .teacher import check_installed

        check_installed()
    if args.dry_run:
        return {"plan": p}
    if init_from is not None and start.family == "msd-crnn":
        return _train_library_msd(args, p, start, config_dir, log, say, warn, workers)
    cache_dir, models_dir = library_paths(config_dir, args)
    max_bytes = int(args.cache_max_gb * 1e9) if args.cache_max_gb and args.cache_max_gb > 0 else None
    cache = ExcerptCache(cache_dir, args.windows, max_bytes=max_bytes)

    # Decode once, on crnnembed's decoder; a file that fails is one line and is left out.
    # Genre-less tracks by val/test artists are never decoded: nothing of theirs trains.
    wanted = p.records + [r for r in p.unlabelled if r.split == "train"]
    failed = []
    bar = progress(len(wanted)) if progress is not None else None
    t = time.time()
    try:
        ok = decode(wanted, cache, workers, timeout, progress=(lambda: bar.update(1)) if bar else None,
                    on_error=lambda m: (failed.append(m), (warn or log)(f"{m} (left out)")))
    except KeyboardInterrupt:
        raise CrnnError("interrupted while decoding: what was decoded is cached, run the command again") from None
    finally:
        if bar is not None:
            bar.close()
    log(f"log-mels ready for {len(ok)} tracks in {time.time() - t:.0f} s ({len(failed)} left out) in {cache_dir}")
    removed, left = cache.prune(keep=[r.path for r in ok])
    if removed:
        log(f"log-mel cache over {args.cache_max_gb:g} GB: removed the {removed} entries used longest ago")
    if max_bytes and left > max_bytes:
        log(f"log-mel cache: this run's tracks alone take {left / 1e9:.1f} GB, over --cache-max-gb")
    kept = {id(r) for r in ok}
    records = [r for r in p.records if id(r) in kept]
    unlabelled = [r for r in wanted[len(p.records):] if id(r) in kept]
    trained = {r.genre for r in records if r.split == "train"} | {g for r in records if r.split == "train" for g in r.more}
    if len(trained) < 2:
        raise CrnnError("fewer than two genres have training tracks that decode")
    missing = [g for g in p.genres if g not in trained]
    if missing:  # every decoded record must carry only genres the model has
        raise CrnnError(f"no training track of {', '.join(missing)} could be decoded; leave it out with --genres")

    # Train: the manifest code, with this data, an excerpt cache and a new genre output.
    args.init_from = init_from
    args.new_head = init_from is not None
    args.data = []
    if args.out:  # the user's folder: written like manifest training writes --out (the two model files)
        tmp = None
        args.out = os.path.expanduser(args.out)
    else:  # crnn_models/<model id>: the id is known once the weights are, so write aside and rename
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = models_dir / f".training-{os.getpid()}"
        args.out = str(tmp)
    args.version_cache = args.version_cache or str(cache_dir / "versions")
    args.teacher_cache = args.teacher_cache or str(Path(config_dir) / CACHE_DIR / TEACHER_DIR)
    callbacks = [time_budget(args.max_minutes)] if args.max_minutes else []
    summary = p.summary()
    summary["decode_failed"] = len(failed)
    summary["tracks"] = {s: sum(r.split == s for r in records) for s in dataset.SPLITS}
    if "unlabelled" in summary:
        summary["unlabelled"]["train"] = len(unlabelled)  # those that decode
    try:
        card = train.run(args, log=log, records=[r for r in records if r.split != "test"], cache=cache,
                         unlabelled=unlabelled,
                         on_epoch=lambda row: say(epoch_line(row, args.epochs, args.max_minutes)),
                         callbacks=callbacks, card_extra={"library": summary})
        if tmp is None:
            folder = Path(args.out)
        else:
            folder = models_dir / card.model_id
            if folder.exists():  # the same weights again: ours to replace
                shutil.rmtree(folder)
            tmp.rename(folder)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    from ..model import ModelCard

    card = ModelCard.load(folder)
    stopped = card.extra["training"].get("stopped")
    test = None
    if stopped == "interrupted":
        log("evaluation skipped (interrupted): beet crnneval measures the model")
    else:
        try:
            metrics = card.extra.setdefault("metrics", {})
            for split in ("val", "test"):
                chosen = [r for r in records if r.split == split]
                if chosen:
                    metrics.setdefault(split, {})[SOURCE] = score(chosen, card, cache, args.windows)
            card.save(folder / "crnn.json")
            test = metrics.get("test", {}).get(SOURCE)
        except KeyboardInterrupt:
            log("evaluation interrupted: the model is written; beet crnneval measures it")
        if test:
            pk = test["precision_at_k"]
            say(f"held-out test artists ({test['tracks']} tracks): top-1 accuracy {test['accuracy']:.3f}, "
                f"macro F1 {test['macro']['f1']:.3f}, precision@{pk['k']} {_num(pk['cosine'])} cosine / "
                f"{_num(pk['genre'])} genre-aware")
    return {"card": card, "folder": folder, "plan": p, "failed": failed}


def _train_library_msd(args, p: Plan, start, config_dir, log, say, warn=None, workers=None) -> dict:
    """Library training from a model of the MSD CRNN family (the shipped one): ``finetune`` on the library's
    records, the start's stem cached once per track (decoding only the windows it reads), the start's tags as
    the tag head's teacher. Test artists' tracks are only scored."""
    from . import finetune
    from ..model import ModelCard

    cache_dir, models_dir = library_paths(config_dir, args)
    stem_cache = finetune.FeatureCache(cache_dir.parent / "msd", finetune.Start(start.weights.parent))
    versions = tuple(v for v in (args.versions or "").split(",") if v)
    models_dir.mkdir(parents=True, exist_ok=True)
    out = Path(os.path.expanduser(args.out)) if args.out else models_dir / f".training-{os.getpid()}"
    try:
        run = finetune.Run([r for r in p.records if r.split != "test"], stem_cache, out, versions,
                           args.version_cache or str(cache_dir.parent / "versions"), unfreeze="gru", lr=args.lr,
                           batch_size=max(args.batch_size, 16), seed=args.seed, workers=workers or 2, log=log,
                           warn=warn)
        result = run.fit(args.epochs, patience=args.patience)
        say(f"best epoch {result['best']['epoch']} of {result['epoch']}: val {finetune._brief(result['best']['val'])}")
        summary = p.summary()
        summary["tracks"] = {s: sum(r.split == s for r in p.records) for s in dataset.SPLITS}
        card = run.save(result, args.name, args.command if hasattr(args, "command") else "beet crnntrain",
                        extra={"library": summary})
        folder = out
        if not args.out:
            folder = models_dir / card.model_id
            if folder.exists():
                shutil.rmtree(folder)
            out.rename(folder)
    finally:
        if not args.out and out.exists():
            shutil.rmtree(out, ignore_errors=True)
    card = ModelCard.load(folder)
    mels = dataset.MelCache(cache_dir.parent / f"{card.front.name}-mels", card.front)  # as serving_cache has it
    metrics = card.extra.setdefault("metrics", {})
    for split in ("val", "test"):
        chosen = []
        for r in p.records:
            if r.split != split or r.path in run.left_out:
                continue
            try:
                mels.serving(r.path, args.windows)
                chosen.append(r)
            except CrnnError as exc:  # a held-out file that cannot be decoded: one line, not scored
                (warn or log)(f"{exc} (left out)")
        if chosen:
            metrics.setdefault(split, {})[SOURCE] = score(chosen, card, mels, args.windows)
    card.save(folder / "crnn.json")
    test = metrics.get("test", {}).get(SOURCE)
    if test:
        pk = test["precision_at_k"]
        say(f"held-out test artists ({test['tracks']} tracks): top-1 accuracy {test['accuracy']:.3f}, "
            f"macro F1 {test['macro']['f1']:.3f}, precision@{pk['k']} {_num(pk['cosine'])} cosine / "
            f"{_num(pk['genre'])} genre-aware")
    return {"card": card, "folder": folder, "plan": p, "failed": []}


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


# ---- evaluation ----

def serving_cache(cache, card):
    """``cache`` where it holds what ``card``'s front end hears (the level-free log-mels); for another family's
    front end (the MSD CRNN's), a log-mel cache of that front end beside it."""
    from ..features import LEVEL_FREE

    if card.front is LEVEL_FREE or getattr(cache, "front", None) is card.front:
        return cache
    return dataset.MelCache(Path(cache.folder).parent / f"{card.front.name}-mels", card.front)


def embed(records, card, cache, n_windows, embedder=None):
    """(unit embeddings, genre probabilities) per record, from the windows crnnembed analyses."""
    from ..model import embedder_for, pool_track

    embedder = embedder or embedder_for(card, precision="float32")
    cache = serving_cache(cache, card)
    embs, probs = [], []
    for r in records:
        e, p = pool_track(*embedder(cache.serving(r.path, n_windows)))
        embs.append(e)
        probs.append(p)
    return np.array(embs), np.array(probs)


def score(records, card, cache, n_windows, k=5, genre_weight=None, embedder=None) -> dict:
    """The paper's tables over the genres the model knows, and precision@k over all ``records``.

    A track with several genres counts under its first (the one it is listed under).
    """
    from .metrics import classification_report, precision_at_k
    from ..rank import DEFAULT_GENRE_WEIGHT

    genre_weight = DEFAULT_GENRE_WEIGHT if genre_weight is None else genre_weight
    embs, probs = embed(records, card, cache, n_windows, embedder)
    present = sorted({r.genre for r in records})
    shared = [g for g in card.genres if g in present]
    idx = [i for i, r in enumerate(records) if r.genre in shared]
    if shared:
        cols = [card.genres.index(g) for g in shared]
        report = classification_report([shared.index(records[i].genre) for i in idx], probs[idx][:, cols], shared)
    else:
        report = {"labels": [], "n": 0, "per_genre": {}, "macro": {}, "accuracy": float("nan"), "confusion": []}
    genres = [r.genre for r in records]
    artists = [r.artist for r in records]
    report["precision_at_k"] = {
        "k": k,
        "cosine": precision_at_k(embs, probs, genres, artists, k=k, mode="cosine"),
        "genre": precision_at_k(embs, probs, genres, artists, k=k, mode="genre", genre_weight=genre_weight),
        "genre_weight": genre_weight,
    }
    report.update({"model_id": card.model_id, "tracks": len(records), "windows": n_windows,
                   "artists": len({r.artist for r in records}), "genres_scored": shared,
                   "genres_unknown": [g for g in present if g not in shared]})
    return report


def library_info(card) -> dict | None:
    return (card.extra.get("training") or {}).get("library")


def held_out(tracks, card, split="test", aliases=None, field=None) -> tuple[list, str]:
    """The records to evaluate ``card`` on, and a line saying which they are.

    For a model trained on a library: its taxonomy, and for ``test`` the tracks by artists it neither
    trained nor validated on (``val``: its validation artists). Any other model: all tracks with a
    genre it knows.
    """
    info = library_info(card)
    field = field or (info or {}).get("field") or "genre"
    names = GenreNames(aliases)
    keyed = [(t, names.keys(split_genres(t.values))) for t in tracks]
    taxonomy = list(info["genres"]) if info else list(card.genres)
    # the model's labels, matched to this library's spellings through the same normalising and aliases
    label = {names.to_key.get(genre_key(g), genre_key(g)): g for g in taxonomy}
    if info:
        seen = set(info["split"]["artists"].get("train", [])) | set(info["split"]["artists"].get("val", []))
        val = set(info["split"]["artists"].get("val", []))
        if split == "val":
            wanted = lambda a: a in val  # noqa: E731
            what = f"the artists {card.model_id} validated on"
        else:
            wanted = lambda a: a not in seen  # noqa: E731
            what = f"artists {card.model_id} neither trained nor validated on"
    else:
        wanted = lambda a: True  # noqa: E731
        what = f"all tracks with a genre {card.model_id} knows (it was not trained on a library)"
    records = []
    for t, ks in keyed:
        mine = [label[k] for k in ks if k in label]
        a = artist_key(t.artist) or _no_artist(t)
        if mine and wanted(a):
            records.append(dataset.Record(Path(os.fsdecode(t.path)), mine[0], split, a, SOURCE, tuple(mine[1:])))
    return records, what


def newest_model(models_dir) -> Path | None:
    folders = [p for p in Path(models_dir).glob("*/crnn.json") if not p.parent.name.startswith(".")]
    return max(folders, key=lambda p: p.stat().st_mtime).parent if folders else None


def format_side_by_side(reports: list[tuple[str, dict]]) -> str:
    """The summary rows of several models' reports in columns."""
    w = 26
    cols = [max(len(name), 12) for name, _ in reports]
    lines = [" " * w + "  ".join(f"{name:>{c}}" for (name, _), c in zip(reports, cols))]

    def row(title, get):
        cells = []
        for (_, r), c in zip(reports, cols):
            try:
                v = get(r)
            except (KeyError, TypeError):
                v = None
            cells.append(f"{v:>{c}}" if isinstance(v, str) else f"{_num(v):>{c}}")
        lines.append(f"{title:<{w}}" + "  ".join(cells))

    row("genres scored", lambda r: f"{len(r['genres_scored'])} of {len(r['genres_scored']) + len(r['genres_unknown'])}")
    row("top-1 accuracy", lambda r: r["accuracy"] if r["genres_scored"] else None)
    row("macro F1", lambda r: r["macro"]["f1"])
    row("macro ROC-AUC", lambda r: r["macro"]["roc_auc"])
    k = reports[0][1]["precision_at_k"]["k"]
    row(f"precision@{k} cosine", lambda r: r["precision_at_k"]["cosine"])
    row(f"precision@{k} genre-aware", lambda r: r["precision_at_k"]["genre"])
    return "\n".join(lines)


def eval_library(args, tracks, card, others=(), cache_dir=None, aliases=None, query="", log=print,
                 windows=audio.DEFAULT_WINDOWS, workers=None, timeout=audio.DEFAULT_TIMEOUT,
                 progress=None) -> tuple[str, dict]:
    """`beet crnneval [QUERY]`: ``card`` and other models side by side on the same held-out tracks.

    The tracks are ``card``'s held-out ones (``held_out``); ``others`` are (role, card) pairs such
    as ("configured", ...), ("shipped", ...), where a str in place of a card says why that model
    cannot be compared. Returns (text, report).
    """
    from .metrics import format_report

    n_windows = args.windows or windows
    records, what = held_out(tracks, card, args.split, aliases, args.field)
    if len(records) < 2:
        raise CrnnError(f"only {len(records)} of the {len(tracks)} matching tracks are {what} and have a genre "
                        "the model knows: nothing to evaluate")
    cache = ExcerptCache(cache_dir, n_windows)
    failed = []
    bar = progress(len(records)) if progress is not None else None
    try:
        records = decode(records, cache, workers, timeout, progress=(lambda: bar.update(1)) if bar else None,
                         on_error=lambda m: (failed.append(m), log(f"{m} (left out)")))
    finally:
        if bar is not None:
            bar.close()
    if len(records) < 2:
        raise CrnnError("fewer than two held-out tracks could be decoded")
    models = [("", card)] + [(role, c) for role, c in others if not isinstance(c, str)]
    notes = [f"{role} model not compared: {c}" for role, c in others if isinstance(c, str)]
    reports = []
    for role, c in models:
        r = score(records, c, cache, n_windows, args.k, args.genre_weight)
        r["role"] = role or "evaluated"
        reports.append((c.model_id + (f" ({role})" if role else ""), r))
    n_artists = len({r.artist for r in records})
    matching = f" matching {query!r}" if query else ""
    out = [f"== {len(records)} tracks{matching} by {n_artists} artists: {what} ==",
           format_side_by_side(reports)]
    out.extend(notes)
    artists_of = {}
    for r in records:
        artists_of.setdefault(r.genre, set()).add(r.artist)
    lonely = sorted(g for g, a in artists_of.items() if len(a) < 2)
    if lonely:
        out.append(f"precision@{args.k} counts only neighbours by other artists; {', '.join(lonely)} "
                   f"{'has' if len(lonely) == 1 else 'have'} one artist here, so those tracks cannot score")
    if failed:
        out.append(f"{len(failed)} track(s) left out: they could not be decoded")
    for name, r in reports:
        out.append("")
        out.append(f"-- {name} --")
        if r["genres_unknown"]:
            out.append(f"genres it does not know (precision@k only): {', '.join(r['genres_unknown'])}")
        if r["genres_scored"]:
            pk = r["precision_at_k"]
            out.append(format_report(r, {"cosine": pk["cosine"], "genre": pk["genre"], "k": pk["k"]}))
        else:
            pk = r["precision_at_k"]
            out.append(f"precision@{pk['k']} cosine: {_num(pk['cosine'])} / genre-aware: {_num(pk['genre'])}")
    result = {"split": args.split, "tracks": len(records), "artists": n_artists, "which": what,
              "models": {name: r for name, r in reports}, "failed": failed}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n", "utf-8")
    return "\n".join(out), result
