"""The MSD CRNN family: its front end, the port of the released file, the ONNX export, fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audiogen import write
from conftest import ROOT

SHARED = ROOT.parent / "shared"
RELEASED = SHARED / "pretrained" / "choi2017-msd-crnn" / "music_tagger_crnn_weights_tensorflow.h5"
EMOTIFY = SHARED / "data" / "emotify"


def write_released(net, path: Path) -> Path:
    """Write ``net``'s weights in the released file's Keras 1 layout (names, orders, running_std), so the
    port can be tested on any machine, without ../shared."""
    import h5py

    from beetsplug.crnn import msd

    layers = {layer.name: layer for layer in net.layers}
    with h5py.File(path, "w") as f:
        for name in ["bn_0_freq"] + [f"bn{i}" for i in range(1, 5)]:
            gamma, beta, mean, var = layers[name].get_weights()
            g = f.create_group(name)
            for param, value in (("gamma", gamma), ("beta", beta), ("running_mean", mean),
                                 ("running_std", np.sqrt(var) - msd.BN_EPS)):
                g[f"{name}_{param}_1:0"] = value
        for i in range(1, 5):
            w, b = layers[f"conv{i}"].get_weights()
            g = f.create_group(f"conv{i}")
            g[f"conv{i}_W_1:0"] = w.transpose(3, 2, 0, 1)
            g[f"conv{i}_b_1:0"] = b
        for name in ("gru1", "gru2"):
            w, u, b = layers[name].get_weights()
            g = f.create_group(name)
            for j, gate in enumerate("zrh"):
                s = slice(j * msd.GRU_UNITS, (j + 1) * msd.GRU_UNITS)
                g[f"{name}_W_{gate}:0"] = w[:, s]
                g[f"{name}_U_{gate}:0"] = u[:, s]
                g[f"{name}_b_{gate}:0"] = b[s]
        w, b = layers["tags"].get_weights()
        g = f.create_group("output")
        g["output_W_1:0"] = w
        g["output_b_1:0"] = b
    return path


def random_msd(seed=0, n_genres=3, genre_input="state"):
    """The MSD CRNN with random weights (batch-norm statistics too, so the norms are exercised)."""
    import keras

    from beetsplug.crnn import msd

    keras.utils.set_random_seed(seed)
    net = msd.build(n_genres, genre_input=genre_input)
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.name.startswith("bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return net


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A file in the released layout: random weights, so the port is tested without ../shared."""
    folder = tmp_path_factory.mktemp("released")
    net = random_msd(seed=3)
    return write_released(net, folder / "released.h5"), net


def test_front_end_window_and_level():
    from beetsplug.crnn.features import MSD, front_end_for

    assert MSD.window_samples == 349_440  # 29.12 s at 12 kHz
    y = np.random.default_rng(0).normal(0, 0.1, MSD.window_samples).astype(np.float32)
    mels = MSD.log_mels(np.stack([y, 0.05 * y]))
    assert mels.shape == (2, 96, 1366)
    x = MSD.model_input(mels)
    assert np.max(np.abs(x[0] - x[1])) < 1e-3  # a 26 dB quieter file reads the same
    assert abs(float(x[0].mean())) < 1e-4 and abs(float(x[0].std()) - 1) < 1e-3
    silent = MSD.model_input(MSD.log_mels(np.zeros((1, MSD.window_samples), np.float32)))
    assert np.all(silent == 0)
    assert front_end_for(MSD.params) is MSD
    assert front_end_for(dict(MSD.params, n_fft=1024)) is None


def test_keras1_hard_sigmoid_is_not_keras3s():
    import keras

    from beetsplug.crnn.msd import keras1_hard_sigmoid

    x = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0], np.float32)
    ours = np.asarray(keras1_hard_sigmoid(x))
    np.testing.assert_allclose(ours, np.clip(0.2 * x + 0.5, 0, 1), atol=1e-7)
    assert np.max(np.abs(ours - np.asarray(keras.activations.hard_sigmoid(x)))) > 0.05


