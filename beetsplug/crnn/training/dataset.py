"""Labelled audio for training and evaluation: records, the log-mel cache, serving-identical windows.

Inputs are a CSV manifest (emotify's metadata.csv format: path, genre, artist, split, ...)
or a folder per genre (GTZAN style ``genre/file``). Log-mels are computed with the same
audio and feature code as ``crnnembed`` and cached on disk, so epochs never re-decode.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import audio
from ..audio import HOP_LENGTH, WINDOW_FRAMES
from ..errors import CrnnError
from ..features import LEVEL_FREE, PARAMS, log_mel
from .fileid import content_id

SPLITS = ("train", "val", "test")
DEFAULT_CACHE = Path(".cache") / "mels"  # the log-mel cache of crnn-train, crnn-eval and crnn-wccn
AUDIO_EXTS = {".mp3", ".flac", ".ogg", ".oga", ".opus", ".wav", ".aif", ".aiff", ".m4a", ".aac", ".wma"}


@dataclass(frozen=True)
class Record:
    path: Path
    genre: str
    split: str
    artist: str
    source: str = ""  # the labelled set it comes from: its genres are the only ones it can vouch for
    more: tuple = ()  # further genres of the same clip (a library track tagged "rock; pop"): also positives


def read_manifest(path) -> list[Record]:
    """Records of a CSV manifest; relative paths are relative to the manifest's folder."""
    path = Path(path)
    base = path.parent
    records = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "genre"} - set(reader.fieldnames or ())
            if missing:
                raise CrnnError(f"manifest {path} lacks column(s): {', '.join(sorted(missing))}")
            for line, row in enumerate(reader, 2):
                if not row.get("path") or not row.get("genre"):
                    raise CrnnError(f"manifest {path}, line {line}: no path or no genre")
                p = Path(row["path"])
                split = (row.get("split") or "train").strip().lower()
                if split not in SPLITS:
                    raise CrnnError(f"manifest {path}: unknown split {split!r} for {p}")
                records.append(
                    Record(p if p.is_absolute() else base / p, row["genre"].strip().lower(), split, (row.get("artist") or "").strip())
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CrnnError(f"cannot read manifest {path}: {reason}") from None
    return records


def read_folders(root, val_fraction=0.1, test_fraction=0.1) -> list[Record]:
    """Records of a ``genre/file`` tree. The split is a stable hash of the file name, so it never moves."""
    root = Path(root)
    records = []
    for genre_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(genre_dir.rglob("*")):
            if f.suffix.lower() not in AUDIO_EXTS or not f.is_file():
                continue
            u = zlib.crc32(f.name.encode("utf-8")) / 2**32
            split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
            records.append(Record(f, genre_dir.name.lower(), split, ""))
    if not records:
        raise CrnnError(f"no audio files under {root}/<genre>/")
    return records


def read_records(source) -> list[Record]:
    """Records of one labelled set, each tagged with the set's name (its folder's name)."""
    source = Path(source)
    if source.is_dir():
        manifest = source / "metadata.csv"
        records = read_manifest(manifest) if manifest.is_file() else read_folders(source)
        name = source.resolve().name
    else:
        records = read_manifest(source)
        name = source.resolve().parent.name
    return [replace(r, source=name) for r in records]


def read_sources(sources) -> list[Record]:
    """Records of several labelled sets; two sets with one name are an error (their masks would merge)."""
    records, seen = [], {}
    for s in sources:
        recs = read_records(s)
        name = recs[0].source if recs else str(s)
        if name in seen:
            raise CrnnError(f"two data sets are both named {name!r} ({seen[name]} and {s}): rename one folder")
        seen[name] = s
        records.extend(recs)
    return records


def label_sets(records) -> dict[str, list[str]]:
    """The genres each source labels: a clip says nothing about genres its own set never uses."""
    out: dict[str, set] = {}
    for r in records:
        out.setdefault(r.source, set()).update((r.genre, *r.more))
    return {k: sorted(v) for k, v in sorted(out.items())}


def genres_of(records) -> list[str]:
    return sorted({r.genre for r in records})


class MelCache:
    """Whole-clip log-mels on disk as float16, keyed by file content and preprocessing.

    ``front`` is the model family's front end (``features.FrontEnd``); the level-free one's frames are
    not centred, so its windows can be cut from a whole-clip log-mel. Others' ``serving`` windows are
    decoded as crnnembed decodes them and cached per window count.
    """

    def __init__(self, folder, front=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.front = front or LEVEL_FREE

    def _key(self, path: Path, *more) -> Path:
        params = PARAMS if self.front is LEVEL_FREE else self.front.params
        ident = json.dumps([content_id(path), params, *more], sort_keys=True)
        return self.folder / (hashlib.sha1(ident.encode()).hexdigest() + ".npz")

    def get(self, path) -> tuple[np.ndarray, int]:
        """(log-mel (96, frames) float32, clip length in samples)."""
        path = Path(path)
        key = self._key(path)
        if key.is_file():
            try:
                with np.load(key) as data:
                    return data["mel"].astype(np.float32), int(data["n_samples"])
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is recomputed
        front = self.front
        y = audio.load_all(path, sample_rate=front.sample_rate)
        n = len(y)
        whole = audio.fit_window(y, front.window_samples) if n < front.window_samples else y
        mel = (log_mel(whole) if front is LEVEL_FREE else front.log_mels(whole)[0]).astype(np.float16)
        tmp = key.with_name(key.stem + ".tmp.npz")
        np.savez(tmp, mel=mel, n_samples=np.int64(n))
        os.replace(tmp, key)
        return mel.astype(np.float32), n

    def serving(self, path, n_windows: int) -> np.ndarray:
        """The windows crnnembed would analyse for this file: (k, 96, 1366) float32."""
        if self.front is LEVEL_FREE:
            return serving_windows(*self.get(path), n_windows)
        key = self._key(Path(path), "serving", int(n_windows))
        if key.is_file():
            try:
                with np.load(key) as data:
                    return data["mels"].astype(np.float32)
            except (OSError, ValueError, KeyError):
                pass
        mels = self.front.log_mels(np.stack(audio.load_windows(path, n_windows, front=self.front)))
        tmp = key.with_name(key.stem + ".tmp.npz")
        np.savez(tmp, mels=mels.astype(np.float16))
        os.replace(tmp, key)
        return mels

    def part_starts(self, path) -> list[int]:
        """Where each part ``get`` gives starts in the file, in frames: a whole clip is one part at 0.

        A crop's place in the file is its part's start plus its start in the part; teacher targets
        are per time in the file, so they need that sum.
        """
        return [0]

    def fill(self, records, workers=2, progress=None) -> None:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda r: self.get(r.path), records):
                if progress is not None:
                    progress()


def serving_windows(mel: np.ndarray, n_samples: int, n_windows: int) -> np.ndarray:
    """The windows crnnembed would analyse, cut from a whole-clip log-mel: (k, 96, 1366)."""
    starts = audio.plan_windows(n_samples, n_windows)
    return np.stack([mel[:, s // HOP_LENGTH : s // HOP_LENGTH + WINDOW_FRAMES] for s in starts])


def random_start(n_frames: int, rng: np.random.Generator, length: int = WINDOW_FRAMES) -> int:
    """Start of a hop-aligned random crop of ``length`` frames (a window) of an n_frames log-mel
    (augmentation: a clip gives many windows)."""
    extra = n_frames - length
    return int(rng.integers(0, extra + 1)) if extra > 0 else 0


def mask_bands(mel: np.ndarray, rng: np.random.Generator, n_masks=2, max_bands=12, max_frames=120) -> np.ndarray:
    """SpecAugment-style masking: a few mel bands and time spans set to the crop's mean level.

    Hides single cues (one instrument's band, one drum fill) so a small training set cannot
    be memorised from them.
    """
    out = mel.copy()
    fill = float(out.mean())
    n_bands, n_frames = out.shape
    for _ in range(n_masks):
        w = int(rng.integers(0, max_bands + 1))
        f0 = int(rng.integers(0, n_bands - w + 1))
        out[f0 : f0 + w, :] = fill
        t = int(rng.integers(0, max_frames + 1))
        t0 = int(rng.integers(0, n_frames - t + 1))
        out[:, t0 : t0 + t] = fill
    return out


def shift_bands(mel: np.ndarray, rng: np.random.Generator, max_shift=4) -> np.ndarray:
    """Move the crop up or down by a few mel bands (about a pitch/timbre shift), edges repeated.

    Keys, singers and recording chains differ between artists; a genre does not live at one
    exact band, and the artist-disjoint splits punish a model that thinks it does.
    """
    k = int(rng.integers(-max_shift, max_shift + 1))
    if k == 0:
        return mel
    out = np.roll(mel, k, axis=0)
    if k > 0:
        out[:k] = mel[0]
    else:
        out[k:] = mel[-1]
    return out


def prepare_versions(records, names, version_dir, cache: "MelCache", workers=2, log=print) -> dict:
    """Codec versions of each record's clip, encoded once and their log-mels cached.

    Returns {record path: {version name: version path}}; a version that cannot be made is
    logged in one line and left out (the clip itself still trains).
    """
    from . import augment

    jobs = [(r, n) for r in records for n in names]
    out: dict = {r.path: {} for r in records}

    def one(job):
        r, n = job
        try:
            p = augment.make_version(r.path, n, version_dir)
            cache.get(p)
            return r.path, n, p
        except (CrnnError, OSError) as exc:
            log(f"{r.path}: {n} version left out: {exc}")
            return r.path, n, None

    with ThreadPoolExecutor(workers) as pool:
        for path, n, p in pool.map(one, jobs):
            if p is not None:
                out[path][n] = p
    return out
