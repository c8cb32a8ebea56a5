"""Audio front end: find how long a file is, plan analysis windows, decode only those spans.

No beets and no model here: paths in, mono float32 at 22,050 Hz out.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 22050
N_FFT = 2048
HOP_LENGTH = 512
N_MELS = 96
WINDOW_FRAMES = 1366
# Samples that give exactly WINDOW_FRAMES STFT frames with center=False, so a window cut
# from a whole-clip log-mel (training) equals the log-mel of that window decoded alone (serving).
WINDOW_SAMPLES = N_FFT + HOP_LENGTH * (WINDOW_FRAMES - 1)
DEFAULT_WINDOWS = 3
DEFAULT_TIMEOUT = 120.0



def _display(path) -> str:
    return os.fsdecode(path)


def plan_windows(n_samples: int, n_windows: int = DEFAULT_WINDOWS) -> list[int]:
    """Start samples of up to ``n_windows`` windows spread evenly from start to end.

    Starts are multiples of the hop, so the frames line up with a whole-clip log-mel.
    A track shorter than one window gets one window at 0 (padded later).
    """
    if n_windows < 1:
        raise ValueError("n_windows must be at least 1")
    last = n_samples - WINDOW_SAMPLES
    if last <= 0:
        return [0]
    wanted = min(n_windows, math.ceil(n_samples / WINDOW_SAMPLES))
    if wanted == 1:
        starts = [last // 2]  # one window: the middle says most about a song
    else:
        starts = [round(i * last / (wanted - 1)) for i in range(wanted)]
    return sorted({(s // HOP_LENGTH) * HOP_LENGTH for s in starts})


def fit_window(y: np.ndarray) -> np.ndarray:
    """Pad (with silence) or cut a signal to exactly one window."""
    if len(y) >= WINDOW_SAMPLES:
        return y[:WINDOW_SAMPLES]
    return np.pad(y, (0, WINDOW_SAMPLES - len(y)))


def _mono(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    return data


def _resample(y: np.ndarray, sr: int) -> np.ndarray:
    if sr == SAMPLE_RATE or len(y) == 0:
        return y.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(y, sr, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


class AudioFile:
    """One file opened for windowed decoding.

    Uses libsndfile when it can read the file (seeks, so only the windows are decoded),
    and ffmpeg otherwise (m4a/aac, wma, ...). ``length`` is in samples at 22,050 Hz.
    """

    def __init__(self, path, timeout: float = DEFAULT_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._sf_info = None
        self.length = 0
        name = _display(path)
        if not os.path.exists(path):
            raise AudioError(f"{name}: file not found")
        if not os.access(path, os.R_OK):
            raise AudioError(f"{name}: permission denied")
        if os.path.getsize(path) == 0:
            raise AudioError(f"{name}: empty file")
        error = None
        # libsndfile first (wav, flac, ogg/vorbis/opus, mp3, aiff; it seeks, so only windows are
        # decoded); ffmpeg for what it cannot read (m4a/aac, wma, ...).
        try:
            import soundfile

            info = soundfile.info(name)
            if info.frames <= 0 or info.samplerate <= 0:
                raise RuntimeError("no audio frames")
            self._sf_info = info
            self.length = int(info.frames * SAMPLE_RATE / info.samplerate)
            return
        except Exception as exc:  # libsndfile's messages are good; keep for the report
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if shutil.which("ffmpeg") is None:
            raise AudioError(f"{name}: cannot decode ({error or 'format needs ffmpeg, which is not installed'})")
        self.length = int(self._probe_duration() * SAMPLE_RATE)
        if self.length <= 0:
            raise AudioError(f"{name}: cannot decode ({error or 'no duration'})")

    def _probe_duration(self) -> float:
        try:
            import mutagen

            f = mutagen.File(_display(self.path))
            if f is not None and f.info is not None and getattr(f.info, "length", 0) > 0:
                return float(f.info.length)
        except Exception:
            pass
        # No tag reader knows it: decode it all once (bounded by the timeout).
        return len(self._ffmpeg(0.0, None)) / SAMPLE_RATE

    def _ffmpeg(self, offset: float, duration: float | None) -> np.ndarray:
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{offset:.6f}"]
        if duration is not None:
            cmd += ["-t", f"{duration:.6f}"]
        cmd += ["-i", _display(self.path), "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"]
        name = _display(self.path)
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise AudioError(f"{name}: decoding took longer than {self.timeout:g} s") from None
        if proc.returncode != 0:
            msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise AudioError(f"{name}: cannot decode ({msg[-1] if msg else 'ffmpeg failed'})")
        return np.frombuffer(proc.stdout, dtype="<f4").copy()

    def read(self, start: int, n: int) -> np.ndarray:
        """Decode ``n`` samples (22,050 Hz mono) from sample ``start``; shorter at the end."""
        if self._sf_info is None:
            return self._ffmpeg(start / SAMPLE_RATE, n / SAMPLE_RATE)[:n]
        import soundfile

        sr = self._sf_info.samplerate
        a = int(start * sr / SAMPLE_RATE)
        b = int(math.ceil((start + n) * sr / SAMPLE_RATE)) + 1
        try:
            with soundfile.SoundFile(_display(self.path)) as f:
                if a:
                    f.seek(a)
                data = f.read(b - a, dtype="float32", always_2d=True)
        except Exception as exc:
            raise AudioError(f"{_display(self.path)}: cannot decode ({exc})") from None
        y = _resample(_mono(data), sr)[:n]
        if not np.all(np.isfinite(y)):
            raise AudioError(f"{_display(self.path)}: decoded audio contains NaN or infinity")
        return y

    def read_all(self) -> np.ndarray:
        return self.read(0, self.length + SAMPLE_RATE)

    def windows(self, n_windows: int = DEFAULT_WINDOWS) -> list[np.ndarray]:
        """The planned windows, each exactly WINDOW_SAMPLES long."""
        out = []
        for start in plan_windows(self.length, n_windows):
            y = self.read(start, WINDOW_SAMPLES)
            if start == 0 and len(y) == 0:
                raise AudioError(f"{_display(self.path)}: no audio could be decoded")
            out.append(fit_window(y))
        return out


def load_windows(path, n_windows: int = DEFAULT_WINDOWS, timeout: float = DEFAULT_TIMEOUT) -> list[np.ndarray]:
    return AudioFile(path, timeout).windows(n_windows)


def load_all(path, timeout: float = DEFAULT_TIMEOUT) -> np.ndarray:
    """The whole file as 22,050 Hz mono (training decodes clips once and caches their log-mels)."""
    return AudioFile(path, timeout).read_all()
