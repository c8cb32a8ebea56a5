"""96-band log-mel spectrograms, the CRNN's input. Pure numpy in, numpy out."""

from __future__ import annotations

import numpy as np

from .audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WINDOW_FRAMES

AMIN = 1e-10  # power floor: silence maps to -100 dB rather than -inf

PARAMS = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "hop_length": HOP_LENGTH,
    "window": "hann",
    "n_mels": N_MELS,
    "window_frames": WINDOW_FRAMES,
    "center": False,
    "scale": "10*log10(max(power, 1e-10))",
}

_MEL_BASIS = None


def _mel_basis() -> np.ndarray:
    global _MEL_BASIS
    if _MEL_BASIS is None:
        import librosa

        _MEL_BASIS = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32)
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
