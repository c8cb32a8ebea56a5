"""Log-mel excerpts of library tracks, cached: the spans ``crnnembed`` analyses, plus a margin for random crops.

Decoded on ``pipeline``'s parallel, time-limited decoder (``decode``) and kept under a size cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .. import audio
from ..audio import HOP_LENGTH, SAMPLE_RATE, TRUNCATION_SLACK, WINDOW_FRAMES, WINDOW_SAMPLES
from ..errors import AudioError, CrnnError, display_path
from ..features import PARAMS, log_mel
from . import dataset

MARGIN_S = 5.0  # seconds decoded on each side of an analysis window, so training crops can move


def excerpt_spans(n_samples: int, n_windows: int, margin: int) -> list[tuple[int, int]]:
    """Sample spans to decode: each analysis window (as crnnembed plans them) widened by ``margin``
    on both sides, starts on the hop grid, overlapping spans merged. A short track is one span."""
    if n_samples <= WINDOW_SAMPLES:
        return [(0, n_samples)]
    spans: list[list[int]] = []
    for s in audio.plan_windows(n_samples, n_windows):
        a = max(0, s - margin)
        a -= a % HOP_LENGTH
        b = min(n_samples, s + WINDOW_SAMPLES + margin)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [(a, b) for a, b in spans]


class ExcerptCache(dataset.MelCache):
    """Log-mels of the parts of each track that training and evaluation use, cached on disk (float16).

    A track is cut into spans around the windows crnnembed analyses (``excerpt_spans``), so a
    five-minute track costs about 0.7 MB, not 3 MB; a track whose spans cover it (a short one, or
    a 60 s clip at two windows) is cached whole, exactly as manifest training caches it.
    ``get`` gives what training crops from (one array, or a list of spans), ``serving`` the
    windows crnnembed would analyse. With ``max_bytes`` the folder is kept under that size by
    removing the entries used longest ago (``prune``).
    """

    VERSION = "excerpt-1"

    def __init__(self, folder, n_windows=audio.DEFAULT_WINDOWS, margin_s=MARGIN_S, max_bytes=None):
        super().__init__(folder)
        self.n_windows = int(n_windows)
        self.margin = int(margin_s * SAMPLE_RATE)
        self.max_bytes = max_bytes

    def _key(self, path: Path) -> Path:
        st = Path(path).stat()
        ident = json.dumps([str(Path(path).resolve()), st.st_size, int(st.st_mtime), PARAMS, self.VERSION,
                            self.n_windows, self.margin], sort_keys=True)
        return self.folder / (hashlib.sha1(ident.encode()).hexdigest() + ".npz")

    def has(self, path) -> bool:
        try:
            return self._key(Path(path)).is_file()
        except OSError:
            return False

    def _load(self, key: Path):
        try:
            with np.load(key) as data:
                parts = [data[f"mel{i}"] for i in range(int(data["parts"]))]
                entry = parts, [int(s) for s in data["starts"]], int(data["n_samples"])
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is decoded again
        try:
            os.utime(key)  # the size cap removes the entries used longest ago
        except OSError:
            pass
        return entry

    def entry(self, path, timeout=None, opened=None):
        """(spans' log-mels float16, their start frames, track length in samples), decoded if not cached."""
        path = Path(path)
        key = self._key(path)
        if key.is_file():
            entry = self._load(key)
            if entry is not None:
                return entry
        f = audio.AudioFile(path, timeout)
        if opened is not None:
            opened(f)
        try:
            parts, starts, n = self._decode(f)
        finally:
            f.close()
        tmp = key.with_name(key.stem + ".tmp.npz")
        np.savez(tmp, parts=np.int64(len(parts)), starts=np.array(starts, np.int64), n_samples=np.int64(n),
                 **{f"mel{i}": m for i, m in enumerate(parts)})
        os.replace(tmp, key)
        return parts, starts, n

    def _decode(self, f: audio.AudioFile):
        n = f.length
        while True:
            spans = excerpt_spans(n, self.n_windows, self.margin)
            if spans == [(0, n)]:  # the whole track, as MelCache decodes it
                y = f.read(0, n + SAMPLE_RATE)
                if not len(y):
                    raise AudioError(f"{f.name}: no audio could be decoded")
                mel = log_mel(audio.fit_window(y) if len(y) < WINDOW_SAMPLES else y)
                return [mel.astype(np.float16)], [0], len(y)
            parts, end = [], None
            for a, b in spans:
                try:
                    y = f.read(a, b - a)
                except AudioError:
                    if a == 0:
                        raise
                    end = a  # this part does not decode: treat the audio as ending before it
                    break
                if len(y) < (b - a) - TRUNCATION_SLACK:
                    end = a + len(y)
                    break
                parts.append(log_mel(audio.fit_window(y) if len(y) < WINDOW_SAMPLES else y).astype(np.float16))
            if end is None:
                return parts, [a // HOP_LENGTH for a, _ in spans], n
            if end <= 0:
                raise AudioError(f"{f.name}: no audio could be decoded")
            n = end  # truncated: plan again inside the audio that is really there

    def get(self, path):
        """(what training crops from: one log-mel, or a list of spans, float16; track length in samples)."""
        parts, _, n = self.entry(path)
        return (parts[0] if len(parts) == 1 else list(parts)), n

    def part_starts(self, path) -> list[int]:
        """The start frame in the track of each span ``get`` gives (one span alone may start after 0)."""
        try:
            with np.load(self._key(Path(path))) as data:  # only the starts, not the log-mels
                return [int(s) for s in data["starts"]]
        except (OSError, ValueError, KeyError):
            return self.entry(path)[1]

    def serving(self, path, n_windows: int) -> np.ndarray:
        """The windows crnnembed would analyse, cut from the cached spans: (k, 96, 1366) float32."""
        parts, starts, n = self.entry(path)
        out = []
        for s in audio.plan_windows(n, n_windows):
            f = s // HOP_LENGTH
            for mel, first in zip(parts, starts):
                if first <= f and f - first + WINDOW_FRAMES <= mel.shape[1]:
                    out.append(mel[:, f - first : f - first + WINDOW_FRAMES].astype(np.float32))
                    break
            else:
                raise CrnnError(f"{display_path(path)}: cached excerpt does not hold window {s} (cache made "
                                f"for {self.n_windows} windows)")
        return np.stack(out)

    def fill(self, records, workers=2, progress=None) -> None:
        """Decode what is not cached yet (``decode`` has normally done it, in parallel and time-limited)."""
        for r in records:
            self.entry(r.path)
            if progress is not None:
                progress()

    def _entries(self):
        return [p for p in self.folder.glob("*.npz") if re.fullmatch(r"[0-9a-f]{40}\.npz", p.name)]

    def prune(self, keep=()) -> tuple[int, int]:
        """Remove the entries used longest ago until the folder is under ``max_bytes``; never one in ``keep``
        (this run's tracks). Returns (entries removed, bytes left)."""
        entries = []
        for p in self._entries():
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        if self.max_bytes is None or total <= self.max_bytes:
            return 0, total
        keep_keys = set()
        for path in keep:
            try:
                keep_keys.add(self._key(Path(path)).name)
            except OSError:
                pass
        removed = 0
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p.name in keep_keys:
                continue
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            removed += 1
        return removed, total


def decode(records, cache: ExcerptCache, workers=None, timeout=audio.DEFAULT_TIMEOUT, progress=None,
           on_error=None) -> list:
    """Fill the cache for ``records`` on crnnembed's decoder pool (parallel, each file time-limited).

    Returns the records whose audio is ready; each file that fails is reported once through
    ``on_error(message)`` and left out. ``progress()`` is called once per record.
    """
    from ..pipeline import decode_all, decode_step

    ready, todo = [], []
    for r in records:
        (ready if cache.has(r.path) else todo).append(r)
    for _ in ready:
        if progress is not None:
            progress()
    if not todo:
        return list(records)
    failed = set()

    def work(task):
        decode_step(task.path, lambda: cache.entry(task.path, timeout=timeout,
                                                   opened=lambda f: setattr(task, "audio", f)))

    with contextlib.closing(decode_all(((k, r.path) for k, r in enumerate(todo)), work, workers, timeout)) as decoded:
        for task, error in decoded:
            if error is not None:
                failed.add(task.key)
                if on_error is not None:
                    on_error(error)
            if progress is not None:
                progress()
    bad = {id(todo[k]) for k in failed}
    return [r for r in records if id(r) not in bad]
