"""A teacher for training: musicnn's MSD model (Pons and Serra 2019), its 50 tags and 200-d embedding.

The teacher runs only while training, on the clean audio, once per file: its outputs per
3 s window are cached on disk (``TeacherCache``) and the student learns them on augmented
crops. musicnn builds a TensorFlow 1 graph and switches eager execution off for the whole
process, which Keras 3 cannot run under, so it always runs in a subprocess of its own
(``python -m beetsplug.crnn.training.teacher``), with ``TF_USE_LEGACY_KERAS=1`` set before TensorFlow loads.

Install: ``pip install 'beets-crnn[train]' librosa`` and ``pip install --no-deps tf-keras musicnn`` (musicnn 0.1.0
declares numpy<1.17, which cannot install beside TensorFlow 2.21; its code runs on numpy 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..audio import HOP_LENGTH, SAMPLE_RATE
from ..errors import CrnnError
from .fileid import content_id

TEACHERS = ("musicnn",)
TEACHER_MODEL = "MSD_musicnn"
TEACHER_SR = 16000
TEACHER_HOP = 256
TEACHER_N_FFT = 512
TEACHER_SECONDS = 3.0
EMB_DIMS = 200  # musicnn's penultimate layer
DEFAULT_CACHE = Path(".cache") / "teacher"  # teacher outputs unless told
INSTALL_HINT = "pip install 'beets-crnn[train]' librosa && pip install --no-deps tf-keras musicnn"


class TeacherError(CrnnError):
    pass


def check_installed() -> None:
    """One clear line when the optional teacher packages are missing."""
    import importlib.util

    missing = [m for m in ("musicnn", "tf_keras", "librosa") if importlib.util.find_spec(m) is None]
    if missing:
        raise TeacherError(f"the musicnn teacher needs {' and '.join(missing)}: {INSTALL_HINT}")


class TeacherCache:
    """Teacher outputs per file: tags (windows, 50) and embedding (windows, 200), float16."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, path) -> Path:
        ident = json.dumps([content_id(path), TEACHER_MODEL, "float32-mel"])
        return self.folder / (hashlib.sha1(ident.encode()).hexdigest() + ".npz")

    def has(self, path) -> bool:
        return self.key(path).is_file()

    def get(self, path) -> dict:
        with np.load(self.key(path)) as data:
            return {"tags": data["tags"].astype(np.float32), "emb": data["emb"].astype(np.float32),
                    "hop": float(data["hop"]), "seconds": float(data["seconds"])}

    def put(self, path, tags, emb, hop, seconds) -> None:
        key = self.key(path)
        tmp = key.with_name(key.stem + ".tmp.npz")
        np.savez(tmp, tags=np.asarray(tags, np.float16), emb=np.asarray(emb, np.float16),
                 hop=np.float64(hop), seconds=np.float64(seconds))
        os.replace(tmp, key)


def tag_names() -> list[str]:
    from musicnn import configuration  # plain constants; does not import TensorFlow

    return list(configuration.MSD_LABELS)


def compute(paths, cache: TeacherCache, log=print, runner=None) -> int:
    """Teacher outputs for every path not yet cached, in a subprocess. Returns how many were computed.

    A file the teacher cannot read is logged in one line and left without targets (its
    crops then train on labels alone).
    """
    todo = [str(p) for p in dict.fromkeys(paths) if not cache.has(p)]
    if not todo:
        return 0
    check_installed()
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    cmd = runner or [sys.executable, "-m", "beetsplug.crnn.training.teacher", "--cache", str(cache.folder)]
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(json.dumps(todo))
    except KeyboardInterrupt:  # Ctrl-C: the teacher stops too; each file it finished is already cached
        proc.kill()
        proc.wait()
        kept = sum(cache.has(p) for p in todo if Path(p).exists())
        raise TeacherError(f"interrupted while computing teacher targets: {kept} of {len(todo)} files are done "
                           "and cached; run the command again for the rest") from None
    done = 0
    for line in out.splitlines():
        if line.startswith("ok "):
            done += 1
        elif line.startswith("error "):
            log(line[len("error "):])
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise TeacherError(f"the musicnn teacher stopped (exit {proc.returncode}): {last}")
    log(f"teacher targets computed for {done} of {len(todo)} files")
    return done


