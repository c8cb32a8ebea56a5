"""research/gpu/pack.py: log-mels shrunk for a lent GPU machine come back close to what training reads here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "research" / "gpu"
sys.path[:0] = [str(TOOLS), str(ROOT / "tests")]  # pack.py; the suite's helpers (audiogen, labelled sets)

from audiogen import has_ffmpeg, signal  # noqa: E402
from beetsplug.crnn import audio, model  # noqa: E402
from beetsplug.crnn.features import log_mel  # noqa: E402
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


@pytest.mark.slow
def test_packed_data_trains_through_the_gpu_runner(tmp_path):
    """pack.py, then train_gpu.py on its folders (here on TensorFlow: CI has no JAX) writes a model and card."""
    from test_training_data import _labelled_set

    import pack as pack_tool

    data = _labelled_set(tmp_path / "tiny", ["rock", "pop"], seconds=3.0)
    cache = tmp_path / "cache"
    # With ffmpeg, one codec version per clip travels too (its own length decides its loop period).
    versions = ["--versions", "mp3-64k", "--version-cache", str(tmp_path / "versions")] if has_ffmpeg() else []
    assert pack_tool.main([str(tmp_path / "packed"), str(data), "--", "--cache", str(cache), *versions]) == 0
    folders = sorted((tmp_path / "packed").iterdir())
    assert [f.name for f in folders] == ["c1"] and (folders[0] / "meta.xz").is_file()
    out = tmp_path / "model"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(TOOLS / "train_gpu.py"), str(folders[0]), str(out), "--",
                           "--epochs", "2", "--crops", "4", "--short-crops", "160", "--short-share", "0.5",
                           "--name", "tiny", *versions[:2]], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"packed data: 4 train clips, {4 if versions else 0} codec versions, 2 val clips" in proc.stdout
    card = model.ModelCard.load(out)
    card.verify()
    training = card.extra["training"]
    assert training["epochs_run"] == 2 and training["clips"] == {"train": 4, "val": 2, "unlabelled": 0}
    assert "research/gpu/train_gpu.py" in training["trained_on"] and "1 dB" in training["trained_on"]
    assert training["command"].startswith(f"python -m beetsplug.crnn.training.train {data} --epochs 2")
    net = model.build_for(card)
    net.load_weights(str(card.weights))  # the weights load where crnnembed's Keras runtime loads them
