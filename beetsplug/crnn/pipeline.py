"""Streamed analysis: decode + log-mel in worker threads; the CRNN there too (ONNX) or batched in the caller's thread (Keras).

Only a bounded number of tracks are in flight, so memory stays flat however long the list;
results come back one track at a time, so the caller can store each as soon as it is done.

Each file has a time limit. A decoder can hang where nothing can interrupt it (libsndfile
blocked in open() on a stalled network file or a FIFO), so the workers are daemon threads
of our own rather than a ThreadPoolExecutor (whose workers are joined at interpreter exit,
which would hang the command on such a thread): a file over its limit is reported, its
thread is abandoned and replaced, and the command finishes and exits regardless.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from . import audio
from .errors import AudioError, CrnnError, display_path
from .features import LEVEL_FREE
from .model import pool_track

# How long closing the pipeline waits for workers that are still decoding (not for stuck ones).
CLOSE_WAIT = 2.0


@dataclass
class Result:
    key: Any
    path: Any
    embedding: np.ndarray | None = None
    probs: np.ndarray | None = None
    mtime: float | None = None
    error: str | None = None
    warning: str | None = None  # analysed, but something the user should know (e.g. truncated file)
    tags: np.ndarray | None = None  # mean tag probabilities over the windows, when the model has a tag head


def one_blas_thread():
    """A context in which numpy's BLAS uses one thread: the decoding threads already keep every core
    busy, and OpenBLAS's own threads would only spin beside them (the mel product, run from two
    decoding threads with BLAS threads on, cost about twice the CPU in bench/embed.py)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def track_mels(path, n_windows: int, timeout: float, opened=None, front=LEVEL_FREE) -> tuple[np.ndarray, float, str | None]:
    """(windows' log-mels (k, 96, 1366), file mtime read before decoding, warning or None), as ``front`` hears them.

    ``opened`` is called with the AudioFile as soon as it exists, so a caller can abort it.
    """
    mtime = os.stat(path).st_mtime
    f = audio.AudioFile(path, timeout, front.sample_rate)
    if opened is not None:
        opened(f)
    windows = f.windows(n_windows, front.window_samples, front.hop_length)
    return front.log_mels(np.stack(windows)), mtime, f.warning  # all windows in one call


def decode_step(path, step):
    """Run one file's decoding step; any failure but our own becomes one AudioError line naming the file,
    so a decoder bug in one file never ends the batch."""
    try:
        return step()
    except CrnnError:
        raise
    except FileNotFoundError:
        raise AudioError(f"{display_path(path)}: file not found") from None
    except PermissionError:
        raise AudioError(f"{display_path(path)}: permission denied") from None
    except Exception as exc:
        raise AudioError(f"{display_path(path)}: {type(exc).__name__}: {exc}") from None


class _Task:
    __slots__ = ("key", "path", "started", "thread", "done", "value", "error", "audio", "abandoned", "lock")

    def __init__(self, key, path):
        self.key, self.path = key, path
        self.started = None  # time.monotonic() when a worker took it
        self.thread = None  # the worker running it
        self.done = threading.Event()
        self.value = self.error = self.audio = None
        self.abandoned = False
        self.lock = threading.Lock()


