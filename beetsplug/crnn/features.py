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


def _mel_basis() -> np.ndarray:
    global _MEL_BASIS
    if _MEL_BASIS is None:
        import librosa

        _MEL_BASIS = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmax=FMAX).astype(np.float32)
    return _MEL_BASIS


def log_mel(y: np.ndarray) -> np.ndarray:
    """Log-mel (N_MELS, frames) float32 of a 22,050 Hz mono signal, frames not centred.

    center=False makes frame k depend only on samples [k*hop, k*hop + n_fft), so any
    hop-aligned crop of a long spectrogram equals the spectrogram of that crop.
    """
    import librosa

    y = np.asarray(y, dtype=np.float32)
    if len(y) < N_FFT:
        y = np.pad(y, (0, N_FFT - len(y)))
    stft = librosa.stft(y, n_fft=N_FFT, hop_length=HOP_LENGTH, window="hann", center=False)
    power = (stft.real**2 + stft.imag**2).astype(np.float32)
    mel = _mel_basis() @ power
    return (10.0 * np.log10(np.maximum(mel, AMIN))).astype(np.float32)


def band_frequencies() -> np.ndarray:
    """Centre frequency (Hz) of each mel band, for augmentations that act by frequency."""
    import librosa

    return librosa.mel_frequencies(N_MELS + 2, fmin=0.0, fmax=FMAX)[1:-1].astype(np.float32)


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
