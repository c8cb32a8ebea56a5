"""Evaluate a CRNN like the paper: per-genre tables on a test split, and the recommender's precision@5.

    python -m beetsplug.crnn.training.evaluate ../shared/data/emotify ../shared/data/gtzan --robustness

Clips are analysed exactly as ``crnnembed`` analyses tracks (same windows, same pooling).
Each labelled set is scored on its own, over the genres it labels that the model knows
(a GTZAN clip cannot be right or wrong as "electronic"); a set the model was not trained
on is marked out of domain. ``--robustness`` adds the codec/level report (``robustness``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import dataset
from ..audio import DEFAULT_WINDOWS
from ..errors import CrnnError, command_main
from ..model import ModelCard, embedder_for, pool_track
from ..rank import DEFAULT_GENRE_WEIGHT


def embed_records(records, embedder, cache, n_windows=DEFAULT_WINDOWS):
    """(unit embeddings, genre probabilities) per record, analysed as crnnembed would."""
    embs, probs = [], []
    for r in records:
        e, p = embedder(cache.serving(r.path, n_windows))
        e, p = pool_track(e, p)
        embs.append(e)
        probs.append(p)
    return np.array(embs), np.array(probs)


def training_sources(card: ModelCard) -> set:
    """Names of the labelled sets a model was trained on, from its card (older cards name one data path)."""
    training = card.extra.get("training", {}) or {}
    if isinstance(training.get("sources"), dict):
        return set(training["sources"])
    data = training.get("data")
    paths = data if isinstance(data, list) else [data] if data else []
    return {Path(str(p)).name if Path(str(p)).suffix.lower() != ".csv" else Path(str(p)).parent.name for p in paths}


def evaluate(records, card: ModelCard, cache_dir=dataset.DEFAULT_CACHE, split="test",
             n_windows=DEFAULT_WINDOWS, k=5, genre_weight=DEFAULT_GENRE_WEIGHT, embedder=None) -> dict:
    """The paper's tables and precision@k for one labelled set's split.

    Genres the model does not know are left out (counted in the report); the top genre is
    taken among the set's genres that the model knows.
    """
    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise CrnnError(f"no records in split {split!r}")
    set_genres = sorted({r.genre for r in records})
    shared = [g for g in card.genres if g in set_genres]
    if not shared:
        raise CrnnError(f"split {split!r} has no genre the model knows (it knows {', '.join(card.genres)})")
    unknown = sorted({r.genre for r in chosen} - set(card.genres))
    scored = [r for r in chosen if r.genre in shared]
    embedder = embedder or embedder_for(card, precision="float32")
    cache = dataset.MelCache(cache_dir, card.front)
    embs, probs = embed_records(scored, embedder, cache, n_windows)
    report = genre_tables(scored, probs, card.genres, shared)
    report["precision_at_k"] = neighbour_precision(scored, embs, probs, k, genre_weight)
    source = scored[0].source if scored else ""
    report.update({"split": split, "clips": len(scored), "model_id": card.model_id, "windows": n_windows,
                   "source": source, "in_training": source in training_sources(card) if source else None,
                   "genres_scored": shared, "left_out": {"genres": unknown, "clips": len(chosen) - len(scored)}})
    return report


def genre_tables(records, probs, model_genres, shared) -> dict:
    """The paper's tables for the records of the ``shared`` genres: each one's top genre among those."""
    from .metrics import classification_report

    idx = [i for i, r in enumerate(records) if r.genre in shared]
    cols = [model_genres.index(g) for g in shared]
    return classification_report(np.array([shared.index(records[i].genre) for i in idx]), probs[idx][:, cols], shared)


def neighbour_precision(records, embs, probs, k=5, genre_weight=DEFAULT_GENRE_WEIGHT) -> dict:
    """The recommender's precision@k over ``records``, cosine and genre-aware: neighbours by other artists only."""
    from .metrics import precision_at_k

    genres = [r.genre for r in records]
    artists = [r.artist or str(r.path) for r in records]
    return {
        "k": k,
        "cosine": precision_at_k(embs, probs, genres, artists, k=k, mode="cosine"),
        "genre": precision_at_k(embs, probs, genres, artists, k=k, mode="genre", genre_weight=genre_weight),
        "genre_weight": genre_weight,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crnn-eval", description="Evaluate a beets-crnn model on labelled splits.")
    p.add_argument("data", nargs="+", help="one or more labelled sets (manifest CSV or folder); each is scored on its own")
    return add_options(p)


def add_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options (all but the data): `beet crnneval` has the same ones for both its forms."""
    p.add_argument("--model", default=None, help="model folder or card (default: the shipped model)")
    p.add_argument("--split", default="test", help="the split to score (default: test)")
    p.add_argument("--cache", default=str(dataset.DEFAULT_CACHE), help="log-mel cache folder")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="analysis windows per track")
    p.add_argument("--k", type=int, default=5, help="neighbours for precision@k")
    p.add_argument("--genre-weight", type=float, default=DEFAULT_GENRE_WEIGHT)
    p.add_argument("--json", default=None, help="also write the report here")
    g = p.add_argument_group("robustness and the model card (labelled data only)")
    g.add_argument("--robustness", action="store_true",
                   help="also make codec/level versions of the split's clips with ffmpeg and report how far they move")
    g.add_argument("--clips-per-genre", type=int, default=None,
                   help="robustness on the first N clips of each genre only (default: all)")
    g.add_argument("--version-cache", default=None,
                   help="keep the robustness versions in this folder (default: a temporary folder, removed after)")
    g.add_argument("--update-card", action="store_true",
                   help="record the metrics in the card of the --model (needs --model: never the shipped card)")
    return p


def run(args, log=None) -> str:
    from .metrics import format_report

    log = log or (lambda m: print(m, file=sys.stderr))
    args.cache = args.cache or str(dataset.DEFAULT_CACHE)  # `beet crnneval DATA` leaves these to us
    args.windows = args.windows or DEFAULT_WINDOWS
    if args.update_card and not args.model:  # the shipped card is the release's record, not a scratch pad
        raise CrnnError("--update-card writes into the model's card: name the model with --model DIR")
    card = ModelCard.load(args.model)
    embedder = embedder_for(card, precision="float32")  # the ONNX export when the card has one, as crnnembed
    reports, out = {}, []
    for data in args.data:
        records = dataset.read_records(data)
        report = evaluate(records, card, args.cache, args.split, args.windows, args.k, args.genre_weight, embedder)
        name = report["source"] or str(data)
        domain = "in training" if report["in_training"] else "OUT OF DOMAIN (not in the model's training data)"
        out.append(f"== {name}, {args.split} split: {report['clips']} clips, {domain} ==")
        if report["left_out"]["clips"]:
            out.append(f"left out: {report['left_out']['clips']} clips of genres the model does not know "
                       f"({', '.join(report['left_out']['genres'])})")
        pk = report["precision_at_k"]
        out.append(format_report(report, {"cosine": pk["cosine"], "genre": pk["genre"], "k": pk["k"]}))
        if args.robustness:
            from .robustness import format_robustness, pick_clips, robustness

            chosen = pick_clips([r for r in records if r.split == args.split and r.genre in card.genres],
                                args.clips_per_genre)
            cols = [card.genres.index(g) for g in report["genres_scored"]]
            report["robustness"] = robustness(chosen, embedder, version_dir=args.version_cache,
                                              n_windows=args.windows, log=log, genre_columns=cols)
            out.append(format_robustness(report["robustness"]))
        reports[name] = report
        out.append("")
    result = reports if len(reports) > 1 else next(iter(reports.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    if args.update_card:
        metrics = card.extra.setdefault("metrics", {})
        for name, report in reports.items():  # metrics[split][set name]
            metrics.setdefault(args.split, {})[name] = report
        card.save(card.weights.parent / "crnn.json")
    return "\n".join(out).rstrip()


def main(argv=None) -> int:
    return command_main("crnn-eval", lambda: build_parser().parse_args(argv), lambda args: print(run(args)))


if __name__ == "__main__":
    sys.exit(main())
