"""Train the CRNN on labelled audio and write weights + model card.

    python -m beetsplug.crnn.training.train ../shared/data/emotify ../shared/data/gtzan --out model_weights

The recipe is the paper's (Adam 0.001/0.9/0.999, sigmoid outputs, binary cross-entropy)
plus what a few hundred clips need: random hop-aligned crops, class-balanced epochs,
optional mixup, learning-rate halving on plateau and early stopping on the val split.

Several labelled sets train one model over the union of their genres. A set only vouches
for the genres it uses, so the genre loss is masked per source: an emotify clip is never
told it is not "metal", a genre emotify does not label. What real libraries do to audio
(codecs, levels, low-passes) comes in as cached codec versions and log-mel edits
(``augment``); a teacher (``teacher``) can add its tags and embedding as targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import augment, dataset
from ..audio import DEFAULT_WINDOWS, WINDOW_FRAMES, samples_for
from ..errors import CrnnError, ModelError
from ..features import model_input
from .teacher import crop_targets
from ..model import (CARD_NAME, DEFAULT_ARCHITECTURE, POOLS, WEIGHTS_NAME, ModelCard, build, import_tensorflow,
                    require_tensorflow, sha256_of)

DEFAULT_CACHE = Path(".cache") / "mels"
TEACHER_TARGETS = ("tags", "emb", "both")


def _bce(y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Binary cross-entropy; with a mask, the mean over each clip's labelled genres, then over clips."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    if mask is None:
        return float(np.mean(per))
    return float(np.mean((per * mask).sum(-1) / np.maximum(mask.sum(-1), 1)))


def masked_bce(y_true, y_pred):
    """Keras loss: ``y_true`` is [labels | mask] side by side; genres a clip's source never labels do not count.

    Per clip: the mean BCE over its masked-in genres (0 for a clip with no labels, such as
    unlabelled audio that only the teacher speaks for).
    """
    from keras import ops

    n = ops.shape(y_pred)[-1]
    y, mask = y_true[..., :n], y_true[..., n:]
    p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
    per = -(y * ops.log(p) + (1 - y) * ops.log(1 - p))
    return ops.sum(per * mask, axis=-1) / ops.maximum(ops.sum(mask, axis=-1), 1.0)


def teacher_emb_loss(y_true, y_pred):
    """Keras loss: 1 - cosine between the student's projection and the teacher embedding; [target | has] packed."""
    from keras import ops

    n = ops.shape(y_pred)[-1]
    t, has = y_true[..., :n], y_true[..., n]
    t = t / ops.maximum(ops.norm(t, axis=-1, keepdims=True), 1e-6)
    p = y_pred / ops.maximum(ops.norm(y_pred, axis=-1, keepdims=True), 1e-6)
    return has * (1.0 - ops.sum(t * p, axis=-1))


PAIR_TEMPERATURE = 0.1


def pair_loss(y_true, y_pred):
    """Keras loss on the embedding: rows 2j and 2j + 1 are two views of one place in one clip (a codec
    version, other edits); each row's partner must be its nearest row in the batch by cosine.

    The contrastive loss of SimCLR (NT-Xent, temperature ``PAIR_TEMPERATURE``): cross-entropy of the
    partner among all other rows of the batch. It asks for what the robustness report measures,
    versions of a clip nearer to each other than to any other clip. ``y_true`` is unused.
    """
    from keras import ops

    z = y_pred / ops.maximum(ops.norm(y_pred, axis=-1, keepdims=True), 1e-6)
    n = ops.shape(z)[0]
    logits = ops.matmul(z, ops.transpose(z)) / PAIR_TEMPERATURE - 1e9 * ops.eye(n)  # never itself
    idx = ops.arange(n)
    partner = idx + 1 - 2 * (idx % 2)
    return -ops.sum(ops.one_hot(partner, n) * ops.log_softmax(logits, axis=-1), axis=-1)


