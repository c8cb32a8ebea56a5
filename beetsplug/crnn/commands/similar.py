"""``beet similar`` (tracks, or albums with ``-a``) and ``beet crnnpath`` (a song path between two seeds).

The searching lives in ``search``, ``songpath`` and ``rank``; here are the beets ends of it: options
and config, seeds, ``--filter`` queries, printing and the playlist a result becomes. Saved mixes
(``mixes``) and the radio run the same searches.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from beets import config as beets_config
from beets import ui
from beets.ui import UserError

from .. import rank, search, store
from ..errors import CrnnError, StoreError, display_path
from .common import user_errors
from .index import load_index

SIMILAR_HELP = "list tracks (or albums) that sound like the query's"
PATH_HELP = "tracks that drift step by step from one seed's sound to another's"


# ---- options and settings ----

def ranking_options(parser) -> None:
    """The options `beet similar`, `beet crnnpath` and `beet crnnradio` share (saved mixes take the same names)."""
    parser.add_option("--mode", choices=list(rank.MODES), default=None,
                      help="genre: cosine + genre agreement (default); cosine: plain cosine")
    parser.add_option("--no-genre", dest="mode", action="store_const", const="cosine", help="same as --mode cosine")
    parser.add_option("--genre-weight", type="float", default=None, help="weight of genre agreement")
    parser.add_option("--genre", default=None, help="only results whose predicted genre is G")
    parser.add_option("--filter", action="append", default=None, metavar="QUERY",
                      help="only results that also match this beets query (repeatable; all must match)")


def _list_options(parser, seed_help) -> None:
    """What a result list takes beside the ranking: its length, the artist cap, its order, a playlist."""
    parser.add_option("-n", "--number", type="int", default=10, help="how many results (default 10)")
    ranking_options(parser)
    parser.add_option("--max-per-artist", type="int", default=None, help="at most K results per artist")
    parser.add_option("--order", choices=list(search.ORDERS), default=None,
                      help="score: best first (default); smooth: each the closest remaining to the one before")
    parser.add_option("--m3u", default=None, metavar="PATH", help="write the result to this playlist")
    parser.add_option("--m3u8", action="store_true", default=False, help="write the playlist as UTF-8 M3U8")
    parser.add_option("--include-seed", action="store_true", default=False, help=seed_help)
    parser.add_format_option()


def add_similar_options(parser) -> None:
    parser.add_album_option()
    _list_options(parser, "put the query's tracks first in the playlist")


def add_path_options(parser) -> None:
    parser.usage = "%prog FROM_QUERY TO_QUERY [options]"
    _list_options(parser, "start the playlist with FROM's tracks and end it with TO's")


def configured(plugin) -> search.Settings:
    """The ranking settings in the config (crnn.mode, genre_weight, max_per_artist, order, search_k)."""
    with user_errors():
        return search.checked(search.Settings(
            mode=plugin.config["mode"].as_str(), genre_weight=plugin.config["genre_weight"].as_number(),
            max_per_artist=plugin.config["max_per_artist"].get(int) or None, order=plugin.config["order"].as_str(),
            search_k=plugin.config["search_k"].get(int)), "crnn.")


def settings(plugin, opts) -> search.Settings:
    """The configured settings with the command's options over them."""
    if opts.number < 1:
        raise UserError("-n must be at least 1")
    base = configured(plugin)
    cap = getattr(opts, "max_per_artist", None)
    if cap is None:
        cap = plugin.config["max_per_artist"].get(int)
    if cap < 0:
        raise UserError("--max-per-artist must be at least 0")
    return search.Settings(
        mode=opts.mode or base.mode,
        genre_weight=opts.genre_weight if opts.genre_weight is not None else base.genre_weight,
        max_per_artist=cap or None,
        genre=opts.genre,
        order=getattr(opts, "order", None) or base.order,
        filters=list(opts.filter or []),
        search_k=base.search_k,
    )


# ---- the commands ----

def run_similar(plugin, lib, opts, args) -> None:
    found = find(plugin, lib, args, opts.number, settings(plugin, opts), albums=opts.album)
    for obj, cand in found.results:
        if opts.format:
            ui.print_(format(obj, opts.format))
        elif opts.album:
            ui.print_(f"{format(obj)}  [{cand.score:.3f} {cand.genre}]")
        else:
            # Why it was chosen: its score, predicted genre, and the tags it shares with the seeds.
            shared = [t for t in store.split_tags(obj.get(store.TAGS)) if t in found.tags]
            why = f"; shared tags: {', '.join(shared)}" if shared else ""
            ui.print_(f"{format(obj)}  [{cand.score:.3f} {cand.genre}{why}]")
    if opts.m3u:
        write_playlist(plugin, lib, opts.m3u, opts.m3u8, found.playlist(opts.include_seed))


