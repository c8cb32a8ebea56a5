"""Fine-tune the MSD CRNN (``msd``) into a beets-crnn model on labelled audio, on a CPU.

The stem (``bn_0_freq`` .. ``conv3``) stays as the Million Song Dataset trained it: its output for
every training window and codec version is computed once and cached (``FeatureCache``), together
with the frozen original's 50 tags and 32-d state (the teacher's targets). Epochs then run only the
top (``conv4`` .. the heads) on the cache: seconds, not hours, on two cores.

Loss: genre cross-entropy masked per source (a clip counts only for the genres its own set labels),
plus cross-entropy of the tag head towards the frozen original's tags on every window and version
(so the 50 MSD tags stay what they were), plus optionally 1 - cos to the original 32-d state, plus
optionally (``--musicnn-weight``) the squared error of a linear map of the 32-d state to musicnn's
200-d embedding of the clean clip (a second MSD teacher, its outputs cached by ``teacher``; the map
trains with the top and is not served).

Every epoch writes a checkpoint (top weights, optimizer state, epoch, random state, best so far)
under ``OUT/checkpoint``; ``--resume OUT`` continues a stopped run where it ended.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import audio, msd
from . import dataset
from ..errors import CrnnError, command_main
from ..features import MSD
from .fileid import content_id

STEM_OUTPUT = "drop3"  # the cached layer: (4, 60, 128) per window
TOP_LAYERS = ("conv4", "bn4", "elu4", "pool4", "drop4", "to_sequence", "gru1", "gru2", "drop_gru", "genres", "tags")
TRAIN_WINDOWS = 3  # windows per training clip (a 60 s clip: start, middle, end); val: the served 2
DEFAULT_VERSIONS = ("mp3-64k", "vorbis48", "aac96k")
CACHE_VERSION = 1
DEFAULT_CACHE = Path(".cache") / "msd"


def log_stderr(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the frozen original: stem features and teacher targets, computed once ----


class Start:
    """Where fine-tuning starts, and the teacher of its tag head: the released file (``msd.port``) or a
    model of the family (a card: library training starts from the shipped model)."""

    def __init__(self, source=None):
        from ..model import ModelCard

        self.card = None
        path = Path(source) if source else msd.default_weights_path()
        if path.suffix.lower() != ".h5" or path.name.endswith(".weights.h5"):
            self.card = ModelCard.load(path)
            if self.card.family != msd.FAMILY or len(self.card.tags) != len(msd.TAGS):
                raise CrnnError(f"{self.card.model_id} is not of the MSD CRNN family with its 50 tags: it cannot be "
                                "fine-tuned this way")
            self.card.verify()
            self.path = self.card.weights
        else:
            self.path = path
        self._sha = None

    @property
    def sha256(self) -> str:
        if self._sha is None:
            if not self.path.is_file():
                raise CrnnError(f"the MSD CRNN weights are not at {self.path} (--weights)")
            self._sha = self.card.sha256 if self.card else _sha256(self.path)
        return self._sha

    def describe(self) -> dict:
        if self.card:
            return {"model": self.card.model_id, "sha256": self.card.sha256}
        return {"weights": msd.WEIGHTS_FILE, "sha256": self.sha256}

    @property
    def genre_input(self) -> str:
        """What a run from here feeds its genre head by default: the start card's choice, else the state
        beside the conv mean (it generalised best across sets: docs/experiments/2026-12-06-genre-head.rst)."""
        if self.card is not None:
            return self.card.architecture.get("genre_input", "state")
        return "state+conv_mean"

    def keeps_head(self, genres, genre_input=None) -> bool:
        """Whether a network for ``genres`` starts with this start's own genre head (a model of the family
        with these genres and this head input), not a fresh one."""
        return (self.card is not None and list(genres) == self.card.genres
                and (genre_input or self.genre_input) == self.genre_input)

    def network(self, genres, genre_activation="sigmoid", genre_input=None):
        """The start's network with a genre head for ``genres`` (kept from the start when its genres and
        the head's input are these)."""
        from ..model import build_for, import_tensorflow

        import_tensorflow()
        genre_input = genre_input or self.genre_input
        if self.card is None:
            return msd.build_pretrained(genres, self.path, genre_activation=genre_activation, genre_input=genre_input)
        source = build_for(self.card)
        source.load_weights(str(self.card.weights))
        net = msd.build(len(genres), len(msd.TAGS), projection=bool(self.card.architecture.get("projection")),
                        genre_activation=genre_activation, genre_input=genre_input)
        keep = {layer.name for layer in net.layers} - (set() if self.keeps_head(genres, genre_input) else {"genres"})
        copy_weights(source, net, keep)
        return net


