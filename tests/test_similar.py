"""`beet similar` on a real on-disk library whose embeddings have a known geometry."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from audiogen import write
from beetsplug.crnn import store
from conftest import GENRES

DIM = 8


def unit_at(degrees, axis=1):
    """A unit vector at `degrees` from e0 towards e_axis: cosine to e0 is cos(degrees)."""
    v = np.zeros(DIM, np.float32)
    v[0] = math.cos(math.radians(degrees))
    v[axis] = math.sin(math.radians(degrees))
    return v


def one_hot_probs(genre, p=0.9):
    probs = np.full(len(GENRES), (1 - p) / (len(GENRES) - 1), np.float32)
    probs[GENRES.index(genre)] = p
    return probs


def add_embedded(env, model, title, vec, genre="rock", artist=None, length=200.0):
    """An item whose stored analysis is written through the project's own storage code."""
    from beets.library import Item

    lib = env.library()
    path = env.music / f"{title}.mp3"
    item = Item(path=str(path).encode(), artist=artist or f"Artist {title}", title=title, album="A", length=length)
    lib.add(item)
    item.update(store.fields_for(vec, one_hot_probs(genre), model.genres, model.model_id, 0.0, time.time()))
    item.store()
    lib._close()
    return item.id


def ids_of(proc):
    return [int(x) for x in proc.stdout.split()]


@pytest.fixture
def geometry(beets_env, tiny_model):
    """seed at 0°, neighbours at 10°..60°: cosine order is known exactly."""
    env = beets_env
    ids = {"seed": add_embedded(env, tiny_model, "seed", unit_at(0), "classical", artist="Seed Artist")}
    for deg in (10, 20, 30, 40, 50, 60):
        ids[deg] = add_embedded(env, tiny_model, f"t{deg}", unit_at(deg), "classical")
    return env, ids


def test_cosine_mode_exact_order(geometry):
    env, ids = geometry
    proc = env.run("similar", "title:seed", "-n", "4", "--mode", "cosine", "-f", "$id")
    assert ids_of(proc) == [ids[10], ids[20], ids[30], ids[40]]
    proc = env.run("similar", "title:seed", "-n", "2", "--no-genre", "-f", "$id")
    assert ids_of(proc) == [ids[10], ids[20]]


def test_default_output_shows_score_and_genre(geometry):
    env, ids = geometry
    lines = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine").stdout.splitlines()
    assert len(lines) == 1
    assert "t10" in lines[0]
    assert f"[{math.cos(math.radians(10)):.3f} classical]" in lines[0]


def test_genre_aware_mode_reorders(beets_env, tiny_model):
    env = beets_env
    add_embedded(env, tiny_model, "seed", unit_at(0), "classical")
    near_other_genre = add_embedded(env, tiny_model, "near", unit_at(10), "rock")
    farther_same_genre = add_embedded(env, tiny_model, "far", unit_at(25), "classical")
    cosine = ids_of(env.run("similar", "title:seed", "-n", "2", "--mode", "cosine", "-f", "$id"))
    genre = ids_of(env.run("similar", "title:seed", "-n", "2", "-f", "$id"))  # genre-aware is the default
    assert cosine == [near_other_genre, farther_same_genre]
    assert genre == [farther_same_genre, near_other_genre]
    # With no weight on genres, the genre-aware score is the cosine.
    assert ids_of(env.run("similar", "title:seed", "-n", "2", "--genre-weight", "0", "-f", "$id")) == cosine


def test_seed_duplicates_and_artist_cap(beets_env, tiny_model):
    env = beets_env
    add_embedded(env, tiny_model, "Song", unit_at(0), artist="The Band")
    dup = add_embedded(env, tiny_model, "dup", unit_at(1), artist="  the   BAND ")
    lib = env.library()
    item = lib.get_item(dup)
    item.title = "  SONG "
    item.store()
    lib._close()
    a1 = add_embedded(env, tiny_model, "a1", unit_at(5), artist="Prolific")
    a2 = add_embedded(env, tiny_model, "a2", unit_at(6), artist="Prolific")
    a3 = add_embedded(env, tiny_model, "a3", unit_at(7), artist="Prolific")
    other = add_embedded(env, tiny_model, "o", unit_at(30), artist="Other")
    got = ids_of(env.run("similar", "title:Song", "artist:The Band", "-n", "5", "--mode", "cosine", "-f", "$id"))
    assert got == [a1, a2, a3, other]  # neither the seed nor its duplicate
    capped = ids_of(env.run("similar", "title:Song", "artist:The Band", "-n", "3", "--mode", "cosine",
                            "--max-per-artist", "1", "-f", "$id"))
    assert capped == [a1, other]  # only 2 candidates left after the cap


def test_genre_filter(geometry, tiny_model):
    env, ids = geometry
    rock = add_embedded(env, tiny_model, "rocky", unit_at(45), "rock")
    assert ids_of(env.run("similar", "title:seed", "-n", "3", "--genre", "rock", "-f", "$id")) == [rock]