def run_path(plugin, lib, opts, args) -> None:
    if len(args) != 2:
        raise UserError("crnnpath needs two queries, FROM and TO, each one argument "
                        "(quote it): beet crnnpath 'artist:A title:X' 'artist:B'")
    found = find(plugin, lib, args[0], opts.number, settings(plugin, opts), to=args[1])
    for number, (item, cand) in enumerate(found.results, 1):
        ui.print_(format(item, opts.format) if opts.format
                  else f"{format(item)}  [step {number}: {cand.score:.3f} {cand.genre}]")
    if opts.m3u:
        write_playlist(plugin, lib, opts.m3u, opts.m3u8, found.playlist(opts.include_seed))


# ---- the searches ----

@dataclass
class Found:
    """A search's results and what its playlist holds."""

    results: list  # [(item or album, rank.Candidate)]
    before: list  # the seeds (a path's FROM tracks): first in the playlist with include_seed
    after: list = field(default_factory=list)  # a path's TO tracks: last in the playlist with include_seed
    tags: set = field(default_factory=set)  # the seed tracks' crnn_tags
    albums: bool = False

    def playlist(self, include_seed=False) -> list:
        """The items of the playlist: the results (albums as their tracks), with the seeds around them."""
        around = bool(include_seed)
        found = (self.before if around else []) + [obj for obj, _ in self.results] + (self.after if around else [])
        return [t for album in found for t in album_tracks(album)] if self.albums else found


def find(plugin, lib, query, n, settings, to=None, albums=False) -> Found:
    """`beet similar` (``albums``: -a) or, with ``to``, `beet crnnpath` from ``query`` to ``to``."""
    if to is not None:
        return _song_path(plugin, lib, query, to, n, settings)
    if albums:
        return _similar_albums(plugin, lib, query, n, settings)
    return _similar_tracks(plugin, lib, query, n, settings)


def _similar_tracks(plugin, lib, query, n, settings) -> Found:
    seeds, vec, probs, tags = track_seed(plugin, lib, query)
    index = load_index(plugin, lib)
    chosen, whole = search.nearest(index, vec, probs, n, _picker(seeds, settings), catalogue(lib, settings),
                                   settings, exclude={item.id for item in seeds})
    results = _finish(plugin, chosen, n, "tracks", whole, settings, vec, index, lib.get_item)
    return Found(results, seeds, tags=tags)


def _similar_albums(plugin, lib, query, n, settings) -> Found:
    text = query if isinstance(query, str) else " ".join(query)
    seeds = list(lib.albums(query))
    if not seeds:
        raise UserError(f"no albums match the query {text!r}")
    index = load_index(plugin, lib, albums=True)
    rows = [r for r in index.rows_of([a.id for a in seeds]).tolist() if r >= 0]
    if not rows:
        raise UserError(f"the {len(seeds)} album(s) matching {text!r} have no analysed tracks: "
                        f"run beet crnnembed {text}".rstrip())
    vec = _centroid([index.vector(int(index.ids[r])) for r in rows], f"the albums matching {text!r}")
    probs = index.probs[rows].mean(axis=0)
    chosen, whole = search.nearest(index, vec, probs, n, _picker(seeds, settings, albums=True),
                                   catalogue(lib, settings, index=index, albums=True), settings,
                                   exclude={a.id for a in seeds})
    results = _finish(plugin, chosen, n, "albums", whole, settings, vec, index, lib.get_album)
    return Found(results, seeds, albums=True)


def _song_path(plugin, lib, start_query, end_query, n, settings) -> Found:
    """A path of ``n`` steps between two seeds."""
    from .. import songpath

    start, start_vec, start_probs, _ = track_seed(plugin, lib, start_query, "FROM_QUERY")
    end, end_vec, end_probs, _ = track_seed(plugin, lib, end_query, "TO_QUERY")
    index = load_index(plugin, lib)
    seeds = start + end
    try:
        chosen = songpath.walk(index, start_vec, end_vec, start_probs, end_probs, n, _picker(seeds, settings),
                            catalogue(lib, settings), settings, exclude={item.id for item in seeds})
    except ValueError as exc:
        raise UserError(f"no path from {start_query!r} to {end_query!r}: {exc}") from None
    results = _finish(plugin, chosen, n, "steps", True, settings, start_vec, index, lib.get_item)
    return Found(results, start, end)


def _picker(seeds, settings, albums=False) -> rank.Picker:
    """The seeds are never results, nor their duplicates (same artist and title or album, or MusicBrainz id)."""
    if albums:
        va_name = beets_config["va_name"].as_str()  # a compilation's album artist is no one artist (album_fields)
        keys = [("" if rank.is_compilation(a.albumartist, a.comp, va_name) else a.albumartist, a.album) for a in seeds]
        mbids = [a.get("mb_albumid") for a in seeds]
    else:
        keys = [(s.artist, s.title) for s in seeds]
        mbids = [s.get("mb_trackid") for s in seeds]
    return rank.Picker({s.id for s in seeds}, keys, mbids, max_per_artist=settings.max_per_artist,
                       genre=settings.genre)


