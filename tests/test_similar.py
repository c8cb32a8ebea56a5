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


# --- duplicates: untagged tracks and MusicBrainz ids ---------------------------------------------------------------


def add_untagged(env, model, rel_path, vec, genre="electronic"):
    """A track as `beet import -A` leaves a file without tags: no artist, no title."""
    from beets.library import Item

    lib = env.library()
    path = env.music / rel_path
    item = Item(path=str(path).encode(), artist="", title="", album="", length=180.0)
    lib.add(item)
    item.update(store.fields_for(vec, one_hot_probs(genre), model.genres, model.model_id, 0.0, time.time()))
    item.store()
    lib._close()
    return item.id


def set_fields(env, item_id, **values):
    lib = env.library()
    item = lib.get_item(item_id)
    item.update(values)
    item.store()
    lib._close()


def test_untagged_tracks_are_not_duplicates(beets_env, tiny_model):
    """The issue's case: 14 untagged files, 3 of them the seed; all 11 others are results, none merged."""
    env = beets_env
    for i in range(3):
        add_untagged(env, tiny_model, f"dubstep/d{i}.mp3", unit_at(i))
    others = [add_untagged(env, tiny_model, f"misc/u{deg}.mp3", unit_at(deg)) for deg in range(5, 60, 5)]
    got = ids_of(env.run("similar", "path::dubstep", "-n", "10", "--mode", "cosine", "-f", "$id"))
    assert got == others[:10]
    everything = ids_of(env.run("similar", "path::dubstep", "-n", "20", "--mode", "cosine", "-f", "$id"))
    assert everything == others
    # No artist is not one artist: the cap does not lump untagged tracks together.
    capped = ids_of(env.run("similar", "path::dubstep", "-n", "5", "--mode", "cosine", "--max-per-artist", "1",
                            "-f", "$id"))
    assert capped == others[:5]


def test_musicbrainz_ids_merge_duplicates(geometry, tiny_model):
    env, ids = geometry
    mbid, other_mbid = "5c3b3b36-0000-4000-8000-000000000001", "5c3b3b36-0000-4000-8000-000000000002"
    set_fields(env, ids["seed"], mb_trackid=mbid)
    set_fields(env, ids[10], mb_trackid=mbid)  # the seed's recording under another title: a duplicate of the seed
    set_fields(env, ids[20], mb_trackid=other_mbid)
    set_fields(env, ids[30], mb_trackid=other_mbid)  # the same recording as t20: only the better one stays
    got = ids_of(env.run("similar", "title:seed", "-n", "3", "--mode", "cosine", "-f", "$id"))
    assert got == [ids[20], ids[40], ids[50]]
    # Untagged tracks with the same title ("") but different ids stay apart; the same id merges even so.
    a = add_untagged(env, tiny_model, "x/a.mp3", unit_at(12, axis=2))
    b = add_untagged(env, tiny_model, "x/b.mp3", unit_at(13, axis=2))
    c = add_untagged(env, tiny_model, "x/c.mp3", unit_at(14, axis=2))
    set_fields(env, b, mb_trackid="5c3b3b36-0000-4000-8000-00000000000b")
    set_fields(env, c, mb_trackid="5c3b3b36-0000-4000-8000-00000000000b")
    got = ids_of(env.run("similar", f"id:{a}", "-n", "3", "--mode", "cosine", "-f", "$id"))
    assert got == [b, ids["seed"], ids[20]]  # c is b's recording, t10 the seed's


# --- --filter and the widening search --------------------------------------------------------------------------


def add_many(env, model, rows):
    """Items in one library session: rows of (title, vector, fields dict). Returns their ids."""
    from beets.library import Item

    lib = env.library()
    out = []
    for title, vec, fields in rows:
        item = Item(path=str(env.music / f"{title}.mp3").encode(), artist=f"Artist {title}", title=title, album="A",
                    length=200.0)
        item.update(fields)
        lib.add(item)
        item.update(store.fields_for(vec, one_hot_probs(fields.get("crnn_genre_hint", "rock")), model.genres,
                                     model.model_id, 0.0, time.time()))
        item.store()
        out.append(item.id)
    lib._close()
    return out


def genre_field(genre):
    """beets >= 2.13 keeps genres in a list field `genres` (queries on `genre` search it)."""
    from beets.library import Item

    return {"genres": [genre]} if "genres" in Item._fields else {"genre": genre}


