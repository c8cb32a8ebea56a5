"""Front end, model card and training: no train/serve skew, loadable outputs, shipped weights unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audiogen import signal, write
from beetsplug.crnn import audio
from beetsplug.crnn.training import dataset
from beetsplug.crnn.errors import CrnnError, ModelError
from beetsplug.crnn.features import LEVEL_FREE, log_mel
from beetsplug.crnn.model import Embedder, ModelCard, default_weights_dir, resolve_precision
from conftest import ROOT, BeetsEnv

REGRESSION = Path(__file__).parent / "data" / "shipped_outputs.npz"


def test_plan_windows_spread_and_aligned():
    w = audio.WINDOW_SAMPLES
    assert audio.plan_windows(w // 3, 3) == [0]  # shorter than a window: one, looped
    assert audio.plan_windows(w, 3) == [0]
    starts = audio.plan_windows(10 * w, 3)
    assert len(starts) == 3
    assert all(s % audio.HOP_LENGTH == 0 for s in starts)
    for i, s in enumerate(starts):  # each window centred in its third of the track
        assert abs(s + w / 2 - (i + 0.5) * 10 * w / 3) <= audio.HOP_LENGTH
    assert audio.plan_windows(10 * w, 1) == [(9 * w // 2) // audio.HOP_LENGTH * audio.HOP_LENGTH]  # the middle
    assert audio.plan_windows(int(1.9 * w), 2) == [0, int(0.9 * w) // audio.HOP_LENGTH * audio.HOP_LENGTH]  # whole clip
    assert len(audio.plan_windows(int(1.5 * w), 5)) == 2  # no more windows than the track holds
    with pytest.raises(ValueError):
        audio.plan_windows(w, 0)


def test_training_crop_equals_serving_window(tmp_path):
    """A window cut from a whole-clip log-mel (training) equals the window decoded alone (serving)."""
    path = write(tmp_path / "clip.flac", 75.0, kind="beat", seed=3)
    cache = dataset.MelCache(tmp_path / "cache")
    mel, n = cache.get(path)
    from_cache = dataset.serving_windows(mel, n, 3)
    served = np.stack([log_mel(w) for w in audio.load_windows(path, 3)])
    assert from_cache.shape == served.shape == (3, audio.N_MELS, audio.WINDOW_FRAMES)
    # float16 cache: about 0.05 dB apart at most, far below what the model can notice.
    assert np.max(np.abs(from_cache - served)) < 0.1


def test_short_clip_is_looped(tmp_path):
    path = write(tmp_path / "short.wav", 0.5)
    clip = audio.load_all(path)
    windows = audio.load_windows(path, 3)
    assert len(windows) == 1 and len(windows[0]) == audio.WINDOW_SAMPLES
    n = len(clip)
    assert np.array_equal(windows[0][:n], clip) and np.array_equal(windows[0][n : 2 * n], clip)
    assert np.array_equal(windows[0], clip[np.arange(audio.WINDOW_SAMPLES) % n])


def test_resampled_and_multichannel_input(tmp_path):
    path = write(tmp_path / "x.wav", 3.0, sr=44100, channels=2)
    f = audio.AudioFile(path)
    assert abs(f.length - 3.0 * audio.SAMPLE_RATE) < 50
    y = f.read_all()
    assert abs(len(y) - 3 * audio.SAMPLE_RATE) < 50 and y.dtype == np.float32


def test_card_mismatch_is_clear(tmp_path, tiny_model):
    card = json.loads((tiny_model.weights.parent / "crnn.json").read_text())
    (tmp_path / "crnn.weights.h5").write_bytes(tiny_model.weights.read_bytes())
    bad = dict(card, features=dict(card["features"], n_mels=128))
    (tmp_path / "crnn.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="preprocessing differs"):
        ModelCard.load(tmp_path)
    bad = dict(card, architecture=dict(card["architecture"], gru_units=99))
    (tmp_path / "crnn.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="do not fit the architecture"):
        Embedder.load(tmp_path)


def test_band_shift_moves_content_and_repeats_edges():
    mel = np.arange(96, dtype=np.float32)[:, None] * np.ones((1, 10), np.float32)
    seen = set()
    for seed in range(20):
        out = dataset.shift_bands(mel, np.random.default_rng(seed), max_shift=3)
        assert out.shape == mel.shape
        k = int(mel[50, 0] - out[50, 0])  # band i now holds what band i - k held
        assert -3 <= k <= 3
        seen.add(k)
        if k > 0:
            assert np.all(out[:k] == 0) and np.array_equal(out[k:], mel[:-k])
        elif k < 0:
            assert np.all(out[k:] == 95) and np.array_equal(out[:k], mel[-k:])
        else:
            assert np.array_equal(out, mel)
    assert len(seen) > 3


def test_bad_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(CrnnError, match=r"cannot read manifest .*nowhere\.csv"):
        dataset.read_records(tmp_path / "nowhere.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,genre,split\na.wav,rock,train\nb.wav,,train\n")
    with pytest.raises(CrnnError, match=r"bad\.csv, line 3: no path or no genre"):
        dataset.read_records(bad)
    bad.write_bytes(b"path,genre\n\xff\xfe.wav,rock\n")
    with pytest.raises(CrnnError, match=r"cannot read manifest .*bad\.csv"):
        dataset.read_records(bad)


def _tiny_dataset(root):
    """Two sound kinds as two genres; a manifest gives each split clips of both."""
    rows = ["path,genre,artist,title,album,year,split"]
    for g, kind in (("calm", "tonal"), ("busy", "beat")):
        for i, split in enumerate(("train", "train", "train", "val", "test", "test")):
            write(root / g / f"{g}{i}.wav", 4.0, kind=kind, seed=i)
            rows.append(f"{g}/{g}{i}.wav,{g},{g} artist {i},{g}{i},A,2020,{split}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_smoke_writes_loadable_model(tmp_path):
    data = _tiny_dataset(tmp_path / "data")
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "beetsplug.crnn.training.train", str(data), "--out", str(out),
         "--cache", str(tmp_path / "c"),
         "--epochs", "2", "--max-steps", "1", "--batch-size", "2", "--conv-filters", "4,4,4,4", "--gru-units", "4",
         "--dropout", "0.2", "--masking", "--shift", "3", "--mixup", "0.2", "--average", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(out)
    card.verify()
    assert card.genres == ["busy", "calm"]
    assert card.architecture == {"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.2}
    assert card.extra["training"]["epochs_run"] == 2
    assert card.extra["training"]["optimizer"] == {"name": "adam", "lr": 0.001, "beta_1": 0.9, "beta_2": 0.999}
    averaging = card.extra["training"]["averaging"]
    assert sorted(averaging["epochs"]) == [1, 2]
    # The average is kept exactly when val says it beats the best single epoch.
    assert averaging["used"] == (averaging["val_loss"] < averaging["best_single_val_loss"])
    emb, probs = Embedder(card)(np.stack([log_mel(audio.fit_window(signal(2.0)))]))
    assert emb.shape == (1, 4) and probs.shape == (1, 2)
    assert abs(np.linalg.norm(emb[0]) - 1) < 1e-5

    # Fine-tuning from it works through `beet crnntrain` (the same code path).
    env = BeetsEnv(tmp_path / "beets", out)
    tuned = tmp_path / "tuned"
    proc = env.run("crnntrain", str(data), "--out", str(tuned), "--cache", str(tmp_path / "c"), "--epochs", "1",
                   "--max-steps", "1", "--batch-size", "2", "--init-from", str(out), "--weight-decay", "0.05",
                   "--dropout", "0.3")
    tuned_card = ModelCard.load(tuned)
    tuned_card.verify()
    assert tuned_card.architecture == card.architecture
    assert "--init-from keeps the starting model's dropout" in proc.stdout + proc.stderr
    assert tuned_card.extra["training"]["optimizer"]["weight_decay"] == 0.05
    assert tuned_card.extra["training"]["command"].startswith("beet crnntrain")
    assert tuned_card.extra["training"]["clips"] == {"train": 6, "val": 2, "unlabelled": 0}

    # And it can be evaluated like the paper: tables on stdout, JSON on disk.
    report_path = tmp_path / "eval.json"
    proc = env.run("crnneval", str(data), "--model", str(tuned), "--cache", str(tmp_path / "c"), "--k", "1",
                   "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["clips"] == 4 and report["split"] == "test"
    assert set(report["per_genre"]) == {"busy", "calm"}
    assert 0.0 <= report["accuracy"] <= 1.0
    assert "top-1 accuracy" in proc.stdout and "precision@1" in proc.stdout


def _fixed_input(front=LEVEL_FREE):
    """A fixed generated input: one full window of each kind of sound, as ``front`` (the shipped card's for the
    shipped model) hears it."""
    ys = [audio.fit_window(signal(40.0, sr=front.sample_rate, kind=k, seed=7), front.window_samples)
          for k in ("tonal", "beat", "silence")]
    return front.log_mels(np.stack(ys))


def shipped_card():
    card_path = default_weights_dir() / "crnn.json"
    if not card_path.is_file():
        pytest.fail("model_weights/crnn.json is missing: the default model must ship with the plugin")
    return ModelCard.load(card_path.parent)


def test_shipped_card_matches_weights():
    card = shipped_card()
    card.verify()
    assert card.family == "msd-crnn" and card.architecture["conv_filters"] == [64, 128, 128, 128]
    assert card.architecture["gru_units"] == 32 and card.front.name == "msd"
    assert len(card.genres) >= 2 and len(card.tags) == 50
    assert "Choi" in card.extra["license"] and "MIT" in card.extra["license"]


def _fixed_versions(folder, front):
    """One fixed generated 40 s clip as a library holds it: the WAV, 20 dB quieter, 6 dB louder
    (FLAC, 44.1 kHz stereo), and re-encoded as MP3 and Ogg Vorbis (soundfile's encoders, no ffmpeg)."""
    import soundfile as sf

    y = 0.5 * signal(40.0, kind="tonal", seed=3) + 0.5 * signal(40.0, kind="beat", seed=4)
    files = {"original": (folder / "clip.wav", y, 22050, {}),
             "quieter": (folder / "quiet.wav", 0.1 * y, 22050, {}),
             "louder-flac44-stereo": (folder / "loud.flac", None, 44100, {}),
             "mp3": (folder / "clip.mp3", y, 22050, {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
             "vorbis": (folder / "clip.ogg", y, 22050, {"format": "OGG", "subtype": "VORBIS"})}
    out = {}
    for name, (path, data, sr, kw) in files.items():
        if data is None:  # resampled to 44.1 kHz, two channels, +6 dB
            import soxr

            up = np.clip(2.0 * soxr.resample(y, 22050, 44100), -1, 1)
            data = np.stack([up, up], axis=1)
        sf.write(str(path), data, sr, **kw)
        out[name] = front.log_mels(np.stack(audio.load_windows(path, 2, front=front)))
    return out


def test_shipped_weights_give_stored_outputs(tmp_path):
    card = shipped_card()
    stored = np.load(REGRESSION)
    assert str(stored["model_id"]) == card.model_id, "regenerate tests/data/shipped_outputs.npz for the new model"
    emb, probs = Embedder(card)(_fixed_input(card.front))
    np.testing.assert_allclose(emb, stored["embeddings"], atol=1e-4)
    np.testing.assert_allclose(probs, stored["probs"], atol=1e-4)


def test_shipped_model_hears_the_same_clip_in_every_file(tmp_path):
    """Level, rate, channels and codec move the shipped model's analysis of one clip very little."""
    from beetsplug.crnn.model import pool_track

    card = shipped_card()
    embedder = Embedder(card)
    tracks = {name: pool_track(*embedder(mels)) for name, mels in _fixed_versions(tmp_path, card.front).items()}
    original = tracks["original"][0]
    for name, (emb, probs) in tracks.items():
        assert float(emb @ original) > 0.98, f"{name}: cosine {float(emb @ original):.3f} to the original"
    stored = np.load(REGRESSION)
    np.testing.assert_allclose(np.stack([tracks[n][0] for n in sorted(tracks)]), stored["version_embeddings"],
                               atol=2e-3)  # lossy decoders may differ in the last bits between library builds


def test_bfloat16_inference_stays_close_to_float32():
    """The shipped model in bfloat16 (crnnembed's choice on CPUs that have it) ranks like float32."""
    card = shipped_card()
    x = _fixed_input(card.front)
    emb32, probs32 = Embedder(card, precision="float32")(x)
    emb16, probs16 = Embedder(card, precision="bfloat16")(x)
    assert np.all(np.sum(emb32 * emb16, axis=1) > 0.999)  # cosine between the two unit vectors
    np.testing.assert_allclose(probs16, probs32, atol=2e-2)


def test_precision_choice():
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    assert resolve_precision("auto") in ("float32", "bfloat16")
    with pytest.raises(ModelError):
        resolve_precision("int8")


def regenerate():
    """python tests/test_model.py  -- store the shipped model's outputs on the fixed inputs."""
    import tempfile

    from beetsplug.crnn.model import pool_track

    card = shipped_card()
    embedder = Embedder(card)
    emb, probs = embedder(_fixed_input(card.front))
    with tempfile.TemporaryDirectory() as tmp:
        versions = _fixed_versions(Path(tmp), card.front)
    version_embeddings = np.stack([pool_track(*embedder(versions[n]))[0] for n in sorted(versions)])
    REGRESSION.parent.mkdir(exist_ok=True)
    np.savez(REGRESSION, embeddings=emb, probs=probs, version_embeddings=version_embeddings,
             model_id=np.array(card.model_id))
    print(f"wrote {REGRESSION} for {card.model_id}")


if __name__ == "__main__":
    regenerate()
