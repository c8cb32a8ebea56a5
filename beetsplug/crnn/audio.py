"""Audio front end: find how long a file is, plan analysis windows, decode only those spans.

No beets and no model here: paths in, mono float32 at 22,050 Hz out.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import threading

import numpy as np

from .errors import AudioError, display_path

SAMPLE_RATE = 22050
N_FFT = 2048
HOP_LENGTH = 512
N_MELS = 96
WINDOW_FRAMES = 1366


def samples_for(frames: int) -> int:
    """Samples that give exactly ``frames`` STFT frames with center=False."""
    return N_FFT + HOP_LENGTH * (frames - 1)


# So a window cut from a whole-clip log-mel (training) equals the log-mel of that window decoded alone (serving).
WINDOW_SAMPLES = samples_for(WINDOW_FRAMES)
DEFAULT_WINDOWS = 2  # a 3-minute track: the middle of its first and second half
DEFAULT_TIMEOUT = 120.0
# Audio may end this much before the length a header promises (VBR estimates) before it counts as truncated.
TRUNCATION_SLACK = SAMPLE_RATE


def _clock(samples: float, sr: int = SAMPLE_RATE) -> str:
    s = samples / sr
    return f"{int(s // 60)}:{s % 60:04.1f}" if s >= 60 else f"{s:.1f} s"


def plan_windows(n_samples: int, n_windows: int = DEFAULT_WINDOWS, window_samples: int = WINDOW_SAMPLES,
                 hop: int = HOP_LENGTH) -> list[int]:
    """Start samples of up to ``n_windows`` windows, one centred in each of as many equal parts.

    Centring in parts keeps windows off the intro and fade-out of a long track, and one
    window is the middle of it. Starts are multiples of the hop, so the frames line up
    with a whole-clip log-mel. A track shorter than one window gets one window at 0
    (looped to length later).
    """
    if n_windows < 1:
        raise ValueError("n_windows must be at least 1")
    last = n_samples - window_samples
    if last <= 0:
        return [0]
    wanted = min(n_windows, math.ceil(n_samples / window_samples))
    centres = [(i + 0.5) * n_samples / wanted for i in range(wanted)]
    starts = [min(max(round(c - window_samples / 2), 0), last) for c in centres]
    return sorted({(s // hop) * hop for s in starts})


def fit_window(y: np.ndarray, window_samples: int = WINDOW_SAMPLES) -> np.ndarray:
    """Cut a signal to exactly one window, or loop a shorter one until it fills the window.

    Looping (not silence) keeps a short clip's window full of music, as every window of a
    full-length track is: a 3 s excerpt then reads like 3 s of the song repeated, not
    like a 3 s song followed by half a minute of nothing.
    """
    y = np.asarray(y, dtype=np.float32)
    if len(y) >= window_samples:
        return y[:window_samples]
    if len(y) == 0:
        return np.zeros(window_samples, np.float32)
    return np.resize(y, window_samples)


def _mono(data: np.ndarray) -> np.ndarray:
    """The mean of the channels, summed column by column: the same numbers as ``data.mean(axis=1)``
    for stereo, at a tenth of its CPU (a mean over a short axis reduces row by row)."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        return data
    if data.shape[1] == 1:
        return data[:, 0].copy()
    y = data[:, 0] + data[:, 1]
    for c in range(2, data.shape[1]):
        y += data[:, c]
    y *= np.float32(1.0 / data.shape[1]) if data.shape[1] != 2 else np.float32(0.5)
    return y