class Frozen:
    """The start's network, frozen: model input -> (stem output, 32-d state, 50 tags)."""

    def __init__(self, start: Start):
        import keras

        from ..model import import_tensorflow

        tf = import_tensorflow()
        self.start = start
        net = start.network(["_"])
        model = keras.Model(net.input, [net.get_layer(STEM_OUTPUT).output, net.outputs[0], net.outputs[2]])

        @tf.function(input_signature=[tf.TensorSpec([None, 96, 1366, 1], tf.float32)])
        def run(x):
            return model(x, training=False)

        self._run = run

    def __call__(self, mels: np.ndarray, batch: int = 8):
        x = MSD.model_input(mels)[..., None]
        outs = [[o.numpy() for o in self._run(x[i : i + batch])] for i in range(0, len(x), batch)]
        return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))


def _sha256(path) -> str:
    from ..model import sha256_of

    return sha256_of(path)


class FeatureCache:
    """Per (clip, version): the stem output of each window (float16), the teacher's tags and state.

    Keyed by the file's content, the front end, the released weights and the window count, so a
    changed recipe computes again rather than reusing.
    """

    def __init__(self, folder, start: Start | None = None, weights=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start = start or Start(weights)
        self._frozen = None
        self.computed = 0  # entries computed (not read) by this object: the tests check reuse

    @property
    def frozen(self) -> Frozen:
        if self._frozen is None:
            self._frozen = Frozen(self.start)
        return self._frozen

    def _sha(self) -> str:
        """The start's sha256: entries of other weights are never read back."""
        return self.start.sha256

    def key(self, path, n_windows: int) -> Path:
        ident = json.dumps([content_id(path), MSD.params, self._sha(), STEM_OUTPUT, n_windows, CACHE_VERSION])
        return self.folder / (hashlib.sha1(ident.encode()).hexdigest() + ".npz")

    def load(self, path, n_windows: int) -> dict | None:
        key = self.key(path, n_windows)
        if not key.is_file():
            return None
        try:
            with np.load(key) as data:
                return {k: data[k] for k in ("x", "tags", "emb")}
        except (OSError, ValueError, KeyError):
            return None

    def fill(self, jobs, workers: int = 2, log=log_stderr, warn=None) -> dict:
        """Compute what is missing for [(path, n_windows)]; returns {(path, n_windows): entry}. A file that
        cannot be decoded is one ``warn`` line and is left out."""
        out, todo = {}, []
        for path, n in jobs:
            entry = self.load(path, n)
            if entry is None:
                todo.append((path, n))
            else:
                out[(path, n)] = entry
        if not todo:
            return out
        log(f"computing the MSD stem for {len(todo)} files ({len(out)} cached)")
        t0 = time.time()

        def decode(job):
            path, n = job
            try:
                return job, MSD.log_mels(np.stack(audio.load_windows(path, n, front=MSD))), None
            except CrnnError as exc:
                return job, None, str(exc)

        with ThreadPoolExecutor(workers) as pool:
            for i, (job, mels, error) in enumerate(pool.map(decode, todo), 1):
                if error:
                    (warn or log)(f"{error} (left out)")
                    continue
                x, emb, tags = self.frozen(mels)
                entry = {"x": x.astype(np.float16), "tags": tags.astype(np.float32), "emb": emb.astype(np.float32)}
                key = self.key(*job)
                tmp = key.with_name(key.stem + ".tmp.npz")
                np.savez(tmp, **entry)
                os.replace(tmp, key)
                self.computed += 1
                out[job] = entry
                if i % 100 == 0:
                    log(f"  {i}/{len(todo)} in {time.time() - t0:.0f} s")
        return out


# ---- rows for training and validation ----


class Rows:
    """Stacked windows: stem features, genre targets and masks, teacher targets, and the clip of each row."""

    def __init__(self, x, y, mask, tags, emb, clip):
        self.x, self.y, self.mask, self.tags, self.emb, self.clip = x, y, mask, tags, emb, clip

    def __len__(self):
        return len(self.x)


def make_rows(records, entries, genres, label_sets) -> Rows:
    """``entries``: per record, a list of cache entries (the clip and its versions)."""
    n = len(genres)
    xs, ys, ms, ts, es, cs = [np.zeros((0, 4, 60, 128), np.float16)], [np.zeros((0, n), np.float32)], \
        [np.zeros((0, n), np.float32)], [np.zeros((0, len(msd.TAGS)), np.float32)], \
        [np.zeros((0, msd.GRU_UNITS), np.float32)], [np.zeros(0, int)]
    for i, (r, clip_entries) in enumerate(zip(records, entries)):
        target = np.zeros(len(genres), np.float32)
        for g in (r.genre, *r.more):
            if g in genres:
                target[genres.index(g)] = 1.0
        mask = np.array([g in label_sets.get(r.source, genres) for g in genres], np.float32)
        for e in clip_entries:
            k = len(e["x"])
            xs.append(e["x"])
            ys.append(np.repeat(target[None], k, 0))
            ms.append(np.repeat(mask[None], k, 0))
            ts.append(e["tags"])
            es.append(e["emb"])
            cs.append(np.full(k, i))
    return Rows(np.concatenate(xs), np.concatenate(ys), np.concatenate(ms), np.concatenate(ts), np.concatenate(es),
                np.concatenate(cs))


def check_no_test(records) -> None:
    """Test splits never reach training: the trainer refuses records whose split is test."""
    bad = [r for r in records if r.split == "test"]
    if bad:
        raise CrnnError(f"{len(bad)} test records reached training (e.g. {bad[0].path})")


# ---- the top: what trains ----


def build_top(n_genres: int, n_tags: int, dropout=0.1, gru_dropout=0.3, genre_activation="sigmoid", musicnn_dims=0,
              genre_input="state"):
    """conv4 .. heads, reading the cached stem output; layer names as in ``msd.build``. With
    ``musicnn_dims``, a fourth output: a linear map of the state towards musicnn's embedding (training only)."""
    import keras
    from keras import layers

    inp = keras.Input((4, 60, 128), name="stem")
    x = layers.Conv2D(128, 3, padding="same", name="conv4")(inp)
    x = layers.BatchNormalization(axis=-1, epsilon=0.0, name="bn4")(x)
    x = layers.ELU(name="elu4")(x)
    x = layers.MaxPooling2D((4, 4), name="pool4")(x)
    x = layers.Dropout(dropout, name="drop4")(x)
    seq = layers.Reshape((15, 128), name="to_sequence")(x)
    gru = dict(activation="tanh", recurrent_activation=msd.keras1_hard_sigmoid, reset_after=False)
    x = layers.GRU(msd.GRU_UNITS, return_sequences=True, name="gru1", **gru)(seq)
    emb = layers.GRU(msd.GRU_UNITS, name="gru2", **gru)(x)
    top = layers.Dropout(gru_dropout, name="drop_gru")(emb)
    genre_in = msd.genre_head_input(top, seq, genre_input)
    genres = layers.Dense(n_genres, activation=genre_activation, name="genres")(genre_in)
    tags = layers.Dense(n_tags, activation="sigmoid", name="tags")(top)
    outputs = [emb, genres, tags]
    if musicnn_dims:
        outputs.append(layers.Dense(musicnn_dims, name="musicnn")(emb))
    return keras.Model(inp, outputs, name="msd_top")


def copy_weights(src, dst, names=TOP_LAYERS) -> None:
    have = {layer.name: layer for layer in src.layers}
    for layer in dst.layers:
        if layer.name in names and layer.name in have and layer.weights:
            layer.set_weights(have[layer.name].get_weights())


def set_trainable(top, unfreeze: str) -> None:
    """``head``: the genre head alone, by gradient descent; ``gru``: the GRUs and both heads; ``conv4``: conv4
    too. Batch norms keep the MSD statistics (batches here are small). (``none``: nothing trains by
    gradient; ``fit_probe_head`` fits the genre head.)"""
    if unfreeze not in msd.UNFREEZE or unfreeze == "none":
        raise CrnnError(f"--unfreeze must be one of {', '.join(msd.UNFREEZE[1:])} for a gradient run")
    trainable = {"head": {"genres"}, "gru": {"gru1", "gru2", "genres", "tags", "musicnn"},
                 "conv4": {"conv4", "gru1", "gru2", "genres", "tags", "musicnn"}}[unfreeze]
    for layer in top.layers:
        layer.trainable = layer.name in trainable


# ---- validation: what the checkpoints are chosen by ----


def pool_clips(rows: Rows, emb: np.ndarray, probs: np.ndarray):
    from ..model import pool_track

    clips = np.unique(rows.clip)
    pooled = [pool_track(emb[rows.clip == c], probs[rows.clip == c]) for c in clips]
    return clips, np.array([p[0] for p in pooled]), np.array([p[1] for p in pooled])


def score_val(records, rows: Rows, emb, probs, genres, label_sets, k=5) -> dict:
    """Per source: top-1 accuracy among its genres, macro-F1 of those decisions, p@5 by cosine
    (other artists); ``score`` is the mean of every source's accuracy and of the p@5 of sources whose val
    clips have at least 3 artists in each genre (GTZAN's val is one or two stand-in artists a genre, so
    its p@5 counts mostly other genres whatever the model does)."""
    from .metrics import precision_at_k, top_genre_macro_f1

    clips, e, p = pool_clips(rows, emb, probs)
    out, scores = {}, []
    by_source: dict = {}
    for j, c in enumerate(clips):
        by_source.setdefault(records[c].source, []).append(j)
    for source, idx in sorted(by_source.items()):
        cols = [genres.index(g) for g in label_sets[source]]
        truth = [records[clips[j]].genre for j in idx]
        pred = [genres[cols[int(np.argmax(p[j, cols]))]] for j in idx]
        acc = float(np.mean([a == b for a, b in zip(truth, pred)]))
        artists = [records[clips[j]].artist or str(records[clips[j]].path) for j in idx]
        p5 = precision_at_k(e[idx], p[idx], truth, artists, k=k, mode="cosine")
        out[source] = {"accuracy": acc, "macro_f1": top_genre_macro_f1(truth, pred, label_sets[source]),
                       "p_at_5": float(p5), "clips": len(idx)}
        scores.append(acc)
        per_genre = {g: {a for a, t in zip(artists, truth) if t == g} for g in set(truth)}
        if min(len(a) for a in per_genre.values()) >= 3:
            scores.append(float(p5))
    out["score"] = float(np.mean(scores)) if scores else float("nan")
    return out


# ---- the run ----


class Run:
    """One fine-tuning run: the data (cached), the top, the optimizer and its checkpoints."""

    def __init__(self, records, cache: FeatureCache, out_dir, versions=DEFAULT_VERSIONS, version_dir=None,
                 unfreeze="gru", lr=1e-3, tag_weight=1.0, emb_weight=0.0, batch_size=32, seed=0, workers=2,
                 log=log_stderr, warn=None, musicnn_weight=0.0, teacher_dir=None, genre_input=None):
        self.log = log
        self.out = Path(out_dir)
        self.genre_activation = "softmax" if unfreeze == "none" else "sigmoid"
        self.config = {"unfreeze": unfreeze, "lr": lr, "tag_weight": tag_weight, "emb_weight": emb_weight,
                       "musicnn_weight": musicnn_weight, "genre_input": genre_input or cache.start.genre_input,
                       "batch_size": batch_size, "seed": seed, "versions": list(versions),
                       "train_windows": TRAIN_WINDOWS, "val_windows": audio.DEFAULT_WINDOWS}
        self.fit_records = [r for r in records if r.split == "train"]
        self.val_records = [r for r in records if r.split == "val"]
        check_no_test(self.fit_records)
        self.genres = dataset.genres_of(self.fit_records)
        self.label_sets = dataset.label_sets(self.fit_records)
        self.sources = {s: {"genres": g, "train": sum(r.source == s for r in self.fit_records),
                            "val": sum(r.source == s for r in self.val_records)} for s, g in self.label_sets.items()}
        self.cache = cache
        paths = self._version_paths(versions, version_dir, workers)
        jobs = [(p, TRAIN_WINDOWS) for ps in paths for p in ps] + [(r.path, audio.DEFAULT_WINDOWS) for r in self.val_records]
        entries = cache.fill(jobs, workers, log, warn)
        self.left_out = {p for p, n in jobs if (p, n) not in entries}  # files that could not be decoded
        self.train = make_rows(self.fit_records, [[entries[(p, TRAIN_WINDOWS)] for p in ps if (p, TRAIN_WINDOWS) in entries]
                                                  for ps in paths], self.genres, self.label_sets)
        self.val = make_rows(self.val_records, [[entries[(r.path, audio.DEFAULT_WINDOWS)]] if (r.path, audio.DEFAULT_WINDOWS)
                                                in entries else [] for r in self.val_records], self.genres, self.label_sets)
        self.records_seen = list(self.fit_records)  # what reached training: asserted by the tests
        self.musicnn = self._musicnn_targets(teacher_dir) if musicnn_weight else None
        log(f"{len(self.train)} training windows from {len(self.fit_records)} clips x {1 + len(versions)} versions; "
            f"{len(self.val)} val windows; genres: {', '.join(self.genres)}")

    def _musicnn_targets(self, teacher_dir):
        """Per training row: musicnn's embedding of the clean clip (mean over its 3 s windows, standardised
        over the train clips), and a mask (0 where the teacher could not read the clip). Every window and
        codec version of a clip learns the clean clip's target."""
        from . import teacher

        cache = teacher.TeacherCache(teacher_dir or teacher.DEFAULT_CACHE)
        got = teacher.outputs([r.path for r in self.fit_records], cache, self.log)
        means = np.array([e["emb"].mean(0) if e is not None else np.zeros(teacher.EMB_DIMS) for e in got], np.float32)
        ok = np.array([e is not None for e in got], bool)
        if not ok.any():
            raise CrnnError("no training clip has musicnn targets: --musicnn-weight needs the teacher")
        mu, sd = means[ok].mean(0), np.maximum(means[ok].std(0), 1e-6)
        target = ((means - mu) / sd).astype(np.float32)
        return target[self.train.clip], ok[self.train.clip].astype(np.float32)

    def _version_paths(self, versions, version_dir, workers):
        from . import augment

        if not versions:
            return [[r.path] for r in self.fit_records]
        version_dir = Path(version_dir or augment.DEFAULT_VERSION_DIR)

        def one(r):
            got = [r.path]
            for name in versions:
                try:
                    got.append(augment.make_version(r.path, name, version_dir))
                except CrnnError as exc:
                    self.log(f"{r.path}: {name} version left out: {exc}")
            return got

        t0 = time.time()
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(one, self.fit_records))
        self.log(f"codec versions ready in {time.time() - t0:.0f} s")
        return out

    # -- model and optimizer --

    def _build(self):
        import keras

        from ..model import import_tensorflow
        from . import teacher

        import_tensorflow()
        keras.utils.set_random_seed(self.config["seed"])
        full = self.cache.start.network(self.genres, self.genre_activation, self.config["genre_input"])
        self.top = build_top(len(self.genres), len(msd.TAGS), genre_activation=self.genre_activation,
                             musicnn_dims=teacher.EMB_DIMS if self.musicnn is not None else 0,
                             genre_input=self.config["genre_input"])
        copy_weights(full, self.top)
        if self.config["unfreeze"] != "none":
            set_trainable(self.top, self.config["unfreeze"])
        self.optimizer = keras.optimizers.Adam(self.config["lr"])
        self.optimizer.build(self.top.trainable_variables)

    def _step_fn(self):
        import tensorflow as tf

        top, opt, cfg = self.top, self.optimizer, self.config
        tw, ew, mw = float(cfg["tag_weight"]), float(cfg["emb_weight"]), float(cfg.get("musicnn_weight", 0.0))
        train_tags = cfg["unfreeze"] != "head"

        @tf.function(reduce_retracing=True)
        def step(x, y, mask, tags, emb0, mt, mt_mask):
            with tf.GradientTape() as tape:
                emb, probs, tag_probs, *mt_pred = top(x, training=True)
                eps = 1e-7
                p = tf.clip_by_value(probs, eps, 1 - eps)
                bce = -(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
                loss = tf.reduce_sum(bce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
                if train_tags and tw:
                    q = tf.clip_by_value(tag_probs, eps, 1 - eps)
                    loss += tw * tf.reduce_mean(-(tags * tf.math.log(q) + (1 - tags) * tf.math.log(1 - q)))
                if ew:
                    cos = tf.reduce_sum(tf.math.l2_normalize(emb, -1) * tf.math.l2_normalize(emb0, -1), -1)
                    loss += ew * tf.reduce_mean(1 - cos)
                if mw:
                    err = tf.reduce_mean(tf.square(mt_pred[0] - mt), -1)
                    loss += mw * tf.reduce_sum(err * mt_mask) / tf.maximum(tf.reduce_sum(mt_mask), 1.0)
            grads = tape.gradient(loss, top.trainable_variables)
            opt.apply_gradients(zip(grads, top.trainable_variables))
            return loss

        return step

    def predict(self, rows: Rows, batch=256):
        if not len(rows):
            return np.zeros((0, msd.GRU_UNITS), np.float32), np.zeros((0, len(self.genres)), np.float32)
        outs = [self.top(rows.x[i : i + batch].astype(np.float32), training=False) for i in range(0, len(rows), batch)]
        return (np.concatenate([np.asarray(o[0]) for o in outs]), np.concatenate([np.asarray(o[1]) for o in outs]))

    # -- checkpoints --

    def _seed_states(self) -> list:
        """The state variables of the dropout layers' seed generators."""
        return [layer.seed_generator.state for layer in self.top.layers if getattr(layer, "seed_generator", None)]

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self, epoch, rng, best, history):
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.top.save_weights(str(self.ckpt / "tmp-top.weights.h5"))
        os.replace(self.ckpt / "tmp-top.weights.h5", self.ckpt / "top.weights.h5")
        np.savez(self.ckpt / "tmp-optimizer.npz", *[np.asarray(v) for v in self.optimizer.variables])
        os.replace(self.ckpt / "tmp-optimizer.npz", self.ckpt / "optimizer.npz")
        np.savez(self.ckpt / "tmp-seeds.npz", *[np.asarray(v) for v in self._seed_states()])
        os.replace(self.ckpt / "tmp-seeds.npz", self.ckpt / "seeds.npz")
        state = {"epoch": epoch, "config": self.config, "rng": rng.bit_generator.state, "best": best,
                 "history": history, "genres": self.genres}
        (self.ckpt / "tmp-state.json").write_text(json.dumps(state, indent=1), "utf-8")
        os.replace(self.ckpt / "tmp-state.json", self.ckpt / "state.json")

    def load_checkpoint(self):
        state = json.loads((self.ckpt / "state.json").read_text("utf-8"))
        if state["genres"] != self.genres:
            raise CrnnError(f"the checkpoint in {self.ckpt} was trained on other genres ({', '.join(state['genres'])})")
        self.top.load_weights(str(self.ckpt / "top.weights.h5"))
        with np.load(self.ckpt / "optimizer.npz") as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(values) != len(self.optimizer.variables):
            raise CrnnError(f"the optimizer state in {self.ckpt} does not fit this run")
        for var, value in zip(self.optimizer.variables, values):
            var.assign(value)
        with np.load(self.ckpt / "seeds.npz") as data:  # dropout's random streams go on as they would have
            for var, i in zip(self._seed_states(), range(len(data.files))):
                var.assign(data[f"arr_{i}"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        return state["epoch"], rng, state["best"], state["history"]

    # -- fit --

    def fit(self, epochs: int, resume: bool = False, patience: int = 0, stop_after: int = 0) -> dict:
        """Train to ``epochs`` (counting epochs a resumed run already did); keep the best top by val score.

        ``stop_after`` ends this sitting after that many epochs (the run stays resumable)."""
        self._build()
        if resume and (self.ckpt / "state.json").is_file():
            epoch, rng, best, history = self.load_checkpoint()
            self.log(f"resumed at epoch {epoch} (best val score {best['score']:.3f} at epoch {best['epoch']})")
        else:
            epoch, rng = 0, np.random.default_rng(self.config["seed"])
            emb, probs = self.predict(self.val)
            val = score_val(self.val_records, self.val, emb, probs, self.genres, self.label_sets)
            best = {"epoch": 0, "score": val["score"], "val": val}
            history = [{"epoch": 0, "val": val}]
            self.top.save_weights(str(self._best_path()))
            head = "its own genre head" if self.cache.start.keeps_head(self.genres, self.config["genre_input"]) else \
                "a fresh genre head"
            self.log(f"epoch 0 (the start's network, {head}): val {_brief(val)}")
        step = self._step_fn()
        bs = int(self.config["batch_size"])
        done_now = 0
        while epoch < epochs:
            t0 = time.time()
            order = rng.permutation(len(self.train))
            losses = []
            for i in range(0, len(order), bs):  # the last batch may be smaller
                b = np.sort(order[i : i + bs])
                tr = self.train
                mt, mt_mask = (self.musicnn[0][b], self.musicnn[1][b]) if self.musicnn is not None else \
                    (np.zeros((len(b), 1), np.float32), np.zeros(len(b), np.float32))
                losses.append(float(step(tr.x[b].astype(np.float32), tr.y[b], tr.mask[b], tr.tags[b], tr.emb[b],
                                         mt, mt_mask)))
            epoch += 1
            emb, probs = self.predict(self.val)
            val = score_val(self.val_records, self.val, emb, probs, self.genres, self.label_sets)
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val": val, "seconds": time.time() - t0})
            if val["score"] > best["score"] or not np.isfinite(best["score"]):  # no val: the last epoch
                best = {"epoch": epoch, "score": val["score"], "val": val}
                self.top.save_weights(str(self._best_path()))
            self.save_checkpoint(epoch, rng, best, history)
            self.log(f"epoch {epoch}: loss {np.mean(losses):.4f}, val {_brief(val)} ({time.time() - t0:.0f} s)")
            done_now += 1
            if patience and epoch - best["epoch"] >= patience:
                self.log(f"no better val score for {patience} epochs: stopping")
                break
            if stop_after and done_now >= stop_after and epoch < epochs:
                self.log(f"stopped after {done_now} epochs this sitting; continue with --resume {self.out}")
                return {"finished": False, "epoch": epoch, "best": best, "history": history}
        return {"finished": True, "epoch": epoch, "best": best, "history": history}

    def _best_path(self) -> Path:
        self.ckpt.mkdir(parents=True, exist_ok=True)
        return self.ckpt / "best-top.weights.h5"

    def save(self, result: dict, name: str, command: str, extra: dict | None = None):
        """The full model (the start's stem + the best top) with its card and ONNX export."""
        from .card import save_model

        full = self.cache.start.network(self.genres, self.genre_activation, self.config["genre_input"])
        self.top.load_weights(str(self._best_path()))
        copy_weights(self.top, full)
        extra = {"training": {
            "recipe": "finetune", "start": self.cache.start.describe(),
            "credit": msd.CREDIT, "sources": self.sources, "genres_trained": self.genres,
            "label_mask": "per source: a clip's genre loss counts only the genres its own set labels",
            "clips": {"train": len(self.fit_records), "val": len(self.val_records)},
            "windows": {"train": len(self.train), "val": len(self.val)},
            "config": self.config, "epochs_run": result["epoch"], "best_epoch": result["best"]["epoch"],
            "val": result["best"]["val"], "history": [{k: v for k, v in h.items() if k != "val"} | {"score": h["val"]["score"]}
                                                       for h in result["history"]],
            "teacher": "the frozen released network's 50 tags on every window and version (tag head)"
                       + ("; musicnn's 200-d embedding of the clean clip from the state (--musicnn-weight)"
                          if self.musicnn is not None else ""),
            "command": command, **(extra or {})}}
        extra["license"] = f"{msd.CREDIT} The licence notice is in {msd.LICENSE_FILE} beside the weights."
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / msd.LICENSE_FILE).write_text(msd.LICENSE, "utf-8")
        if "probe" in result:
            extra["training"]["genre_head"] = result["probe"]
        arch = dict(msd.ARCHITECTURE, genre_activation=self.genre_activation, genre_input=self.config["genre_input"])
        return save_model(full, self.out, self.genres, arch, extra, name=name, tags=msd.TAGS,
                          features=MSD.params, log=self.log)


def head_features(run: Run, rows: Rows, batch: int = 256) -> np.ndarray:
    """What the genre head reads for each row, from the start's layers: the 32-d state (cached), beside
    the conv sequence's time mean when the run's ``genre_input`` asks for it."""
    if run.config["genre_input"] == "state":
        return rows.emb
    import keras

    conv = keras.Model(run.top.input, run.top.get_layer("conv_mean").output)
    means = [np.asarray(conv(rows.x[i : i + batch].astype(np.float32), training=False))
             for i in range(0, len(rows), batch)]
    return np.concatenate([rows.emb, np.concatenate(means) if means else np.zeros((0, 128), np.float32)], axis=1)


def fit_probe_head(run: Run) -> dict:
    """The frozen network with a softmax probe as its genre head (``--unfreeze none``).

    The probe (``probe.fit_probe``: L2 chosen on val windows' log-loss, refitted on train + val) reads
    each window's ``head_features`` as the start computes them, on every train window and codec version
    and every val window; one genre per clip, each clip's softmax over its own set's genres (the per-source
    label mask). Its standardisation folds into the head's weights, so the served network is the start's
    layers plus one softmax layer over all genres; a track's genres are the mean of its windows' outputs.
    """
    from .probe import fit_probe

    labels = run.genres
    run._build()
    X_train, X_val = head_features(run, run.train), head_features(run, run.val)
    y_train = np.array([labels.index(run.fit_records[c].genre) for c in run.train.clip])
    y_val = np.array([labels.index(run.val_records[c].genre) for c in run.val.clip], dtype=np.int64)
    probe, info = fit_probe(labels, X_train, y_train, X_val, y_val, mask_train=run.train.mask, mask_val=run.val.mask)
    W = probe.W / probe.scale[:, None]
    b = probe.b - (probe.mean / probe.scale) @ probe.W
    run.top.get_layer("genres").set_weights([W.astype(np.float32), b.astype(np.float32)])
    emb, probs = run.predict(run.val)
    val = score_val(run.val_records, run.val, emb, probs, run.genres, run.label_sets)
    run.top.save_weights(str(run._best_path()))
    reads = {"state": "the standardised 32-d state", "state+conv_mean": "the standardised 32-d state beside the "
             "conv sequence's 128-d time mean"}[run.config["genre_input"]]
    info = {"probe": f"softmax regression on {reads}, per window; each clip's softmax over its own set's genres",
            "l2": info["l2"], "fit": info.get("method"),
            "windows": {"train": int(len(y_train)), "val": int(len(y_val))},
            "val_log_loss": info.get("val_log_loss")}
    run.log(f"probe head (L2 {info['l2']:g}, fitted on train + val windows): val {_brief(val)} (val took part in "
            "the refit: this is not a held-out score)")
    return {"finished": True, "epoch": 0, "best": {"epoch": 0, "score": val["score"], "val": val},
            "history": [{"epoch": 0, "val": val}], "probe": info}


def _brief(val: dict) -> str:
    parts = [f"{s} acc {v['accuracy']:.3f} f1 {v['macro_f1']:.3f} p@5 {v['p_at_5']:.3f}"
             for s, v in val.items() if isinstance(v, dict)]
    return "; ".join(parts) + f"; score {val['score']:.3f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crnn-finetune",
                                description="Fine-tune the MSD CRNN (Choi et al. 2017) into a beets-crnn model.")
    p.add_argument("data", nargs="+", help="labelled sets (folders with metadata.csv, or genre/ subfolders)")
    p.add_argument("--out", required=True, help="a new folder for the model and its checkpoints")
    p.add_argument("--weights", default=None, help=f"where to start: the released {msd.WEIGHTS_FILE} (default: "
                   "../shared/pretrained) or a model folder of this family")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="stem feature cache folder")
    p.add_argument("--version-cache", default=None, help="codec version cache folder")
    p.add_argument("--versions", default=",".join(DEFAULT_VERSIONS), help="codec versions of the train clips ('' = none)")
    p.add_argument("--unfreeze", choices=msd.UNFREEZE, default="gru")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better val score")
    p.add_argument("--stop-after", type=int, default=0, help="end this sitting after N epochs (resume later)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tag-weight", type=float, default=1.0)
    p.add_argument("--emb-weight", type=float, default=0.0)
    p.add_argument("--musicnn-weight", type=float, default=0.0, help="weight of musicnn's embedding as a second "
                   "teacher of the state (needs the [teacher] extra; its targets are cached)")
    p.add_argument("--teacher-cache", default=None, help="musicnn target cache folder")
    p.add_argument("--genre-input", choices=msd.GENRE_INPUTS, default=None, help="what the genre head reads "
                   "(default: the start model's choice; from the released file, state+conv_mean)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="crnn-msd")
    p.add_argument("--workers", type=int, default=2)
    return p


def _run(args, argv) -> None:
    """crnn-finetune's work; ``argv`` goes into the card's command line."""
    records = dataset.read_sources(args.data)
    versions = tuple(v for v in args.versions.split(",") if v)
    out = Path(args.out)
    genre_input = args.genre_input
    if args.resume:
        state = out / "checkpoint" / "state.json"
        if not state.is_file():
            raise CrnnError(f"nothing to resume in {out} (no checkpoint/state.json)")
        config = json.loads(state.read_text("utf-8"))["config"]
        mine = {"unfreeze": args.unfreeze, "lr": args.lr, "tag_weight": args.tag_weight,
                "emb_weight": args.emb_weight, "musicnn_weight": args.musicnn_weight,
                "genre_input": args.genre_input or config.get("genre_input", "state"),
                "batch_size": args.batch_size, "seed": args.seed,
                "versions": list(versions)}
        old = {"musicnn_weight": 0.0, "genre_input": "state"}  # runs from before these settings
        differ = [k for k, v in mine.items() if config.get(k, old.get(k)) != v]
        if differ:
            raise CrnnError(f"--resume with other settings than the run's ({', '.join(differ)})")
        genre_input = mine["genre_input"]
    cache = FeatureCache(args.cache, weights=args.weights)
    run = Run(records, cache, out, versions, args.version_cache, args.unfreeze, args.lr, args.tag_weight,
              args.emb_weight, args.batch_size, args.seed, args.workers, musicnn_weight=args.musicnn_weight,
              teacher_dir=args.teacher_cache, genre_input=genre_input)
    if args.unfreeze == "none":
        result = fit_probe_head(run)
    else:
        result = run.fit(args.epochs, resume=args.resume, patience=args.patience, stop_after=args.stop_after)
    if not result["finished"]:
        return  # stopped by --stop-after: --resume continues
    card = run.save(result, args.name, "crnn-finetune " + " ".join(argv if argv is not None else sys.argv[1:]))
    log_stderr(f"wrote {card.weights.parent} ({card.model_id}); best epoch {result['best']['epoch']}: "
               f"{_brief(result['best']['val'])}")


def main(argv=None) -> int:
    return command_main("crnn-finetune", lambda: build_parser().parse_args(argv), lambda args: _run(args, argv),
                        "interrupted; the last finished epoch is checkpointed (--resume continues)")


if __name__ == "__main__":
    sys.exit(main())
