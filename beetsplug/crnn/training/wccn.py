"""Make versions of a clip land together: ``crnn-wccn DATA... --model DIR --out DIR``.

Why: the trained CRNN's embedding still moves a little with the file (the same music louder
into a limiter, low-passed, re-encoded), and in some directions of the 68-d space those moves
are as large as the differences between tracks, so a track's nearest neighbours can be other
tracks rather than its own other copies. Within-class covariance normalisation (WCCN, from
speaker verification) measures how each train window's embedding scatters over its versions
(codec versions and log-mel edits, as training makes them) and divides that scatter out:
the embedding becomes ``h @ P`` with ``P = (S_w + shrink * mean variance * I)^(-1/2)``, a new
linear layer after the last GRU ("projection" in the card's architecture).

The genre and tag heads are folded through ``P^-1``, so every genre and tag output is the
model's own to round-off: only distances between embeddings (similarity, the index) change,
and with them the model id. It takes minutes on a CPU; no layer is trained. Test splits
never reach it.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from . import augment, dataset
from ..audio import DEFAULT_WINDOWS
from ..errors import CrnnError, command_main
from ..model import Embedder, ModelCard, build_for

DEFAULT_EDITS = ("compress", "lowpass", "tilt", "noise")
DEFAULT_COPIES = 2
DEFAULT_SHRINK = 0.1


def within_scatter(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean outer product of each row's deviation from its group's mean (the within-group covariance)."""
    X = np.asarray(X, np.float64)
    groups = np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    means = np.zeros((inverse.max() + 1, X.shape[1]))
    np.add.at(means, inverse, X)
    means /= np.bincount(inverse)[:, None]
    D = X - means[inverse]
    return D.T @ D / len(X)


def projection(scatter: np.ndarray, shrink: float = DEFAULT_SHRINK) -> np.ndarray:
    """``(S_w + shrink * mean(diag S_w) * I)^(-1/2)``, scaled to a mean gain of 1 (trace = d).

    ``shrink`` pulls the map towards the identity: directions no version moves are not blown up
    by the inverse of a variance near zero.
    """
    S = np.asarray(scatter, np.float64)
    d = len(S)
    if shrink < 0:
        raise CrnnError("--shrink is at least 0")
    w, U = np.linalg.eigh(S + shrink * np.trace(S) / d * np.eye(d))
    if w.min() <= 0:
        raise CrnnError("the within-clip scatter is singular: use more clips, versions or --shrink")
    P = U @ np.diag(w ** -0.5) @ U.T
    return P * (d / np.trace(P))


