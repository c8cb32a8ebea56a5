"""What real libraries do to audio, for training and for the robustness evaluation.

Two kinds:
- ``CODEC_VERSIONS``: a clip re-encoded through real codecs, sample rates and levels with
  ffmpeg. Made once per clip (``make_version``) and cached as files; their log-mels go
  through the same cache as any clip, so epochs never re-encode.
- Cheap log-mel edits applied per training crop (gain, compression, low-pass, spectral tilt, noise):
  they act in the dB domain on the absolute log-mel, before ``features.model_input``.

Pure numpy apart from the ffmpeg subprocess; nothing here knows about beets or Keras.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..errors import CrnnError
from .fileid import content_id

# name -> (file extension, ffmpeg output arguments). What a library holds beside the clip:
# lossless at another rate and level, common lossy codecs and rates, a low-passed copy.
CODEC_VERSIONS = {
    "flac44-loud": (".flac", ["-af", "volume=9dB,alimiter=limit=0.9", "-ar", "44100", "-ac", "2", "-c:a", "flac"]),
    "mp3-64k": (".mp3", ["-af", "volume=-6dB", "-ar", "44100", "-ac", "2", "-c:a", "libmp3lame", "-b:a", "64k"]),
    "mp3-128k-quiet": (".mp3", ["-af", "volume=-12dB", "-ar", "44100", "-ac", "2", "-c:a", "libmp3lame", "-b:a", "128k"]),
    "mp3-320k": (".mp3", ["-ar", "48000", "-ac", "2", "-c:a", "libmp3lame", "-b:a", "320k"]),
    "vorbis48": (".ogg", ["-af", "volume=6dB,alimiter=limit=0.95", "-ar", "48000", "-ac", "2", "-c:a", "libvorbis", "-q:a", "3"]),
    "aac96k": (".m4a", ["-af", "volume=-8dB", "-ar", "44100", "-ac", "2", "-c:a", "aac", "-b:a", "96k"]),
    "lowpass6k": (".flac", ["-af", "lowpass=f=6000:poles=2,lowpass=f=6000:poles=2", "-c:a", "flac"]),
}
# The versions training draws from by default (the evaluation uses all of them).
TRAIN_VERSIONS = ("mp3-64k", "vorbis48", "aac96k")


DEFAULT_VERSION_DIR = Path(".cache") / "versions"  # where codec versions are kept unless told


def ffmpeg_path() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise CrnnError("ffmpeg is not installed: codec versions need it (e.g. apt-get install ffmpeg)")
    return exe


def version_path(source: Path, name: str, folder: Path) -> Path:
    """Where the cached version ``name`` of ``source`` lives: keyed by the source's content and the
    version's ffmpeg arguments, so a changed recipe is encoded again rather than reused."""
    key = content_id(source)[:16]
    ext, args = CODEC_VERSIONS[name]
    recipe = hashlib.sha1(" ".join(args).encode()).hexdigest()[:8]
    return Path(folder) / key / f"{name}-{recipe}{ext}"


