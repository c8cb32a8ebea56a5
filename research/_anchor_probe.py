"""Helpers for research/anchor.py: a numpy genre probe, clip features of the frozen networks, timings.

- ``Probe``: multinomial logistic regression (softmax, L2 on the weights) on standardised
  features, fitted by L-BFGS (scipy) or, without scipy, full-batch gradient descent.
  ``fit_probe`` picks the L2 strength on the validation split (log-loss), then refits on
  train + val. Test clips never reach it.
- ``clip_embedding``: musicnn's clip embedding, the mean of its per-window 200-d
  'penultimate' outputs, L2-normalised. ``msd_features``: the MSD CRNN's, the mean of its unit
  32-d ``gru2`` states over the served windows, L2-normalised, and that beside the mean of its
  50 tag logits (a second probe input).
- ``rate``: start-up and steady seconds per clip from each clip's wall seconds.
- ``Caches``: look a file's teacher outputs up in several ``TeacherCache`` folders.
- Run as a script, this file is the ``runner`` that ``teacher.compute`` starts: it starts the
  real worker (``python -m beetsplug.crnn.training.teacher``) unchanged, passes its input and output
  through, and writes when each file finished to a side file, so the benchmark can tell the
  worker's start-up from its steady seconds per clip. Imports numpy only (no TensorFlow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from beetsplug.crnn.training.probe import (DEFAULT_L2, L2_GRID, Probe, _softmax, fit_probe,  # noqa: E402,F401
                                           one_blas_thread)


def restrict(P: np.ndarray, columns) -> np.ndarray:
    """A softmax distribution conditioned on a subset of its classes (columns renormalised)."""
    Q = np.asarray(P, np.float64)[:, list(columns)]
    return Q / np.maximum(Q.sum(axis=1, keepdims=True), 1e-12)


# ---- clip features of the frozen networks ----


def unit_mean(vectors, unit_rows: bool = False) -> np.ndarray:
    """Mean of per-window vectors (each L2-normalised first when ``unit_rows``), L2-normalised."""
    v = np.asarray(vectors, np.float64)
    if unit_rows:
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    v = v.mean(axis=0)
    return (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)


def clip_embedding(entry: dict) -> np.ndarray:
    """musicnn: mean of the per-window 200-d embeddings, L2-normalised."""
    return unit_mean(entry["emb"])


def msd_features(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """MSD CRNN (a finetune.FeatureCache entry): the clip's unit state, and [state, mean tag logits]."""
    state = unit_mean(entry["emb"], unit_rows=True)
    p = np.clip(np.asarray(entry["tags"], np.float64), 1e-6, 1 - 1e-6)
    logits = (np.log(p) - np.log1p(-p)).mean(axis=0)
    return state, np.concatenate([state, logits]).astype(np.float32)


class Caches:
    """Teacher outputs looked up in several TeacherCache folders, first hit wins."""

    def __init__(self, *caches):
        self.caches = caches

    def find(self, path):
        for c in self.caches:
            if c.has(path):
                return c
        return None

    def has(self, path) -> bool:
        return self.find(path) is not None

    def get(self, path) -> dict:
        c = self.find(path)
        if c is None:
            raise KeyError(str(path))
        return c.get(path)


def runner_command(times_file: Path, cache_dir: Path) -> list:
    """The ``runner`` for ``teacher.compute``: this file wrapping the real worker."""
    return [sys.executable, str(Path(__file__).resolve()), "--times", str(times_file), "--",
            sys.executable, "-m", "beetsplug.crnn.training.teacher", "--cache", str(cache_dir)]


def read_times(times_file: Path) -> dict | None:
    """{'clips', 'wall_s', 'startup_s', 'steady_s_per_clip'} of one wrapped worker run, None if no file finished."""
    try:
        data = json.loads(Path(times_file).read_text())
    except (OSError, ValueError):
        return None
    t0, done = data["start"], data["ok"]
    return rate(np.diff([t0, *done]), data["end"] - t0) if done else None


def rate(seconds, wall_s: float | None = None, load_s: float = 0.0, warm: bool = False) -> dict | None:
    """{'clips', 'wall_s', 'startup_s', 'steady_s_per_clip', 's_per_clip_all_in'} from each clip's seconds
    (in order): steady is the mean after the first, start-up ``load_s`` + the first's excess over it.
    ``warm``: the model was already running, every clip counts as steady and there is no start-up."""
    s = [float(x) for x in seconds]
    if not s:
        return None
    n = len(s)
    wall = float(sum(s)) + load_s if wall_s is None else float(wall_s)
    if warm:
        return {"clips": n, "wall_s": wall, "startup_s": None, "steady_s_per_clip": float(np.mean(s)),
                "s_per_clip_all_in": wall / n}
    steady = float(np.mean(s[1:])) if n > 1 else None
    return {"clips": n, "wall_s": wall, "startup_s": load_s + s[0] - steady if steady is not None else None,
            "steady_s_per_clip": steady, "s_per_clip_all_in": wall / n}


def _wrap(times_file: str, cmd: list) -> int:
    start = time.time()
    payload = sys.stdin.read()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(payload)
    proc.stdin.close()  # the worker reads all of its input before it prints anything
    ok = []
    for line in proc.stdout:
        if line.startswith("ok "):
            ok.append(time.time())
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = proc.wait()
    Path(times_file).write_text(json.dumps({"start": start, "ok": ok, "end": time.time()}))
    return rc


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "--times" or args[2] != "--":
        sys.exit("usage: _anchor_probe.py --times FILE -- WORKER COMMAND...")
    sys.exit(_wrap(args[1], args[3:]))
