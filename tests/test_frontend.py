"""The level-free front end and the augmentations: what a file's level, codec or EQ does to the model input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from audiogen import has_ffmpeg, signal
from beetsplug.crnn import audio
from beetsplug.crnn.training import augment, dataset
from beetsplug.crnn.errors import CrnnError
from beetsplug.crnn.features import AMIN, FLOOR_DB, FMAX, band_frequencies, log_mel, model_input


def _input(y):
    return model_input(log_mel(audio.fit_window(y)))


@pytest.fixture(scope="module")
def beat_mel():
    """Absolute log-mel of one window of broadband generated audio (every band carries energy)."""
    return log_mel(audio.fit_window(signal(31.0, kind="beat", seed=4)))


@pytest.mark.parametrize("kind", ["tonal", "beat"])
def test_gain_cancels_to_round_off(kind):
    y = signal(40.0, kind=kind, seed=1)
    base = _input(y)
    for g in (0.1, 3.0, 1e-3):
        diff = np.max(np.abs(_input(np.float32(g) * y) - base))
        assert diff < 1e-3, f"gain {g}: model input moved by {diff} dB"


def test_model_input_range_and_peak():
    mels = np.stack([log_mel(audio.fit_window(signal(8.0, kind=k, seed=2))) for k in ("tonal", "beat")])
    x = model_input(mels)
    assert x.shape == mels.shape and x.dtype == np.float32
    assert x.min() >= -FLOOR_DB and x.max() <= 0.0
    assert np.all(x.max(axis=(-2, -1)) == 0.0)  # each window on its own: its loudest cell is exactly 0 dB
    assert np.any(x == -FLOOR_DB)  # the sparse tonal window reaches the floor
    # Per window: a second window 40 dB quieter does not change the first's input, nor its own.
    both = model_input(np.stack([mels[0], mels[0] - 40.0]))
    assert np.max(np.abs(both[0] - both[1])) < 1e-3


def test_silence_gives_finite_constant_input():
    for y in (np.zeros(5 * audio.SAMPLE_RATE, np.float32), np.zeros(0, np.float32)):
        mel = log_mel(audio.fit_window(y))
        assert np.all(mel == np.float32(10 * np.log10(AMIN)))  # the power floor, not -inf
        x = model_input(mel)
        assert np.all(np.isfinite(x)) and np.all(x == x.flat[0]) and x.flat[0] == -80.0  # silence sits at the floor


def test_mel_bands_stop_at_fmax():
    freqs = band_frequencies()
    assert len(freqs) == audio.N_MELS and np.all(np.diff(freqs) > 0) and freqs[-1] < FMAX
    # A 10.5 kHz tone sits above every band: nothing of it reaches the log-mel.
    t = np.arange(audio.WINDOW_SAMPLES) / audio.SAMPLE_RATE
    hi = log_mel((0.5 * np.sin(2 * np.pi * 10500 * t)).astype(np.float32))
    lo = log_mel((0.5 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32))
    assert hi.max() < lo.max() - 60


# ---- log-mel edits ----

def test_gain_edit_changes_nothing_after_model_input(beat_mel):
    for seed in range(5):
        out = augment.gain(beat_mel, np.random.default_rng(seed))
        assert abs(float(out.mean() - beat_mel.mean())) > 0.01  # the edit did move the absolute level
        assert np.max(np.abs(model_input(out) - model_input(beat_mel))) < 1e-3


def test_lowpass_attenuates_above_cutoff_only(beat_mel):
    freqs = band_frequencies()
    cutoff = 4000.0
    out = augment.lowpass(beat_mel, np.random.default_rng(0), freqs, low=cutoff, high=cutoff)
    below, above = freqs < cutoff, freqs > cutoff
    # Below the cut-off nothing changes, apart from cells more than 100 dB under the peak, which the
    # edit lifts to its floor (model_input floors them at -80 dB anyway).
    floor = beat_mel.max() - 100.0
    np.testing.assert_array_equal(out[below], np.maximum(beat_mel[below], floor))
    np.testing.assert_array_equal(model_input(out)[below], model_input(beat_mel)[below])
    drop = (beat_mel - out).mean(axis=1)  # per band
    assert np.all(drop[above] > 0)
    assert np.all(np.diff(drop[above]) > 0)  # steeper the further above the cut-off
    # On a flat spectrum (far above the edit's floor) the roll-off is exactly 48 dB per octave.
    flat = np.full_like(beat_mel[:, :10], -20.0)
    rolled = augment.lowpass(flat, np.random.default_rng(0), freqs, low=cutoff, high=cutoff)
    expect = np.where(freqs > cutoff, 48.0 * np.log2(freqs / cutoff), 0.0)
    np.testing.assert_allclose((flat - rolled)[:, 0], expect, atol=1e-3)
    # Random cut-offs stay in 5-9.5 kHz: bands well below 5 kHz are never touched.
    for seed in range(5):
        o = augment.lowpass(beat_mel, np.random.default_rng(seed), freqs)
        np.testing.assert_array_equal(o[freqs < 4900], np.maximum(beat_mel[freqs < 4900], floor))


def test_tilt_is_monotone_in_frequency(beat_mel):
    freqs = band_frequencies()
    slopes = set()
    for seed in range(8):
        out = augment.tilt(beat_mel, np.random.default_rng(seed), freqs)
        d = out - beat_mel
        assert np.allclose(d, d[:, :1], atol=1e-3)  # a fixed EQ: the same in every frame
        d = d[:, 0]
        steps = np.diff(d)
        assert np.all(steps >= -1e-4) or np.all(steps <= 1e-4)
        assert abs(d[-1] - d[0]) > 1e-3
        assert abs(np.interp(1000.0, freqs, d)) < 0.1  # pivots around 1 kHz
        slopes.add(bool(d[-1] > d[0]))
    assert slopes == {True, False}  # brighter and darker both happen


def test_noise_raises_the_floor(beat_mel):
    quiet = beat_mel.copy()
    quiet[:, :200] -= 70.0  # a near-silent passage
    for seed in range(5):
        out = augment.noise(quiet, np.random.default_rng(seed))
        assert np.all(out >= quiet - 1e-3)  # adding power never lowers a cell
        assert out.min() >= quiet.max() - 60.0 - 1e-3  # the floor sits at most 60 dB below the peak
        assert out[:, :200].mean() > quiet[:, :200].mean() + 10
        assert abs(float(out.max() - quiet.max())) < 0.01  # the loud cells are unchanged


def test_compress_lowers_loud_frames_only():
    """A crop whose frames step from quiet to loud: the loud frames lose the excess over the threshold
    times (1 - 1/ratio), the quiet ones keep their level, and every band of a frame moves together."""
    mel = np.full((audio.N_MELS, 40), -60.0, np.float32)
    mel[:, 20:] = -30.0  # the loud half: 30 dB above the quiet one
    depth, ratio = 10.0, 4.0
    out = augment.compress(mel, np.random.default_rng(0), depth, depth, ratio, ratio, hold_frames=0)
    cut = mel - out
    assert np.allclose(cut, cut[:1], atol=1e-4)  # a per-frame gain: the same in every band
    assert np.allclose(cut[:, :20], 0.0, atol=1e-4)
    assert np.allclose(cut[:, 20:], depth * (1 - 1 / ratio), atol=1e-3)
    held = augment.compress(mel, np.random.default_rng(0), depth, depth, ratio, ratio, hold_frames=2)
    assert np.allclose((mel - held)[0, 18:20], depth * (1 - 1 / ratio), atol=1e-3)  # look-ahead
    assert np.allclose((mel - held)[0, :18], 0.0, atol=1e-4)


def test_compress_moves_the_model_input_where_gain_does_not(beat_mel):
    """The front end cancels a gain, not a limiter: the reason compression is an edit of its own."""
    base = model_input(beat_mel)
    for seed in range(4):
        out = augment.compress(beat_mel, np.random.default_rng(seed))
        assert np.all(out <= beat_mel + 1e-4)  # it only ever lowers
        assert np.max(np.abs(model_input(out) - base)) > 1.0
        assert np.max(np.abs(model_input(out + 12.0) - model_input(out))) < 1e-3


def test_mel_augmenter_choices():
    with pytest.raises(CrnnError, match="unknown augmentation.*wobble"):
        augment.MelAugmenter(["gain", "wobble"])
    mel = np.random.default_rng(0).normal(-40, 10, (audio.N_MELS, 50)).astype(np.float32)
    off = augment.MelAugmenter(augment.MEL_EDITS, p=0.0)
    out = off(mel, np.random.default_rng(1))
    np.testing.assert_array_equal(out, mel)
    assert out is not mel
    on = augment.MelAugmenter(["tilt", "gain"], p=1.0)
    assert on.edits == ("gain", "tilt") and on.describe() == {"edits": ["gain", "tilt"], "p": 1.0}
    assert not np.allclose(on(mel, np.random.default_rng(1)), mel)
    gain_only = augment.MelAugmenter(["gain"], p=1.0)
    assert np.max(np.abs(model_input(gain_only(mel, np.random.default_rng(2))) - model_input(mel))) < 1e-3


# ---- codec versions (ffmpeg) ----

needs_ffmpeg = pytest.mark.skipif(not has_ffmpeg(), reason="ffmpeg is not installed")


@needs_ffmpeg
def test_make_version_is_made_once(tmp_path):
    src = tmp_path / "clip.wav"
    sf.write(str(src), signal(3.0, kind="tonal", seed=0), audio.SAMPLE_RATE, subtype="PCM_16")
    out = augment.make_version(src, "mp3-64k", tmp_path / "v")
    assert out.is_file() and out.suffix == ".mp3" and out.stat().st_size > 0
    assert not list(out.parent.glob("tmp-*"))
    os.utime(out, (1_000_000, 1_000_000))  # an old, recognisable mtime: a re-encode would replace it
    again = augment.make_version(src, "mp3-64k", tmp_path / "v")
    assert again == out and again.stat().st_mtime == 1_000_000
    with pytest.raises(CrnnError, match="unknown codec version"):
        augment.make_version(src, "mp3-1k", tmp_path / "v")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(CrnnError, match="cannot make the mp3-64k version"):
        augment.make_version(bad, "mp3-64k", tmp_path / "v")


@needs_ffmpeg
@pytest.mark.parametrize("kind,level,name", [("tonal", 1.0, "flac44-loud"), ("tonal", 1.0, "mp3-128k-quiet"),
                                             ("beat", 1.0, "mp3-128k-quiet")])
def test_louder_or_quieter_version_gives_the_same_input(tmp_path, kind, level, name):
    """+9 dB (flac, 44.1 kHz) or -12 dB (128k mp3) of a 40 s clip: the model input over the serving windows
    barely moves. Measured (median |diff| over cells above -60 dB): tonal loud 0.02, tonal quiet 0.004,
    beat quiet 0.16 dB; the bound has a wide margin.

    The beat clip is not used for flac44-loud: its alimiter delays the audio by 5 ms (109 samples),
    which moves the frames of a transient-rich clip by a fifth of a hop (0.8 dB median there).
    """
    src = tmp_path / f"{kind}.flac"
    sf.write(str(src), level * signal(40.0, kind=kind, seed=3), audio.SAMPLE_RATE, subtype="PCM_16")
    cache = dataset.MelCache(tmp_path / "mels")
    ref = model_input(dataset.serving_windows(*cache.get(src), 2))
    version = augment.make_version(src, name, tmp_path / "v")
    mel, n = cache.get(version)
    got = model_input(dataset.serving_windows(mel, n, 2))
    assert got.shape == ref.shape == (2, audio.N_MELS, audio.WINDOW_FRAMES)
    d = np.abs(got - ref)
    active = ref > -60.0
    assert np.median(d) < 1.0
    assert np.median(d[active]) < 1.0, f"median |diff| over active cells {np.median(d[active]):.3f} dB"


def test_log_mel_equals_librosa_front_end():
    """The numpy/scipy log-mel is the librosa one it replaced (STFT, Slaney mel filters) to round-off."""
    librosa = pytest.importorskip("librosa")
    from beetsplug.crnn.features import log_mels, mel_filters

    basis = librosa.filters.mel(sr=audio.SAMPLE_RATE, n_fft=audio.N_FFT, n_mels=audio.N_MELS, fmax=FMAX)
    assert np.max(np.abs(mel_filters() - basis)) < 1e-7
    np.testing.assert_allclose(band_frequencies(), librosa.mel_frequencies(audio.N_MELS + 2, fmin=0.0, fmax=FMAX)[1:-1],
                               rtol=1e-6)
    windows = np.stack([audio.fit_window(signal(40.0, kind=k, seed=5)) for k in ("tonal", "beat")]
                       + [audio.fit_window(1e-3 * signal(3.0, kind="beat", seed=6))])
    ours = log_mels(windows)
    for y, mel in zip(windows, ours):
        stft = librosa.stft(y, n_fft=audio.N_FFT, hop_length=audio.HOP_LENGTH, window="hann", center=False)
        power = (stft.real**2 + stft.imag**2).astype(np.float32)
        theirs = 10.0 * np.log10(np.maximum(basis @ power, AMIN))
        assert mel.shape == theirs.shape
        assert np.max(np.abs(mel - theirs)) < 2e-3  # dB
        assert np.max(np.abs(model_input(mel) - model_input(theirs))) < 2e-3
    # one call for all windows gives what one call per window gives
    assert np.array_equal(ours[1], log_mel(windows[1]))


def test_stereo_mixdown_is_the_mean_of_the_channels():
    rng = np.random.default_rng(0)
    for channels in (1, 2, 3):
        data = rng.normal(size=(1000, channels)).astype(np.float32)
        np.testing.assert_allclose(audio._mono(data), data.mean(axis=1), atol=1e-6)
    stereo = rng.normal(size=(1000, 2)).astype(np.float32)
    assert np.array_equal(audio._mono(stereo), stereo.mean(axis=1))