def make_version(source, name: str, folder) -> Path:
    """Encode ``source`` as version ``name`` under ``folder`` once; later calls return the file."""
    source = Path(source)
    if name not in CODEC_VERSIONS:
        raise CrnnError(f"unknown codec version {name!r} (known: {', '.join(CODEC_VERSIONS)})")
    out = version_path(source, name, Path(folder))
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _, args = CODEC_VERSIONS[name]
    tmp = out.with_name("tmp-" + out.name)
    cmd = [ffmpeg_path(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source),
           "-map_metadata", "-1", "-vn", *args, str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        reason = (proc.stderr.strip().splitlines() or ["ffmpeg failed"])[-1]
        raise CrnnError(f"{source}: cannot make the {name} version: {reason}")
    os.replace(tmp, out)
    return out


# ---- log-mel edits (absolute dB, shape (bands, frames)) ----

def gain(mel: np.ndarray, rng: np.random.Generator, max_db: float = 24.0) -> np.ndarray:
    """A level change; the front end cancels it exactly (kept as a check that it does)."""
    return mel + np.float32(rng.uniform(-max_db, max_db))


def lowpass(mel: np.ndarray, rng: np.random.Generator, freqs: np.ndarray, low=5000.0, high=9500.0,
            slope_db_per_octave=48.0) -> np.ndarray:
    """Roll off the bands above a random cut-off, as a low-bitrate encoder or an old recording does."""
    cutoff = rng.uniform(low, high)
    octaves = np.log2(np.maximum(freqs, 1.0) / cutoff)
    atten = np.where(octaves > 0, -slope_db_per_octave * octaves, 0.0).astype(np.float32)
    floor = mel.max() - 100.0
    return np.maximum(mel + atten[:, None], floor)


def tilt(mel: np.ndarray, rng: np.random.Generator, freqs: np.ndarray, max_db_per_octave: float = 3.0) -> np.ndarray:
    """A gentle spectral slope around 1 kHz: brighter or darker masters, speakers, EQ."""
    slope = rng.uniform(-max_db_per_octave, max_db_per_octave)
    return mel + (slope * np.log2(np.maximum(freqs, 20.0) / 1000.0)).astype(np.float32)[:, None]


def noise(mel: np.ndarray, rng: np.random.Generator, snr_low: float = 30.0, snr_high: float = 60.0) -> np.ndarray:
    """Add a steady noise floor a random 30-60 dB below the crop's peak (hiss, hum, room)."""
    level = mel.max() - rng.uniform(snr_low, snr_high)
    return (10.0 * np.log10(10.0 ** (mel / 10.0) + 10.0 ** (level / 10.0))).astype(np.float32)


def compress(mel: np.ndarray, rng: np.random.Generator, depth_low=6.0, depth_high=20.0, ratio_low=1.5,
             ratio_high=10.0, hold_frames=1) -> np.ndarray:
    """Squash the loudest frames, as the limiter or compressor of a loud modern master does.

    A limiter is not a gain, which the front end cancels: it lowers loud frames more than quiet
    ones, and so moves every cell against the window's maximum. Measured on ``flac44-loud``
    (emotify val): its effect on the model is a per-frame gain (the model's outputs for the
    limited file and for the original with the limiter's per-frame level change agree to cosine
    0.999), and that change follows the frame's power (correlation -0.8), best fitted by a
    threshold 10-14 dB below the loudest frame and a ratio of 2-5. Here frames above a threshold
    a random ``depth`` below the loudest frame lose ``1 - 1/ratio`` of the excess; each cut is
    held ``hold_frames`` either side (look-ahead and release). ``mel`` is one (bands, frames) crop.
    """
    level = 10.0 * np.log10(np.sum(10.0 ** (mel.astype(np.float64) / 10.0), axis=0) + 1e-30)
    threshold = level.max() - rng.uniform(depth_low, depth_high)
    ratio = rng.uniform(ratio_low, ratio_high)
    cut = (1.0 - 1.0 / ratio) * np.maximum(level - threshold, 0.0)
    if hold_frames:
        padded = np.pad(cut, hold_frames, mode="edge")
        cut = np.lib.stride_tricks.sliding_window_view(padded, 2 * hold_frames + 1).max(axis=-1)
    return (mel - cut.astype(np.float32)[None, :]).astype(np.float32)


MEL_EDITS = ("gain", "compress", "lowpass", "tilt", "noise")  # the order they apply: mastering, then the medium


class MelAugmenter:
    """Applies the chosen log-mel edits, each with probability ``p``, to training crops."""

    def __init__(self, edits=MEL_EDITS, p: float = 0.5):
        unknown = set(edits) - set(MEL_EDITS)
        if unknown:
            raise CrnnError(f"unknown augmentation(s): {', '.join(sorted(unknown))} (known: {', '.join(MEL_EDITS)})")
        self.edits = tuple(e for e in MEL_EDITS if e in edits)
        self.p = p
        self._freqs = None

    @property
    def freqs(self) -> np.ndarray:
        if self._freqs is None:
            from ..features import band_frequencies

            self._freqs = band_frequencies()
        return self._freqs

    def __call__(self, mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mel = mel.astype(np.float32, copy=True)
        for e in self.edits:
            if rng.random() >= self.p:
                continue
            if e == "gain":
                mel = gain(mel, rng)
            elif e == "lowpass":
                mel = lowpass(mel, rng, self.freqs)
            elif e == "tilt":
                mel = tilt(mel, rng, self.freqs)
            elif e == "noise":
                mel = noise(mel, rng)
            elif e == "compress":
                mel = compress(mel, rng)
        return mel

    def describe(self) -> dict:
        return {"edits": list(self.edits), "p": self.p}