def test_centroid_of_several_seeds(beets_env, tiny_model):
    env = beets_env
    s1, s2 = unit_at(40, axis=1), unit_at(40, axis=2)
    add_embedded(env, tiny_model, "s1", s1, artist="Seeds")
    add_embedded(env, tiny_model, "s2", s2, artist="Seeds")
    centre = (s1 + s2) / np.linalg.norm(s1 + s2)
    middle = add_embedded(env, tiny_model, "middle", centre)
    e3 = np.eye(DIM, dtype=np.float32)[3]
    near_s1 = add_embedded(env, tiny_model, "close", math.cos(0.17) * s1 + math.sin(0.17) * e3)
    both = ids_of(env.run("similar", "artist:Seeds", "-n", "2", "--mode", "cosine", "-f", "$id"))
    assert both == [middle, near_s1]  # the seeds' normalised mean is the query
    one = ids_of(env.run("similar", "title:s1", "-n", "2", "--mode", "cosine", "-f", "$id"))
    assert one[0] == near_s1


def test_index_rebuilds_when_library_changes(geometry, tiny_model):
    env, ids = geometry
    first = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "-f", "$id")
    assert "rebuilding" in first.stderr  # no index yet
    again = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "-f", "$id")
    assert "rebuilding" not in again.stderr
    # Added.
    new = add_embedded(env, tiny_model, "new", unit_at(5), "classical")
    proc = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "-f", "$id")
    assert "out of date" in proc.stderr and ids_of(proc) == [new]
    # Re-embedded (moved far away).
    lib = env.library()
    item = lib.get_item(new)
    item.update(store.fields_for(unit_at(89), one_hot_probs("classical"), GENRES, tiny_model.model_id, 0.0,
                                 time.time() + 1))
    item.store()
    lib._close()
    proc = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "-f", "$id")
    assert "out of date" in proc.stderr and ids_of(proc) == [ids[10]]
    # Removed.
    env.run("rm", "-f", f"id:{ids[10]}")
    proc = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "-f", "$id")
    assert "out of date" in proc.stderr and ids_of(proc) == [ids[20]]
    # Garbage index file.
    index_path = env.root / "crnn_index.npz"
    index_path.write_bytes(b"not an index")
    proc = env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "-f", "$id")
    assert "unreadable" in proc.stderr and ids_of(proc) == [ids[20]]


def test_m3u_exact_bytes_relative(geometry, tmp_path):
    env, ids = geometry
    (tmp_path / "lists").mkdir()
    env.run("similar", "title:seed", "-n", "2", "--mode", "cosine", "--include-seed",
            "--m3u", str(tmp_path / "lists" / "mix.m3u"))
    text = (tmp_path / "lists" / "mix.m3u").read_bytes()
    assert text == (
        b"#EXTM3U\n"
        b"#EXTINF:200,Seed Artist - seed\n" + str(env.music / "seed.mp3").encode() + b"\n"
        b"#EXTINF:200,Artist t10 - t10\n" + str(env.music / "t10.mp3").encode() + b"\n"
        b"#EXTINF:200,Artist t20 - t20\n" + str(env.music / "t20.mp3").encode() + b"\n"
    )
    # relative_to: playlist, and a bare file name goes to playlist_dir.
    with open(env.root / "config.yaml", "a") as f:
        f.write(f"  playlist_dir: {tmp_path / 'lists'}\n  relative_to: playlist\n")
    env.run("similar", "title:seed", "-n", "1", "--mode", "cosine", "--m3u", "rel.m3u8")
    assert (tmp_path / "lists" / "rel.m3u8").read_bytes() == (
        b"#EXTM3U\n#EXTINF:200,Artist t10 - t10\n../" + (str(env.music.relative_to(tmp_path)) + "/t10.mp3").encode() + b"\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["title:nothing-matches"], "no tracks match"),
        (["title:seed", "-n", "0"], "at least 1"),
        (["title:plain"], "run beet crnnembed"),
        (["title:seed", "--m3u", "/proc/forbidden/x.m3u"], "cannot write playlist"),
        (["title:seed", "--bogus-option"], "no such option"),
    ],
)
def test_errors_are_one_line(geometry, args, message):
    env, ids = geometry
    from beets.library import Item

    lib = env.library()
    lib.add(Item(path=b"/x/plain.mp3", title="plain", artist="P"))
    lib._close()
    proc = env.run("similar", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_end_to_end_from_audio(beets_env):
    env = beets_env
    for i in range(3):
        env.add(write(env.music / f"tonal{i}.wav", 8.0, kind="tonal", seed=i), artist=f"T{i}", title=f"tonal{i}")
        env.add(write(env.music / f"beat{i}.wav", 8.0, kind="beat", seed=i), artist=f"B{i}", title=f"beat{i}")
    env.run("crnnembed")
    proc = env.run("similar", "title:tonal0", "-n", "5", "-f", "$title")
    titles = proc.stdout.split()
    assert len(titles) == 5 and "tonal0" not in titles