def test_filters_narrow_and_negate(geometry):
    env, ids = geometry
    for deg, year, genre in ((10, 1985, "christmas"), (20, 1995, "christmas"), (30, 1995, "pop"), (40, 2001, "pop"),
                             (50, 1970, "pop"), (60, 2010, "christmas")):
        set_fields(env, ids[deg], year=year, **genre_field(genre))
    run = lambda *a: ids_of(env.run("similar", "title:seed", "--mode", "cosine", "-f", "$id", *a))  # noqa: E731
    assert run("-n", "3", "--filter", "year:1990..") == [ids[20], ids[30], ids[40]]
    assert run("-n", "3", "--filter", "^genre:christmas") == [ids[30], ids[40], ids[50]]
    assert run("-n", "3", "--filter", "-genre:christmas", "--filter", "year:1990..") == [ids[30], ids[40]]
    assert run("-n", "3", "--filter", "year:1990.. , genre:pop") == [ids[20], ids[30], ids[40]]  # beets' OR
    # A flexible attribute: beets cannot answer it in SQL, so it is matched on the candidates' items.
    set_fields(env, ids[50], mood="calm")
    set_fields(env, ids[20], mood="calm")
    assert run("-n", "3", "--filter", "mood:calm") == [ids[20], ids[50]]
    assert run("-n", "2", "--filter", "^mood:calm") == [ids[10], ids[30]]


def test_filter_on_added_date(geometry):
    env, ids = geometry
    old = time.time() - 90 * 86400
    for deg in (10, 20, 30):
        set_fields(env, ids[deg], added=old)
    got = ids_of(env.run("similar", "title:seed", "-n", "2", "--mode", "cosine", "--filter", "added:-4w..",
                         "-f", "$id"))
    assert got == [ids[40], ids[50]]


def test_filter_widens_past_the_first_candidates(beets_env, tiny_model):
    env = beets_env
    add_embedded(env, tiny_model, "seed", unit_at(0))
    # 150 near tracks from 1980 fill the first batch (100 candidates); the 1990s ones are all farther.
    near = add_many(env, tiny_model, [(f"near{i}", unit_at(1 + i * 0.2, axis=2), {"year": 1980}) for i in range(150)])
    far = add_many(env, tiny_model, [(f"far{deg}", unit_at(deg), {"year": 1995}) for deg in (50, 60, 70)])
    proc = env.run("similar", "title:seed", "-n", "3", "--mode", "cosine", "--filter", "year:1990..", "-f", "$id")
    assert ids_of(proc) == far
    assert "only" not in proc.stderr
    # Fewer than asked for exist: it looks at the whole library, then says so.
    proc = env.run("similar", "title:seed", "-n", "5", "--mode", "cosine", "--filter", "year:1990..", "-f", "$id")
    assert ids_of(proc) == far
    assert "only 3 of 5 tracks found" in proc.stderr
    # Without a filter the nearest come first, as before.
    assert ids_of(env.run("similar", "title:seed", "-n", "2", "--mode", "cosine", "-f", "$id")) == near[:2]


def test_bad_filter_is_one_line(geometry):
    env, ids = geometry
    proc = env.run("similar", "title:seed", "--filter", "year:19x0..", check=False)
    assert proc.returncode != 0 and "--filter 'year:19x0..'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- --order smooth ---------------------------------------------------------------------------------------------


def test_smooth_order_is_the_greedy_tour(beets_env, tiny_model):
    """Two arms out of the seed: by score the list zig-zags between them, smooth order walks each."""
    env = beets_env
    add_embedded(env, tiny_model, "seed", unit_at(0), "classical")
    a = add_embedded(env, tiny_model, "a", unit_at(10, axis=1), "classical")
    b = add_embedded(env, tiny_model, "b", unit_at(12, axis=2), "classical")
    c = add_embedded(env, tiny_model, "c", unit_at(20, axis=1), "classical")
    d = add_embedded(env, tiny_model, "d", unit_at(22, axis=2), "classical")
    by_score = ids_of(env.run("similar", "title:seed", "-n", "4", "--mode", "cosine", "-f", "$id"))
    assert by_score == [a, b, c, d]
    # From the seed the nearest is a (10 deg); from a, c (10 deg) beats b (15.6 deg); from c, b (23.2 deg)
    # beats d (29.6 deg); d is last.
    smooth = env.run("similar", "title:seed", "-n", "4", "--mode", "cosine", "--order", "smooth")
    titles = [line.split(" - ")[-1].split()[0] for line in smooth.stdout.splitlines()]
    assert titles == ["a", "c", "b", "d"]
    assert f"[{math.cos(math.radians(20)):.3f} classical]" in smooth.stdout.splitlines()[1]  # scores go with tracks
    # The config sets the default order.
    with open(env.root / "config.yaml", "a") as f:
        f.write("  order: smooth\n")
    assert ids_of(env.run("similar", "title:seed", "-n", "4", "--mode", "cosine", "-f", "$id")) == [a, c, b, d]
    assert ids_of(env.run("similar", "title:seed", "-n", "4", "--mode", "cosine", "--order", "score",
                          "-f", "$id")) == by_score


