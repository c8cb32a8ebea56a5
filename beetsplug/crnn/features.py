"""96-band log-mel spectrograms and the level-free model input. Pure numpy in, numpy out.

Two choices make the model hear music rather than the file it came in:
- The mel bands stop at ``FMAX`` (9.5 kHz). Low-bitrate MP3s (the emotify training set is
  48 kbit/s, cut at ~10 kHz), old rips and radio cut the top octave; what is above it says
  more about the codec than the music, so the model never sees it.
- ``model_input`` measures every window in dB below its own loudest cell, floored at
  ``FLOOR_DB``: a file 6 dB louder or 20 dB quieter gives the same input to round-off.
"""

from __future__ import annotations

import numpy as np

from .audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WINDOW_FRAMES

# Power floor: digital silence maps to -200 dB rather than -inf. Far below any real signal,
# so that even a quiet track made 40 dB quieter keeps its relative levels exactly.
AMIN = 1e-20
FMAX = 9500.0  # Hz: the top mel band's upper edge (below the cut of 48-64 kbit/s MP3s)
FLOOR_DB = 80.0  # model input range: 0 dB (the window's loudest cell) down to -80 dB
SILENCE_DB = -120.0  # a window that never gets louder than this is silence

PARAMS = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "hop_length": HOP_LENGTH,
    "window": "hann",
    "n_mels": N_MELS,
    "window_frames": WINDOW_FRAMES,
    "center": False,
    "fmax": FMAX,
    "scale": "10*log10(max(power, 1e-20))",
    "normalise": "per window: dB below the window's maximum (at least -120 dB), floored at -80 dB",
    "short_clips": "looped to fill a window",
}

_MEL_BASIS = None
_WINDOW = None


def hz_to_mel(f):
    """Slaney's mel scale (librosa's default, htk=False): linear to 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_part = f >= 1000.0
    return np.where(log_part, 15.0 + np.log(np.maximum(f, 1000.0) / 1000.0) / (np.log(6.4) / 27.0), mel)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_frequencies(n: int, fmin: float = 0.0, fmax: float = FMAX) -> np.ndarray:
    """``n`` frequencies (Hz) evenly spaced on the mel scale from ``fmin`` to ``fmax``."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n))


def mel_filters(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmax: float = FMAX) -> np.ndarray:
    """Triangular mel filters (n_mels, 1 + n_fft // 2), Slaney-normalised (each filter's area is constant).

    The same filters as ``librosa.filters.mel(sr, n_fft, n_mels, fmax=fmax)``, built here so that
    analysis does not import librosa (its import alone took ~4.5 s of crnnembed's start-up).
    """
    bins = np.linspace(0.0, sr / 2, 1 + n_fft // 2)
    edges = mel_frequencies(n_mels + 2, 0.0, fmax)
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def _mel_basis() -> np.ndarray:
    global _MEL_BASIS, _WINDOW
    if _MEL_BASIS is None:
        # periodic Hann window, as for an STFT (scipy.signal.get_window("hann", N_FFT))
        _WINDOW = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)
        _MEL_BASIS = mel_filters()
    return _MEL_BASIS


def log_mels(ys) -> np.ndarray:
    """Log-mels (k, N_MELS, frames) float32 of ``k`` equally long 22,050 Hz mono signals, in one call.

    Frames are not centred: frame t depends only on samples [t*hop, t*hop + n_fft), so any
    hop-aligned crop of a long spectrogram equals the spectrogram of that crop. Each frame's
    FFT is taken in float64 and its power rounded to float32, as librosa's STFT does, so
    the result equals the librosa front end this replaced to ~1e-4 dB. numpy's FFT (pocketfft,
    as fast as scipy's here) saves the ~0.3 s that importing scipy.fft adds to start-up.
    """
    ys = np.asarray(ys, dtype=np.float32)
    if ys.ndim == 1:
        ys = ys[None]
    if ys.shape[-1] < N_FFT:
        ys = np.pad(ys, ((0, 0), (0, N_FFT - ys.shape[-1])))
    basis = _mel_basis()
    frames = np.lib.stride_tricks.sliding_window_view(ys, N_FFT, axis=-1)[:, ::HOP_LENGTH]  # (k, t, n_fft) view
    k, t = frames.shape[:2]
    out = np.empty((k, N_MELS, t), np.float32)
    for i in range(k):  # one window at a time keeps the float64 spectrum small (~20 MB)
        spec = np.fft.rfft(frames[i] * _WINDOW, axis=-1)
        power = (spec.real**2 + spec.imag**2).astype(np.float32)  # (t, 1025)
        out[i] = (power @ basis.T).T  # (t, 96) then transposed: 4x faster than basis @ power.T
    np.maximum(out, AMIN, out=out)
    np.log10(out, out=out)
    out *= 10.0
    return out


def log_mel(y: np.ndarray) -> np.ndarray:
    """Log-mel (N_MELS, frames) float32 of one 22,050 Hz mono signal (see ``log_mels``)."""
    return log_mels(np.asarray(y, dtype=np.float32)[None])[0]


def band_frequencies() -> np.ndarray:
    """Centre frequency (Hz) of each mel band, for augmentations that act by frequency."""
    return mel_frequencies(N_MELS + 2, 0.0, FMAX)[1:-1].astype(np.float32)


def model_input(mels: np.ndarray) -> np.ndarray:
    """Absolute log-mel windows (..., bands, frames) -> dB below each window's maximum, floored.

    Gain is a constant dB offset, which the subtraction removes: ``y`` and ``0.1 * y`` give
    the same input to round-off. The floor keeps near-silent cells (and the codec noise
    floor) from carrying information.
    """
    m = np.asarray(mels, dtype=np.float32)
    # A window whose loudest cell is below SILENCE_DB is silence: it maps to the floor everywhere
    # (not to 0 dB, which would make digital silence read as a loud, flat spectrum).
    peak = np.maximum(m.max(axis=(-2, -1), keepdims=True), SILENCE_DB)
    return np.maximum(m - peak, -FLOOR_DB).astype(np.float32)
