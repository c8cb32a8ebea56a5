"""Teach the network's top that versions of a clip are the clip: ``python research/consistency.py DATA... --out DIR``.

Why: a louder master through a limiter, a low-passed copy or another codec still moves the
model's outputs enough to change the top genre of clips near a genre boundary, and neither
WCCN (which only rescales the embedding) nor refitting the genre head fixes that (both were
measured). This fine-tunes the recurrent top (both GRUs, the projection, the heads) on every
train window as it is, as each codec version and under log-mel edits, with the model itself
on the clean window as the teacher (clean teacher, altered student):

- each row's unit embedding is pulled to the source model's on the clean window, and its
  genre and tag outputs to the source model's there (cross-entropy);
- optionally the labelled genre loss (masked per source, as in training).

The conv layers stay frozen, so their output ("features") is computed once per window and
cached: on a CPU the fine-tune takes minutes rather than the hours of retraining. A WCCN
projection is then refitted on the new embedding (``wccn``). Test splits never reach it.
docs/experiments/2026-12-04-crnn-consistency.rst has what it was measured to do: it was not shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: python research/consistency.py

from beetsplug.crnn.training import dataset, wccn  # noqa: E402
from beetsplug.crnn.errors import CrnnError, command_main  # noqa: E402
from beetsplug.crnn.features import model_input  # noqa: E402
from beetsplug.crnn.model import (ModelCard, build_for, import_tensorflow, l2_normalise,  # noqa: E402
                                  require_tensorflow)

FRONT_END = "to_sequence"  # the last frozen layer: conv stack output as a sequence over time
# The sweep's best for agreement across versions (the experiment's page); the labels overfit the train clips.
DEFAULT_EPOCHS = 30
DEFAULT_LR = 1e-3
DEFAULT_WEIGHTS = {"embedding": 300.0, "clean_genres": 10.0, "tags": 1.0, "genres": 0.0}


class FrontEnd:
    """The source model's frozen layers up to the sequence the GRUs read: log-mel windows -> (k, steps, width)."""

    def __init__(self, model, batch_size=8):
        tf = import_tensorflow()
        import keras

        sub = keras.Model(model.input, model.get_layer(FRONT_END).output)

        @tf.function(reduce_retracing=True)
        def infer(x):
            return sub(x, training=False)

        self._infer, self.batch_size = infer, batch_size

    def __call__(self, mels: np.ndarray) -> np.ndarray:
        x = model_input(mels)[..., None]
        return np.concatenate([self._infer(x[i : i + self.batch_size]).numpy().astype(np.float16)
                               for i in range(0, len(x), self.batch_size)])


def features(data: wccn.Versions, card: ModelCard, model, cache_file=None, log=print):
    """Front-end features of every row of ``data`` (as ``Versions.rows``), from ``cache_file`` when it holds
    the same rows of the same model, else computed and saved there."""
    key = hashlib.sha256(json.dumps({
        "model": card.sha256, "records": [[str(r.path), r.split] for r in data.records],
        "versions": list(data.versions), "edits": list(data.augmenter.edits) if data.augmenter else None,
        "p": data.augmenter.p if data.augmenter else None, "copies": data.copies, "windows": data.n_windows,
        "seed": data.seed}, sort_keys=True).encode()).hexdigest()
    if cache_file and Path(cache_file).is_file():
        with np.load(cache_file) as z:
            if str(z["key"]) == key:
                log(f"front-end features from {cache_file}")
                return z["X"], z["groups"], z["files"]
    X, groups, files = data.rows(FrontEnd(model))
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache_file) + ".tmp.npz")
        np.savez(tmp, X=X, groups=groups, files=files, key=np.array(key))
        tmp.replace(cache_file)
    return X, groups, files


def top_of(model):
    """The source model's layers after the front end, on a sequence input: a model giving (embedding,
    genres[, tags]) and one giving the last GRU's output.

    They are the same layer objects, so training the first trains ``model`` in place.
    """
    import_tensorflow()
    import keras

    seq = model.get_layer(FRONT_END).output
    inp = keras.Input(tuple(seq.shape[1:]), name="sequence")
    x = raw = model.get_layer("gru2")(model.get_layer("gru1")(inp))
    if any(layer.name == "projection" for layer in model.layers):
        x = model.get_layer("projection")(x)
    outputs = [x, model.get_layer("genres")(x)]
    if any(layer.name == "tags" for layer in model.layers):
        outputs.append(model.get_layer("tags")(x))
    return keras.Model(inp, outputs, name="top"), keras.Model(inp, [raw], name="top_raw")


