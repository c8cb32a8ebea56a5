"""Real audio files made on the fly: numpy -> wav/flac/ogg/mp3 (soundfile), m4a (ffmpeg when present)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".aiff": ("AIFF", "PCM_16"),
}


def signal(seconds: float, sr: int = 22050, kind: str = "tonal", seed: int = 0, channels: int = 1) -> np.ndarray:
    """A few seconds of music-like sound: 'tonal' (harmonic notes), 'beat' (noise bursts), 'silence'."""
    rng = np.random.default_rng(seed)
    n = max(1, int(seconds * sr))
    t = np.arange(n) / sr
    if kind == "silence":
        y = np.zeros(n)
    elif kind == "beat":
        env = np.exp(-((t * 2.0) % 1.0) * 12)  # 120 bpm decaying bursts
        y = 0.4 * env * rng.standard_normal(n) + 0.1 * np.sin(2 * np.pi * 55 * t)
    else:
        notes = 220 * 2 ** (rng.integers(0, 12, size=int(seconds) + 1) / 12)
        f = notes[np.minimum((t).astype(int), len(notes) - 1)]
        phase = 2 * np.pi * np.cumsum(f) / sr
        y = sum(0.2 / k * np.sin(k * phase) for k in range(1, 5))
    y = y.astype(np.float32)
    if channels > 1:
        y = np.stack([y * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return y


def write(path, seconds=5.0, sr=22050, kind="tonal", seed=0, channels=1) -> Path:
    """Write a generated clip; the format follows the suffix. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".opus" and sr not in (8000, 12000, 16000, 24000, 48000):
        sr = 48000  # the only rates Opus takes
    y = signal(seconds, sr, kind, seed, channels)
    if suffix in FORMATS:
        fmt, sub = FORMATS[suffix]
        sf.write(str(path), y, sr, format=fmt, subtype=sub)
    elif suffix == ".opus":
        sf.write(str(path), y, sr, format="OGG", subtype="OPUS")
    elif suffix in (".m4a", ".aac"):
        if not has_ffmpeg():
            raise RuntimeError("ffmpeg is needed to write m4a")
        wav = path.with_suffix(".src.wav")
        sf.write(str(wav), y, sr)
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", str(path)], check=True)
        wav.unlink()
    else:
        raise ValueError(f"no writer for {suffix}")
    return path


def has_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None
