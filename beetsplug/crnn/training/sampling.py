"""The data of one training run and how an epoch samples it.

``TrainingData`` holds the cached log-mels of the train and val clips (whole clips, or a
library's excerpt spans), their codec versions and teacher targets; ``epoch_data`` draws one
epoch: class-balanced picks, random hop-aligned crops of a clip or of one of its versions,
log-mel edits, band shifts, masking and mixup (within one source, so label masks stay right).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..audio import DEFAULT_WINDOWS, WINDOW_FRAMES, samples_for
from ..errors import CrnnError
from ..features import model_input
from ..model import POOLS
from . import dataset
from .teacher import crop_targets


def _hot(records, genres) -> np.ndarray:
    """Targets per record: 1 for its genre and any further genres it has (``Record.more``); all 0 without a genre."""
    out = np.zeros((len(records), len(genres)), np.float32)
    for i, r in enumerate(records):
        for g in (r.genre, *r.more) if r.genre else ():
            out[i, genres.index(g)] = 1
    return out


class TrainingData:
    """Holds the data of one run: cached log-mels, codec versions and teacher targets of the train and val clips."""

    def __init__(self, records, cache_dir=dataset.DEFAULT_CACHE, genres=None, n_windows=DEFAULT_WINDOWS, log=print, workers=2,
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
            self.teacher = teacher_mod.outputs([r.path for r in fit_records], tcache, log)
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


def unlabelled_records(folder) -> list:
    """Audio files under a folder as records without a genre (split 'train'; the teacher alone speaks for them)."""
    folder = Path(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in dataset.AUDIO_EXTS)
    if not files:
        raise CrnnError(f"no audio files under {folder}")
    return [dataset.Record(f, "", "train", "", "unlabelled:" + folder.name) for f in files]