class Versions:
    """Train windows as they are, as each codec version and under log-mel edits, grouped per window."""

    def __init__(self, records, cache_dir, versions=augment.TRAIN_VERSIONS, version_dir=None, edits=DEFAULT_EDITS,
                 copies=DEFAULT_COPIES, edit_p=0.5, splits=("train",), n_windows=DEFAULT_WINDOWS, seed=0, workers=2,
                 log=print, front=None):
        if "test" in splits:
            raise CrnnError("a test split never reaches training: fit on train (and val) only")
        self.records = [r for r in records if r.split in splits]
        self.splits = tuple(splits)
        if not self.records:
            raise CrnnError(f"no records in split(s) {', '.join(splits)}")
        self.cache = dataset.MelCache(cache_dir, front)  # the model's own front end: what crnnembed feeds it
        self.versions, self.version_dir = tuple(versions), version_dir
        self.augmenter = augment.MelAugmenter(edits, edit_p) if edits and copies else None
        self.copies = int(copies) if self.augmenter else 0
        if not self.versions and not self.copies:
            raise CrnnError("nothing to compare a window with: name codec versions or log-mel edits")
        self.n_windows, self.seed, self.workers, self.log = n_windows, seed, workers, log

    def describe(self) -> dict:
        """What the card says about these rows."""
        return {
            "splits": list(self.splits),
            "clips": len(self.records),
            "codec_versions": list(self.versions),
            "log_mel_edits": ({"edits": list(self.augmenter.edits), "p": self.augmenter.p, "copies": self.copies}
                              if self.copies else None),
        }

    def rows(self, embed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(``embed`` of every row, group of each row, file of each row: 0 the clip, i its i-th codec version).

        ``embed`` maps log-mel windows (k, 96, 1366) to one array per window (the raw embedding,
        or the conv features). One group per window of a clip, over its files and copies: group
        ``g`` is window ``g % n_windows`` of record ``g // n_windows``, and its first row is that
        window of the clip itself, unedited.
        """
        self.cache.fill(self.records, workers=self.workers)
        made = (dataset.prepare_versions(self.records, self.versions, self.version_dir, self.cache, self.workers,
                                         self.log) if self.versions else {})
        rng = np.random.default_rng(self.seed)
        X, groups, files, t = [], [], [], time.time()
        for i, r in enumerate(self.records):
            these = [(0, Path(r.path))] + [(1 + self.versions.index(n), Path(p)) for n, p in made.get(r.path, {}).items()]
            for j, f in these:
                windows = self.cache.serving(f, self.n_windows)
                batch = [windows] + [np.stack([self.augmenter(w, rng) for w in windows]) for _ in range(self.copies)]
                X.append(embed(np.concatenate(batch)))
                groups.append(np.tile(i * self.n_windows + np.arange(len(windows)), 1 + self.copies))
                files.append(np.full(len(groups[-1]), j))
            if (i + 1) % 50 == 0 or i + 1 == len(self.records):
                self.log(f"embedded {i + 1} of {len(self.records)} clips ({time.time() - t:.0f} s)")
        return np.concatenate(X), np.concatenate(groups), np.concatenate(files)


def projected(card: ModelCard, old, P: np.ndarray, architecture: dict):
    """``old`` (the card's loaded model) with ``P`` after its last GRU and its heads folded through ``P^-1``
    (same outputs). A projection ``old`` has already is replaced: the heads absorb it first."""
    new = build_for(ModelCard(card.model_id, card.genres, card.weights, card.sha256, architecture, tags=card.tags))
    names = {layer.name for layer in old.layers}
    before = (np.asarray(old.get_layer("projection").get_weights()[0], np.float64) if "projection" in names
              else np.eye(len(P)))
    for layer in old.layers:
        if layer.weights and layer.name != "projection":
            new.get_layer(layer.name).set_weights(layer.get_weights())
    new.get_layer("projection").set_weights([P.astype(np.float32)])
    fold = np.linalg.inv(np.asarray(P, np.float64)) @ before
    k = len(fold)
    for head in ("genres", "tags"):
        if head in names:  # a head reading more than the state (genre_input) has the state in its first k rows
            kernel, bias = new.get_layer(head).get_weights()
            kernel = np.asarray(kernel, np.float64)
            kernel[:k] = fold @ kernel[:k]
            new.get_layer(head).set_weights([kernel.astype(np.float32), bias])
    return new


def save_projected(card: ModelCard, model, P: np.ndarray, out, key: str, record: dict, log=print, drop=()) -> ModelCard:
    """``model`` with ``P`` after its last GRU (``projected``) written as a new model of the card's family,
    hearing through the card's front end. The card's extra is kept, less its metrics (measured on the old
    embedding: ``crnn-eval --update-card`` measures the new one) and the keys in ``drop``; ``record`` says
    how the projection was made, under ``key``."""
    from .card import save_model

    arch = dict(card.architecture, projection="wccn")
    extra = copy.deepcopy(card.extra)
    for k in ("metrics", *drop):
        extra.pop(k, None)
    extra[key] = record
    return save_model(projected(card, model, P, arch), out, card.genres, arch, extra, name=family_name(card),
                      tags=card.tags, log=log, features=card.features)


def family_name(card: ModelCard) -> str:
    """The ``--name`` the card's model was trained under ("crnn-emotify-gtzan"): the new model keeps it.

    Cards written before the name was recorded give it back from the model id, less its hash.
    """
    if card.extra.get("name"):
        return str(card.extra["name"])
    head, _, tail = card.model_id.rpartition("-")
    return head if head and len(tail) == 10 and all(c in "0123456789abcdef" for c in tail) else card.model_id


def source_model(args) -> ModelCard:
    """The card of ``--model``, checked, for a command that writes a new model into ``--out``."""
    card = ModelCard.load(args.model)
    card.verify()
    if Path(args.out).resolve() == card.weights.parent.resolve():
        raise CrnnError("--out must be another folder than the model's own (the result is a new model)")
    return card


def versions_from(args, log=print, front=None) -> Versions:
    """The rows that ``add_version_arguments``'s options name, as ``front`` (the model's front end) hears them."""
    from .train import _names

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    versions = _names(args.versions, list(augment.CODEC_VERSIONS), augment.TRAIN_VERSIONS, what="codec version")
    edits = _names(args.augment, augment.MEL_EDITS, DEFAULT_EDITS, what="augmentation")
    return Versions(dataset.read_sources(args.data), args.cache, versions, args.version_cache, edits, args.copies,
                    args.augment_p, splits, args.windows, args.seed, log=log, front=front)


def run(args, log=print) -> ModelCard:
    card = source_model(args)
    if card.architecture.get("projection"):
        raise CrnnError(f"model {card.model_id} has a projection already: fit one on the model it was made from")
    data = versions_from(args, log, card.front)
    embedder = Embedder(card)
    t = time.time()
    X, groups, _ = data.rows(embedder.raw_embeddings)
    P = projection(within_scatter(X, groups), args.shrink)
    new = save_projected(card, embedder.model, P, args.out, "wccn", {
        "from": card.model_id,
        "command": " ".join(["python -m beetsplug.crnn.training.wccn"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "data": [str(d) for d in args.data],
        **data.describe(),
        "rows": int(len(X)),
        "groups": int(len(np.unique(groups))),
        "shrink": args.shrink,
        "heads": "folded through the inverse projection: genre and tag outputs unchanged",
        "seed": args.seed,
        "minutes": round((time.time() - t) / 60, 1),
    }, log=log)
    log(f"wrote {new.weights} (model id {new.model_id}: {card.model_id} with a WCCN projection)")
    return new


def add_version_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    """The options naming a source model, a folder for the new one, and the rows (``Versions``) it is made from."""
    p.add_argument("data", nargs="+", help="labelled sets (manifest CSV or folder) whose train split is used")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--out", required=True, help="folder for the new model")
    p.add_argument("--splits", default="train", help="comma-separated splits to use (never test)")
    p.add_argument("--versions", default="default",
                   help=f"codec versions of each clip ({', '.join(augment.CODEC_VERSIONS)}; default: "
                        f"{', '.join(augment.TRAIN_VERSIONS)}; none: '')")
    p.add_argument("--augment", default="default",
                   help=f"log-mel edits ({', '.join(augment.MEL_EDITS)}; default: {', '.join(DEFAULT_EDITS)}; none: '')")
    p.add_argument("--augment-p", type=float, default=0.5, help="probability of each log-mel edit per copy")
    p.add_argument("--copies", type=int, default=DEFAULT_COPIES, help="edited copies of each file's windows")
    p.add_argument("--cache", default=str(dataset.DEFAULT_CACHE), help="log-mel cache folder")
    p.add_argument("--version-cache", default=str(augment.DEFAULT_VERSION_DIR), help="folder for codec versions")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="windows per clip, as crnnembed analyses")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crnn-wccn", description=__doc__.split("\n\n")[0])
    add_version_arguments(p, "the model to project (default: the shipped model)")
    p.add_argument("--shrink", type=float, default=DEFAULT_SHRINK,
                   help="pull towards the identity, as a share of the mean within-clip variance")
    return p


def main(argv=None) -> int:
    # the model is written only at the end: nothing half-written is left
    return command_main("crnn-wccn", lambda: build_parser().parse_args(argv), run, "interrupted; no model written")


if __name__ == "__main__":
    sys.exit(main())
