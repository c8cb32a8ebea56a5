"""Evaluate a CRNN like the paper: per-genre tables on a test split, and the recommender's precision@5.

    python -m beetsplug.crnn.evaluate ../shared/data/emotify --json eval.json

Clips are analysed exactly as ``crnnembed`` analyses tracks (same windows, same pooling).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import dataset
from .audio import DEFAULT_WINDOWS
from .errors import CrnnError
from .model import Embedder, ModelCard, pool_track
from .rank import DEFAULT_GENRE_WEIGHT


def embed_records(records, embedder, cache, n_windows=DEFAULT_WINDOWS):
    """(unit embeddings, genre probabilities) per record, analysed as crnnembed would."""
    embs, probs = [], []
    for r in records:
        mel, n = cache.get(r.path)
        e, p = embedder(dataset.serving_windows(mel, n, n_windows))
        e, p = pool_track(e, p)
        embs.append(e)
        probs.append(p)
    return np.array(embs), np.array(probs)


def evaluate(records, card: ModelCard, cache_dir=Path(".cache") / "mels", split="test",
             n_windows=DEFAULT_WINDOWS, k=5, genre_weight=DEFAULT_GENRE_WEIGHT) -> dict:
    from .metrics import classification_report, precision_at_k

    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise CrnnError(f"no records in split {split!r}")
    unknown = {r.genre for r in chosen} - set(card.genres)
    if unknown:
        raise CrnnError(f"split {split!r} has genres the model does not know: {', '.join(sorted(unknown))}")
    embedder = Embedder(card)
    cache = dataset.MelCache(cache_dir)
    embs, probs = embed_records(chosen, embedder, cache, n_windows)
    y = np.array([card.genres.index(r.genre) for r in chosen])
    report = classification_report(y, probs, card.genres)
    genres = [r.genre for r in chosen]
    artists = [r.artist or str(r.path) for r in chosen]
    report["precision_at_k"] = {
        "k": k,
        "cosine": precision_at_k(embs, probs, genres, artists, k=k, mode="cosine"),
        "genre": precision_at_k(embs, probs, genres, artists, k=k, mode="genre", genre_weight=genre_weight),
        "genre_weight": genre_weight,
    }
    report.update({"split": split, "clips": len(chosen), "model_id": card.model_id, "windows": n_windows})
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crnn-eval", description="Evaluate a beets-crnn model on a labelled split.")
    p.add_argument("data", help="manifest CSV or folder of genre/ subfolders")
    p.add_argument("--model", default=None, help="model folder or card (default: the shipped model)")
    p.add_argument("--split", default="test")
    p.add_argument("--cache", default=str(Path(".cache") / "mels"), help="log-mel cache folder")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS)
    p.add_argument("--k", type=int, default=5, help="neighbours for precision@k")
    p.add_argument("--genre-weight", type=float, default=DEFAULT_GENRE_WEIGHT)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--update-card", action="store_true", help="record the metrics in the model card")
    return p


def run(args) -> str:
    from .metrics import format_report

    card = ModelCard.load(args.model)
    report = evaluate(dataset.read_records(args.data), card, args.cache, args.split, args.windows, args.k,
                      args.genre_weight)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    if args.update_card:
        card.extra.setdefault("metrics", {})[args.split] = report
        card.save(card.weights.parent / "crnn.json")
    pk = report["precision_at_k"]
    return format_report(report, {"cosine": pk["cosine"], "genre": pk["genre"], "k": pk["k"]})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except CrnnError as exc:
        print(f"crnn-eval: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
