"""Streamed analysis: decode + log-mel in worker threads, batched CRNN inference in the caller's thread.

Only a bounded number of tracks are in flight, so memory stays flat however long the list;
results come back one track at a time, so the caller can store each as soon as it is done.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from . import audio
from .errors import AudioError, CrnnError
from .features import log_mel
from .model import pool_track


@dataclass
class Result:
    key: Any
    path: Any
    embedding: np.ndarray | None = None
    probs: np.ndarray | None = None
    mtime: float | None = None
    error: str | None = None


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def track_mels(path, n_windows: int, timeout: float) -> tuple[np.ndarray, float]:
    """(windows' log-mels (k, 96, 1366), file mtime read before decoding)."""
    mtime = os.stat(path).st_mtime
    windows = audio.load_windows(path, n_windows, timeout)
    return np.stack([log_mel(w) for w in windows]), mtime


def analyse(jobs: Iterable[tuple[Any, Any]], embedder, n_windows=audio.DEFAULT_WINDOWS, workers=None,
            timeout=audio.DEFAULT_TIMEOUT, batch_windows=16) -> Iterator[Result]:
    """Yield a Result for every (key, path) job, in order; failures carry a one-line reason."""
    workers = workers or default_workers()
    jobs = iter(jobs)
    in_flight: deque = deque()
    pending: list = []  # (job, mels, mtime) waiting for the next batch

    def prepare(path):
        try:
            return track_mels(path, n_windows, timeout)
        except CrnnError:
            raise
        except FileNotFoundError:
            raise AudioError(f"{os.fsdecode(path)}: file not found") from None
        except PermissionError:
            raise AudioError(f"{os.fsdecode(path)}: permission denied") from None
        except Exception as exc:  # a decoder bug in one file must not end the batch
            raise AudioError(f"{os.fsdecode(path)}: {type(exc).__name__}: {exc}") from None

    def flush():
        if not pending:
            return []
        mels = np.concatenate([m for _, m, _ in pending])
        embs, probs = embedder(mels)
        out, i = [], 0
        for (key, path), m, mtime in pending:
            e, p = pool_track(embs[i : i + len(m)], probs[i : i + len(m)])
            i += len(m)
            out.append(Result(key, path, e, p, mtime))
        pending.clear()
        return out

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crnn-decode") as pool:

        def refill():
            while len(in_flight) < 2 * workers:
                job = next(jobs, None)
                if job is None:
                    return
                in_flight.append((job, pool.submit(prepare, job[1])))

        refill()
        while in_flight:
            job, fut = in_flight.popleft()
            refill()
            try:
                mels, mtime = fut.result(timeout=timeout)
            except FutureTimeout:
                fut.cancel()
                yield Result(job[0], job[1], error=f"{os.fsdecode(job[1])}: decoding took longer than {timeout:g} s")
                continue
            except CrnnError as exc:
                yield Result(job[0], job[1], error=str(exc))
                continue
            pending.append((job, mels, mtime))
            if sum(len(m) for _, m, _ in pending) >= batch_windows:
                yield from flush()
        yield from flush()
