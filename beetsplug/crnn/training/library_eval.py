"""``beet crnneval QUERY``: models side by side on the library's held-out artists, scored as ``evaluate`` scores.

A model trained on the library is measured on the tracks by artists it neither trained nor
validated on (its card keeps the split); any other model on every track with a genre it knows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import audio
from ..errors import CrnnError
from . import dataset
from .excerpts import ExcerptCache, decode
from .metrics import format_score
from .taxonomy import SOURCE, GenreNames, genre_key, split_genres, split_key


def serving_cache(cache, card):
    """``cache`` where it holds what ``card``'s front end hears (the level-free log-mels); for another family's
    front end (the MSD CRNN's), a log-mel cache of that front end beside it."""
    from ..features import LEVEL_FREE

    if card.front is LEVEL_FREE or getattr(cache, "front", None) is card.front:
        return cache
    return front_cache(cache.folder, card.front)


def front_cache(cache_dir, front):
    """The log-mel cache of ``front``'s serving windows, beside the library's excerpt cache ``cache_dir``."""
    return dataset.MelCache(Path(cache_dir).parent / f"{front.name}-mels", front)


def score(records, card, cache, n_windows, k=5, genre_weight=None, embedder=None) -> dict:
    """``evaluate``'s tables over the genres the model knows, and its precision@k over all ``records``.

    A track with several genres counts under its first (the one it is listed under).
    """
    from ..model import embedder_for
    from ..rank import DEFAULT_GENRE_WEIGHT
    from .evaluate import embed_records, genre_tables, neighbour_precision

    genre_weight = DEFAULT_GENRE_WEIGHT if genre_weight is None else genre_weight
    embedder = embedder or embedder_for(card, precision="float32")
    embs, probs = embed_records(records, embedder, serving_cache(cache, card), n_windows)
    present = sorted({r.genre for r in records})
    shared = [g for g in card.genres if g in present]
    if shared:
        report = genre_tables(records, probs, card.genres, shared)
    else:
        report = {"labels": [], "n": 0, "per_genre": {}, "macro": {}, "accuracy": float("nan"), "confusion": []}
    report["precision_at_k"] = neighbour_precision(records, embs, probs, k, genre_weight)
    report.update({"model_id": card.model_id, "tracks": len(records), "windows": n_windows,
                   "artists": len({r.artist for r in records}), "genres_scored": shared,
                   "genres_unknown": [g for g in present if g not in shared]})
    return report


def held_out_line(test: dict) -> str:
    """One line of a trained model's scores on its held-out test artists."""
    pk = test["precision_at_k"]
    return (f"held-out test artists ({test['tracks']} tracks): top-1 accuracy {test['accuracy']:.3f}, "
            f"macro F1 {test['macro']['f1']:.3f}, precision@{pk['k']} {format_score(pk['cosine'])} cosine / "
            f"{format_score(pk['genre'])} genre-aware")


def library_info(card) -> dict | None:
    return (card.extra.get("training") or {}).get("library")


def held_out(tracks, card, split="test", aliases=None) -> tuple[list, str]:
    """The records to evaluate ``card`` on, and a line saying which they are.

    For a model trained on a library: its taxonomy, and for ``test`` the tracks by artists it neither
    trained nor validated on (``val``: its validation artists). Any other model: all tracks with a
    genre it knows.
    """
    info = library_info(card)
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
        a = split_key(t)
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
            cells.append(f"{v:>{c}}" if isinstance(v, str) else f"{format_score(v):>{c}}")
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

    if args.split not in ("test", "val"):
        raise CrnnError(f"--split on a library is test or val, not {args.split!r}")
    n_windows = args.windows or windows
    records, what = held_out(tracks, card, args.split, aliases)
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
            out.append(f"precision@{pk['k']} cosine: {format_score(pk['cosine'])} / genre-aware: {format_score(pk['genre'])}")
    result = {"split": args.split, "tracks": len(records), "artists": n_artists, "which": what,
              "models": {name: r for name, r in reports}, "failed": failed}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n", "utf-8")
    return "\n".join(out), result