# --- beet crnnpath ----------------------------------------------------------------------------------------------


@pytest.fixture
def line(beets_env, tiny_model):
    """FROM at 0 deg, TO at 90 deg, a track every 5 deg between them, and two off the line."""
    env = beets_env
    ids = {"start": add_embedded(env, tiny_model, "start", unit_at(0), "classical", artist="From"),
           "finish": add_embedded(env, tiny_model, "finish", unit_at(90), "rock", artist="To")}
    ids.update({deg: add_embedded(env, tiny_model, f"p{deg}", unit_at(deg), "classical") for deg in range(5, 90, 5)})
    e3 = np.eye(DIM, dtype=np.float32)[3]
    ids["off"] = add_embedded(env, tiny_model, "off", 0.6 * unit_at(45) + 0.8 * e3, "pop")
    return env, ids


def test_path_moves_from_one_seed_to_the_other(line):
    env, ids = line
    got = ids_of(env.run("crnnpath", "title:start", "title:finish", "-n", "6", "--mode", "cosine", "-f", "$id"))
    by_id = {v: k for k, v in ids.items()}
    degrees = [by_id[i] for i in got]
    assert len(degrees) == 6 and "off" not in degrees
    assert degrees[0] == 5 and degrees[-1] == 85  # the nearest tracks to FROM and to TO
    to_end = [90 - d for d in degrees]
    assert all(a > b for a, b in zip(to_end, to_end[1:]))  # each step closer to TO
    # Steps at 0, 18, 36, 54, 72 and 90 deg: the nearest unused tracks, each printed with its score.
    assert degrees == [5, 20, 35, 55, 70, 85]
    lines = env.run("crnnpath", "title:start", "title:finish", "-n", "6", "--mode", "cosine").stdout.splitlines()
    assert len(lines) == 6
    assert "p5" in lines[0] and f"[step 1: {math.cos(math.radians(5)):.3f} classical]" in lines[0]
    assert "p85" in lines[5] and f"[step 6: {math.cos(math.radians(5)):.3f} classical]" in lines[5]


def test_path_playlist_filters_and_smooth_order(line, tmp_path):
    env, ids = line
    for deg in (20, 35):
        set_fields(env, ids[deg], year=1970)
    got = ids_of(env.run("crnnpath", "title:start", "title:finish", "-n", "4", "--mode", "cosine",
                         "--filter", "^year:1970", "-f", "$id"))
    assert got == [ids[5], ids[30], ids[60], ids[85]]
    # On a line the greedy tour from FROM is the path's own order.
    assert ids_of(env.run("crnnpath", "title:start", "title:finish", "-n", "4", "--mode", "cosine",
                          "--filter", "^year:1970", "--order", "smooth", "-f", "$id")) == got
    env.run("crnnpath", "title:start", "title:finish", "-n", "2", "--mode", "cosine", "--include-seed",
            "--m3u", str(tmp_path / "drift.m3u"))
    assert (tmp_path / "drift.m3u").read_bytes() == b"".join(
        f"#EXTINF:200,{artist} - {title}\n{env.music / (title + '.mp3')}\n".encode()
        for artist, title in (("From", "start"), ("Artist p5", "p5"), ("Artist p85", "p85"), ("To", "finish"))
    ).join([b"#EXTM3U\n", b""])


