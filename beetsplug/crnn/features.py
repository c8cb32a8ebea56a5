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

from .audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WINDOW_FRAMES, samples_for

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
    return _power_db(ys, N_FFT, HOP_LENGTH, _WINDOW, basis)


def _power_db(ys: np.ndarray, n_fft: int, hop: int, window: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """10 log10 of the mel power of every ``hop``-spaced ``n_fft`` frame of each signal in ``ys`` (k, n)."""
    frames = np.lib.stride_tricks.sliding_window_view(ys, n_fft, axis=-1)[:, ::hop]  # (k, t, n_fft) view
    k, t = frames.shape[:2]
    out = np.empty((k, basis.shape[0], t), np.float32)
    for i in range(k):  # one window at a time keeps the float64 spectrum small (~20 MB)
        spec = np.fft.rfft(frames[i] * window, axis=-1)
        power = (spec.real**2 + spec.imag**2).astype(np.float32)  # (t, 1 + n_fft / 2)
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


def level_free_input(mels: np.ndarray) -> np.ndarray:
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


# ---- front ends: what a model family hears. The card's ``features`` names one of these. ----

MSD_SAMPLE_RATE = 12000
MSD_N_FFT = 512
MSD_HOP = 256
MSD_FMAX = 6000.0
MSD_FLOOR_DB = 80.0  # on the squared-power scale the released code used (10 log10(mel^2), top_db 80)

MSD_PARAMS = {
    "sample_rate": MSD_SAMPLE_RATE,
    "n_fft": MSD_N_FFT,
    "hop_length": MSD_HOP,
    "window": "hann",
    "n_mels": N_MELS,
    "window_frames": WINDOW_FRAMES,
    "center": True,
    "fmax": MSD_FMAX,
    "scale": "10*log10(max(power, 1e-20)); the model reads 10*log10(power^2) as Choi et al.'s code did",
    "normalise": "per window: floored 80 dB (squared scale) below its maximum, then minus its mean, over its "
                 "standard deviation",
    "short_clips": "looped to fill a window",
}


class FrontEnd:
    """What a model family hears: sample rate, window, log-mel and the level-free model input.

    ``log_mels`` gives absolute power dB (augmentations act on it); ``model_input`` turns that into
    what the network reads. A model card's ``features`` equals one front end's ``params``.
    """

    name = "level-free"
    params = PARAMS
    sample_rate = SAMPLE_RATE
    hop_length = HOP_LENGTH
    n_fft = N_FFT
    window_frames = WINDOW_FRAMES

    @property
    def window_samples(self) -> int:
        return samples_for(self.window_frames)

    def log_mels(self, ys) -> np.ndarray:
        return log_mels(ys)

    def model_input(self, mels) -> np.ndarray:
        return level_free_input(mels)


class MsdFrontEnd(FrontEnd):
    """Choi et al.'s front end for the MSD CRNN: 12 kHz, n_fft 512, hop 256, 96 mel bands to 6 kHz,
    frames centred (as librosa's default), 1366 frames = 29.12 s; standardised per window, so it is
    level-free too (a constant dB offset vanishes with the mean)."""

    name = "msd"
    params = MSD_PARAMS
    sample_rate = MSD_SAMPLE_RATE
    hop_length = MSD_HOP
    n_fft = MSD_N_FFT

    @property
    def window_samples(self) -> int:
        return self.hop_length * (self.window_frames - 1)  # 349,440 samples: 1366 centred frames

    def log_mels(self, ys) -> np.ndarray:
        ys = np.asarray(ys, dtype=np.float32)
        if ys.ndim == 1:
            ys = ys[None]
        pad = self.n_fft // 2  # centred frames with zero padding (librosa >= 0.10's default)
        basis, window = _msd_basis()
        return _power_db(np.pad(ys, ((0, 0), (pad, pad))), self.n_fft, self.hop_length, window, basis)

    def model_input(self, mels) -> np.ndarray:
        m = 2.0 * np.asarray(mels, dtype=np.float32)  # 10 log10(mel^2)
        m = np.maximum(m, m.max(axis=(-2, -1), keepdims=True) - MSD_FLOOR_DB)
        m = m - m.mean(axis=(-2, -1), keepdims=True)
        std = m.std(axis=(-2, -1), keepdims=True)
        return (m / np.where(std > 1e-6, std, 1.0)).astype(np.float32)  # a flat (silent) window stays all zero


_MSD_BASIS = None


def _msd_basis():
    global _MSD_BASIS
    if _MSD_BASIS is None:
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(MSD_N_FFT) / MSD_N_FFT)
        _MSD_BASIS = (mel_filters(MSD_SAMPLE_RATE, MSD_N_FFT, N_MELS, MSD_FMAX), window)
    return _MSD_BASIS


LEVEL_FREE = FrontEnd()
MSD = MsdFrontEnd()
FRONT_ENDS = {f.name: f for f in (LEVEL_FREE, MSD)}


def front_end_for(features: dict | None) -> FrontEnd | None:
    """The front end whose parameters a card records, or None when no front end of this version matches."""
    if not features:
        return LEVEL_FREE
    for f in FRONT_ENDS.values():
        if f.params == features:
            return f
    return None


def model_input(mels: np.ndarray, front: FrontEnd | None = None) -> np.ndarray:
    """What the network reads for absolute log-mel windows (level-free front end unless ``front`` says)."""
    return (front or LEVEL_FREE).model_input(mels)