def test_port_reads_every_layer_of_the_released_layout(released):
    from beetsplug.crnn import msd

    path, source = released
    net = msd.build(3)
    msd.port(net, path)
    x = np.random.default_rng(1).normal(0, 1, (2, 96, 1366, 1)).astype(np.float32)
    want = [np.asarray(o) for o in source(x, training=False)]
    got = [np.asarray(o) for o in net(x, training=False)]
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)  # the 32-d state
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)  # the 50 tags


def test_port_refuses_another_file(tmp_path):
    import h5py

    from beetsplug.crnn import msd
    from beetsplug.crnn.errors import ModelError

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ModelError, match="not the released MSD CRNN file"):
        msd.read_released(tmp_path / "other.h5")
    with pytest.raises(ModelError, match="weights are not at"):
        msd.read_released(tmp_path / "missing.h5")


@pytest.mark.parametrize("genre_input", ["state", "state+conv_mean"])
def test_onnx_export_of_the_family_agrees_with_keras(tmp_path, genre_input):
    """Random weights (not the port): the export must follow every layer, not one set of numbers."""
    from beetsplug.crnn import msd
    from beetsplug.crnn.features import MSD
    from beetsplug.crnn.model import Embedder, ModelCard, OnnxEmbedder
    from beetsplug.crnn.training.card import save_model

    net = random_msd(seed=5, genre_input=genre_input)
    card = save_model(net, tmp_path, ["a", "b", "c"], dict(msd.ARCHITECTURE, genre_input=genre_input),
                      {"training": {}}, name="t", tags=msd.TAGS, features=MSD.params)
    assert card.onnx is not None and card.onnx["checked"]["max_abs_diff"] <= 1e-4
    card = ModelCard.load(tmp_path)
    assert card.family == "msd-crnn" and card.front is MSD
    y = np.random.default_rng(2).normal(0, 0.1, (2, MSD.window_samples)).astype(np.float32)
    mels = MSD.log_mels(y)
    keras_out = Embedder(card, precision="float32").analyse(mels)
    onnx_out = OnnxEmbedder(card).analyse(mels)
    for k, o in zip(keras_out, onnx_out):
        np.testing.assert_allclose(o, k, atol=1e-4)


def test_an_unknown_genre_input_is_refused_by_the_network_and_by_fine_tuning_s_top():
    """Both builders share msd.genre_head_input; neither may quietly read the conv mean for a misspelt value."""
    from beetsplug.crnn import msd
    from beetsplug.crnn.errors import ModelError
    from beetsplug.crnn.training import finetune

    with pytest.raises(ModelError, match="unknown genre_input 'conv'"):
        msd.build(2, genre_input="conv")
    with pytest.raises(ModelError, match="unknown genre_input 'conv'"):
        finetune.build_top(2, len(msd.TAGS), genre_input="conv")


def test_a_saved_card_hears_its_familys_front_end_unless_told_otherwise(tmp_path):
    """save_model without ``features``: the MSD family's card names the MSD front end, ours the level-free one."""
    from beetsplug.crnn import msd
    from beetsplug.crnn.features import MSD, PARAMS
    from beetsplug.crnn.model import ModelCard
    from beetsplug.crnn.training.card import save_model

    save_model(random_msd(seed=3, n_genres=2), tmp_path / "msd", ["a", "b"], msd.ARCHITECTURE, {"training": {}},
               name="t", tags=msd.TAGS)
    card = ModelCard.load(tmp_path / "msd")
    assert card.family == "msd-crnn" and card.front is MSD and card.features == MSD.params != PARAMS


