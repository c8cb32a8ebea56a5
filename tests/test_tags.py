"""crnn_tags: a model card with a tag head stores the track's top tags, `beet ls` finds them, `similar` shows them."""

from __future__ import annotations

import numpy as np
import pytest

from audiogen import write
from beetsplug.crnn import store
from conftest import GENRES, BeetsEnv

TAGS = ["rock", "punk", "Hip-Hop"]
TAG_BIAS = [3.0, -3.0, 3.0]  # sigmoid: 0.95, 0.05, 0.95 whatever the audio


def _attrs(env, item_id):
    lib = env.library()
    values = dict(lib.get_item(item_id).items())
    lib._close()
    return values


@pytest.fixture(scope="module")
def tag_model(tmp_path_factory):
    """A tiny CRNN with a 3-tag head whose outputs do not depend on the audio."""
    import keras

    from beetsplug.crnn.model import build
    from beetsplug.crnn.training.card import save_model

    keras.utils.set_random_seed(0)
    arch = {"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.1}
    net = build(len(GENRES), arch["conv_filters"], arch["gru_units"], n_tags=len(TAGS))
    layer = net.get_layer("tags")
    kernel, _ = layer.get_weights()
    layer.set_weights([np.zeros_like(kernel), np.array(TAG_BIAS, np.float32)])
    return save_model(net, tmp_path_factory.mktemp("tag_model"), GENRES, arch,
                      {"training": {"note": "random weights with a fixed tag head, made by the test suite"}},
                      name="test-tags", tags=TAGS)


@pytest.fixture
def tagged_library(tmp_path, tag_model):
    env = BeetsEnv(tmp_path, tag_model.weights.parent)
    ids = [env.add(write(env.music / f"{name}.wav", 4.0, kind=kind, seed=i), artist=f"Artist {i}", title=name)
           for i, (name, kind) in enumerate([("first", "beat"), ("second", "tonal")])]
    return env, ids


# ---- store: pure functions ----


def test_top_tags_threshold_order_and_limit():
    names = ["rock", "pop", "indie", "Hip-Hop", "00s"]
    probs = [0.4, 0.9, 0.1, 0.9, 0.3]
    assert store.top_tags(probs, names, 0.3, 5) == "pop, Hip-Hop, rock, 00s"  # ties keep the card's order
    assert store.top_tags(probs, names, 0.35, 2) == "pop, Hip-Hop"
    assert store.top_tags(probs, names, 0.3, 0) == "pop, Hip-Hop, rock, 00s"  # 0 = no cap
    assert store.top_tags(probs, names, 0.95, 5) == ""
    assert store.split_tags("pop, Hip-Hop, rock") == ["pop", "Hip-Hop", "rock"]
    assert store.split_tags("") == [] and store.split_tags(None) == []


def test_fields_for_tags_are_optional():
    vec = np.eye(4, dtype=np.float32)[0]
    probs = np.array([0.1, 0.2, 0.3, 0.9])
    plain = store.fields_for(vec, probs, GENRES, "m", 0.0, 1.0)  # existing callers: no tags, no crnn_tags
    assert store.TAGS not in plain
    tagged = store.fields_for(vec, probs, GENRES, "m", 0.0, 1.0, tags=[0.2, 0.8, 0.5], tag_names=["a", "b", "c"])
    assert tagged[store.TAGS] == "b, c"
    assert {k: v for k, v in tagged.items() if k != store.TAGS} == plain
    assert store.fields_for(vec, probs, GENRES, "m", 0.0, 1.0, tags=[0.2, 0.8, 0.5], tag_names=["a", "b", "c"],
                            tag_threshold=0.1, max_tags=1)[store.TAGS] == "b"


def test_pipeline_pools_tags_by_mean(tmp_path):
    from beetsplug.crnn.pipeline import analyse

    class FakeEmbedder:
        """Window k of a batch gets tag probabilities (k, 1 - k) / 10: the pooled value is their mean."""

        def analyse(self, mels):
            n = len(mels)
            emb = np.tile(np.eye(4, dtype=np.float32)[0], (n, 1))
            probs = np.full((n, len(GENRES)), 0.5, np.float32)
            k = np.arange(n, dtype=np.float32)[:, None]
            return emb, probs, np.hstack([k, 10 - k]) / 10

    path = write(tmp_path / "long.wav", 70.0, kind="tonal", seed=1)
    (result,) = analyse([(1, path)], FakeEmbedder(), n_windows=2, workers=1)
    assert result.error is None
    np.testing.assert_allclose(result.tags, [0.05, 0.95], atol=1e-6)  # windows 0 and 1


# ---- beet crnnembed / ls / similar ----


def test_embed_stores_tags_and_ls_finds_them(tagged_library, tag_model, tiny_model):
    env, ids = tagged_library
    proc = env.run("crnnembed", "-q")
    assert "embedded 2, up to date 0, failed 0" in proc.stderr
    for item_id in ids:
        values = _attrs(env, item_id)
        assert values[store.TAGS] == "rock, Hip-Hop"  # punk is below the threshold; rock and Hip-Hop tie
        assert values[store.MODEL] == tag_model.model_id
    for query in ("crnn_tags:hip-hop", "crnn_tags:rock", "crnn_tags:Hip-Hop"):
        assert sorted(map(int, env.run("ls", "-f", "$id", query).stdout.split())) == sorted(ids), query
    assert env.run("ls", "-f", "$id", "crnn_tags:punk").stdout.split() == []

    # `similar` says which tags a result shares with the seed; -f output stays as asked.
    out = env.run("similar", "title:first", "-n", "1").stdout.splitlines()
    assert len(out) == 1 and "second" in out[0] and "shared tags: rock, Hip-Hop]" in out[0], out
    assert env.run("similar", "title:first", "-n", "1", "-f", "$id").stdout.split() == [str(ids[1])]

    # A model without a tag head removes the tags an earlier model stored.
    env = BeetsEnv(env.root, tiny_model.weights.parent)
    assert "embedded 2, up to date 0, failed 0" in env.run("crnnembed", "-q").stderr
    for item_id in ids:
        values = _attrs(env, item_id)
        assert store.TAGS not in values and values[store.MODEL] == tiny_model.model_id
    out = env.run("similar", "title:first", "-n", "1").stdout
    assert "shared tags" not in out and "second" in out


def test_tag_settings(tmp_path, tag_model):
    env = BeetsEnv(tmp_path, tag_model.weights.parent, "  max_tags: 1\n  tag_threshold: 0.5\n")
    item_id = env.add(write(env.music / "one.wav", 3.0, seed=3))
    env.run("crnnembed", "-q")
    assert _attrs(env, item_id)[store.TAGS] == "rock"

    bad = BeetsEnv(tmp_path, tag_model.weights.parent, "  tag_threshold: 1.5\n")
    proc = bad.run("crnnembed", "-f", check=False)
    assert proc.returncode != 0 and "tag_threshold" in proc.stderr
