"""`beet crnnembed` end to end on a real on-disk library with generated audio."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from audiogen import has_ffmpeg, write
from beetsplug.crnn import store
from conftest import GENRES, BeetsEnv


def _attrs(env, item_id):
    lib = env.library()
    item = lib.get_item(item_id)
    values = dict(item.items())
    lib._close()
    return values


@pytest.fixture
def small_library(beets_env):
    """Tracks of several formats and lengths: shorter than a window, about one, and several."""
    files = [
        ("a_short.wav", 4.0, "tonal"),
        ("b_one.flac", 33.0, "beat"),
        ("c_long.mp3", 100.0, "tonal"),
        ("d_vorbis.ogg", 12.0, "beat"),
        ("e_opus.opus", 8.0, "tonal"),
    ]
    ids = {}
    for i, (name, seconds, kind) in enumerate(files):
        ids[name] = beets_env.add(write(beets_env.music / name, seconds, kind=kind, seed=i), artist=f"Artist {i}")
    return beets_env, ids


def test_embed_stores_typed_attributes(small_library, tiny_model):
    env, ids = small_library
    proc = env.run("crnnembed")
    assert f"embedded {len(ids)}, up to date 0, failed 0" in proc.stderr
    # TensorFlow loads (oneDNN on by default) without its notices reaching the terminal.
    assert "oneDNN" not in proc.stderr and "absl" not in proc.stderr and "tensorflow" not in proc.stderr.lower()
    for name, item_id in ids.items():
        values = _attrs(env, item_id)
        vec = store.decode_vector(values[store.EMBEDDING])
        assert vec.shape == (tiny_model.architecture["gru_units"],)
        assert abs(np.linalg.norm(vec) - 1) < 1e-3
        probs = np.array([float(values[store.prob_field(g)]) for g in GENRES])
        assert np.all((probs >= 0) & (probs <= 1))
        assert values[store.GENRE] == GENRES[int(np.argmax(probs))]
        assert float(values[store.GENRE_PROB]) == pytest.approx(probs.max(), abs=1e-4)
        assert values[store.MODEL] == tiny_model.model_id
        assert float(values[store.MTIME]) == pytest.approx(os.stat(env.music / name).st_mtime, abs=1e-3)
        assert "genre" not in values or values["genre"] == ""  # writing the genre field is opt-in


def test_second_run_is_idempotent_and_force_recomputes(small_library):
    env, ids = small_library
    env.run("crnnembed")
    first = {i: _attrs(env, i) for i in ids.values()}
    proc = env.run("crnnembed")
    assert f"embedded 0, up to date {len(ids)}, failed 0" in proc.stderr
    assert {i: _attrs(env, i) for i in ids.values()} == first

    # A changed file is stale and re-analysed; the rest stay current.
    target = env.music / "a_short.wav"
    write(target, 6.0, kind="beat", seed=42)
    os.utime(target, (float(first[ids["a_short.wav"]][store.MTIME]) + 10,) * 2)
    proc = env.run("crnnembed")
    assert f"embedded 1, up to date {len(ids) - 1}, failed 0" in proc.stderr

    proc = env.run("crnnembed", "--force", "artist:Artist 2")
    assert "embedded 1, up to date 0, failed 0" in proc.stderr
    again = _attrs(env, ids["c_long.mp3"])
    assert float(again[store.STAMP]) > float(first[ids["c_long.mp3"]][store.STAMP])
    # Same file, same model: the same vector (float16 storage) and probabilities.
    np.testing.assert_allclose(store.decode_vector(again[store.EMBEDDING]),
                               store.decode_vector(first[ids["c_long.mp3"]][store.EMBEDDING]), atol=2e-3)


def test_ls_queries_on_typed_fields(small_library):
    env, ids = small_library
    env.run("crnnembed")
    lib = env.library()
    genres = {item.id: item[store.GENRE] for item in lib.items()}
    probs = {item.id: float(item[store.GENRE_PROB]) for item in lib.items()}
    lib._close()
    genre = genres[ids["b_one.flac"]]
    listed = env.run("ls", "-f", "$id", f"{store.GENRE}:{genre}").stdout.split()
    assert sorted(map(int, listed)) == sorted(i for i, g in genres.items() if g == genre)
    distinct = sorted(set(probs.values()))  # a threshold at a distinct value splits the items unless all tie
    threshold = distinct[len(distinct) // 2]
    listed = env.run("ls", "-f", "$id", f"{store.GENRE_PROB}:{threshold}..").stdout.split()
    # A numeric range query only works if the field is typed FLOAT (a string field would match nothing or everything).
    assert sorted(map(int, listed)) == sorted(i for i, p in probs.items() if p >= threshold)
    assert 0 < len(listed) < len(probs) or len(set(probs.values())) == 1


def test_bad_file_fails_alone(beets_env):
    good = beets_env.add(write(beets_env.music / "good.wav", 5.0))
    bad_path = beets_env.music / "bad.flac"
    write(bad_path, 5.0)
    bad = beets_env.add(bad_path)
    bad_path.write_bytes(os.urandom(4096))  # corrupted after import
    proc = beets_env.run("crnnembed", check=False)
    assert proc.returncode != 0
    error_lines = [line for line in proc.stderr.splitlines() if "bad.flac" in line]
    assert len(error_lines) == 1, proc.stderr
    assert "embedded 1, up to date 0, failed 1" in proc.stderr
    assert store.EMBEDDING in _attrs(beets_env, good)
    assert store.EMBEDDING not in _attrs(beets_env, bad)


def test_write_genre_is_opt_in(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent, "  write_genre: yes\n")
    item_id = env.add(write(env.music / "x.wav", 5.0))
    env.run("crnnembed")
    values = _attrs(env, item_id)
    assert values["genre"] == values[store.GENRE]


@pytest.mark.skipif(not has_ffmpeg(), reason="ffmpeg is not installed")
def test_m4a_through_ffmpeg(beets_env):
    item_id = beets_env.add(write(beets_env.music / "x.m4a", 6.0))
    beets_env.run("crnnembed")
    assert store.EMBEDDING in _attrs(beets_env, item_id)


def test_ls_and_version_do_not_import_tensorflow(beets_env):
    beets_env.add(write(beets_env.music / "x.wav", 2.0))
    probe = (
        "import sys, beets.ui\n"
        "try:\n    beets.ui.main(sys.argv[1:])\n"
        "finally:\n    print('TF-LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'TF-ABSENT')\n"
    )
    for args in (["ls"], ["version"], ["ls", "crnn_genre:rock"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], env=beets_env.env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "TF-ABSENT" in proc.stdout, (args, proc.stdout)
    assert "crnn" in subprocess.run([sys.executable, "-c", probe, "version"], env=beets_env.env(),
                                    capture_output=True, text=True).stdout


def test_import_stage_embeds_when_auto(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent, "  auto: yes\n")
    write(env.music / "new.wav", 5.0)
    env.run("import", "-q", "-A", env.music)
    lib = env.library()
    items = list(lib.items())
    lib._close()
    assert len(items) == 1
    assert store.decode_vector(items[0][store.EMBEDDING]).shape == (tiny_model.architecture["gru_units"],)


def test_real_clips_from_shared_data(shared_data, beets_env):
    meta = (shared_data / "metadata.csv").read_text().splitlines()[1:]
    picks = [line.split(",")[0] for line in meta if line.endswith(",test")][::20][:4]
    ids = [beets_env.add(shared_data / p) for p in picks]
    beets_env.run("crnnembed")
    for item_id in ids:
        assert store.decode_vector(_attrs(beets_env, item_id)[store.EMBEDDING]).size > 0


def test_missing_model_is_one_line_error(tmp_path):
    env = BeetsEnv(tmp_path, tmp_path / "nowhere")
    env.add(write(env.music / "x.wav", 2.0))
    proc = env.run("crnnembed", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no model card" in proc.stderr


def test_card_checksum_mismatch_is_clear_error(tmp_path, tiny_model):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model.weights.parent, model)
    card = json.loads((model / "crnn.json").read_text())
    card["sha256"] = "0" * 64
    (model / "crnn.json").write_text(json.dumps(card))
    (tmp_path / "lib").mkdir()
    env = BeetsEnv(tmp_path / "lib", model)
    env.add(write(env.music / "x.wav", 2.0))
    proc = env.run("crnnembed", check=False)
    assert proc.returncode == 1
    assert "does not match its card" in proc.stderr
    assert "Traceback" not in proc.stderr