@pytest.mark.parametrize(
    "args, message",
    [
        (["title:start"], "needs two queries"),
        (["title:start", "title:nothing"], "no tracks match TO_QUERY 'title:nothing'"),
        (["title:start", "title:finish", "-n", "0"], "at least 1"),
    ],
)
def test_path_errors_are_one_line(line, args, message):
    env, ids = line
    proc = env.run("crnnpath", *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


# --- beet similar -a --------------------------------------------------------------------------------------------


def add_album(env, model, name, artist, tracks, **album_fields):
    """An album of (title, degrees, genre, track number, disc) tracks; returns (album id, {title: item id})."""
    from beets.library import Item

    lib = env.library()
    items = []
    for title, deg, genre, track, disc in tracks:
        item = Item(path=str(env.music / name / f"{title}.mp3").encode(), artist=artist, albumartist=artist,
                    album=name, title=title, track=track, disc=disc, length=100.0 + track)
        item.update(store.fields_for(unit_at(deg), one_hot_probs(genre), model.genres, model.model_id, 0.0,
                                     time.time()))
        items.append(item)
    album = lib.add_album(items)
    album.update(album_fields)
    album.store()
    out = album.id, {item.title: item.id for item in items}
    lib._close()
    return out


@pytest.fixture
def albums(beets_env, tiny_model):
    """Album directions (the mean of two tracks 5 deg either side): seed 0, near 10 (rock), mid 20, far 40."""
    env, m = beets_env, tiny_model
    ids = {
        "seed": add_album(env, m, "Seed Album", "SA", [("s1", -5, "classical", 1, 1), ("s2", 5, "classical", 2, 1)],
                          mb_albumid="aaaaaaaa-0000-4000-8000-000000000001", year=1990)[0],
        # The seed album again (another copy: same album artist and title): left out.
        "copy": add_album(env, m, "seed album", " sa", [("c1", 1, "classical", 1, 1), ("c2", 3, "classical", 2, 1)])[0],
        # Another release of the seed by its MusicBrainz id: left out.
        "release": add_album(env, m, "Seed (Deluxe)", "SA", [("r1", 0, "classical", 1, 1), ("r2", 4, "classical", 2, 1)],
                             mb_albumid="aaaaaaaa-0000-4000-8000-000000000001")[0],
    }
    ids["near"], tracks = add_album(env, m, "Near", "NA", [("n2", 5, "rock", 2, 1), ("n1", 15, "rock", 1, 1)], year=1975)
    ids["mid"], mid_tracks = add_album(env, m, "Mid", "MA", [("m3", 15, "classical", 1, 2), ("m1", 25, "classical", 1, 1),
                                                             ("m2", 20, "classical", 2, 1)], year=2001)
    ids["far"], _ = add_album(env, m, "Far", "FA", [("f1", 35, "classical", 1, 1), ("f2", 45, "classical", 2, 1)],
                              year=2005)
    tracks.update(mid_tracks)
    return env, ids, tracks


def test_albums_ranked_by_album_vectors(albums):
    env, ids, _ = albums
    seed = f"id:{ids['seed']}"  # the album query "album:Seed Album" would match its copy too
    cosine = ids_of(env.run("similar", "-a", seed, "--mode", "cosine", "-f", "$id"))
    assert cosine == [ids["near"], ids["mid"], ids["far"]]  # not the seed album, its copy or its other release
    lines = env.run("similar", "-a", seed, "-n", "1", "--mode", "cosine").stdout.splitlines()
    assert lines == [f"NA - Near  [{math.cos(math.radians(10)):.3f} rock]"]  # like `beet ls -a`, then score and genre
    # Genre-aware: the classical albums pass the nearer rock one.
    assert ids_of(env.run("similar", "-a", seed, "-n", "3", "-f", "$id")) == [ids["mid"], ids["far"], ids["near"]]
    # Album filters and the genre.
    assert ids_of(env.run("similar", "-a", seed, "--mode", "cosine", "--filter", "year:2000..",
                          "-f", "$id")) == [ids["mid"], ids["far"]]
    assert ids_of(env.run("similar", "-a", seed, "--genre", "rock", "-f", "$id")) == [ids["near"]]


def test_album_artist_cap_counts_a_compilation_as_no_artist(beets_env, tiny_model):
    """--max-per-artist on albums: a compilation (album artist = va_name, or comp) is no one artist, as its
    tracks count under their own artists in track results and in library training."""
    env, m = beets_env, tiny_model

    def album(name, artist, degrees, **fields):
        return add_album(env, m, name, artist, [(f"{name}1", degrees - 5, "classical", 1, 1),
                                                (f"{name}2", degrees + 5, "classical", 2, 1)], **fields)[0]

    seed = album("Seed", "SA", 0)
    ids = [album("Hits One", "Various Artists", 10), album("Hits Two", "various artists", 15),
           album("Film", "Label", 20, comp=True), album("Film Two", "Label", 25, comp=True),
           album("Band One", "Band", 30), album("Band Two", "Band", 35)]
    got = ids_of(env.run("similar", "-a", f"id:{seed}", "--mode", "cosine", "--max-per-artist", "1", "-f", "$id"))
    assert got == ids[:5]  # every compilation; one album of the band
    assert ids_of(env.run("similar", "-a", f"id:{seed}", "--mode", "cosine", "-f", "$id")) == ids


def test_album_playlist_in_album_order(albums, tmp_path):
    env, ids, tracks = albums
    seed = f"id:{ids['seed']}"
    env.run("similar", "-a", seed, "-n", "2", "--mode", "cosine", "--m3u", str(tmp_path / "a.m3u"))
    expected = [("NA", "Near", "n1"), ("NA", "Near", "n2"), ("MA", "Mid", "m1"), ("MA", "Mid", "m2"),
                ("MA", "Mid", "m3")]  # disc 1 before disc 2, then track numbers
    assert (tmp_path / "a.m3u").read_bytes() == b"#EXTM3U\n" + b"".join(
        f"#EXTINF:{100 + int(t[-1]) if t != 'm3' else 101},{artist} - {t}\n{env.music / album / (t + '.mp3')}\n".encode()
        for artist, album, t in expected
    )


def test_album_index_follows_album_changes(albums, tiny_model):
    env, ids, tracks = albums
    seed = f"id:{ids['seed']}"
    first = env.run("similar", "-a", seed, "-n", "1", "--mode", "cosine", "-f", "$id")
    assert ids_of(first) == [ids["near"]]
    assert "rebuilding" not in env.run("similar", "-a", seed, "-n", "1", "-f", "$id").stderr
    # Move Near's far track (15 deg) to Far: Near is now just its 5 deg track, Far holds 15, 35 and 45.
    lib = env.library()
    item = lib.get_item(tracks["n1"])
    item.album_id = ids["far"]
    item.store()
    lib._close()
    proc = env.run("similar", "-a", seed, "--mode", "cosine", "-f", "$id")
    assert "out of date" in proc.stderr
    assert ids_of(proc) == [ids["near"], ids["mid"], ids["far"]]
    lines = env.run("similar", "-a", seed, "-n", "3", "--mode", "cosine").stdout.splitlines()
    far = np.mean([unit_at(d) for d in (15, 35, 45)], axis=0)
    assert lines[0] == f"NA - Near  [{math.cos(math.radians(5)):.3f} rock]"  # its one track left, at 5 deg
    assert lines[2] == f"FA - Far  [{far[0] / np.linalg.norm(far):.3f} classical]"


def test_album_errors_are_one_line(albums):
    env, ids, _ = albums
    from beets.library import Item

    lib = env.library()
    lib.add_album([Item(path=b"/x/plain.mp3", title="plain", artist="P", album="Plain")])
    lib._close()
    for args, message in ((["album:Nothing"], "no albums match"), (["album:Plain"], "have no analysed tracks")):
        proc = env.run("similar", "-a", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_similar_path_and_mixes_import_neither_tensorflow_nor_librosa(albums, tmp_path):
    import subprocess
    import sys

    env, ids, _ = albums
    with open(env.root / "config.yaml", "a") as f:
        f.write(f"  playlist_dir: {tmp_path}\n  playlists:\n    - name: m\n      query: title:s1\n      n: 2\n")
    probe = (
        "import sys, beets.ui\n"
        "try:\n    beets.ui.main(sys.argv[1:])\n"
        "finally:\n    print('HEAVY:' + ','.join(sorted(m for m in ('tensorflow', 'keras', 'librosa', 'numba')"
        " if m in sys.modules)))\n"
    )
    for args in (["similar", "title:s1", "--filter", "year:1900..", "--order", "smooth"],
                 ["similar", "-a", f"id:{ids['seed']}"], ["crnnpath", "title:s1", "title:f2"], ["crnnplaylists"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], env=env.env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "HEAVY:", (args, proc.stdout)