def outputs(paths, cache: TeacherCache, log=print) -> list:
    """Each path's teacher outputs (``TeacherCache.get``), what is missing computed first; None for a file
    the teacher could not read."""
    compute(paths, cache, log=log)
    return [cache.get(p) if cache.has(p) else None for p in paths]


def crop_targets(entry: dict, start_frame: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean teacher tags and embedding over the teacher windows centred inside a student crop.

    A clip shorter than the crop is looped to fill it, so its whole-clip mean is the target.
    """
    tags, emb, hop = entry["tags"], entry["emb"], entry["hop"]
    t0 = start_frame * HOP_LENGTH / SAMPLE_RATE
    t1 = (start_frame + n_frames) * HOP_LENGTH / SAMPLE_RATE
    centres = (np.arange(len(tags)) + 0.5) * hop
    if entry["seconds"] <= t1 - t0:  # looped to fill the crop: every window is in it
        inside = np.ones(len(tags), bool)
    else:
        inside = (centres >= t0) & (centres <= t1)
        if not inside.any():  # no window centred inside: the nearest one(s)
            distance = np.abs(centres - (t0 + t1) / 2)
            inside = distance == distance.min()
    return tags[inside].mean(axis=0), emb[inside].mean(axis=0)


# ---- the subprocess ----

def _worker(cache_dir: str) -> int:
    """Reads a JSON list of paths on stdin; writes each file's outputs to the cache; 'ok'/'error' lines."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import librosa
    import tensorflow as tf
    from musicnn import configuration as config
    from musicnn import models

    tf.compat.v1.disable_eager_execution()
    cache = TeacherCache(cache_dir)
    paths = json.loads(sys.stdin.read())
    n_frames = librosa.time_to_frames(TEACHER_SECONDS, sr=TEACHER_SR, n_fft=TEACHER_N_FFT, hop_length=TEACHER_HOP) + 1
    hop_s = n_frames * TEACHER_HOP / TEACHER_SR
    x = tf.compat.v1.placeholder(tf.float32, [None, n_frames, config.N_MELS])
    is_training = tf.compat.v1.placeholder(tf.bool)
    outputs = models.define_model(x, is_training, TEACHER_MODEL, len(config.MSD_LABELS))
    probs, penultimate = tf.nn.sigmoid(outputs[0]), outputs[-1]
    sess = tf.compat.v1.Session(config=tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1))
    tf.compat.v1.train.Saver().restore(sess, os.path.join(os.path.dirname(models.__file__), TEACHER_MODEL) + "/")
    for path in paths:
        try:
            y, _ = librosa.load(path, sr=TEACHER_SR, mono=True)
            seconds = len(y) / TEACHER_SR
            need = (n_frames - 1) * TEACHER_HOP + TEACHER_N_FFT
            if len(y) < need:  # a short clip is looped, as the student's window loops it
                y = np.resize(y, need) if len(y) else np.zeros(need, np.float32)
            mel = librosa.feature.melspectrogram(y=y, sr=TEACHER_SR, hop_length=TEACHER_HOP, n_fft=TEACHER_N_FFT,
                                                 n_mels=config.N_MELS).T.astype(np.float32)
            # musicnn casts to float16 here, which overflows to inf on loud audio: float32 instead.
            rep = np.log10(10000.0 * mel + 1.0)
            starts = range(0, rep.shape[0] - n_frames + 1, n_frames)
            batch = np.stack([rep[s : s + n_frames] for s in starts])
            t, e = [], []
            for i in range(0, len(batch), 32):
                a, b = sess.run([probs, penultimate], feed_dict={x: batch[i : i + 32], is_training: False})
                t.append(a)
                e.append(b)
            cache.put(path, np.concatenate(t), np.concatenate(e), hop_s, seconds)
            print("ok " + path, flush=True)
        except Exception as exc:  # one bad file must not stop the batch
            print(f"error {path}: teacher could not analyse it: {exc!r}"[:500].replace("\n", " "), flush=True)
    sess.close()
    return 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Compute musicnn teacher outputs (internal; used by crnn-train --teacher).")
    ap.add_argument("--cache", required=True)
    sys.exit(_worker(ap.parse_args().cache))