def _resample(y: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if sr == target or len(y) == 0:
        return y.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(y, sr, target, quality="HQ").astype(np.float32, copy=False)


class AudioFile:
    """One file opened for windowed decoding.

    Uses libsndfile when it can read the file (seeks, so only the windows are decoded),
    and ffmpeg otherwise (m4a/aac, wma, ...). ``length`` is in samples at 22,050 Hz.
    ``sample_rate`` is the rate a model family's front end hears (22,050 Hz unless it says otherwise).
    ``timeout`` bounds each ffmpeg run (None or 0: no limit); ``abort()`` (from another
    thread) kills a running ffmpeg and makes every later read fail. ``warning`` is set
    when the audio ends well before the length the file's header promises.
    """

    def __init__(self, path, timeout: float | None = DEFAULT_TIMEOUT, sample_rate: int = SAMPLE_RATE):
        self.path = path
        self.sample_rate = int(sample_rate)
        self.name = display_path(path)
        self.timeout = timeout or None
        self.warning = None
        self._fspath = os.fsencode(path)  # bytes: any file name the OS accepts, valid UTF-8 or not
        self._sf_info = None  # (sample rate, frames) when libsndfile reads it
        self._sf = None
        self._proc = None
        self._aborted = False
        self._lock = threading.Lock()
        self.length = 0
        name = self.name
        try:
            st = os.stat(self._fspath)
        except FileNotFoundError:
            raise AudioError(f"{name}: file not found") from None
        except OSError as exc:
            raise AudioError(f"{name}: cannot open ({exc.strerror or exc})") from None
        if stat.S_ISDIR(st.st_mode):
            raise AudioError(f"{name}: is a directory, not an audio file")
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise AudioError(f"{name}: empty file")
        # Read the first block here, outside any lock: soundfile opens every file under one
        # process-wide lock, so a file whose storage stalls (a hung network mount, a FIFO) would
        # otherwise block every decoding thread, not just its own.
        try:
            fd = os.open(self._fspath, os.O_RDONLY)
            try:
                os.read(fd, 1 << 16)
            finally:
                os.close(fd)
        except PermissionError:
            raise AudioError(f"{name}: permission denied") from None
        except FileNotFoundError:
            raise AudioError(f"{name}: file not found") from None
        except OSError as exc:
            raise AudioError(f"{name}: cannot read ({exc.strerror or exc})") from None
        error = None
        # libsndfile first (wav, flac, ogg/vorbis/opus, mp3, aiff; it seeks, so only windows are
        # decoded); ffmpeg for what it cannot read (m4a/aac, wma, ...).
        try:
            import soundfile

            sf = soundfile.SoundFile(self._fspath)
            if sf.frames <= 0 or sf.samplerate <= 0:
                sf.close()
                raise RuntimeError("no audio frames")
            self._sf = sf
            self._sf_info = (sf.samplerate, sf.frames)
            self.length = int(sf.frames * self.sample_rate / sf.samplerate)
            return
        except Exception as exc:  # libsndfile's messages are good; keep for the report
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = _strip_name(error.replace(f"Error opening {self._fspath!r}: ", ""), name)
        if shutil.which("ffmpeg") is None:
            raise AudioError(f"{name}: cannot decode ({error}); ffmpeg, which reads more formats "
                             "(m4a, aac, wma), is not installed")
        self.length = int(self._probe_duration() * self.sample_rate)
        if self.length <= 0:
            raise AudioError(f"{name}: cannot decode ({error or 'no duration'})")

    def close(self) -> None:
        """Release the open file (reads reopen it when needed)."""
        if self._sf is not None:
            self._sf.close()
            self._sf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def abort(self) -> None:
        """Give up on this file: kill a running ffmpeg; later reads raise AudioError."""
        with self._lock:
            self._aborted = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _probe_duration(self) -> float:
        try:
            import mutagen

            f = mutagen.File(self._fspath.decode("utf-8", "surrogateescape"))
            if f is not None and f.info is not None and getattr(f.info, "length", 0) > 0:
                return float(f.info.length)
        except Exception:
            pass
        # No tag reader knows it: decode it all once, counting samples (bounded by the timeout, flat memory).
        return self._ffmpeg(0.0, None, keep=False) / self.sample_rate

    def _ffmpeg(self, offset: float, duration: float | None, keep: bool = True):
        """Mono float32 samples at ``sample_rate`` (or, with keep=False, only how many there are)."""
        cmd = [b"ffmpeg", b"-nostdin", b"-v", b"error", b"-ss", f"{offset:.6f}".encode()]
        if duration is not None:
            cmd += [b"-t", f"{duration:.6f}".encode()]
        cmd += [b"-i", self._fspath, b"-vn", b"-ac", b"1", b"-ar", str(self.sample_rate).encode(), b"-f", b"f32le", b"-"]
        name = self.name
        with self._lock:
            if self._aborted:
                raise AudioError(f"{name}: decoding was stopped")
            proc = self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)
        chunks, count = [], 0
        # stderr is drained by a helper thread so a chatty ffmpeg cannot block on a full pipe.
        err = bytearray()
        drain = threading.Thread(target=lambda: err.extend(proc.stderr.read()), daemon=True)
        drain.start()
        timed_out = []

        def stop():
            timed_out.append(True)
            proc.kill()

        killer = threading.Timer(self.timeout, stop) if self.timeout else None
        if killer is not None:
            killer.daemon = True
            killer.start()
        try:
            while True:
                block = proc.stdout.read(1 << 20)
                if not block:
                    break
                count += len(block)
                if keep:
                    chunks.append(block)
            proc.wait()
            drain.join(5)
        finally:
            if killer is not None:
                killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            with self._lock:
                self._proc = None
                aborted = self._aborted
        if aborted:
            raise AudioError(f"{name}: decoding was stopped")
        if proc.returncode != 0:
            if timed_out:
                raise AudioError(f"{name}: decoding took longer than {self.timeout:g} s")
            msg = err.decode("utf-8", "replace").strip().splitlines()
            raise AudioError(f"{name}: cannot decode ({_strip_name(msg[-1], name) if msg else 'ffmpeg failed'})")
        if not keep:
            return count // 4
        data = b"".join(chunks)
        return np.frombuffer(data[: len(data) // 4 * 4], dtype="<f4").copy()

    def read(self, start: int, n: int) -> np.ndarray:
        """Decode ``n`` samples (mono, at ``sample_rate``) from sample ``start``; shorter at the end."""
        if self._aborted:
            raise AudioError(f"{self.name}: decoding was stopped")
        if self._sf_info is None:
            y = self._ffmpeg(start / self.sample_rate, n / self.sample_rate)[:n]
        else:
            import soundfile

            sr = self._sf_info[0]
            a = int(start * sr / self.sample_rate)
            b = int(math.ceil((start + n) * sr / self.sample_rate)) + 1
            try:
                if self._sf is None:
                    self._sf = soundfile.SoundFile(self._fspath)
                f = self._sf
                f.seek(min(a, f.frames))
                data = f.read(b - a, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(f"{self.name}: cannot decode ({_strip_name(str(exc).strip(), self.name)})") from None
            y = _resample(_mono(data), sr, self.sample_rate)[:n]
        if not np.all(np.isfinite(y)):
            raise AudioError(f"{self.name}: decoded audio contains NaN or infinity")
        return y

    def read_all(self) -> np.ndarray:
        try:
            return self.read(0, self.length + self.sample_rate)
        finally:
            self.close()

    def windows(self, n_windows: int = DEFAULT_WINDOWS, window_samples: int = WINDOW_SAMPLES,
                hop: int = HOP_LENGTH) -> list[np.ndarray]:
        """The planned windows, each exactly ``window_samples`` long (a front end's window; hop-aligned starts).

        A file whose audio stops early (truncated download, damaged tail) is analysed over the part
        that decodes, with ``warning`` saying so; one with no decodable audio at all is an AudioError.
        """
        try:
            return self._windows(n_windows, window_samples, hop)
        finally:
            self.close()

    def _windows(self, n_windows: int, window_samples: int, hop: int) -> list[np.ndarray]:
        promised = self.length
        while True:
            out, end = [], None
            for start in plan_windows(self.length, n_windows, window_samples, hop):
                try:
                    y = self.read(start, window_samples)
                except AudioError:
                    if start == 0 or self._aborted:
                        raise
                    end = start  # a window further in does not decode: treat the audio as ending there
                    break
                expected = min(window_samples, self.length - start)
                if len(y) < expected - self.sample_rate:  # TRUNCATION_SLACK: a second of slack
                    end = start + len(y)
                    break
                out.append(fit_window(y, window_samples))
            if end is None:
                if self.length < promised:
                    self.warning = (f"{self.name}: audio stops at {_clock(self.length, self.sample_rate)} although its header says "
                                    f"{_clock(promised, self.sample_rate)} (truncated file?); analysed the part that decodes")
                return out
            if end <= 0:
                raise AudioError(f"{self.name}: no audio could be decoded")
            self.length = end  # plan again inside the audio that is really there


def _strip_name(message: str, name: str) -> str:
    """Decoders often start their message with the file name, which our line already names."""
    for prefix in (name + ": ", name + ":"):
        if message.startswith(prefix):
            return message[len(prefix):].strip()
    return message


def load_windows(path, n_windows: int = DEFAULT_WINDOWS, timeout: float = DEFAULT_TIMEOUT, front=None) -> list[np.ndarray]:
    """The planned windows of a file as a front end hears them (the level-free one unless ``front`` says)."""
    if front is None:
        return AudioFile(path, timeout).windows(n_windows)
    return AudioFile(path, timeout, front.sample_rate).windows(n_windows, front.window_samples, front.hop_length)


def load_all(path, timeout: float = DEFAULT_TIMEOUT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as mono at ``sample_rate`` (training decodes clips once and caches their log-mels)."""
    return AudioFile(path, timeout, sample_rate).read_all()
