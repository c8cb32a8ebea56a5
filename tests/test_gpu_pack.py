"""tools/gpu/pack.py: log-mels shrunk for a lent GPU machine come back close to what training reads here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from audiogen import signal
from beetsplug.crnn import audio
from beetsplug.crnn.features import log_mel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "gpu"))
from pack import quantise, restore  # noqa: E402


def test_a_whole_clip_comes_back_within_half_a_step():
    y = signal(40.0, kind="tonal", seed=3)
    mel = log_mel(y)
    packed = quantise(mel, len(y), step=1.0)
    assert packed["q"].dtype == np.uint8 and packed["period"] is None
    back = restore(packed, 1.0)
    assert back.shape == mel.shape
    near = mel > mel.max() - 120  # the range the packing keeps (255 steps of 1 dB, the input floors at -80)
    assert np.abs(back - mel)[near].max() <= 0.5 + 1e-4


def test_a_short_clip_travels_as_one_period_of_its_loop():
    """A 3 s excerpt is cached as its loop over a window; one period is tiled back, close to the real loop."""
    y = signal(3.0, kind="tonal", seed=5)
    looped = log_mel(audio.fit_window(y))  # what MelCache holds for it
    packed = quantise(looped, len(y), step=1.0)
    period = int(round(len(y) / audio.HOP_LENGTH))
    assert packed["period"] == period and packed["q"].shape == (audio.N_MELS, period)
    back = restore(packed, 1.0)
    assert back.shape == looped.shape == (audio.N_MELS, audio.WINDOW_FRAMES)
    loud = looped > looped.max() - 60
    # Each repeat of the loop is off by under half a hop: the tiled frames stay close to the real ones.
    assert np.median(np.abs(back - looped)[loud]) < 1.0
    # A wrong period would misalign the repeats: it lands much farther from the loop.
    wrong = restore(dict(packed, q=np.roll(packed["q"], period // 3, axis=1)), 1.0)
    assert np.median(np.abs(wrong - looped)[loud]) > 2 * np.median(np.abs(back - looped)[loud])
