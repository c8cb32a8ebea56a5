"""The robustness report: does the same music in another file get the same analysis?

For each clip, ffmpeg makes the versions a real library holds (``augment.CODEC_VERSIONS``:
other levels, codecs, rates, channels, a low-passed copy); every file then goes through
``crnnembed``'s own path (windowed decoding, log-mels, the model, pooling) and the report
says how far the versions land from the original:

- cosine of each version's embedding to the original's (median, 5th percentile);
- of each track's k nearest neighbours (k = versions per clip - 1), the fraction that are
  versions of the same clip;
- how often all versions of a clip get the same top genre.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from . import augment
from ..audio import DEFAULT_TIMEOUT, DEFAULT_WINDOWS
from ..errors import CrnnError
from ..model import pool_track


def pick_clips(records, per_genre: int | None):
    """The first ``per_genre`` clips of each genre in manifest order (all when None): a fixed, reproducible subset."""
    if not per_genre:
        return list(records)
    seen: dict = {}
    out = []
    for r in records:
        if seen.get(r.genre, 0) < per_genre:
            seen[r.genre] = seen.get(r.genre, 0) + 1
            out.append(r)
    return out


def analyse_file(path, embedder, n_windows=DEFAULT_WINDOWS):
    """(unit embedding, genre probabilities) of a file, exactly as crnnembed computes them."""
    from ..pipeline import track_mels

    from ..features import LEVEL_FREE

    mels, _, _ = track_mels(path, n_windows, DEFAULT_TIMEOUT, front=getattr(embedder, "front", LEVEL_FREE))
    return pool_track(*embedder(mels))


def robustness(records, embedder, versions=None, version_dir=None, n_windows=DEFAULT_WINDOWS, log=print,
               genre_columns=None) -> dict:
    """The report for ``records`` (see the module docstring). ``genre_columns``: indices of the model's
    genres to take the top genre among (the genres the clips' set labels), all when None."""
    versions = list(versions or augment.CODEC_VERSIONS)
    if not records:
        raise CrnnError("no clips for the robustness report")
    tmp = None
    if version_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="crnn-robustness-")
        version_dir = tmp.name
    try:
        embs, probs, kept = [], [], []
        for i, r in enumerate(records, 1):
            try:
                files = [Path(r.path)] + [augment.make_version(r.path, v, version_dir) for v in versions]
                pairs = [analyse_file(f, embedder, n_windows) for f in files]
            except CrnnError as exc:
                log(f"{r.path}: left out of the robustness report: {exc}")
                continue
            embs.append([e for e, _ in pairs])
            probs.append([p for _, p in pairs])
            kept.append(r)
            if i % 10 == 0:
                log(f"robustness: {i} of {len(records)} clips")
    finally:
        if tmp is not None:
            tmp.cleanup()
    if len(kept) < 2:
        raise CrnnError("the robustness report needs at least two clips that decode")
    E = np.asarray(embs, np.float32)  # (clips, 1 + versions, d)
    P = np.asarray(probs, np.float32)
    return summarise(E, P, ["original"] + versions, genre_columns)


def summarise(E: np.ndarray, P: np.ndarray, names, genre_columns=None) -> dict:
    """The report's numbers from embeddings (clips, files, d) and genre probabilities (clips, files, g)."""
    n_clips, n_files, _ = E.shape
    cos = np.einsum("cvd,cd->cv", E[:, 1:], E[:, 0])  # each version to its original
    per_version = {
        name: {"median_cosine": float(np.median(cos[:, j])), "p5_cosine": float(np.percentile(cos[:, j], 5))}
        for j, name in enumerate(names[1:])
    }
    flat = E.reshape(n_clips * n_files, -1)
    clip_of = np.repeat(np.arange(n_clips), n_files)
    sims = flat @ flat.T
    np.fill_diagonal(sims, -np.inf)
    k = n_files - 1
    nearest = np.argsort(-sims, axis=1)[:, :k]
    same_clip = float(np.mean(clip_of[nearest] == clip_of[:, None]))
    cols = np.arange(P.shape[2]) if genre_columns is None else np.asarray(genre_columns)
    top = P[:, :, cols].argmax(axis=2)
    same_genre = float(np.mean(np.all(top == top[:, :1], axis=1)))
    for j, name in enumerate(names[1:], 1):
        per_version[name]["same_top_genre"] = float(np.mean(top[:, j] == top[:, 0]))
    return {
        "clips": int(n_clips),
        "versions": list(names[1:]),
        "median_cosine": float(np.median(cos)),
        "p5_cosine": float(np.percentile(cos, 5)),
        "same_clip_neighbours": same_clip,
        "k": int(k),
        "same_top_genre": same_genre,
        "per_version": per_version,
    }


def format_robustness(report: dict) -> str:
    w = max(len(v) for v in report["versions"] + ["version"])
    lines = [f"robustness over {report['clips']} clips x {len(report['versions']) + 1} files "
             f"(the original and {len(report['versions'])} versions):"]
    lines.append(f"{'version':<{w}}  {'median cos':>10} {'p5 cos':>7} {'same genre':>10}")
    for name in report["versions"]:
        v = report["per_version"][name]
        lines.append(f"{name:<{w}}  {v['median_cosine']:>10.3f} {v['p5_cosine']:>7.3f} {v['same_top_genre']:>10.3f}")
    lines.append(f"all versions: median cosine {report['median_cosine']:.3f}, 5th percentile {report['p5_cosine']:.3f}")
    lines.append(f"same-clip neighbours (k = {report['k']}): {report['same_clip_neighbours']:.3f}")
    lines.append(f"all versions share the top genre: {report['same_top_genre']:.3f}")
    return "\n".join(lines)