@pytest.mark.skipif(not RELEASED.is_file() or not EMOTIFY.is_dir(), reason="needs ../shared (pretrained and emotify)")
def test_port_reproduces_the_released_tags():
    """README of ../shared/pretrained/choi2017-msd-crnn: two centred windows, tags averaged."""
    from beetsplug.crnn import audio, msd
    from beetsplug.crnn.features import MSD

    net = msd.build_pretrained(["_"], RELEASED)

    def tags(name):
        mels = MSD.log_mels(np.stack(audio.load_windows(EMOTIFY / name, 2, front=MSD)))
        t = np.asarray(net(MSD.model_input(mels)[..., None], training=False)[2]).mean(0)
        return {msd.TAGS[i]: float(t[i]) for i in np.argsort(-t)[:5]}

    rock = tags("rock/1.mp3")
    assert list(rock)[0] == "rock" and abs(rock["rock"] - 0.51) < 0.05
    assert abs(rock["classic rock"] - 0.12) < 0.05
    electronic = tags("electronic/1.mp3")
    assert list(electronic)[:3] == ["electronic", "electronica", "electro"]
    assert abs(electronic["electronic"] - 0.60) < 0.05 and abs(electronic["electronica"] - 0.22) < 0.05


# ---- fine-tuning on a tiny generated set ----


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    """Two labelled sets with train, val and test clips (test clips must never reach training)."""
    root = tmp_path_factory.mktemp("sets")
    kinds = {"calm": "tonal", "loud": "beat", "mixed": "tonal"}
    for s, (set_name, genres) in enumerate((("one", ["calm", "loud"]), ("two", ["loud", "mixed"]))):
        rows = ["path,genre,artist,split"]
        for g in genres:
            for i, split in enumerate(("train", "train", "train", "val", "test")):
                p = write(root / set_name / g / f"{i}.wav", seconds=4 + i, sr=12000, kind=kinds[g],
                          seed=100 * s + 10 * genres.index(g) + i)
                rows.append(f"{p.relative_to(root / set_name)},{g},{set_name}-{g}-{i},{split}")
        (root / set_name / "metadata.csv").write_text("\n".join(rows) + "\n")
    return [root / "one", root / "two"]


def _run(tiny_sets, released, out, cache=None, **settings):
    """A run on the tiny sets with no codec versions; ``settings`` override the gradient run's defaults."""
    from beetsplug.crnn.training import dataset, finetune

    records = dataset.read_sources(tiny_sets)
    cache = cache or finetune.FeatureCache(out.parent / "stem-cache", weights=released[0])
    settings = {"unfreeze": "gru", "lr": 1e-3, "batch_size": 4, **settings}
    return finetune.Run(records, cache, out, versions=(), log=lambda m: None, **settings)


def test_teacher_targets_are_computed_once(tiny_sets, released, tmp_path):
    from beetsplug.crnn.training import finetune

    cache = finetune.FeatureCache(tmp_path / "stem-cache", weights=released[0])
    first = _run(tiny_sets, released, tmp_path / "a", cache)
    assert cache.computed == 16  # every train (12) and val (4) clip once
    again = finetune.FeatureCache(tmp_path / "stem-cache", weights=released[0])
    second = _run(tiny_sets, released, tmp_path / "b", again)
    assert again.computed == 0
    np.testing.assert_array_equal(first.train.tags, second.train.tags)
    # the targets are the frozen original's tags for each window
    assert first.train.tags.shape[1] == 50 and np.all((first.train.tags > 0) & (first.train.tags < 1))
    assert again.start.sha256 == finetune._sha256(released[0])


def test_test_splits_never_reach_training(tiny_sets, released, tmp_path):
    from beetsplug.crnn.training import dataset, finetune
    from beetsplug.crnn.errors import CrnnError

    run = _run(tiny_sets, released, tmp_path / "run")
    records = dataset.read_sources(tiny_sets)
    assert any(r.split == "test" for r in records)
    assert run.records_seen and all(r.split == "train" for r in run.records_seen)
    assert {r.path for r in run.fit_records}.isdisjoint({r.path for r in records if r.split == "test"})
    assert all(r.split == "val" for r in run.val_records)
    with pytest.raises(CrnnError, match="test records reached training"):
        finetune.check_no_test(records)