class _DecodePool:
    """``n`` daemon threads running ``work(task)`` for queued tasks; a task over its time limit is
    abandoned with its thread, and a fresh thread takes that one's place."""

    def __init__(self, n: int, work):
        self._work = work
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stuck: set = set()
        self._closed = False
        for _ in range(n):
            self._spawn()

    def _spawn(self):
        t = threading.Thread(target=self._run, name=f"crnn-decode-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        t.start()

    def _run(self):
        while True:
            task = self._queue.get()
            if task is None or self._closed:
                return
            task.thread = threading.current_thread()
            task.started = time.monotonic()
            try:
                task.value = self._work(task)
            except BaseException as exc:  # handed to the caller, never raised in the worker
                task.error = exc
            with task.lock:
                task.done.set()
                if task.abandoned:
                    return  # replaced while it was stuck on this task: the replacement carries on

    def submit(self, task: _Task):
        self._queue.put(task)

    def wait(self, task: _Task, timeout: float | None) -> bool:
        """True once the task is done; False when it has run ``timeout`` s (it is then abandoned)."""
        while not task.done.is_set():
            if task.started is None or not timeout:
                task.done.wait(0.25)  # queued behind others: its clock has not started
                continue
            left = task.started + timeout - time.monotonic()
            if left > 0:
                # Short waits: a Ctrl-C that the kernel hands to one of TensorFlow's threads is only
                # seen when the main thread runs Python again, so it must not sleep for the whole limit.
                task.done.wait(min(left, 0.25))
                continue
            with task.lock:
                if task.done.is_set():
                    break
                task.abandoned = True
            self._stuck.add(task.thread)
            if task.audio is not None:
                task.audio.abort()  # kills a running ffmpeg; a libsndfile call cannot be stopped
            self._spawn()
            return False
        return True

    def close(self):
        """Stop taking tasks; give running ones a moment to end (stuck ones are left: they are daemons)."""
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + CLOSE_WAIT
        for t in self._threads:
            if t not in self._stuck:
                t.join(max(0.0, deadline - time.monotonic()))


def decode_all(jobs: Iterable[tuple[Any, Any]], work, workers=None, timeout=audio.DEFAULT_TIMEOUT,
               front=LEVEL_FREE) -> Iterator[tuple[_Task, str | None]]:
    """Run ``work(task)`` for every (key, path) job on the decoder pool; yield (task, None) with
    ``task.value`` set, or (task, one-line reason) for a file that failed or ran over ``timeout``, in order.

    The one loop behind crnnembed (``analyse``) and library training (``excerpts.decode``): at most
    2 x ``workers`` files in flight, numpy's BLAS on one thread, the mel filters of ``front`` (the model family's front end) built before the
    first file's clock starts. ``work`` should set ``task.audio`` to its AudioFile so a file over its
    time limit can be aborted. Errors that are not ours (Ctrl-C, MemoryError in a worker) are raised.
    """
    workers = workers or default_workers()
    jobs = iter(jobs)
    in_flight: deque = deque()
    front.log_mels(np.zeros((1, front.window_samples), np.float32))  # its filters: not charged to the first files' limit
    with one_blas_thread():
        pool = _DecodePool(workers, work)
        try:

            def refill():
                while len(in_flight) < 2 * workers:
                    job = next(jobs, None)
                    if job is None:
                        return
                    task = _Task(*job)
                    in_flight.append(task)
                    pool.submit(task)

            refill()
            while in_flight:
                task = in_flight.popleft()
                refill()
                if not pool.wait(task, timeout):
                    yield task, f"{display_path(task.path)}: decoding took longer than {timeout:g} s"
                elif task.error is not None:
                    if not isinstance(task.error, CrnnError):
                        raise task.error  # KeyboardInterrupt/SystemExit/MemoryError in a worker
                    yield task, str(task.error)
                else:
                    yield task, None
        finally:
            pool.close()


def analyse(jobs: Iterable[tuple[Any, Any]], embedder, n_windows=audio.DEFAULT_WINDOWS, workers=None,
            timeout=audio.DEFAULT_TIMEOUT, batch_windows=16) -> Iterator[Result]:
    """Yield a Result for every (key, path) job, in order; failures carry a one-line reason.

    ``timeout`` (seconds, None or 0 for none) limits how long one file may take to decode (and,
    when the model runs in the decoding threads, to be analysed: a few tenths of a second more).
    """
    pending: list = []  # (task, mels, mtime, warning) waiting for the next batch

    # An embedder that releases the GIL (onnxruntime) runs in the decoding threads, one track a call:
    # the cores then decode and infer at once. Keras runs here, on batches gathered across tracks.
    in_workers = getattr(embedder, "in_workers", False)
    front = getattr(embedder, "front", LEVEL_FREE)  # the model family's front end (its card says which)

    def prepare(task: _Task):
        mels, mtime, warning = decode_step(task.path, lambda: track_mels(task.path, n_windows, timeout,
                                                                         opened=lambda f: setattr(task, "audio", f),
                                                                         front=front))
        return (mels, mtime, warning), (run_model(mels) if in_workers else None)

    def run_model(mels):
        if hasattr(embedder, "analyse"):
            return embedder.analyse(mels)
        return (*embedder(mels), None)  # any callable giving (embeddings, genre probabilities) will do

    def result(task, embs, probs, tags, mtime, warning):
        e, p = pool_track(embs, probs)
        t = None if tags is None else tags.mean(axis=0).astype(np.float32)  # pooled like genres
        if not (np.all(np.isfinite(e)) and np.all(np.isfinite(p)) and (t is None or np.all(np.isfinite(t)))
                and abs(float(np.linalg.norm(e)) - 1) < 1e-3):
            return Result(task.key, task.path, error=f"{display_path(task.path)}: the model gave no "
                                                     "usable embedding (NaN or zero vector)")
        return Result(task.key, task.path, e, p, mtime, warning=warning, tags=t)

    def flush():
        if not pending:
            return []
        embs, probs, tags = run_model(np.concatenate([m for _, m, _, _ in pending]))
        out, i = [], 0
        for task, m, mtime, warning in pending:
            j = i + len(m)
            out.append(result(task, embs[i:j], probs[i:j], None if tags is None else tags[i:j], mtime, warning))
            i = j
        pending.clear()
        return out

    # closing(): a consumer that stops early (Ctrl-C, an error) stops the pool now, not at garbage collection.
    with one_blas_thread(), contextlib.closing(decode_all(jobs, prepare, workers, timeout, front)) as decoded:
        for task, error in decoded:
            if error is not None:
                yield Result(task.key, task.path, error=error)
                continue
            (mels, mtime, warning), outputs = task.value
            task.value = None
            if outputs is not None:
                yield result(task, *outputs, mtime, warning)
                continue
            pending.append((task, mels, mtime, warning))
            if sum(len(m) for _, m, _, _ in pending) >= batch_windows:
                yield from flush()
        yield from flush()
