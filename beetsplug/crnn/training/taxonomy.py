"""A library's genres and its artist split: what ``beet crnntrain QUERY`` learns, decided before any decoding.

- genre strings are normalised (case, spaces, hyphens: "Hip-Hop", "hip hop" and "HipHop" are
  one genre), split on beets' separators ("; ", ", ", " / ") into several labels, and merged
  through the user's ``crnn.genre_aliases``;
- the taxonomy is the user's ``--genres`` or every genre with at least ``--min-tracks`` tracks
  (at most ``--max-genres``, the largest);
- the split is by artist (album artist where set; the track artist on compilations), stratified
  by genre, with a fixed seed: validation and test artists never reach training.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np

from ..errors import CrnnError
from ..rank import DEFAULT_VA_NAME, is_compilation, norm_text
from ..store import genre_key
from . import dataset

SOURCE = "library"  # the one labelled set a library is: every taxonomy genre is labelled for every track
UNLABELLED = "unlabelled:library"  # tracks without a usable genre, taught by the teacher alone
# beets' separators for several values in one string field (its multi-value delimiter too)
SEPARATORS = ("\\␀", "; ", ", ", " / ")
SHOWN = 5  # genre names shown per left-out reason


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
    split_of = split_artists([(split_key(t), mine[0]) for t, mine in usable],
                             val_fraction, test_fraction, seed)
    records, ids = [], []
    for t, mine in usable:
        a = split_key(t)
        records.append(dataset.Record(Path(os.fsdecode(t.path)), label[mine[0]], split_of[a], a, SOURCE,
                                      tuple(label[k] for k in mine[1:])))
        ids.append(t.id)
    genre_less = []
    if unlabelled and spare:
        keys = [split_key(t) for t in spare]
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


def split_key(track) -> str:
    """The artist a track is split by, compared normalised; tracks without any artist count as one artist per
    folder (never split across train and test)."""
    return norm_text(track.artist) or "(no artist) " + os.path.dirname(os.fsdecode(track.path))


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