def _masked_argmax(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Top genre among those the clip's source labels (a GTZAN clip cannot be 'right' as electronic)."""
    return np.where(mask > 0, p, -1.0).argmax(1)


def _hot(records, genres) -> np.ndarray:
    """Targets per record: 1 for its genre and any further genres it has (``Record.more``); all 0 without a genre."""
    out = np.zeros((len(records), len(genres)), np.float32)
    for i, r in enumerate(records):
        for g in (r.genre, *r.more) if r.genre else ():
            out[i, genres.index(g)] = 1
    return out


class Trainer:
    """Holds the data (cached log-mels, codec versions, teacher targets) and the Keras model for one run."""

    def __init__(self, records, cache_dir=DEFAULT_CACHE, genres=None, n_windows=DEFAULT_WINDOWS, log=print, workers=2,
                 versions=(), version_dir=None, teacher=None, teacher_dir=None, unlabelled=()):
        """``cache_dir`` is a folder for a MelCache, or a cache object itself (a library's excerpt cache)."""
        self.log = log
        self.n_windows = n_windows
        test = [r for r in list(records) + list(unlabelled) if r.split == "test"]
        if test:  # never trained on, not even through the teacher
            self.log(f"{len(test)} test clips left out of training")
        self.train_records = [r for r in records if r.split == "train"]
        self.val_records = [r for r in records if r.split == "val"]
        self.unlabelled = [r for r in unlabelled if r.split == "train"]
        if not self.train_records:
            raise CrnnError("no training records (split 'train')")
        self.genres = list(genres or dataset.genres_of(self.train_records))
        unknown = {g for r in self.train_records + self.val_records for g in (r.genre, *r.more)} - set(self.genres)
        if unknown:
            raise CrnnError(f"records have genres the model does not know: {', '.join(sorted(unknown))}")
        self.label_sets = dataset.label_sets(self.train_records + self.val_records)
        self.cache = cache_dir if isinstance(cache_dir, dataset.MelCache) else dataset.MelCache(cache_dir)
        t = time.time()
        self.cache.fill(self.train_records + self.val_records + self.unlabelled, workers=workers)
        self.log(f"log-mels ready for {len(self.train_records)} train + {len(self.val_records)} val clips"
                 + (f" + {len(self.unlabelled)} unlabelled" if self.unlabelled else "") + f" in {time.time() - t:.0f} s")
        fit_records = self.train_records + self.unlabelled
        cached = [self.cache.get(r.path) for r in fit_records]
        self.train_mels = [mel for mel, _ in cached]
        self.train_samples = np.array([n for _, n in cached])  # clip lengths: which clips --short-crops shortens
        self.train_starts = [self.cache.part_starts(r.path) for r in fit_records]  # teacher targets need file time
        self.train_y = np.array([self.genres.index(r.genre) if r.genre else -1 for r in fit_records])
        self.train_hot = _hot(fit_records, self.genres)  # one-hot, or several 1s for a clip with several genres
        self.train_mask = np.stack([self._mask(r) for r in fit_records])
        self.train_source = np.array([r.source for r in fit_records])
        self.val_windows = [self.cache.serving(r.path, n_windows) for r in self.val_records]
        self.val_y = np.array([self.genres.index(r.genre) for r in self.val_records])
        self.val_hot = _hot(self.val_records, self.genres)
        self.val_mask = np.stack([self._mask(r) for r in self.val_records]) if self.val_records else None
        self.versions = tuple(versions)
        self.train_versions = [[] for _ in fit_records]
        self.train_version_starts = [[] for _ in fit_records]  # per version, as train_starts per clip
        self.train_version_samples = [[] for _ in fit_records]  # per version, as train_samples per clip
        if self.versions:
            t = time.time()
            made = dataset.prepare_versions(fit_records, self.versions, version_dir, self.cache, workers, log)
            cached = [[self.cache.get(p) for p in made[r.path].values()] for r in fit_records]
            self.train_versions = [[mel for mel, _ in clip] for clip in cached]
            self.train_version_samples = [[n for _, n in clip] for clip in cached]
            self.train_version_starts = [[self.cache.part_starts(p) for p in made[r.path].values()] for r in fit_records]
            self.log(f"{sum(map(len, self.train_versions))} codec versions ready in {time.time() - t:.0f} s")
        self.teacher = None
        self.tag_names, self.teacher_dim = [], 0
        if teacher:
            from . import teacher as teacher_mod

            tcache = teacher_mod.TeacherCache(teacher_dir)
            teacher_mod.compute([r.path for r in fit_records], tcache, log=log)
            self.teacher = [tcache.get(r.path) if tcache.has(r.path) else None for r in fit_records]
            self.tag_names = teacher_mod.tag_names()
            self.teacher_dim = next((e["emb"].shape[1] for e in self.teacher if e is not None), 0)
            self.log(f"teacher targets for {sum(e is not None for e in self.teacher)} of {len(fit_records)} clips")

    def _mask(self, record) -> np.ndarray:
        """1 for each genre the record's source labels (0 everywhere for unlabelled audio)."""
        labelled = set(self.label_sets.get(record.source, ())) if record.genre else set()
        return np.array([g in labelled for g in self.genres], np.float32)

    def epoch_picks(self, rng, crops_per_clip):
        """Clip indices for one epoch: class-balanced over genres, plus the unlabelled clips once each."""
        labelled = np.flatnonzero(self.train_y >= 0)
        n = crops_per_clip * len(labelled)
        per_class = int(np.ceil(n / len(self.genres)))
        picks = []
        for c in range(len(self.genres)):
            members = np.flatnonzero(self.train_y == c)
            if len(members):
                picks.append(rng.choice(members, per_class, replace=len(members) < per_class))
        unlabelled = np.flatnonzero(self.train_y < 0)
        if len(unlabelled):
            picks.append(np.repeat(unlabelled, crops_per_clip))
        return rng.permutation(np.concatenate(picks))

    def crop_lengths(self, picks, short_frames=0, short_share=1.0, rng=None) -> np.ndarray:
        """Frames per crop: a window, or ``short_frames`` for a clip that fits in that many frames.

        A clip shorter than a window is looped to fill it (``audio.fit_window``), so a 3 s excerpt
        in a whole window is ten copies of itself that cost ten times its CPU; a short crop of its
        loop costs ``short_frames / 1366`` of that and shows the same audio. With ``short_share``
        below 1 only that share of such crops (drawn with ``rng``) is short and the rest stay whole
        looped windows, the length ``crnnembed`` serves such a clip at, so the GRU still learns it.
        """
        lengths = np.full(len(picks), WINDOW_FRAMES)
        if short_frames:
            fits = self.train_samples[picks] <= samples_for(short_frames)
            if short_share < 1.0:
                fits &= rng.random(len(picks)) < short_share
            lengths[fits] = short_frames
        return lengths

    def epoch_data(self, rng, crops_per_clip, mixup, masking=False, shift=0, augmenter=None, version_p=0.0, pairs=False,
                   short_frames=0, short_share=1.0):
        """Model inputs and targets for one epoch: random crops of clips or of their codec versions,
        log-mel edits, band shifts, masking, mixup (within one source, so masks stay meaningful).

        With ``short_frames`` (``--short-crops``) clips that fit in that many frames give crops of
        that length (see ``crop_lengths``); x is then a list of (96, frames, 1) crops of two lengths,
        and mixup pairs crops of one length only.

        With ``pairs`` the crops come as two views of one place in one clip, side by side (rows 2j
        and 2j + 1): the clip as it is or as a codec version, then the other of the two where the clip
        has versions, each with its own edits; ``crops_per_clip`` counts both views, so an epoch costs
        the same. ``pair_loss`` pulls the two together and pushes the rest of the batch away.

        Returns (x, targets) where targets maps output name -> packed target array.
        """
        picks = self.epoch_picks(rng, max(1, crops_per_clip // 2) if pairs else crops_per_clip)
        if pairs:
            picks = np.repeat(picks, 2)
        lengths = self.crop_lengths(picks, short_frames, short_share, rng)
        crops, tags, embs = [], [], []
        view = None  # with pairs: (part, start, from a version) of the pair's first view
        for k, (i, length) in enumerate(zip(picks, lengths)):
            second = pairs and k % 2 == 1
            mel, part = self.train_mels[i], 0
            if second:
                part = view[0]
                mel = mel[part] if isinstance(mel, list) else mel
            elif isinstance(mel, list):  # a library track cached as a few separate spans: crop inside one of them
                part = int(rng.integers(len(mel)))
                mel = mel[part]
            first = self.train_starts[i][part]  # the part's start frame in the file
            start = view[1] if second else dataset.random_start(mel.shape[1], rng, length)
            use_version = (not view[2]) if second else rng.random() < version_p
            if pairs and not second:
                view = (part, start, use_version)
            if self.train_versions[i] and use_version:
                which = int(rng.integers(len(self.train_versions[i])))
                mel = self.train_versions[i][which]
                if isinstance(mel, list):
                    part = min(part, len(mel) - 1)
                    mel = mel[part]
                else:
                    part = 0
                first = self.train_version_starts[i][which][part]  # a version's spans are its own
            start = min(start, max(mel.shape[1] - length, 0))
            c = mel[:, start : start + length]
            if augmenter is not None:
                c = augmenter(c, rng)
            if shift:
                c = dataset.shift_bands(c, rng, shift)
            c = model_input(c)
            if masking:  # masks fill with the crop's mean level, so they come after normalising
                c = dataset.mask_bands(c, rng)
            crops.append(c)
            if self.teacher is not None:
                e = self.teacher[i]
                if e is None:  # no teacher output for this clip: zero targets, flagged absent (has = 0)
                    tags.append(np.zeros(len(self.tag_names), np.float32))
                    embs.append(np.zeros(self.teacher_dim + 1, np.float32))
                else:
                    t, v = crop_targets(e, first + start, length)
                    tags.append(t)
                    embs.append(np.concatenate([v, [1.0]]))
        x = [c[..., None] for c in crops]
        y = self.train_hot[picks]
        mask = self.train_mask[picks]
        t = np.array(tags, np.float32) if tags else None
        v = np.array(embs, np.float32) if embs else None
        has = v[:, -1:] if v is not None else None
        if mixup > 0:
            lam = rng.beta(mixup, mixup, size=len(x)).astype(np.float32)
            lam = np.maximum(lam, 1 - lam)  # the first clip dominates, so its crop stays the 'real' one
            other = np.arange(len(x))
            # partners from the same source (and of the same crop length)
            groups = np.char.add(np.char.add(self.train_source[picks].astype(str), "\0"), lengths.astype(str))
            step = 2 if pairs else 1  # a pair's two views mix with the same partner pair, by the same amount
            for group in np.unique(groups[::step]):
                idx = np.flatnonzero(groups[::step] == group) * step
                other[idx] = idx[rng.permutation(len(idx))]
            if pairs:
                lam[1::2] = lam[0::2]
                other[1::2] = other[0::2] + 1
            x = [lam[k] * x[k] + (1 - lam[k]) * x[other[k]] for k in range(len(x))]
            y = lam[:, None] * y + (1 - lam[:, None]) * y[other]
            mask = mask * mask[other]
            if t is not None:
                both = has * has[other]
                t = lam[:, None] * t + (1 - lam[:, None]) * t[other]
                v = np.concatenate([lam[:, None] * v[:, :-1] + (1 - lam[:, None]) * v[other, :-1], both], axis=1)
                has = both
        targets = {"genres": np.concatenate([y, mask], axis=1).astype(np.float32)}
        if pairs:
            targets["pair"] = np.zeros((len(x), 1), np.float32)  # the pairing is the rows' order
        if t is not None:
            targets["tags"] = np.concatenate([t, np.repeat(has, t.shape[1], axis=1)], axis=1).astype(np.float32)
            targets["teacher_emb"] = v.astype(np.float32)
        x = [c.astype(np.float32) for c in x]
        return (np.stack(x) if len(set(lengths.tolist())) <= 1 else x), targets

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
        import_tensorflow()
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


def check_short_crops(frames: int) -> None:
    """A short crop must reach the GRU as at least one step (the pools divide time by 96)."""
    steps = math.prod(t for _, t in POOLS)
    if frames and not steps <= frames < WINDOW_FRAMES:
        raise CrnnError(f"--short-crops is a crop length in frames, {steps} to {WINDOW_FRAMES - 1} (0 = off)")


def length_batches(crops, targets, batch_size, rng):
    """A tf.data dataset of batches whose crops share one length, in random order.

    Crops keep their epoch order inside a length, so a pair's two views (same clip, same
    length, side by side) stay in one batch when the batch size is even. The signature leaves
    the length open, so one traced training step serves every length.
    """
    import tensorflow as tf

    batches = length_groups(crops, batch_size, rng)

    def generate():
        for idx in batches:
            yield np.stack([crops[i] for i in idx]), {name: v[idx] for name, v in targets.items()}

    signature = (tf.TensorSpec((None, *crops[0].shape[:1], None, *crops[0].shape[2:]), tf.float32),
                 {name: tf.TensorSpec((None, *v.shape[1:]), tf.float32) for name, v in targets.items()})
    data = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return data.apply(tf.data.experimental.assert_cardinality(len(batches)))  # Keras then knows the epoch's end


def length_groups(crops, batch_size, rng) -> list[np.ndarray]:
    """Index arrays of batches whose crops share one length (in epoch order inside a length), shuffled."""
    lengths = np.array([c.shape[1] for c in crops])
    batches = []
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


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


def save_model(full_model, out_dir, genres, arch, extra, name="crnn", tags=(), log=None, features=None) -> ModelCard:
    """Write weights and their ONNX export, then the card naming both sha256 (the card is written last).

    The export is what a plain install analyses with; if it fails the model still works on the
    Keras runtime, so that is reported (``log``) rather than raised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    tmp = out_dir / ("tmp-" + WEIGHTS_NAME)
    full_model.save_weights(str(tmp))
    tmp.replace(weights)
    sha = sha256_of(weights)
    extra = dict(extra, name=name)  # the family name, kept by models made from this one (crnn-wccn)
    card = ModelCard(model_id=f"{name}-{sha[:10]}", genres=list(genres), weights=weights, sha256=sha,
                     architecture=dict(arch), extra=extra, tags=list(tags))
    if features is not None:  # another family's front end (the MSD CRNN's); the level-free one otherwise
        card.features = dict(features)
    try:
        from .export import export_card

        card.onnx = export_card(card)
    except (CrnnError, ImportError) as exc:
        (log or print)(f"ONNX export failed ({exc}); the model runs on the Keras runtime only (crnn-export retries)")
    card.save(out_dir / CARD_NAME)
    return card


def build_parser(out_required=True) -> argparse.ArgumentParser:
    """crnn-train's parser; `beet crnntrain DATA` parses with ``out_required=False`` (it files the model itself)."""
    p = argparse.ArgumentParser(prog="crnn-train", description="Train the beets-crnn CRNN on labelled audio.")
    p.add_argument("data", nargs="+",
                   help="one or more labelled sets: a manifest CSV (path, genre, split, artist) or a folder "
                        "(with metadata.csv, or genre/ subfolders); the model learns the union of their genres")
    return add_options(p, out_required=out_required)


EXPERIMENTS = "experiments and smoke tests (measured, not shipped: docs/experiments)"


def add_options(p: argparse.ArgumentParser, out_required=False) -> argparse.ArgumentParser:
    """The training options of both forms (`beet crnntrain QUERY` trains on a library with the same ones), in groups.

    No default --out: a model written into the working directory could replace the checkout's own
    model_weights/, the one that loads. crnn-train requires it; `beet crnntrain` files the model in
    its config directory.
    """
    p.add_argument("--out", default=None, required=out_required,
                   help="folder for crnn.weights.h5 and crnn.json" + (" (required)" if out_required else ""))
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="log-mel cache folder")
    p.add_argument("--init-from", default=None, help="fine-tune from this model folder or card")
    p.add_argument("--name", default="crnn", help="prefix of the model id (kept in the card as its name)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="windows per clip when validating")
    p.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--patience", type=int, default=8)
    g.add_argument("--max-minutes", type=float, default=None, help="stop after this long (best weights kept)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--anneal", type=float, default=0.0, metavar="FRACTION",
                   help="in the last FRACTION of --max-minutes (else of --epochs) the learning rate falls along a "
                        "cosine to a tenth (0 = off: constant, halved on plateaus)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay as in AdamW, scaled by the learning rate (0 = plain Adam)")
    g.add_argument("--average", type=int, default=1,
                   help="average the weights of this many best epochs; kept if val loss improves (1 = off)")
    g.add_argument("--no-recalibrate", action="store_true",
                   help="keep Keras' running batch-norm statistics instead of recomputing them each epoch")

    g = p.add_argument_group("augmentation")
    g.add_argument("--crops", type=int, default=2, help="random crops per training clip per epoch")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--masking", action="store_true",
                   help="mask random mel bands and time spans of each crop (SpecAugment-style)")
    g.add_argument("--shift", type=int, default=0, help="shift crops by up to this many mel bands (0 = off)")
    g.add_argument("--augment", default="",
                   help=f"comma-separated log-mel edits applied to crops: {', '.join(augment.MEL_EDITS)}, or 'all'")
    g.add_argument("--augment-p", type=float, default=0.5, help="probability of each log-mel edit per crop")
    g.add_argument("--versions", default="",
                   help="comma-separated codec versions to train on, made once with ffmpeg and cached "
                        f"({', '.join(augment.CODEC_VERSIONS)}), or 'default' ({', '.join(augment.TRAIN_VERSIONS)})")
    g.add_argument("--version-p", type=float, default=0.5, help="probability that a crop comes from a codec version")
    g.add_argument("--version-cache", default=str(Path(".cache") / "versions"), help="folder for codec versions")

    g = p.add_argument_group("teacher (the [teacher] extra)")
    g.add_argument("--teacher", choices=["musicnn"], default=None, help="distil from this teacher too")
    g.add_argument("--teacher-target", choices=TEACHER_TARGETS, default="both",
                   help="what the student learns from the teacher: its 50 tags, its embedding, or both")
    g.add_argument("--teacher-weight", type=float, default=1.0, help="weight of each teacher loss beside the genre loss")
    g.add_argument("--teacher-cache", default=str(Path(".cache") / "teacher"), help="folder for teacher outputs")
    g.add_argument("--unlabelled", action="append", default=[],
                   help="DATA only: a folder of audio without genres that the teacher alone teaches (repeatable; "
                        "on a library, --teacher trains its tracks without a usable genre)")

    g = p.add_argument_group("architecture (from scratch; --init-from keeps the starting model's)")
    g.add_argument("--conv-filters", default=None, help="comma-separated widths of the 4 conv layers")
    g.add_argument("--gru-units", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None,
                   help=f"dropout after each conv block (default {DEFAULT_ARCHITECTURE['dropout']})")

    g = p.add_argument_group(EXPERIMENTS)
    g.add_argument("--pairs", type=float, default=0.0, metavar="WEIGHT",
                   help="train on pairs of views of one place in a clip (clean / codec version) with a contrastive "
                        "loss of this weight on the embedding, so versions of a clip land nearest each other (0 = off)")
    g.add_argument("--short-crops", type=int, default=0, metavar="FRAMES",
                   help="train clips that fit in FRAMES log-mel frames (3 s excerpts) on crops of FRAMES frames "
                        f"of their loop, not of a whole {WINDOW_FRAMES}-frame window: about FRAMES/1366 "
                        "of a window's CPU (0 = off)")
    g.add_argument("--short-share", type=float, default=1.0, metavar="FRACTION",
                   help="with --short-crops: the share of those clips' crops that are short; the rest are whole "
                        "looped windows, the length crnnembed analyses them at (1 = all short)")
    g.add_argument("--max-steps", type=int, default=None, help="batches per epoch at most (smoke tests)")
    return p


def _names(value: str, known, default=(), what="value") -> list[str]:
    if not value:
        return []
    if value in ("all",):
        return list(known)
    if value == "default":
        return list(default)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CrnnError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def unlabelled_records(folder) -> list:
    """Audio files under a folder as records without a genre (split 'train'; the teacher alone speaks for them)."""
    folder = Path(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in dataset.AUDIO_EXTS)
    if not files:
        raise CrnnError(f"no audio files under {folder}")
    return [dataset.Record(f, "", "train", "", "unlabelled:" + folder.name) for f in files]


def run(args, log=print, records=None, cache=None, on_epoch=None, callbacks=(), card_extra=None,
        unlabelled=()) -> ModelCard:
    """Train as ``args`` say and write the model to ``args.out``.

    A library (``libtrain``) passes its own ``records``, genre-less ``unlabelled`` records (beside
    any ``--unlabelled`` folders) and excerpt ``cache`` instead of ``args.data``, ``on_epoch``/
    ``callbacks`` for its progress line and time budget, and ``card_extra`` for the card's
    training section; everything else is this same code.
    """
    require_tensorflow()  # before any decoding: a plain install cannot train
    if not args.out:
        raise CrnnError("--out DIR: the folder to write the model to")
    records = dataset.read_sources(args.data) if records is None else records
    edits = _names(args.augment, augment.MEL_EDITS, what="augmentation")
    versions = _names(args.versions, list(augment.CODEC_VERSIONS), augment.TRAIN_VERSIONS, what="codec version")
    if args.pairs < 0:
        raise CrnnError("--pairs is a loss weight: 0 (off) or more")
    if not 0 <= args.anneal <= 1:
        raise CrnnError("--anneal is a fraction of the training budget: 0 (off) to 1")
    check_short_crops(args.short_crops)
    if (args.unlabelled or unlabelled) and not args.teacher:  # folders, or a library's genre-less tracks
        raise CrnnError("--unlabelled needs --teacher: without labels, only a teacher can say what the audio is")
    if args.teacher:
        from .teacher import check_installed

        check_installed()
    unlabelled = [r for folder in args.unlabelled for r in unlabelled_records(folder)] + list(unlabelled)
    trainer = Trainer(records, args.cache if cache is None else cache, n_windows=args.windows, log=log, versions=versions,
                      version_dir=args.version_cache, teacher=args.teacher, teacher_dir=args.teacher_cache,
                      unlabelled=unlabelled)
    augmenter = augment.MelAugmenter(edits, args.augment_p) if edits else None
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
                                   weight_decay=args.weight_decay, augmenter=augmenter,
                                   version_p=args.version_p if versions else 0.0,
                                   teacher_target=args.teacher_target, teacher_weight=args.teacher_weight,
                                   new_head=getattr(args, "new_head", False), on_epoch=on_epoch, callbacks=callbacks,
                                   pair_weight=args.pairs, anneal=args.anneal, short_frames=args.short_crops,
                                   short_share=args.short_share)
    count = lambda recs: {g: sum(g in (r.genre, *r.more) for r in recs) for g in trainer.genres}  # noqa: E731
    extra = {
        "training": {
            "data": [str(d) for d in args.data],
            "sources": {src: {"genres": genres,
                              "train": sum(r.source == src for r in trainer.train_records),
                              "val": sum(r.source == src for r in trainer.val_records)}
                        for src, genres in trainer.label_sets.items()},
            "label_mask": "per source: a clip's genre loss counts only the genres its own set labels",
            "clips": {"train": len(trainer.train_records), "val": len(trainer.val_records),
                      "unlabelled": len(trainer.unlabelled)},
            "clips_per_genre": {"train": count(trainer.train_records), "val": count(trainer.val_records)},
            "command": getattr(args, "command", None) or " ".join(["python -m beetsplug.crnn.training.train"]
                                                                   + [shlex.quote(a) for a in sys.argv[1:]]),
            "optimizer": info["optimizer"],
            "loss": info["losses"], "loss_weights": info["loss_weights"],
            "crops_per_clip": args.crops, "batch_size": args.batch_size, "mixup": args.mixup, "masking": args.masking,
            "shift": args.shift, "average": args.average,
            "short_crops": ({"frames": args.short_crops, "share": args.short_share,
                             "clips": int(np.sum(trainer.crop_lengths(np.arange(len(trainer.train_samples)),
                                                                      args.short_crops) < WINDOW_FRAMES))}
                            if args.short_crops else None),
            "augmentation": {"log_mel_edits": augmenter.describe() if augmenter else None,
                             "codec_versions": {v: augment.CODEC_VERSIONS[v][1] for v in versions},
                             "version_p": args.version_p if versions else 0.0},
            "teacher": ({"name": args.teacher, "model": "MSD_musicnn", "target": args.teacher_target,
                         "weight": args.teacher_weight, "on": "clean audio, per 3 s window, mean over each crop",
                         # audio only the teacher speaks for: --unlabelled folders and/or a library's genre-less tracks
                         "unlabelled": {"folders": [str(u) for u in args.unlabelled],
                                        "clips": len(trainer.unlabelled)}} if args.teacher else None),
            "pairs": ({"weight": args.pairs, "loss": "pair_loss (NT-Xent)", "temperature": PAIR_TEMPERATURE,
                       "views": "one place in a clip: as it is and as a codec version, each with its own edits"}
                      if args.pairs else None),
            "seed": args.seed,
            "batchnorm_recalibrated": not args.no_recalibrate, "init_from": args.init_from,
            **({"new_head": True} if getattr(args, "new_head", False) else {}),
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"], "minutes": info["minutes"],
            "stopped": info["stopped"],
            "history": info["history"],
            **({"averaging": info["averaging"]} if "averaging" in info else {}),
            **(card_extra or {}),
        },
    }
    card = save_model(full, args.out, trainer.genres, arch, extra, name=args.name, tags=info["tags"], log=log)
    log(f"wrote {card.weights} and {Path(args.out) / CARD_NAME} (model id {card.model_id})")
    return card


def train_into(models_dir, write) -> tuple[ModelCard, Path]:
    """``write(folder)`` writes a model (returning its card); the folder is ``models_dir/<model id>`` once written.

    The id is known only when the weights are, so the model is written beside, then renamed; a
    model with the same id (the same weights again) is replaced. Returns (card, folder).
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".training-{os.getpid()}"
    try:
        card = write(tmp)
        folder = models_dir / card.model_id
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return card, folder


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