def _finish(plugin, chosen, n, what, whole, settings, start, index, get) -> list:
    """[(beets object, candidate)] in the order asked for; one line when the whole library held fewer than ``n``."""
    from .. import songpath

    if len(chosen) < n and whole:
        plugin._log.info("only {} of {} {} found: the whole library was searched", len(chosen), n, what)
    if settings.order == "smooth":
        chosen = songpath.reorder(chosen, start, index)
    out = []
    for cand in chosen:
        obj = get(cand.item_id)
        if obj is not None:  # not removed since the search looked it up
            out.append((obj, cand))
    return out


def _centroid(vectors, what):
    try:
        return rank.centroid(vectors)
    except ValueError as exc:  # opposite sounds cancel out
        raise UserError(f"{what}: {exc}") from None


def track_seed(plugin, lib, query, what="the query"):
    """(seed items, their centroid, mean genre profile, crnn_tags) of the tracks matching ``query``."""
    import numpy as np

    card = plugin.card()
    text = query if isinstance(query, str) else " ".join(query)
    seeds = list(lib.items(query))
    if not seeds:
        raise UserError(f"no tracks match {what} {text!r}")
    vectors, probs, tags = [], [], set()
    for item in seeds:
        try:
            if item.get(store.MODEL) != card.model_id:
                raise CrnnError("not embedded by the current model")
            vectors.append(store.decode_vector(item.get(store.EMBEDDING)))
            probs.append(store.probs_from(item, card.genres))
            tags.update(store.split_tags(item.get(store.TAGS)))
        except StoreError as exc:  # garbage in the database: say so, use the other seeds
            plugin._log.warning("{}: stored {} is unusable ({}); not used as a seed. beet crnnembed analyses it "
                                "again", display_path(item.path), store.EMBEDDING, exc)
        except CrnnError as exc:
            plugin._log.debug("seed {}: {}", item, exc)
    if not vectors:
        raise UserError(f"the {len(seeds)} track(s) matching {text!r} have no CRNN embedding: "
                        f"run beet crnnembed {text}".rstrip())
    if len(vectors) < len(seeds):
        plugin._log.warning("{} of {} seed tracks have no embedding and are ignored", len(seeds) - len(vectors),
                            len(seeds))
    vec = _centroid(np.array(vectors), f"the tracks matching {text!r}")
    return seeds, vec, np.mean(probs, axis=0), tags


def catalogue(lib, settings, index=None, albums=False) -> search.Catalogue:
    """Candidates' fields and the --filter queries (beets queries on items, or on albums with -a)."""
    from beets.dbcore.query import AndQuery, ParsingError
    from beets.library import Album, Item, parse_query_string

    from .. import library

    model_cls = Album if albums else Item
    queries = []
    for text in settings.filters:
        try:
            with _music_dir(lib):
                queries.append(parse_query_string(text, model_cls)[0])
        except ParsingError as exc:
            raise UserError(f"--filter {text!r}: {exc}") from None
    matches = None
    if queries:
        query = queries[0] if len(queries) == 1 else AndQuery(queries)
        matches = lambda ids: library.matching_ids(lib, query, model_cls, ids)  # noqa: E731
    if not albums:
        return search.Catalogue(lambda ids: library.candidate_fields(lib, ids), matches)

    def album_lookup(ids):
        rows = index.rows_of(ids)
        top = {i: index.genres[int(index.probs[r].argmax())] if r >= 0 and index.genres else ""
               for i, r in zip(ids, rows.tolist())}
        fields = library.album_fields(lib, ids, beets_config["va_name"].as_str())
        return {i: (artist, title, top[i], mbid) for i, (artist, title, mbid) in fields.items()}

    return search.Catalogue(album_lookup, matches)


def _music_dir(lib):
    """The context beets parses path queries in (beets >= 2.12 keeps it per library)."""
    try:
        from beets import context
    except ImportError:
        return contextlib.nullcontext()
    return context.music_dir(lib.directory)


# ---- playlists ----

def album_tracks(album) -> list:
    """An album's tracks in album order (disc, then track number)."""
    return sorted(album.items(), key=lambda i: (i.disc or 0, i.track or 0, i.id))


def write_playlist(plugin, lib, name, m3u8, items) -> None:
    """Write ``items`` as an M3U(8) playlist; a bare file name goes into crnn.playlist_dir."""
    from .. import m3u

    path = os.path.expanduser(name)
    if not os.path.dirname(path):
        path = os.path.join(os.path.expanduser(plugin.config["playlist_dir"].as_str()), path)
    path = os.path.abspath(path)
    relative_to = plugin.config["relative_to"].get()
    if relative_to is None:
        base = None
    elif relative_to == "playlist":
        base = os.path.dirname(path)
    elif relative_to == "library":
        base = os.fsdecode(lib.directory)
    else:
        base = os.path.abspath(os.path.expanduser(str(relative_to)))
    entries = [m3u.Entry(item.path, item.length or None, item.artist, item.title) for item in items]
    with user_errors():
        m3u.write(path, entries, base_dir=base, utf8=m3u.is_m3u8(path, m3u8))
    plugin._log.info("wrote {} tracks to {}", len(entries), path)