def test_stopped_run_resumes_where_it_ended(tiny_sets, released, tmp_path):
    """One epoch, stopped, resumed to two: the same epoch count, the optimizer state carried on, and
    the same weights as a run that was never stopped."""
    whole = _run(tiny_sets, released, tmp_path / "whole")
    done = whole.fit(2)
    assert done["finished"] and done["epoch"] == 2

    first = _run(tiny_sets, released, tmp_path / "split")
    part = first.fit(2, stop_after=1)
    assert not part["finished"] and part["epoch"] == 1
    state = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    iterations_after_one = int(np.asarray(first.optimizer.iterations))
    assert iterations_after_one > 0

    second = _run(tiny_sets, released, tmp_path / "split")
    second._build()
    second.load_checkpoint()
    assert int(np.asarray(second.optimizer.iterations)) == iterations_after_one  # the saved optimizer state
    rest = second.fit(2, resume=True)
    assert rest["finished"] and rest["epoch"] == 2 and len(rest["history"]) == 3
    assert int(np.asarray(second.optimizer.iterations)) == 2 * iterations_after_one
    for a, b in zip(whole.top.get_weights(), second.top.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_finetuned_model_is_saved_as_the_family(tiny_sets, released, tmp_path):
    from beetsplug.crnn import msd
    from beetsplug.crnn.model import ModelCard

    run = _run(tiny_sets, released, tmp_path / "model")
    result = run.fit(1)
    card = run.save(result, "crnn-msd-test", "test")
    card = ModelCard.load(tmp_path / "model")
    assert card.family == "msd-crnn" and card.tags == msd.TAGS
    assert card.genres == ["calm", "loud", "mixed"]
    assert card.onnx is not None
    assert "Choi" in card.extra["training"]["credit"] and "MIT" in card.extra["license"]
    notice = (tmp_path / "model" / msd.LICENSE_FILE).read_text()
    assert "Copyright (c) 2016 Keunwoo Choi" in notice and "MIT License" in notice
    assert card.extra["training"]["clips"] == {"train": 12, "val": 4}


def test_a_model_of_the_family_is_a_start(tiny_sets, released, tmp_path):
    """Library training starts from the shipped model: its stem and top, a new genre head, its tags as teacher."""
    from beetsplug.crnn.training import finetune
    from beetsplug.crnn.features import MSD

    run = _run(tiny_sets, released, tmp_path / "model")
    run.save(run.fit(1), "crnn-msd-test", "test")
    start = finetune.Start(tmp_path / "model")
    assert start.card is not None and start.sha256 == start.card.sha256
    net = start.network(["x", "y"])
    assert start.genre_input == run.config["genre_input"] == "state+conv_mean"  # from the released file: the default
    assert net.get_layer("genres").get_weights()[0].shape == (32 + 128, 2)
    assert start.network(["x", "y"], genre_input="state").get_layer("genres").get_weights()[0].shape == (32, 2)
    np.testing.assert_array_equal(net.get_layer("gru2").get_weights()[0], run.top.get_layer("gru2").get_weights()[0])
    same = start.network(["calm", "loud", "mixed"])  # the same genres: the head is kept too
    np.testing.assert_array_equal(same.get_layer("genres").get_weights()[0], run.top.get_layer("genres").get_weights()[0])
    y = np.random.default_rng(0).normal(0, 0.1, (1, MSD.window_samples)).astype(np.float32)
    stem, emb, tags = finetune.Frozen(start)(MSD.log_mels(y))
    assert stem.shape == (1, 4, 60, 128) and emb.shape == (1, 32) and tags.shape == (1, 50)


@pytest.mark.slow
def test_crnntrain_on_a_library_starts_from_a_model_of_the_family(tmp_path):
    """`beet crnntrain` from an MSD-family model (as from the shipped one): fine-tuned on the library's genres,
    held-out artists scored, the broken file one line, the result loadable and evaluated by crnneval."""
    from beetsplug.crnn import msd
    from beetsplug.crnn.features import MSD
    from beetsplug.crnn.model import Embedder, ModelCard, build_for
    from beetsplug.crnn.training.card import save_model
    from conftest import BeetsEnv
    from test_libtrain import ALIASES, family_library, model_folders

    start = tmp_path / "start"
    save_model(random_msd(seed=7, n_genres=2), start, ["classical", "rock"], msd.ARCHITECTURE, {"training": {}},
               name="crnn-msd-start", tags=msd.TAGS, features=MSD.params)
    env = BeetsEnv(tmp_path / "lib", start, extra_config=ALIASES)
    family_library(env, artists_per_genre=4, tracks_per_artist=2)
    proc = env.run("crnntrain", "--min-tracks", "5", "--val-fraction", "0.25", "--test-fraction", "0.25",
                   "--init-from", start, "--unfreeze", "gru", "--epochs", "3", "--lr", "0.003", timeout=1800)
    out, err = proc.stdout, proc.stderr
    assert "fine-tuning crnn-msd-start-" in out and "best epoch" in out
    bad = [line for line in err.splitlines() if "broken.wav" in line]
    assert len(bad) == 1 and "left out" in bad[0]
    folder = model_folders(env)[0]
    card = ModelCard.load(folder)
    assert card.family == "msd-crnn" and card.front is MSD and card.tags == msd.TAGS
    assert card.genres == ["classical", "electronic", "hip-hop"]
    assert card.extra["training"]["start"]["model"].startswith("crnn-msd-start-")
    assert card.extra["training"]["library"]["field"] == "genre"
    test = card.extra["metrics"]["test"]["library"]
    assert test["tracks"] >= 6 and 0 <= test["accuracy"] <= 1
    Embedder(card)
    proc = env.run("crnneval", "--model", folder, "--json", env.root / "eval.json")
    report = json.loads((env.root / "eval.json").read_text())
    assert report["models"][card.model_id]["accuracy"] == pytest.approx(test["accuracy"])
    # the default, --unfreeze none: the start's network and embedding kept, a genre head fitted on them (the
    # stem cache reused)
    proc = env.run("crnntrain", "--min-tracks", "5", "--val-fraction", "0.25", "--test-fraction", "0.25",
                   "--init-from", start, "--out", env.root / "frozen", timeout=1800)
    assert "fitting a genre head for these 3 genres" in proc.stdout and "probe head" in proc.stdout + proc.stderr
    frozen = ModelCard.load(env.root / "frozen")
    assert frozen.architecture["genre_activation"] == "softmax" and frozen.genres == card.genres
    assert frozen.extra["training"]["config"]["unfreeze"] == "none" and "probe" in frozen.extra["training"]["genre_head"]
    kept, source = build_for(frozen), build_for(ModelCard.load(start))
    kept.load_weights(str(frozen.weights))
    source.load_weights(str(ModelCard.load(start).weights))
    for name in ("conv1", "gru1", "gru2", "tags"):
        for a, b in zip(kept.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert "metrics" in frozen.extra and frozen.extra["metrics"]["test"]["library"]["tracks"] >= 6


def test_frozen_network_with_a_probe_head(tiny_sets, released, tmp_path):
    """--unfreeze none: the start's layers unchanged, a softmax probe (fitted on train + val windows) as the
    genre head, folded so the served network needs no standardisation step; ONNX exports it."""
    from beetsplug.crnn.training import finetune
    from beetsplug.crnn.features import MSD
    from beetsplug.crnn.model import ModelCard, OnnxEmbedder

    run = _run(tiny_sets, released, tmp_path / "probe", unfreeze="none")
    cache = run.cache
    result = finetune.fit_probe_head(run)
    assert result["probe"]["l2"] > 0 and result["probe"]["windows"]["train"] == len(run.train)
    card = run.save(result, "crnn-msd-probe", "test")
    card = ModelCard.load(tmp_path / "probe")
    assert card.architecture["genre_activation"] == "softmax" and card.onnx["checked"]["max_abs_diff"] <= 1e-4
    y = np.random.default_rng(4).normal(0, 0.1, (2, MSD.window_samples)).astype(np.float32)
    emb, probs, tags = OnnxEmbedder(card).analyse(MSD.log_mels(y))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the state and tags are the start's, untouched
    stem, state, teacher_tags = cache.frozen(MSD.log_mels(y))
    np.testing.assert_allclose(tags, teacher_tags, atol=1e-4)
    unit = state / np.linalg.norm(state, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, unit, atol=1e-4)
    # the folded head equals the probe on the standardised state beside the conv sequence's time mean
    from beetsplug.crnn.training.probe import fit_probe

    assert card.architecture["genre_input"] == "state+conv_mean"
    X_train, X_val = finetune.head_features(run, run.train), finetune.head_features(run, run.val)
    assert X_train.shape == (len(run.train), 32 + 128)
    np.testing.assert_array_equal(X_train[:, :32], run.train.emb)
    y_train = [run.genres.index(run.fit_records[c].genre) for c in run.train.clip]
    y_val = [run.genres.index(run.val_records[c].genre) for c in run.val.clip]
    probe, _ = fit_probe(run.genres, X_train, y_train, X_val, y_val, mask_train=run.train.mask, mask_val=run.val.mask)
    _, head = run.predict(run.val)
    np.testing.assert_allclose(head, probe.predict_proba(X_val), atol=1e-3)  # the stem is cached in float16
    # each clip's softmax ran over its own set's genres: set "one" labels calm and loud, never mixed
    assert run.label_sets["one"] == ["calm", "loud"] and run.train.mask[:, run.genres.index("mixed")].min() == 0


def test_state_only_genre_head_is_still_a_choice(tiny_sets, released, tmp_path):
    """--genre-input state: the head reads the 32-d state alone (the first shipped MSD model's head)."""
    from beetsplug.crnn.training import finetune
    from beetsplug.crnn.model import ModelCard

    run = _run(tiny_sets, released, tmp_path / "probe", unfreeze="none", genre_input="state")
    run.save(finetune.fit_probe_head(run), "crnn-msd-probe", "test")
    card = ModelCard.load(tmp_path / "probe")
    assert card.architecture["genre_input"] == "state" and card.onnx["checked"]["max_abs_diff"] <= 1e-4
    from beetsplug.crnn.model import build_for

    assert build_for(card).get_layer("genres").get_weights()[0].shape == (32, len(run.genres))


def test_musicnn_as_a_second_teacher_of_the_state(tiny_sets, released, tmp_path):
    """--musicnn-weight: the state learns musicnn's clean-clip embedding through a linear map that trains
    with the top and is not served; targets come from the teacher cache (here written by the test)."""
    from beetsplug.crnn.training import dataset, teacher
    from beetsplug.crnn.model import ModelCard, build_for

    records = dataset.read_sources(tiny_sets)
    cache = teacher.TeacherCache(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    fit = [r for r in records if r.split == "train"]
    for r in fit:  # every clip cached: the teacher itself (musicnn) is not needed
        cache.put(r.path, rng.random((3, 50)), rng.normal(0, 1, (3, teacher.EMB_DIMS)), 1.5, 4.0)
    run = _run(tiny_sets, released, tmp_path / "run", musicnn_weight=1.0, teacher_dir=tmp_path / "teacher")
    targets, mask = run.musicnn
    assert targets.shape == (len(run.train), teacher.EMB_DIMS)
    assert mask.min() == 1
    # every window of a clip learns its clean clip's mean embedding, standardised over the train clips
    means = np.array([cache.get(r.path)["emb"].mean(0) for r in fit])
    np.testing.assert_allclose(targets[run.train.clip == 2][0], (means[2] - means.mean(0)) / means.std(0), atol=1e-2)
    run._build()
    before = run.top.get_layer("musicnn").get_weights()[0].copy()
    result = run.fit(1)
    assert not np.allclose(run.top.get_layer("musicnn").get_weights()[0], before)
    run.save(result, "crnn-msd-test", "test")
    card = ModelCard.load(tmp_path / "run")
    assert card.extra["training"]["config"]["musicnn_weight"] == 1.0 and "musicnn" in card.extra["training"]["teacher"]
    assert "musicnn" not in {layer.name for layer in build_for(card).layers}
