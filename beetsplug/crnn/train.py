"""Train the CRNN on labelled audio and write weights + model card.

    python -m beetsplug.crnn.train ../shared/data/emotify --out model_weights

The recipe is the paper's (Adam 0.001/0.9/0.999, sigmoid outputs, binary cross-entropy)
plus what a few hundred clips need: random hop-aligned crops, class-balanced epochs,
optional mixup, learning-rate halving on plateau and early stopping on the val split.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from . import dataset
from .audio import DEFAULT_WINDOWS
from .errors import CrnnError, ModelError
from .model import CARD_NAME, DEFAULT_ARCHITECTURE, WEIGHTS_NAME, ModelCard, build, import_tensorflow, sha256_of

DEFAULT_CACHE = Path(".cache") / "mels"


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _one_hot(idx, n) -> np.ndarray:
    out = np.zeros((len(idx), n), np.float32)
    out[np.arange(len(idx)), idx] = 1
    return out


class Trainer:
    """Holds the data (cached log-mels) and the Keras model for one training run."""

    def __init__(self, records, cache_dir=DEFAULT_CACHE, genres=None, n_windows=DEFAULT_WINDOWS, log=print, workers=2):
        self.log = log
        self.n_windows = n_windows
        self.train_records = [r for r in records if r.split == "train"]
        self.val_records = [r for r in records if r.split == "val"]
        if not self.train_records:
            raise CrnnError("no training records (split 'train')")
        self.genres = list(genres or dataset.genres_of(self.train_records))
        unknown = {r.genre for r in self.train_records + self.val_records} - set(self.genres)
        if unknown:
            raise CrnnError(f"records have genres the model does not know: {', '.join(sorted(unknown))}")
        self.cache = dataset.MelCache(cache_dir)
        t = time.time()
        self.cache.fill(self.train_records + self.val_records, workers=workers)
        self.log(f"log-mels ready for {len(self.train_records)} train + {len(self.val_records)} val clips in {time.time() - t:.0f} s")
        self.train_mels = [self.cache.get(r.path)[0] for r in self.train_records]
        self.train_y = np.array([self.genres.index(r.genre) for r in self.train_records])
        self.val_windows = [dataset.serving_windows(*self.cache.get(r.path), n_windows) for r in self.val_records]
        self.val_y = np.array([self.genres.index(r.genre) for r in self.val_records])

    def epoch_data(self, rng, crops_per_clip, mixup, masking=False, shift=0):
        """Class-balanced random crops (with band shifts, masking and mixup when asked) for one epoch."""
        n = crops_per_clip * len(self.train_mels)
        per_class = int(np.ceil(n / len(self.genres)))
        picks = []
        for c in range(len(self.genres)):
            members = np.flatnonzero(self.train_y == c)
            if len(members):
                picks.append(rng.choice(members, per_class, replace=len(members) < per_class))
        picks = rng.permutation(np.concatenate(picks))
        crops = (dataset.random_crop(self.train_mels[i], rng) for i in picks)
        if shift:
            crops = (dataset.shift_bands(c, rng, shift) for c in crops)
        if masking:
            crops = (dataset.mask_bands(c, rng) for c in crops)
        x = np.stack(list(crops))[..., None]
        y = _one_hot(self.train_y[picks], len(self.genres))
        if mixup > 0:
            lam = rng.beta(mixup, mixup, size=len(x)).astype(np.float32)
            lam = np.maximum(lam, 1 - lam)  # the first clip dominates, so its crop stays the 'real' one
            other = rng.permutation(len(x))
            x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[other]
            y = lam[:, None] * y + (1 - lam[:, None]) * y[other]
        return x.astype(np.float32), y

    def recalibrate(self, model, rng, n_crops=192, batch_size=16) -> None:
        """Replace batch-norm running statistics by their exact average over training crops.

        The running averages (momentum 0.99) trail weights that moved quickly at lr 1e-3
        over only a few dozen steps an epoch, which made inference noisy; a forward pass
        over fresh crops with a cumulative average gives the statistics of the final weights.
        """
        from keras import layers

        bns = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
        saved = [bn.momentum for bn in bns]
        x, _ = self.epoch_data(rng, 1, 0.0)
        x = x[:n_crops]
        try:
            for k, i in enumerate(range(0, len(x), batch_size)):
                for bn in bns:
                    bn.momentum = k / (k + 1)  # running value becomes the mean over batches so far
                model(x[i : i + batch_size], training=True)
        finally:
            for bn, m in zip(bns, saved):
                bn.momentum = m

    def predict_clips(self, model, windows_per_clip) -> np.ndarray:
        """Mean genre probabilities per clip over its serving windows."""
        flat = np.concatenate(windows_per_clip)[..., None]
        probs = model.predict(flat, batch_size=16, verbose=0)
        if isinstance(probs, (list, tuple)):
            probs = probs[-1]
        out, i = [], 0
        for w in windows_per_clip:
            out.append(probs[i : i + len(w)].mean(axis=0))
            i += len(w)
        return np.array(out)

    def fit(self, epochs=40, patience=8, crops_per_clip=2, batch_size=16, mixup=0.0, lr=1e-3, seed=0,
            architecture=None, init_from=None, max_minutes=None, max_steps=None, recalibrate=True, masking=False,
            shift=0, average=1, weight_decay=0.0):
        import_tensorflow()
        import keras

        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        arch = dict(DEFAULT_ARCHITECTURE, **(architecture or {}))
        card = None
        if init_from is not None:
            card = ModelCard.load(init_from)
            card.verify()
            if card.genres != self.genres:
                raise ModelError(f"--init-from model knows {card.genres}, the data has {self.genres}")
            ignored = sorted(k for k, v in (architecture or {}).items() if card.architecture.get(k) != v)
            if ignored:
                self.log(f"--init-from keeps the starting model's {', '.join(ignored)}")
            arch = dict(card.architecture)  # fine-tuning keeps the starting model's shape
        full = build(len(self.genres), arch["conv_filters"], arch["gru_units"], arch["dropout"])
        if card is not None:
            try:
                full.load_weights(str(card.weights))
            except Exception as exc:
                raise ModelError(f"cannot start from {card.weights}: {exc}") from None
        net = keras.Model(full.input, full.outputs[1])
        # weight_decay is Keras' decoupled decay (AdamW's: each step scales weights by 1 - lr * decay);
        # None keeps plain Adam, as in the paper. Batch-norm scales and biases are not decayed.
        optimizer = {"name": "adam", "lr": lr, "beta_1": 0.9, "beta_2": 0.999,
                     **({"weight_decay": weight_decay} if weight_decay else {})}
        adam = keras.optimizers.Adam(lr, beta_1=optimizer["beta_1"], beta_2=optimizer["beta_2"],
                                     weight_decay=weight_decay or None)
        if weight_decay:
            adam.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        net.compile(optimizer=adam, loss="binary_crossentropy")
        keep = max(average, 1)
        kept = []  # (score, epoch, weights) of the `keep` best epochs, best first
        history, stale, start = [], 0, time.time()
        val_onehot = _one_hot(self.val_y, len(self.genres))
        for epoch in range(1, epochs + 1):
            x, y = self.epoch_data(rng, crops_per_clip, mixup, masking, shift)
            if max_steps is not None:
                x, y = x[: max_steps * batch_size], y[: max_steps * batch_size]
            h = net.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
            row = {"epoch": epoch, "loss": float(h.history["loss"][-1]), "lr": float(net.optimizer.learning_rate.numpy())}
            if recalibrate:  # the weights kept as 'best' carry statistics that match them
                self.recalibrate(net, rng)
            if self.val_windows:
                p = self.predict_clips(net, self.val_windows)
                row["val_loss"] = _bce(val_onehot, p)
                row["val_acc"] = float(np.mean(p.argmax(1) == self.val_y))
                score = row["val_loss"]
            else:
                score = row["loss"]
            row["minutes"] = round((time.time() - start) / 60, 2)
            history.append(row)
            self.log(json.dumps(row))
            improved = not kept or score < kept[0][0]
            if len(kept) < keep or score < kept[-1][0]:
                kept = sorted(kept + [(score, epoch, net.get_weights())], key=lambda k: k[0])[:keep]
            if improved:
                stale = 0
            else:
                stale += 1
                if stale % 3 == 0:  # plateau: halve the learning rate
                    net.optimizer.learning_rate.assign(row["lr"] / 2)
                if stale >= patience:
                    self.log(f"early stop: no val improvement for {patience} epochs")
                    break
            if max_minutes is not None and (time.time() - start) / 60 > max_minutes:
                self.log(f"time limit of {max_minutes} minutes reached")
                break
        net.set_weights(kept[0][2])
        info = {"optimizer": optimizer, "best_epoch": kept[0][1], "epochs_run": len(history), "history": history}
        if len(kept) > 1 and self.val_windows:
            info["averaging"] = self._try_average(net, kept, rng, val_onehot, recalibrate)
        info["minutes"] = round((time.time() - start) / 60, 1)
        return full, arch, info

    def _try_average(self, net, kept, rng, val_onehot, recalibrate) -> dict:
        """Average the weights of the best epochs; keep the average only if val says it is better.

        Averaging nearby points of one training run lands in a flatter spot than any of them,
        which generalises better on small data; val decides, so it cannot make things worse there.
        """
        net.set_weights([np.mean(layer, axis=0) for layer in zip(*(w for _, _, w in kept))])
        if recalibrate:
            self.recalibrate(net, rng)
        p = self.predict_clips(net, self.val_windows)
        report = {"epochs": [e for _, e, _ in kept], "val_loss": _bce(val_onehot, p),
                  "val_acc": float(np.mean(p.argmax(1) == self.val_y)), "best_single_val_loss": float(kept[0][0])}
        report["used"] = report["val_loss"] < kept[0][0]
        self.log(json.dumps({"averaging": report}))
        if not report["used"]:
            net.set_weights(kept[0][2])
        return report


def save_model(full_model, out_dir, genres, arch, extra, name="crnn") -> ModelCard:
    """Write weights, then the card naming their sha256 (the card is written last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    tmp = out_dir / ("tmp-" + WEIGHTS_NAME)
    full_model.save_weights(str(tmp))
    tmp.replace(weights)
    sha = sha256_of(weights)
    card = ModelCard(model_id=f"{name}-{sha[:10]}", genres=list(genres), weights=weights, sha256=sha,
                     architecture=dict(arch), extra=extra)
    card.save(out_dir / CARD_NAME)
    return card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crnn-train", description="Train the beets-crnn CRNN on labelled audio.")
    p.add_argument("data", help="manifest CSV (path, genre, split, artist) or a folder of genre/ subfolders")
    p.add_argument("--out", default="model_weights", help="folder for crnn.weights.h5 and crnn.json")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="log-mel cache folder")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--crops", type=int, default=2, help="random crops per training clip per epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--masking", action="store_true",
                   help="mask random mel bands and time spans of each crop (SpecAugment-style)")
    p.add_argument("--shift", type=int, default=0, help="shift crops by up to this many mel bands (0 = off)")
    p.add_argument("--average", type=int, default=1,
                   help="average the weights of this many best epochs; kept if val loss improves (1 = off)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay as in AdamW, scaled by the learning rate (0 = plain Adam)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="windows per clip when validating")
    p.add_argument("--conv-filters", default=None, help="comma-separated widths of the 4 conv layers")
    p.add_argument("--gru-units", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None,
                   help=f"dropout after each conv block (default {DEFAULT_ARCHITECTURE['dropout']})")
    p.add_argument("--init-from", default=None, help="fine-tune from this model folder or card")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long (best weights kept)")
    p.add_argument("--max-steps", type=int, default=None, help="batches per epoch at most (smoke tests)")
    p.add_argument("--no-recalibrate", action="store_true",
                   help="keep Keras' running batch-norm statistics instead of recomputing them each epoch")
    p.add_argument("--name", default="crnn", help="prefix of the model id")
    return p


def run(args, log=print) -> ModelCard:
    records = dataset.read_records(args.data)
    trainer = Trainer(records, args.cache, n_windows=args.windows, log=log)
    arch = {}
    if args.conv_filters:
        arch["conv_filters"] = [int(v) for v in args.conv_filters.split(",")]
    if args.gru_units:
        arch["gru_units"] = args.gru_units
    if args.dropout is not None:
        arch["dropout"] = args.dropout
    full, arch, info = trainer.fit(epochs=args.epochs, patience=args.patience, crops_per_clip=args.crops,
                                   batch_size=args.batch_size, mixup=args.mixup, lr=args.lr, seed=args.seed,
                                   architecture=arch, init_from=args.init_from, max_minutes=args.max_minutes,
                                   max_steps=args.max_steps, recalibrate=not args.no_recalibrate,
                                   masking=args.masking, shift=args.shift, average=args.average,
                                   weight_decay=args.weight_decay)
    extra = {
        "training": {
            "data": str(args.data),
            "clips": {"train": len(trainer.train_records), "val": len(trainer.val_records)},
            "command": getattr(args, "command", None) or " ".join(["python -m beetsplug.crnn.train"] + [shlex.quote(a) for a in sys.argv[1:]]),
            "optimizer": info["optimizer"],
            "loss": "binary_crossentropy",
            "crops_per_clip": args.crops, "batch_size": args.batch_size, "mixup": args.mixup, "masking": args.masking,
            "shift": args.shift, "average": args.average,
            "seed": args.seed,
            "batchnorm_recalibrated": not args.no_recalibrate, "init_from": args.init_from,
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"], "minutes": info["minutes"],
            "history": info["history"],
            **({"averaging": info["averaging"]} if "averaging" in info else {}),
        },
    }
    card = save_model(full, args.out, trainer.genres, arch, extra, name=args.name)
    log(f"wrote {card.weights} and {Path(args.out) / CARD_NAME} (model id {card.model_id})")
    return card


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CrnnError as exc:
        print(f"crnn-train: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