def _predict(model, X, batch=512) -> list:
    outs = []
    for i in range(0, len(X), batch):
        out = model(X[i : i + batch].astype(np.float32), training=False)
        outs.append([o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])])
    return [np.concatenate(z) for z in zip(*outs)]


def labels(records, genres, groups, n_windows):
    """(targets, mask) per row: a row's clip genre(s), counted only over the genres its source labels."""
    from beetsplug.crnn.training.sampling import _hot

    for r in records:
        missing = [g for g in (r.genre, *r.more) if g not in genres]
        if missing:
            raise CrnnError(f"{r.path}: genre {missing[0]!r} is not one of the model's genres")
    sets = dataset.label_sets(records)
    mask = np.array([[g in sets[r.source] for g in genres] for r in records], np.float32)
    clip = groups // n_windows
    return _hot(records, genres)[clip], mask[clip]


class Tuner:
    """Fine-tunes the top of ``model`` in place on front-end features grouped per window (first row: clean)."""

    def __init__(self, model, X, groups, y, mask, weights=None, lr=DEFAULT_LR, batch_groups=32, seed=0, log=print):
        self.top, self.raw = top_of(model)
        self.X, self.groups, self.y, self.mask = X, groups, y, mask
        self.weights = dict(DEFAULT_WEIGHTS, **(weights or {}))
        if set(self.weights) != set(DEFAULT_WEIGHTS):
            raise CrnnError(f"loss weights are {', '.join(DEFAULT_WEIGHTS)}")
        if min(self.weights.values()) < 0 or not any(self.weights.values()):
            raise CrnnError("loss weights are at least 0, and one is more")
        self.lr, self.batch_groups, self.seed, self.log = lr, batch_groups, seed, log
        first = np.unique(groups, return_index=True)[1]
        clean_of = np.searchsorted(groups[first], groups)  # row -> index of its group's clean row among ``first``
        outs = _predict(self.top, X[first])
        self.e0, self.p0 = l2_normalise(outs[0])[clean_of], outs[1][clean_of]
        self.t0 = outs[2][clean_of] if len(outs) > 2 else None

    def targets(self, rows) -> dict:
        out = {"e0": self.e0[rows], "p0": self.p0[rows], "y": self.y[rows], "mask": self.mask[rows]}
        if self.t0 is not None:
            out["t0"] = self.t0[rows]
        return out

    def losses(self, rows=None) -> dict:
        """The mean of each loss over ``rows`` (all by default), with the top as it is now."""
        rows = np.arange(len(self.X)) if rows is None else rows
        return {k: float(v) for k, v in loss_terms(_predict(self.top, self.X[rows]), self.targets(rows)).items()}

    def fit(self, epochs: int) -> list[dict]:
        tf = import_tensorflow()
        import keras

        top, w = self.top, self.weights
        optimizer = keras.optimizers.Adam(self.lr)

        @tf.function(reduce_retracing=True)
        def step(x, targets):
            with tf.GradientTape() as tape:
                terms = loss_terms(top(x, training=True), targets)
                loss = tf.add_n([w[k] * v for k, v in terms.items()])
            grads = tape.gradient(loss, top.trainable_weights)
            optimizer.apply_gradients(zip(grads, top.trainable_weights))

        rng = np.random.default_rng(self.seed)
        uniq, inverse = np.unique(self.groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        history, t = [], time.time()
        for epoch in range(epochs):
            perm = rng.permutation(len(uniq))
            for b in range(0, len(perm), self.batch_groups):
                rows = np.concatenate([order[bounds[g] : bounds[g + 1]] for g in perm[b : b + self.batch_groups]])
                step(self.X[rows].astype(np.float32), self.targets(rows))
            row = dict(epoch=epoch + 1, **{k: round(v, 5) for k, v in self.losses().items()})
            history.append(row)
            self.log(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
                     + f" ({time.time() - t:.0f} s)")
        return history

    def raw_embeddings(self) -> np.ndarray:
        """The last GRU's output for every row (what a WCCN projection is fitted on)."""
        return _predict(self.raw, self.X)[0]


def loss_terms(outs, targets: dict) -> dict:
    """Each loss on one batch of the top's outputs (numpy or tensors alike).

    embedding: squared distance of each row's unit embedding to the source model's on the clean
    window; clean_genres and tags: cross-entropy of the genre and tag outputs to the source
    model's on the clean window; genres: the training loss on the labels, masked per source.
    """
    import keras
    from keras import ops

    from beetsplug.crnn.training.losses import masked_bce

    e = outs[0] / ops.maximum(ops.norm(outs[0], axis=1, keepdims=True), 1e-12)
    terms = {"embedding": ops.mean(ops.sum((e - targets["e0"]) ** 2, axis=1)),
             "clean_genres": ops.mean(keras.losses.binary_crossentropy(targets["p0"], outs[1])),
             "genres": ops.mean(masked_bce(ops.concatenate([targets["y"], targets["mask"]], axis=1), outs[1]))}
    if "t0" in targets:
        terms["tags"] = ops.mean(keras.losses.binary_crossentropy(targets["t0"], outs[2]))
    return terms


def run(args, log=print) -> ModelCard:
    require_tensorflow()  # before any decoding: a plain install cannot train
    card = wccn.source_model(args)
    if args.epochs < 1:
        raise CrnnError("--epochs is at least 1")
    data = wccn.versions_from(args, log, card.front)
    import_tensorflow()
    import keras

    keras.utils.set_random_seed(args.seed)
    model = build_for(card)
    model.load_weights(str(card.weights))
    t = time.time()
    X, groups, _ = features(data, card, model, args.features, log=log)
    y, mask = labels(data.records, card.genres, groups, data.n_windows)
    weights = {"embedding": args.embedding_weight, "clean_genres": args.clean_genre_weight, "tags": args.tag_weight,
               "genres": args.genre_weight}
    tuner = Tuner(model, X, groups, y, mask, weights, args.lr, args.batch_groups, args.seed, log=log)
    start = tuner.losses()
    history = tuner.fit(args.epochs)
    P = wccn.projection(wccn.within_scatter(tuner.raw_embeddings(), groups), args.shrink)
    # the source's own "wccn" record is dropped: the projection is refitted here, on the tuned model
    new = wccn.save_projected(card, model, P, args.out, "consistency", {
        "from": card.model_id,
        "command": " ".join(["python research/consistency.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "data": [str(d) for d in args.data],
        **data.describe(),
        "rows": int(len(X)),
        "groups": int(len(np.unique(groups))),
        "trained": "gru1, gru2, projection and heads; the conv layers are the source model's, frozen",
        "teacher": "the source model on the clean window (unit embedding, genre and tag outputs)",
        "loss_weights": tuner.weights,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_groups": args.batch_groups,
        "losses": {"start": {k: round(v, 5) for k, v in start.items()}, "history": history},
        "wccn": {"shrink": args.shrink, "fitted_on": "the tuned last GRU's output on the same rows; heads folded"},
        "seed": args.seed,
        "minutes": round((time.time() - t) / 60, 1),
    }, log=log, drop=("wccn",))
    log(f"wrote {new.weights} (model id {new.model_id}: {card.model_id} tuned for version consistency)")
    return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="research/consistency.py", description=__doc__.split("\n\n")[0])
    wccn.add_version_arguments(p, "the model to tune (default: the shipped model)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--batch-groups", type=int, default=32, help="windows per batch, each with all its rows")
    p.add_argument("--embedding-weight", type=float, default=DEFAULT_WEIGHTS["embedding"],
                   help="pull of each row's unit embedding to the source model's on the clean window")
    p.add_argument("--clean-genre-weight", type=float, default=DEFAULT_WEIGHTS["clean_genres"],
                   help="pull of the genre outputs to the source model's on the clean window")
    p.add_argument("--tag-weight", type=float, default=DEFAULT_WEIGHTS["tags"],
                   help="pull of the tag outputs to the source model's on the clean window")
    p.add_argument("--genre-weight", type=float, default=DEFAULT_WEIGHTS["genres"],
                   help="the labelled genre loss (masked per source)")
    p.add_argument("--shrink", type=float, default=wccn.DEFAULT_SHRINK, help="the refitted WCCN projection's shrink")
    p.add_argument("--features", default=None,
                   help="npz file caching the front-end features (reused while the model and rows are the same)")
    return p


def main(argv=None) -> int:
    return command_main("research/consistency.py", lambda: build_parser().parse_args(argv), run,
                        "interrupted; no model written")


if __name__ == "__main__":
    sys.exit(main())
