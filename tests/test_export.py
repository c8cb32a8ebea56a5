"""The ONNX export: same outputs as Keras, checked at load, and the plain-install path that uses it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from audiogen import write
from beetsplug.crnn import store
from beetsplug.crnn.errors import ModelError
from beetsplug.crnn.model import Embedder, ModelCard, OnnxEmbedder, embedder_for, resolve_runtime
from conftest import GENRES, ROOT, BeetsEnv, make_model
from test_model import REGRESSION, _fixed_input, shipped_card

# Run `beet` with tensorflow and keras impossible to import (as on a plain install), then list heavy modules.
NO_TF_PROBE = (
    "import sys\n"
    "if sys.argv[1] == 'block':\n"
    "    sys.modules.update(tensorflow=None, keras=None)\n"
    "import beets.ui\n"
    "try:\n    beets.ui.main(sys.argv[2:])\n"
    "finally:\n    print('HEAVY:' + ','.join(sorted(m for m in ('tensorflow', 'keras', 'librosa') if sys.modules.get(m) is not None)))\n"
)


def _raw_outputs(embedder, x):
    emb, probs, tags = embedder.analyse(x)
    return [emb, probs] + ([tags] if tags is not None else [])


def test_shipped_onnx_matches_keras_on_stored_inputs():
    card = shipped_card()
    assert card.onnx and card.onnx["checked"]["max_abs_diff"] <= 1e-4
    x = _fixed_input(card.front)
    onnx_out = _raw_outputs(OnnxEmbedder(card), x)
    keras_out = _raw_outputs(Embedder(card, precision="float32"), x)
    assert len(onnx_out) == len(keras_out) == 3  # embedding, genres, tags
    for a, b in zip(onnx_out, keras_out):
        np.testing.assert_allclose(a, b, atol=1e-4)
    stored = np.load(REGRESSION)
    np.testing.assert_allclose(onnx_out[0], stored["embeddings"], atol=1e-4)
    np.testing.assert_allclose(onnx_out[1], stored["probs"], atol=1e-4)


def test_export_of_a_trained_model_matches_keras(tmp_path):
    """crnn-train's save_model exports; crnn-export on the folder writes the same graph again."""
    card = make_model(tmp_path / "m", conv_filters=(6, 8, 8, 8), gru_units=5, seed=3)
    assert card.onnx and (tmp_path / "m" / "crnn.onnx").is_file()
    x = np.concatenate([_fixed_input(), np.random.default_rng(1).normal(-40, 15, (2, 96, 1366)).astype(np.float32)])
    for a, b in zip(_raw_outputs(OnnxEmbedder(card), x), _raw_outputs(Embedder(card), x)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    before = card.onnx["sha256"]
    (tmp_path / "m" / "crnn.onnx").unlink()
    proc = subprocess.run([sys.executable, "-m", "beetsplug.crnn.training.export", str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = ModelCard.load(tmp_path / "m")
    assert again.onnx["sha256"] == before and again.model_id == card.model_id
    assert OnnxEmbedder(again)(x[:1])[0].shape == (1, 5)


def test_tag_head_is_exported(tmp_path):
    from beetsplug.crnn.model import build
    from beetsplug.crnn.training.card import save_model

    import keras

    keras.utils.set_random_seed(5)
    arch = {"conv_filters": [4, 6, 6, 6], "gru_units": 4, "dropout": 0.1}
    card = save_model(build(2, arch["conv_filters"], 4, n_tags=3), tmp_path, ["a", "b"], arch, {}, tags=["x", "y", "z"])
    assert card.onnx["outputs"] == ["embedding", "genres", "tags"]
    x = _fixed_input()
    for a, b in zip(_raw_outputs(OnnxEmbedder(card), x), _raw_outputs(Embedder(card), x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_onnx_file_that_does_not_match_its_card_is_a_clear_error(tmp_path, tiny_model):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model.weights.parent, folder)
    card = ModelCard.load(folder)
    with open(folder / "crnn.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"crnn\.onnx does not match its card .*crnn-export"):
        embedder_for(card, runtime="auto")
    (folder / "crnn.onnx").unlink()
    with pytest.raises(ModelError, match=r"crnn\.onnx is missing"):
        embedder_for(card, runtime="onnx")
    # through beet: one line, no traceback
    env = BeetsEnv(tmp_path / "beets", folder)
    env.add(write(env.music / "x.wav", 3.0))
    proc = env.run("crnnembed", check=False)
    assert proc.returncode != 0 and "crnn.onnx is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_runtime_choice(tiny_model, tmp_path):
    assert resolve_runtime(tiny_model) == "onnx"
    assert resolve_runtime(tiny_model, precision="bfloat16") == "keras"  # onnxruntime computes in float32
    assert resolve_runtime(tiny_model, runtime="keras") == "keras"
    card = ModelCard.load(tiny_model.weights.parent)
    card.onnx = None
    assert resolve_runtime(card) == "keras"
    with pytest.raises(ModelError, match="no ONNX export"):
        embedder_for(card, runtime="onnx")
    with pytest.raises(ModelError, match="bfloat16 needs runtime keras"):
        resolve_runtime(tiny_model, precision="bfloat16", runtime="onnx")
    with pytest.raises(ModelError, match="runtime must be one of"):
        resolve_runtime(tiny_model, runtime="tflite")
    assert isinstance(embedder_for(tiny_model), OnnxEmbedder)


def test_onnx_and_keras_runtimes_store_the_same_embeddings(tmp_path, tiny_model):
    stored = {}
    for runtime in ("onnx", "keras"):
        env = BeetsEnv(tmp_path / runtime, tiny_model.weights.parent, f"  runtime: {runtime}\n  precision: float32\n")
        ids = [env.add(write(env.music / f"t{i}.{ext}", secs, kind=kind, seed=i), artist=f"A{i}")
               for i, (ext, secs, kind) in enumerate((("wav", 4.0, "tonal"), ("flac", 70.0, "beat"),
                                                      ("mp3", 40.0, "tonal")))]
        env.run("crnnembed")
        lib = env.library()
        stored[runtime] = [(store.decode_vector(lib.get_item(i)[store.EMBEDDING]), lib.get_item(i)["crnn_genre"])
                           for i in ids]
        lib._close()
    for (a, ga), (b, gb) in zip(stored["onnx"], stored["keras"]):
        cosine = float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 1 - 1e-3
        assert ga == gb and ga in GENRES


def test_crnnembed_needs_no_tensorflow_and_crnntrain_says_how_to_get_it(beets_env):
    beets_env.add(write(beets_env.music / "x.flac", 35.0, kind="beat"))
    for mode in ("allow", "block"):
        proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, mode, "crnnembed", "-f"], env=beets_env.env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "HEAVY:", (mode, proc.stdout)
        assert "embedded 1" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, "block", "crnntrain", "--epochs", "1"],
                          env=beets_env.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("pip install beets-crnn[train]"), proc.stderr
    # the Keras runtime, asked for, says the same
    with open(beets_env.root / "config.yaml", "a") as f:
        f.write("  runtime: keras\n")
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, "block", "crnnembed", "-f"], env=beets_env.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "pip install beets-crnn[train]" in proc.stderr and "Traceback" not in proc.stderr


def test_card_keeps_its_onnx_block(tmp_path, tiny_model):
    data = json.loads((tiny_model.weights.parent / "crnn.json").read_text())
    assert data["onnx"]["file"] == "crnn.onnx" and len(data["onnx"]["sha256"]) == 64
    card = ModelCard.load(tiny_model.weights.parent)
    card.save(tmp_path / "crnn.json")
    assert json.loads((tmp_path / "crnn.json").read_text())["onnx"] == data["onnx"]
