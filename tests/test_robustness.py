"""The robustness report and the per-set evaluation, through `beet crnneval` on generated audio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audiogen import has_ffmpeg, write
from beetsplug.crnn.training import augment
from beetsplug.crnn.training.robustness import pick_clips, summarise
from conftest import BeetsEnv, make_model


def test_summarise_by_hand():
    # Two clips, each an original and one version; clip 0's version is a copy, clip 1's is
    # orthogonal to its original and equal to clip 0's embedding.
    a, b, c = np.eye(3, dtype=np.float32)
    E = np.array([[a, a], [b, a]])
    P = np.array([[[0.9, 0.1], [0.8, 0.2]], [[0.9, 0.1], [0.2, 0.8]]], np.float32)
    r = summarise(E, P, ["original", "v"])
    assert r["per_version"]["v"]["median_cosine"] == pytest.approx(0.5)  # cosines 1 and 0
    assert r["k"] == 1
    # Nearest neighbours: clip0-orig -> one of the two copies of a (both... a appears 3 times).
    # clip1's version (a) has two exact matches, both of clip 0: wrong; clip1's original (b)
    # ties everything at 0; so at most 3 of 4 tracks find their own clip.
    assert r["same_clip_neighbours"] <= 0.75
    assert r["same_top_genre"] == 0.5  # clip 1's version flips to the second genre
    assert r["per_version"]["v"]["same_top_genre"] == 0.5
    # Restricting the genre columns to one makes every top genre the same.
    assert summarise(E, P, ["original", "v"], genre_columns=[0])["same_top_genre"] == 1.0


def test_pick_clips_per_genre_in_order():
    class R:
        def __init__(self, g, i):
            self.genre, self.i = g, i

    recs = [R("a", 0), R("b", 1), R("a", 2), R("a", 3), R("b", 4)]
    assert [r.i for r in pick_clips(recs, 2)] == [0, 1, 2, 4]
    assert len(pick_clips(recs, None)) == 5


@pytest.mark.slow
@pytest.mark.skipif(not has_ffmpeg(), reason="ffmpeg makes the codec versions")
def test_crnneval_robustness_through_beets(tmp_path):
    data = tmp_path / "data"
    rows = ["path,genre,artist,title,album,year,split"]
    for g, kind in (("calm", "tonal"), ("busy", "beat")):
        for i in range(2):
            write(data / g / f"{g}{i}.wav", 6.0, kind=kind, seed=i)
            rows.append(f"{g}/{g}{i}.wav,{g},{g} artist {i},{g}{i},A,2020,test")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    model = make_model(tmp_path / "model", genres=["busy", "calm", "other"], conv_filters=(4, 4, 4, 4), gru_units=4)
    env = BeetsEnv(tmp_path / "beets", model.weights.parent)
    out = tmp_path / "report.json"
    versions = tmp_path / "versions"
    proc = env.run("crnneval", str(data), "--model", str(model.weights.parent), "--cache", str(tmp_path / "c"),
                   "--k", "1", "--robustness",
                   "--version-cache", str(versions), "--json", str(out))
    report = json.loads(out.read_text())
    # Scored over the genres the set labels that the model knows: 'other' is not a column.
    assert report["genres_scored"] == ["busy", "calm"] and report["clips"] == 4
    assert report["source"] == "data" and report["in_training"] is False
    assert "OUT OF DOMAIN" in proc.stdout
    rob = report["robustness"]
    assert rob["clips"] == 4 and rob["versions"] == list(augment.CODEC_VERSIONS)
    assert rob["k"] == len(augment.CODEC_VERSIONS)
    for key in ("median_cosine", "p5_cosine", "same_clip_neighbours", "same_top_genre"):
        assert 0.0 <= rob[key] <= 1.0 + 1e-6
    # Level changes cannot move the model input, so a loud or quiet lossless copy lands on the original.
    assert rob["per_version"]["flac44-loud"]["p5_cosine"] > 0.98
    assert "same-clip neighbours (k = 7)" in proc.stdout
    # The versions were kept where asked (one folder per clip, one file per version).
    assert len(list(versions.rglob("*.*"))) == 4 * len(augment.CODEC_VERSIONS)
