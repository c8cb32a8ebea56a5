"""research/consistency.py: the top of the network tuned so that versions of a window land on the clean window."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "research"), str(ROOT / "tests")]  # consistency.py; the suite's helpers

import consistency  # noqa: E402
from audiogen import has_ffmpeg  # noqa: E402
from beetsplug.crnn.training import dataset, wccn  # noqa: E402
from beetsplug.crnn.errors import CrnnError  # noqa: E402
from beetsplug.crnn.model import Embedder, ModelCard  # noqa: E402
from conftest import make_model  # noqa: E402
from test_training_data import _labelled_set  # noqa: E402


def test_labels_count_only_the_genres_a_rows_source_labels(tmp_path):
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], with_audio=False)
    b = _labelled_set(tmp_path / "setB", ["jazz", "rock"], with_audio=False)
    records = [r for r in dataset.read_sources([a, b]) if r.split == "train"]
    genres = ["jazz", "pop", "rock"]
    n_windows = 2
    groups = np.array([0, 1, 0, 2 * 2 + 1])  # rows of record 0 (windows 0, 1, 0 again) and of record 2, window 1
    y, mask = consistency.labels(records, genres, groups, n_windows)
    assert [records[0].source, records[0].genre, records[2].genre] == ["setA", "rock", "pop"]
    np.testing.assert_array_equal(y, [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1]] * 4)  # setA never labels jazz
    b_rows = np.array([r.source == "setB" for r in records]).nonzero()[0]
    _, mask_b = consistency.labels(records, genres, np.array([b_rows[0] * n_windows]), n_windows)
    np.testing.assert_array_equal(mask_b, [[1, 0, 1]])  # setB never labels pop
    with pytest.raises(CrnnError, match="not one of the model's genres"):
        consistency.labels(records, ["jazz", "rock"], groups, n_windows)


def test_loss_terms_by_hand():
    outs = [np.array([[3.0, 4.0]]), np.array([[0.8, 0.5]]), np.array([[0.9]])]
    targets = {"e0": np.array([[1.0, 0.0]]), "p0": np.array([[1.0, 0.5]]), "y": np.array([[1.0, 0.0]]),
               "mask": np.array([[1.0, 0.0]]), "t0": np.array([[1.0]])}
    terms = {k: float(v) for k, v in consistency.loss_terms(outs, targets).items()}
    assert terms["embedding"] == pytest.approx(0.4 ** 2 + 0.8 ** 2)  # unit (0.6, 0.8) against (1, 0)
    assert terms["clean_genres"] == pytest.approx((-np.log(0.8) - np.log(0.5)) / 2, rel=1e-5)
    assert terms["genres"] == pytest.approx(-np.log(0.8), rel=1e-5)  # the masked-out genre does not count
    assert terms["tags"] == pytest.approx(-np.log(0.9), rel=1e-5)
    assert "tags" not in consistency.loss_terms(outs[:2], {k: v for k, v in targets.items() if k != "t0"})


@pytest.mark.slow
def test_consistency_pulls_versions_to_the_clean_window_and_writes_a_model(tmp_path):
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], seconds=2.0)
    b = _labelled_set(tmp_path / "setB", ["jazz", "rock"], seconds=2.0)
    old = make_model(tmp_path / "old", genres=["jazz", "pop", "rock"], tags=["loud", "calm"])
    versions = "mp3-64k" if has_ffmpeg() else ""
    features = tmp_path / "features.npz"
    argv = [str(a), str(b), "--model", str(old.weights.parent), "--out", str(tmp_path / "new"), "--copies", "1",
            "--versions", versions, "--cache", str(tmp_path / "mels"), "--version-cache", str(tmp_path / "versions"),
            "--epochs", "4", "--lr", "0.01", "--batch-groups", "2", "--features", str(features),
            "--genre-weight", "0", "--tag-weight", "0"]  # the embedding pull alone, to see it work
    seen, fronts = [], []
    real_rows, real_front = wccn.Versions.rows, consistency.FrontEnd.__call__

    def spy_rows(self, embed):
        seen.extend(self.records)
        return real_rows(self, embed)

    def spy_front(self, mels):
        fronts.append(len(mels))
        return real_front(self, mels)

    wccn.Versions.rows, consistency.FrontEnd.__call__ = spy_rows, spy_front
    try:
        new = consistency.run(consistency.build_parser().parse_args(argv), log=lambda m: None)
        n_front = len(fronts)
        # The same rows of the same model again: the cached features, no front-end pass.
        again = consistency.run(consistency.build_parser().parse_args(
            argv[:5] + [str(tmp_path / "again")] + argv[6:]), log=lambda m: None)
        assert len(fronts) == n_front > 0
        # Other rows (another number of copies): computed afresh.
        consistency.run(consistency.build_parser().parse_args(
            argv[:5] + [str(tmp_path / "other")] + ["--copies", "2"] + argv[8:]), log=lambda m: None)
        assert len(fronts) > n_front
    finally:
        wccn.Versions.rows, consistency.FrontEnd.__call__ = real_rows, real_front
    assert {r.split for r in seen} == {"train"}  # test (and val) clips never reach it
    assert again.model_id == new.model_id  # one seed, one model

    card = ModelCard.load(tmp_path / "new")
    assert card.model_id.startswith("test-") and card.model_id != old.model_id
    assert card.architecture == dict(old.architecture, projection="wccn") and card.tags == ["loud", "calm"]
    info = json.loads((tmp_path / "new" / "crnn.json").read_text())["consistency"]
    assert info["from"] == old.model_id and info["splits"] == ["train"] and info["epochs"] == 4
    files = 1 + (1 if versions else 0)
    assert info["rows"] == 2 * 4 * files * 2 and info["groups"] == 2 * 4  # 8 train clips, one window each
    # The tuned embedding of every version sits nearer its clean window than the source model's did.
    first, last = info["losses"]["start"], info["losses"]["history"][-1]
    assert last["embedding"] < first["embedding"]

    # The front end is the source model's, untouched; the top has moved.
    m_old, m_new = Embedder(old).model, Embedder(card).model
    for name in ("input_norm", "conv1", "bn1", "conv4", "bn4"):
        for w_old, w_new in zip(m_old.get_layer(name).get_weights(), m_new.get_layer(name).get_weights()):
            np.testing.assert_array_equal(w_old, w_new)
    assert not np.allclose(m_old.get_layer("gru2").get_weights()[0], m_new.get_layer("gru2").get_weights()[0])


def test_consistency_refuses_test_splits_its_own_folder_and_no_epochs(tmp_path):
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], with_audio=False)
    old = make_model(tmp_path / "old", genres=["pop", "rock"])
    base = [str(a), "--model", str(old.weights.parent), "--cache", str(tmp_path / "mels")]
    for extra, message in ((["--out", str(old.weights.parent)], "another folder"),
                           (["--out", str(tmp_path / "n"), "--epochs", "0"], "at least 1"),
                           (["--out", str(tmp_path / "n"), "--splits", "train,test"], "test split never")):
        with pytest.raises(CrnnError, match=message):
            consistency.run(consistency.build_parser().parse_args(base + extra), log=lambda m: None)
