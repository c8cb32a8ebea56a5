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


def _has_genres() -> bool:
    """beets 2.14 and later keep genres in the multi-valued `genres`; before, in the string `genre`."""
    from beets.library import Item

    return "genres" in Item._fields


def _genre_env(tmp_path, tiny_model, write_genre, genres=(), flex=None):
    """A library with import.write on, one FLAC track tagged with ``genres``, and crnn.write_genre set."""
    from beets.library import Item

    env = BeetsEnv(tmp_path, tiny_model.weights.parent, f"  write_genre: {write_genre}\n")
    config = env.root / "config.yaml"
    config.write_text(config.read_text().replace("  write: no\n", "  write: yes\n"))
    path = write(env.music / "x.flac", 5.0)
    lib = env.library()
    item = Item.from_path(str(path))
    item.artist, item.title = "Artist", "x"
    if genres:
        if _has_genres():
            item.genres = list(genres)
        else:
            item.genre = "; ".join(genres)
    for key, value in (flex or {}).items():
        item[key] = value
    lib.add(item)
    lib._close()
    return env, item.id, path


def _file_genres(path) -> list:
    from mediafile import MediaFile

    f = MediaFile(str(path))
    return list(f.genres or []) if hasattr(f, "genres") else [f.genre]


def _is_current(env, item_id, path):
    values = _attrs(env, item_id)
    assert float(values[store.MTIME]) == pytest.approx(os.stat(path).st_mtime, abs=1e-3)
    proc = env.run("crnnembed")
    assert "embedded 0, up to date 1, failed 0" in proc.stderr  # the tag written did not make it stale


def test_write_genre_puts_the_prediction_first_and_keeps_the_users_genres(tmp_path, tiny_model):
    env, item_id, path = _genre_env(tmp_path, tiny_model, "yes", ["Funk", "Soul"])
    env.run("crnnembed")
    values = _attrs(env, item_id)
    predicted = values[store.GENRE]
    assert predicted in GENRES
    if _has_genres():  # beets 2.14+: `genres`, the prediction first and the user's genres after it
        lib = env.library()
        item = lib.get_item(item_id)
        assert list(item.genres) == [predicted, "Funk", "Soul"]
        assert item.get(store.GENRE_ADDED) == predicted
        assert "genre" not in item._values_flex  # no flexible `genre` beets would never read
        assert [i.id for i in lib.items(f"genres:{predicted}")] == [item_id]
        lib._close()
        assert _file_genres(path) == [predicted, "Funk", "Soul"]
    else:  # older beets: the single `genre` string holds the prediction
        assert values["genre"] == predicted
        assert _file_genres(path) == [predicted]
    _is_current(env, item_id, path)

    if _has_genres():
        # The next analysis takes out what write_genre added before (here a stand-in, as if an earlier model had
        # predicted "Funk" and the user had not had it): predictions do not pile up, the user's genres stay.
        lib = env.library()
        item = lib.get_item(item_id)
        item.genres = ["Funk", "Soul", "Disco"]
        item[store.GENRE_ADDED] = "funk"
        item.store()
        lib._close()
        env.run("crnnembed", "-f")
        lib = env.library()
        item = lib.get_item(item_id)
        assert list(item.genres) == [predicted, "Soul", "Disco"]
        lib._close()
        assert _file_genres(path) == [predicted, "Soul", "Disco"]
        _is_current(env, item_id, path)


def test_write_genre_keeps_the_users_spelling_of_the_predicted_genre(tmp_path, tiny_model):
    probe, pid, _ = _genre_env(tmp_path / "probe", tiny_model, "no")
    probe.run("crnnembed")
    predicted = _attrs(probe, pid)[store.GENRE]
    env, item_id, path = _genre_env(tmp_path / "lib", tiny_model, "yes", ["Jazz", predicted.upper()])
    env.run("crnnembed")
    lib = env.library()
    item = lib.get_item(item_id)
    if _has_genres():
        assert list(item.genres) == [predicted.upper(), "Jazz"]  # moved first, in the user's spelling
        assert store.GENRE_ADDED not in item  # it was the user's: never taken out later
    else:
        assert item.genre == predicted
    lib._close()


def test_write_genre_replace(tmp_path, tiny_model):
    env, item_id, path = _genre_env(tmp_path, tiny_model, "replace", ["Funk", "Soul"])
    env.run("crnnembed")
    values = _attrs(env, item_id)
    predicted = values[store.GENRE]
    lib = env.library()
    item = lib.get_item(item_id)
    if _has_genres():
        assert list(item.genres) == [predicted] and store.GENRE_ADDED not in item
    else:
        assert item.genre == predicted
    lib._close()
    assert _file_genres(path) == [predicted]
    _is_current(env, item_id, path)


def test_write_genre_is_opt_in_and_checked(tmp_path, tiny_model):
    env, item_id, path = _genre_env(tmp_path / "off", tiny_model, "no", ["Funk"])
    env.run("crnnembed")
    lib = env.library()
    item = lib.get_item(item_id)
    assert (list(item.genres) if _has_genres() else [item.genre]) == ["Funk"]
    lib._close()
    assert not any(_file_genres(path))  # the file is not written either
    env, item_id, path = _genre_env(tmp_path / "bad", tiny_model, "sometimes")
    proc = env.run("crnnembed", check=False)
    assert proc.returncode != 0 and "crnn.write_genre must be yes, no or replace, not 'sometimes'" in proc.stderr
    assert store.EMBEDDING not in _attrs(env, item_id)


@pytest.mark.skipif(not _has_genres(), reason="beets before 2.14 has a real `genre` field")
def test_embed_force_removes_the_stale_flexible_genre(tmp_path, tiny_model):
    """Earlier versions of the plugin set `item.genre` on beets 2.14, which made a flexible attribute."""
    env, item_id, _ = _genre_env(tmp_path, tiny_model, "no", ["Funk"])
    mine, mine_id, _ = _genre_env(tmp_path / "other", tiny_model, "no", ["Funk"])

    def flex_genre(e, value=None):
        lib = e.library()
        item = lib.get_item(item_id if e is env else mine_id)
        if value is not None:
            item["genre"] = value
            item.store()
        out = item._values_flex.get("genre"), list(item.genres)
        lib._close()
        return out

    env.run("crnnembed")
    mine.run("crnnembed")
    flex_genre(env, _attrs(env, item_id)[store.GENRE])  # what an earlier write_genre left on 2.14
    flex_genre(mine, "my own label")  # a flexible `genre` that is no prediction: someone else's
    env.run("crnnembed")  # up to date: nothing is rewritten
    assert flex_genre(env)[0] == _attrs(env, item_id)[store.GENRE]
    env.run("crnnembed", "-f")
    mine.run("crnnembed", "-f")
    assert flex_genre(env) == (None, ["Funk"])  # gone; `genres` untouched
    assert flex_genre(mine) == ("my own label", ["Funk"])


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
