"""The fit loop: the Keras model built (or started from a model), trained epoch by epoch on ``TrainingData``.

Validation per epoch on the val clips' serving windows, learning-rate halving on plateaus or a
cosine anneal, early stopping, a time limit, batch-norm statistics recomputed each epoch, and
the average of the best epochs kept where val says it is better.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from .. import model as model_mod
from ..audio import WINDOW_FRAMES
from ..errors import CrnnError, ModelError
from ..features import model_input
from ..model import DEFAULT_ARCHITECTURE, ModelCard, build
from .losses import _bce, _masked_argmax, masked_bce, pair_loss, teacher_emb_loss
from .sampling import TrainingData, check_short_crops, length_batches


class Trainer(TrainingData):
    """Trains the CRNN on its ``TrainingData``: ``fit`` returns the best model with what happened."""

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
        flat = model_input(np.concatenate(windows_per_clip))[..., None]
        probs = model.predict(flat, batch_size=16, verbose=0)
        if isinstance(probs, dict):
            probs = probs["genres"]
        elif isinstance(probs, (list, tuple)):
            probs = probs[1] if len(probs) > 2 else probs[-1]
        out, i = [], 0
        for w in windows_per_clip:
            out.append(probs[i : i + len(w)].mean(axis=0))
            i += len(w)
        return np.array(out)

    def fit(self, epochs=40, patience=8, crops_per_clip=2, batch_size=16, mixup=0.0, lr=1e-3, seed=0,
            architecture=None, init_from=None, max_minutes=None, max_steps=None, recalibrate=True, masking=False,
            shift=0, average=1, weight_decay=0.0, augmenter=None, version_p=0.0, teacher_target="both",
            teacher_weight=1.0, new_head=False, on_epoch=None, callbacks=(), pair_weight=0.0, anneal=0.0,
            short_frames=0, short_share=1.0):
        """Train; returns (the Keras model with the best epoch's weights, architecture, info).

        ``init_from`` starts from a model's weights; with ``new_head`` that model may know other
        genres: every layer but its genre output (and a tag head that differs) is taken, and the
        genre output starts afresh for this data's genres. ``on_epoch(row)`` replaces the JSON log
        line per epoch; ``callbacks`` are Keras callbacks for each epoch's ``fit``. Ctrl-C ends
        training like the time limit does: the best epoch so far is returned (``info["stopped"]``).
        ``anneal`` is the last fraction of the budget (``max_minutes``, else ``epochs``) in which the
        learning rate falls to a tenth (see ``annealed_lr``). ``short_frames`` trains clips that fit in
        that many frames on crops of that length (see ``crop_lengths``), in batches of one length each;
        ``short_share`` is the share of such crops that are short, the rest whole windows.
        """
        model_mod.import_tensorflow()
        import keras

        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        arch = dict(DEFAULT_ARCHITECTURE, **(architecture or {}))
        n_tags = len(self.tag_names) if self.teacher is not None and teacher_target in ("tags", "both") else 0
        card = None
        if init_from is not None:
            card = ModelCard.load(init_from)
            card.verify()
            if card.genres != self.genres and not new_head:
                raise ModelError(f"--init-from model knows {card.genres}, the data has {self.genres}")
            ignored = sorted(k for k, v in (architecture or {}).items() if card.architecture.get(k) != v)
            if ignored:
                self.log(f"--init-from keeps the starting model's {', '.join(ignored)}")
            arch = dict(card.architecture)  # fine-tuning keeps the starting model's shape
        check_short_crops(short_frames)
        if not 0.0 < short_share <= 1.0:
            raise CrnnError("--short-share is the share of short clips' crops that are short: above 0, at most 1")
        full = build(len(self.genres), arch["conv_filters"], arch["gru_units"], arch["dropout"], n_tags=n_tags,
                     frames=None if short_frames else WINDOW_FRAMES, projection=bool(arch.get("projection")))
        if card is not None:
            try:
                fresh = set() if card.genres == self.genres else {"genres"}
                if len(card.tags) != n_tags:
                    fresh.add("tags")
                if not fresh:
                    full.load_weights(str(card.weights))
                else:  # a head differs: take every layer the two models share, the rest start afresh
                    start = build(len(card.genres), arch["conv_filters"], arch["gru_units"], arch["dropout"],
                                  n_tags=len(card.tags), projection=bool(arch.get("projection")))
                    start.load_weights(str(card.weights))
                    for layer in full.layers:
                        if layer.name not in fresh and layer.weights:
                            layer.set_weights(start.get_layer(layer.name).get_weights())
            except Exception as exc:
                raise ModelError(f"cannot start from {card.weights}: {exc}") from None
        outputs = {"genres": full.outputs[1]}
        losses = {"genres": masked_bce}
        weights = {"genres": 1.0}
        if n_tags:
            outputs["tags"] = full.outputs[2]
            losses["tags"] = masked_bce
            weights["tags"] = teacher_weight
        if self.teacher is not None and teacher_target in ("emb", "both"):
            # A training-only projection of the 68-d embedding onto the teacher's 200-d space.
            outputs["teacher_emb"] = keras.layers.Dense(self.teacher_dim, name="teacher_emb")(full.outputs[0])
            losses["teacher_emb"] = teacher_emb_loss
            weights["teacher_emb"] = teacher_weight
        pairs = pair_weight > 0
        if pairs:
            if batch_size % 2:
                raise CrnnError("--pairs needs an even --batch-size: a batch holds whole pairs")
            outputs["pair"] = full.outputs[0]
            losses["pair"] = pair_loss
            weights["pair"] = pair_weight
        net = keras.Model(full.input, outputs)
        # weight_decay is Keras' decoupled decay (AdamW's: each step scales weights by 1 - lr * decay);
        # None keeps plain Adam, as in the paper. Batch-norm scales and biases are not decayed.
        optimizer = {"name": "adam", "lr": lr, "beta_1": 0.9, "beta_2": 0.999,
                     **({"weight_decay": weight_decay} if weight_decay else {}),
                     **({"anneal": anneal} if anneal else {})}
        adam = keras.optimizers.Adam(lr, beta_1=optimizer["beta_1"], beta_2=optimizer["beta_2"],
                                     weight_decay=weight_decay or None)
        if weight_decay:
            adam.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        net.compile(optimizer=adam, loss=losses, loss_weights=weights)
        keep = max(average, 1)
        kept = []  # (score, epoch, weights) of the `keep` best epochs, best first
        history, stale, start = [], 0, time.time()
        val_onehot = self.val_hot  # one-hot, or several 1s for a clip with several genres
        stopped = "epochs"
        scale = 1.0  # halved on each plateau
        try:
            for epoch in range(1, epochs + 1):
                done = (time.time() - start) / 60 / max_minutes if max_minutes else (epoch - 1) / epochs
                net.optimizer.learning_rate.assign(annealed_lr(lr * scale, done, anneal))
                x, y = self.epoch_data(rng, crops_per_clip, mixup, masking, shift, augmenter, version_p, pairs,
                                       short_frames, short_share)
                y = {k: v for k, v in y.items() if k in outputs}  # --teacher-target tags/emb: one teacher output
                if max_steps is not None:
                    x, y = x[: max_steps * batch_size], {k: v[: max_steps * batch_size] for k, v in y.items()}
                if isinstance(x, list):  # crops of two lengths: batches of one length each
                    x, y = length_batches(x, y, batch_size, rng), None
                # epoch_data has shuffled the clips; with pairs, Keras must not split them up again
                h = net.fit(x, y, batch_size=None if y is None else batch_size, epochs=1,
                            shuffle=not pairs and y is not None, verbose=0, callbacks=list(callbacks))
                row = {"epoch": epoch, "loss": float(h.history["loss"][-1]),
                       "lr": float(net.optimizer.learning_rate.numpy())}
                for name in outputs:
                    if len(outputs) > 1 and f"{name}_loss" in h.history:
                        row[f"{name}_loss"] = float(h.history[f"{name}_loss"][-1])
                if recalibrate:  # the weights kept as 'best' carry statistics that match them
                    self.recalibrate(net, rng)
                if self.val_windows:
                    p = self.predict_clips(net, self.val_windows)
                    row["val_loss"] = _bce(val_onehot, p, self.val_mask)
                    # right when the top genre is one the clip has (its only one, for single-genre data)
                    top = _masked_argmax(p, self.val_mask)
                    row["val_acc"] = float(np.mean(val_onehot[np.arange(len(top)), top] > 0))
                    score = row["val_loss"]
                else:
                    score = row["loss"]
                row["minutes"] = round((time.time() - start) / 60, 2)
                history.append(row)
                improved = not kept or score < kept[0][0]
                row["best"] = improved
                if on_epoch is not None:
                    on_epoch(row)
                else:
                    self.log(json.dumps({k: v for k, v in row.items() if k != "best"}))
                if len(kept) < keep or score < kept[-1][0]:
                    kept = sorted(kept + [(score, epoch, net.get_weights())], key=lambda k: k[0])[:keep]
                if improved:
                    stale = 0
                else:
                    stale += 1
                    if stale % 3 == 0:  # plateau: halve the learning rate
                        scale /= 2
                    if stale >= patience:
                        self.log(f"early stop: no val improvement for {patience} epochs")
                        stopped = "early stop"
                        break
                if max_minutes is not None and (time.time() - start) / 60 > max_minutes:
                    self.log(f"time limit of {max_minutes:g} minutes reached")
                    stopped = "time limit"
                    break
        except KeyboardInterrupt:
            if not kept:
                raise CrnnError("interrupted before the first epoch was validated: no model written") from None
            self.log(f"interrupted: keeping the best epoch so far (epoch {kept[0][1]})")
            stopped = "interrupted"
        for row in history:
            row.pop("best", None)
        net.set_weights(kept[0][2])
        info = {"optimizer": optimizer, "best_epoch": kept[0][1], "epochs_run": len(history), "history": history,
                "losses": {k: (v if isinstance(v, str) else v.__name__) for k, v in losses.items()},
                "loss_weights": weights, "tags": self.tag_names if n_tags else [], "stopped": stopped}
        if len(kept) > 1 and self.val_windows and stopped != "interrupted":
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
        report = {"epochs": [e for _, e, _ in kept], "val_loss": _bce(val_onehot, p, self.val_mask),
                  "val_acc": float(np.mean(_masked_argmax(p, self.val_mask) == self.val_y)),
                  "best_single_val_loss": float(kept[0][0])}
        report["used"] = report["val_loss"] < kept[0][0]
        self.log(json.dumps({"averaging": report}))
        if not report["used"]:
            net.set_weights(kept[0][2])
        return report


def annealed_lr(lr: float, done: float, anneal: float, floor: float = 0.1) -> float:
    """The learning rate for an epoch that starts when ``done`` (0-1) of the budget is spent.

    Constant until the last ``anneal`` of the budget, then down a half cosine to ``floor * lr``.
    The shipped model stopped at its time limit while still improving at a constant rate; the
    same minutes end in a settled model when the rate comes down before the limit instead.
    """
    if anneal <= 0 or done <= 1 - anneal:
        return lr
    t = min((done - (1 - anneal)) / anneal, 1.0)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
