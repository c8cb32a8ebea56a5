"""crnn-wccn: a projection after the last GRU that divides out how versions of a window scatter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audiogen import has_ffmpeg
from beetsplug.crnn.training import dataset, wccn
from beetsplug.crnn.errors import CrnnError
from beetsplug.crnn.model import Embedder, ModelCard
from conftest import make_model
from test_training_data import _labelled_set


def test_within_scatter_by_hand():
    X = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    groups = np.array([7, 7, 2, 2, 9])  # deviations: (-1,0), (1,0), (0,-1), (0,1), (0,0)
    np.testing.assert_allclose(wccn.within_scatter(X, groups), np.eye(2) * 2 / 5)


def test_projection_shrinks_the_direction_versions_move_in():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 6))  # 100 windows, each seen as 4 versions
    X = np.repeat(centres, 4, axis=0)
    X[:, 0] += 2.0 * rng.standard_normal(len(X))  # versions move along axis 0 only, and far
    X[:, 1:] += 0.01 * rng.standard_normal((len(X), 5))
    groups = np.repeat(np.arange(100), 4)
    P = wccn.projection(wccn.within_scatter(X, groups), shrink=0.1)
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    assert np.trace(P) == pytest.approx(6)
    gains = np.linalg.norm(P, axis=0)
    assert gains[0] < 0.2 * gains[1:].min()
    # Versions of one window are now nearer each other than to other windows' versions.
    Z = X @ P
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)

    def same_window_rate(V):
        S = V @ V.T
        np.fill_diagonal(S, -np.inf)
        return np.mean(groups[np.argmax(S, axis=1)] == groups)

    assert same_window_rate(Z) > same_window_rate(U) + 0.2
    # More shrinkage, nearer the identity (up to scale).
    P_far = wccn.projection(wccn.within_scatter(X, groups), shrink=100.0)
    np.testing.assert_allclose(P_far / P_far[1, 1], np.eye(6), atol=0.05)
    with pytest.raises(CrnnError, match="singular"):
        wccn.projection(np.zeros((6, 6)), shrink=0.0)


def test_projected_replaces_a_projection_and_keeps_every_output(tmp_path):
    card = make_model(tmp_path / "m", genres=["pop", "rock"], tags=["loud", "calm"])
    base = Embedder(card).model
    rng = np.random.default_rng(1)

    def spd():
        A = rng.standard_normal((8, 8))
        return A @ A.T + 8 * np.eye(8)

    arch = dict(card.architecture, projection="wccn")
    once = wccn.projected(card, base, spd(), arch)
    P2 = spd()
    twice = wccn.projected(card, once, P2, arch)  # as research/consistency.py refits a tuned, projected model
    x = rng.standard_normal((2, 96, 1366, 1)).astype(np.float32)
    (e0, p0, t0), (_, p1, t1), (e2, p2, t2) = [[o.numpy() for o in m(x, training=False)] for m in (base, once, twice)]
    for p in (p1, p2):
        np.testing.assert_allclose(p, p0, atol=1e-5)
    for t in (t1, t2):
        np.testing.assert_allclose(t, t0, atol=1e-5)
    np.testing.assert_allclose(e2, e0 @ P2, rtol=1e-4, atol=1e-4)


def test_projected_msd_model_whose_genre_head_also_reads_the_conv_mean():
    """The MSD family's genre head reads [state, conv_mean]: only the state's rows fold through P^-1."""
    from beetsplug.crnn import msd
    from test_msd import random_msd

    base = random_msd(seed=2, n_genres=3, genre_input="state+conv_mean")
    arch = dict(msd.ARCHITECTURE, genre_input="state+conv_mean", projection="wccn")
    card = ModelCard("m", ["a", "b", "c"], None, "", arch, tags=list(msd.TAGS))
    rng = np.random.default_rng(3)
    A = rng.standard_normal((32, 32))
    P = A @ A.T + 32 * np.eye(32)
    new = wccn.projected(card, base, P, arch)
    x = rng.standard_normal((1, 96, 1366, 1)).astype(np.float32)
    (e0, p0, t0), (e1, p1, t1) = [[o.numpy() for o in m(x, training=False)] for m in (base, new)]
    np.testing.assert_allclose(p1, p0, atol=1e-5)
    np.testing.assert_allclose(t1, t0, atol=1e-5)
    np.testing.assert_allclose(e1, e0 @ P, rtol=1e-4, atol=1e-4)


def test_wccn_on_an_msd_model_hears_and_keeps_its_front_end(tmp_path):
    """crnn-wccn on a model of the MSD family: rows through its 12 kHz front end, the card keeps that front end."""
    from beetsplug.crnn import msd
    from beetsplug.crnn.features import MSD
    from beetsplug.crnn.training.card import save_model
    from test_msd import random_msd

    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], seconds=2.0)
    arch = dict(msd.ARCHITECTURE, genre_input="state+conv_mean", genre_activation="softmax")
    old = save_model(random_msd(seed=4, n_genres=2, genre_input="state+conv_mean"), tmp_path / "old", ["pop", "rock"],
                     arch, {"training": {}}, name="m", tags=msd.TAGS, features=MSD.params)
    args = wccn.build_parser().parse_args([str(a), "--model", str(old.weights.parent), "--out", str(tmp_path / "new"),
                                           "--copies", "1", "--augment-p", "1", "--versions", "",
                                           "--cache", str(tmp_path / "mels")])
    new = wccn.run(args, log=lambda m: None)
    assert new.front is MSD and new.features == old.features and new.architecture["projection"] == "wccn"
    cache = dataset.MelCache(tmp_path / "mels", MSD)
    train = [r for r in dataset.read_sources([a]) if r.split == "train"]
    # the rows were the MSD front end's windows (the folded heads hide which front end made them; the cache does not)
    assert all(cache._key(Path(r.path), "serving", 2).is_file() for r in train)
    windows = np.concatenate([cache.serving(r.path, 2) for r in train])
    (_, p_old), (_, p_new) = Embedder(old)(windows), Embedder(ModelCard.load(tmp_path / "new"))(windows)
    np.testing.assert_allclose(p_new, p_old, atol=1e-5)


@pytest.mark.slow
def test_wccn_keeps_every_output_and_moves_only_the_embedding(tmp_path):
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], seconds=2.0)
    b = _labelled_set(tmp_path / "setB", ["jazz", "rock"], seconds=2.0)
    old = make_model(tmp_path / "old", genres=["jazz", "pop", "rock"])
    records = dataset.read_sources([a, b])
    versions = "mp3-64k" if has_ffmpeg() else ""
    args = wccn.build_parser().parse_args([str(a), str(b), "--model", str(old.weights.parent), "--out",
                                           str(tmp_path / "new"), "--copies", "1", "--versions", versions,
                                           "--cache", str(tmp_path / "mels"), "--version-cache",
                                           str(tmp_path / "versions")])
    seen = []
    real = wccn.Versions.rows

    def spy(self, embed):
        seen.extend(self.records)
        return real(self, embed)

    wccn.Versions.rows = spy
    try:
        new = wccn.run(args, log=lambda m: None)
    finally:
        wccn.Versions.rows = real
    assert {r.split for r in seen} == {"train"}  # test (and val) clips never reach it
    assert len(seen) == sum(r.split == "train" for r in records)

    card = ModelCard.load(tmp_path / "new")
    assert card.model_id == new.model_id != old.model_id and card.model_id.startswith("test-")
    assert card.extra["name"] == "test"  # the family name, recorded for the next model made from this one
    assert card.architecture == dict(old.architecture, projection="wccn") and card.onnx
    info = json.loads((tmp_path / "new" / "crnn.json").read_text())["wccn"]
    assert info["from"] == old.model_id and info["splits"] == ["train"]
    files = 1 + (1 if versions else 0)
    assert info["rows"] == len(seen) * files * 2 and info["groups"] == len(seen)  # one window per clip, 2 copies

    # Genre outputs are the old model's; the embedding is the old raw embedding times P.
    cache = dataset.MelCache(tmp_path / "mels")
    windows = np.concatenate([cache.serving(r.path, 1) for r in records])
    e_old, p_old = Embedder(old)(windows)
    e_new, p_new = Embedder(card)(windows)
    np.testing.assert_allclose(p_new, p_old, atol=1e-5)
    P = Embedder(card).model.get_layer("projection").get_weights()[0]
    raw_old = Embedder(old).raw_embeddings(windows)
    want = raw_old @ P
    np.testing.assert_allclose(e_new, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-4)
    assert np.max(np.abs(e_new - e_old)) > 1e-3

    # A projected model is not projected again, and never into its own folder.
    args.model, args.out = str(tmp_path / "new"), str(tmp_path / "again")
    with pytest.raises(CrnnError, match="has a projection already"):
        wccn.run(args, log=lambda m: None)

    # Training can start from it (as beet crnntrain starts from the shipped model): the layer is kept.
    from beetsplug.crnn.training import train

    targs = train.build_parser().parse_args([str(a), str(b), "--out", str(tmp_path / "tuned"), "--cache",
                                             str(tmp_path / "mels"), "--epochs", "1", "--max-steps", "1",
                                             "--init-from", str(tmp_path / "new"), "--name", "tuned"])
    tuned = train.run(targs, log=lambda m: None)
    assert tuned.architecture.get("projection") == "wccn" and tuned.onnx
    assert tuned.model_id.startswith("tuned-") and wccn.family_name(ModelCard.load(tmp_path / "tuned")) == "tuned"
    Embedder(tuned)(windows[:1])


def test_family_name_from_the_card_or_else_the_model_id(tmp_path):
    card = make_model(tmp_path / "m", genres=["pop", "rock"])
    assert wccn.family_name(card) == "test"
    card.extra.pop("name")
    card.model_id = "crnn-emotify-gtzan-79f1de974f"
    assert wccn.family_name(card) == "crnn-emotify-gtzan"  # a card from before the name was recorded
    card.extra["name"] = "mine-0123456789"  # a --name that itself ends like a hash is kept whole
    assert wccn.family_name(card) == "mine-0123456789"
    del card.extra["name"]
    card.model_id = "handmade"
    assert wccn.family_name(card) == "handmade"


def test_wccn_refuses_test_splits_its_own_folder_and_nothing_to_compare(tmp_path):
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], with_audio=False)
    old = make_model(tmp_path / "old", genres=["pop", "rock"])
    records = dataset.read_sources([a])
    with pytest.raises(CrnnError, match="test split never"):
        wccn.Versions(records, tmp_path / "mels", splits=("train", "test"))
    with pytest.raises(CrnnError, match="nothing to compare"):
        wccn.Versions(records, tmp_path / "mels", versions=(), copies=0)
    args = wccn.build_parser().parse_args([str(a), "--model", str(old.weights.parent), "--out",
                                           str(old.weights.parent)])
    with pytest.raises(CrnnError, match="another folder"):
        wccn.run(args, log=lambda m: None)


def test_a_projected_model_keeps_the_cards_record_less_what_the_projection_made_stale(tmp_path):
    """save_projected: metrics (of the old embedding) and the ``drop`` keys go; the rest and the new record stay."""
    from beetsplug.crnn import msd
    from beetsplug.crnn.training.card import save_model
    from test_msd import random_msd

    old = save_model(random_msd(seed=6, n_genres=2), tmp_path / "old", ["pop", "rock"], msd.ARCHITECTURE,
                     {"training": {"epochs": 3}, "metrics": {"top1": 0.9}, "wccn": {"shrink": 0.1}}, name="m",
                     tags=msd.TAGS)
    model = Embedder(old).model
    P = np.diag(np.linspace(0.5, 2.0, 32))
    new = wccn.save_projected(old, model, P, tmp_path / "new", "consistency", {"epochs": 1}, log=lambda m: None,
                              drop=("wccn",))
    data = json.loads((tmp_path / "new" / "crnn.json").read_text())
    assert data["training"] == {"epochs": 3} and data["consistency"] == {"epochs": 1}
    assert "metrics" not in data and "wccn" not in data and data["name"] == "m"
    assert new.model_id.startswith("m-") and new.model_id != old.model_id and new.front is old.front
