"""Training on the user's own library: `beet crnntrain [QUERY]` and `beet crnneval [QUERY]`.

The library is real: generated audio files on disk, items in a beets database, the real `beet`
CLI. Three "genres" are timbre families that sound clearly different (a low drone, high bells,
noise bursts); each artist plays its family with its own notes and tempo, so a model that passes
on held-out artists has learnt the family, not the files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiogen import write as write_clip
from beetsplug.crnn import audio
from beetsplug.crnn.training import dataset, excerpts, library_train, taxonomy
from beetsplug.crnn.errors import CrnnError
from beetsplug.crnn.training.fileid import content_id
from conftest import BeetsEnv, sigint_default

SR = 22050
TINY = ["--conv-filters", "4,4,4,4", "--gru-units", "4"]


# ---- audio: three timbre families ----

def family_clip(kind: str, seed: int, seconds: float = 6.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    if kind == "drone":  # low, steady: energy below 300 Hz
        f0 = rng.uniform(45, 80)
        y = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) for k in range(1, 4))
    elif kind == "bells":  # high partials that ring and decay, a note every half second or so
        period = rng.uniform(0.4, 0.7)
        f = rng.uniform(1500, 3000)
        env = np.exp(-(t % period) * 6)
        y = env * sum(0.2 / k * np.sin(2 * np.pi * f * k * 1.5 * t) for k in range(1, 3))
    else:  # "noise": broadband bursts on a beat
        period = rng.uniform(0.3, 0.6)
        env = np.exp(-(t % period) * 20)
        y = 0.4 * env * rng.standard_normal(len(t))
    return (y / max(np.abs(y).max(), 1e-6) * 0.5).astype(np.float32)


def genres_attr(item, values):
    """Set an item's genres as this beets stores them: the multi-valued `genres` (2.14+) or the `genre` string."""
    if "genres" in type(item)._fields:
        item.genres = list(values)
    else:
        item.genre = "; ".join(values)


def add_track(env, path, artist, genres=(), title=None, albumartist="", **flex):
    from beets.library import Item

    lib = env.library()
    item = Item(path=os.fsencode(str(path)), title=title or Path(path).stem, artist=artist, albumartist=albumartist,
                album=f"{artist} album", length=6.0, format="WAV")
    if genres:
        genres_attr(item, genres)
    for k, v in flex.items():
        item[k] = v
    lib.add(item)
    lib._close()
    return item.id


FAMILIES = {"drone": ["Hip-Hop", "hip hop", "HipHop"],  # one genre, three spellings
            "bells": ["Classical"],
            "noise": ["Electronica", "electronic", "EDM"]}  # merged by crnn.genre_aliases


def family_library(env, artists_per_genre=5, tracks_per_artist=3, extras=True):
    """The three families over several artists; with ``extras``: a track without a genre, a rare genre,
    a multi-genre track, and a file that cannot be decoded."""
    n = 0
    for gi, (kind, spellings) in enumerate(FAMILIES.items()):
        for a in range(artists_per_genre):
            for k in range(tracks_per_artist):
                n += 1
                path = env.music / f"{kind}-{a}-{k}.wav"
                sf.write(str(path), family_clip(kind, seed=1000 * gi + 10 * a + k), SR)
                add_track(env, path, f"{kind.title()} Artist {a}", [spellings[(a + k) % len(spellings)]])
    if extras:
        untagged = write_clip(env.music / "untagged.wav", 6.0, kind="tonal", seed=5)
        add_track(env, untagged, "Nobody")
        rare = write_clip(env.music / "polka.wav", 6.0, kind="tonal", seed=6)
        add_track(env, rare, "Polka Band", ["Polka"])
        multi = env.music / "multi.wav"
        sf.write(str(multi), family_clip("drone", 77) + family_clip("noise", 78), SR)
        add_track(env, multi, "Drone Artist 0", ["Hip-Hop; Electronic"])
        broken = env.music / "broken.wav"
        broken.write_bytes(b"RIFF this is not audio at all" * 50)
        add_track(env, broken, "Noise Artist 1", ["electronic"])
    return n


ALIASES = "  genre_aliases:\n    electronic: [electronica, edm]\n"


@pytest.fixture
def lib_env(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent, extra_config=ALIASES)
    family_library(env)
    return env


def model_folders(env):
    return sorted(p for p in (env.root / "crnn_models").glob("*") if not p.name.startswith("."))


# ---- genres: normalising, splitting, aliases, taxonomy (no audio) ----

def test_genre_names_normalise_split_and_alias():
    assert {taxonomy.genre_key(g) for g in ("Hip-Hop", "hip hop", "HipHop", "HIP_HOP", " hip-hop ")} == {"hiphop"}
    assert taxonomy.split_genres("Rock; Pop") == ["Rock", "Pop"]
    assert taxonomy.split_genres("Rock, Pop / Jazz") == ["Rock", "Pop", "Jazz"]
    assert taxonomy.split_genres(["Rock", "Pop; Soul"]) == ["Rock", "Pop", "Soul"]
    assert taxonomy.split_genres("Rock\\␀Pop") == ["Rock", "Pop"]  # beets' multi-value delimiter
    assert taxonomy.split_genres(None) == [] and taxonomy.split_genres(" ; ") == []
    names = taxonomy.GenreNames({"electronic": ["electronica", "EDM"], "Hip-Hop": "rap"})
    assert names.keys(["Electronica", "edm", "Electronic", "Rap", "hip hop"]) == ["electronic", "hiphop"]
    assert names.label("electronic") == "electronic" and names.label("hiphop") == "hip-hop"
    with pytest.raises(CrnnError, match="alias of two genres"):
        taxonomy.GenreNames({"a": ["x"], "b": ["x"]})


def _tracks(spec):
    """[(artist, genre value)] -> Tracks."""
    return [taxonomy.Track(i, f"/music/{i}.mp3", a, [v] if v else []) for i, (a, v) in enumerate(spec)]


def test_plan_taxonomy_counts_and_left_out():
    spec = ([(f"R{i % 6}", "Rock") for i in range(36)] + [(f"J{i % 6}", "jazz") for i in range(31)]
            + [(f"P{i % 6}", "Pop") for i in range(12)] + [("X", None)] * 3 + [("M", "Rock; Jazz")])
    p = taxonomy.plan(_tracks(spec), min_tracks=30)
    assert p.genres == ["jazz", "rock"]
    assert p.left_out["without a genre"]["tracks"] == 3
    rare = p.left_out["of rare genres (fewer than 30 tracks, --min-tracks)"]
    assert rare["tracks"] == 12 and rare["genres"] == {"pop": 12}
    assert sum(sum(c.values()) for c in p.counts.values()) == 36 + 31 + 2  # the multi-genre track counts twice
    multi = [r for r in p.records if r.more]
    assert len(multi) == 1 and (multi[0].genre, multi[0].more) == ("rock", ("jazz",))
    text = taxonomy.format_plan(p)
    assert "left out: 12 of rare genres" in text and "pop 12" in text and "3 without a genre" in text
    # --max-genres keeps the largest; --genres chooses
    p2 = taxonomy.plan(_tracks(spec), min_tracks=10, max_genres=2)
    assert p2.genres == ["jazz", "rock"] and "of genres beyond the 2 largest (--max-genres)" in p2.left_out
    p3 = taxonomy.plan(_tracks(spec), genres=["POP", "jazz"])
    assert p3.genres == ["jazz", "pop"] and p3.left_out["of genres not in --genres"]["tracks"] == 36


def test_plan_errors_are_one_line():
    with pytest.raises(CrnnError, match="none of the 2 tracks .* has a 'genre'"):
        taxonomy.plan(_tracks([("a", None), ("b", "")]))
    with pytest.raises(CrnnError, match=r"at least two genres with 30 or more tracks.*has 1 \(rock 40, pop 3 tracks\)"):
        taxonomy.plan(_tracks([("a", "rock")] * 40 + [("b", "pop")] * 3))
    with pytest.raises(CrnnError, match="--genres must name at least two genres"):
        taxonomy.plan(_tracks([("a", "rock")] * 40 + [("b", "pop")] * 3), genres=["rock"])
    with pytest.raises(CrnnError, match="no track has the genre 'metal'"):
        taxonomy.plan(_tracks([("a", "rock")] * 40 + [("b", "pop")] * 3), genres=["rock", "metal"])
    with pytest.raises(CrnnError, match="no tracks match the query 'x'"):
        taxonomy.plan([], query="x")


def test_artist_split_is_disjoint_stratified_and_seeded():
    rng = np.random.default_rng(1)
    spec = []
    for g in ("rock", "jazz", "pop"):
        for a in range(12):
            spec += [(f"{g} artist {a}", g)] * int(rng.integers(1, 8))
    tracks = _tracks(spec)
    p = taxonomy.plan(tracks, min_tracks=5)
    by_artist = {}
    for r in p.records:
        by_artist.setdefault(r.artist, set()).add(r.split)
    assert all(len(s) == 1 for s in by_artist.values())  # no artist in two splits
    for g in p.genres:  # every genre has train, val and test tracks, roughly in proportion
        c = p.counts[g]
        assert c["train"] > 0 and c["val"] > 0 and c["test"] > 0
        assert c["test"] <= 0.3 * sum(c.values())
    assert taxonomy.plan(tracks, min_tracks=5).artists == p.artists  # fixed seed: same split
    assert taxonomy.plan(tracks, min_tracks=5, seed=1).artists != p.artists
    # never the last artist of a genre: two artists -> one trains
    two = taxonomy.split_artists([("a", "x"), ("b", "x")], val_fraction=0.4, test_fraction=0.4)
    assert sorted(two.values()) == ["test", "train"]
    assert taxonomy.split_artists([("a", "x")] * 5) == {"a": "train"}


def test_split_key_is_the_album_artist_but_the_track_artist_on_compilations():
    split = taxonomy.split_artist
    assert split("Band feat. Guest", "Band") == ("Band", False)  # an album artist gathers its features
    assert split("Solo", "") == ("Solo", False) and split("", "") == ("", False)
    assert split("A", "Various Artists") == ("A", True)  # beets' default va_name
    assert split("A", "  various   ARTISTS ") == ("A", True)
    assert split("A", "Film Label", comp=True) == ("A", True)  # beets' comp flag
    assert split("A", "Verschiedene", va_name="Verschiedene") == ("A", True)
    assert split("A", "Verschiedene") == ("Verschiedene", False)
    assert split("", "Various Artists") == ("", True)  # no track artist: counts with its folder

    # 40 tracks of one compilation by 20 artists, and a band's 20 tracks with guests: the compilation's
    # artists are spread over the splits, the band stays whole.
    tracks = []
    for i in range(40):
        artist, comp = split(f"Artist {i % 20}", "Various Artists")
        tracks.append(taxonomy.Track(i, f"/m/va/{i}.mp3", artist, ["rock" if i % 2 else "pop"], comp))
    for i in range(40, 60):
        artist, comp = split(f"Band feat. Guest {i}", "Band")
        tracks.append(taxonomy.Track(i, f"/m/band/{i}.mp3", artist, ["rock"], comp))
    p = taxonomy.plan(tracks, min_tracks=5, val_fraction=0.2, test_fraction=0.2)
    splits = {}
    for r in p.records:
        splits.setdefault(r.artist, set()).add(r.split)
    assert splits["band"] and len(splits["band"]) == 1 and "various artists" not in splits
    assert len([a for a in splits if a.startswith("artist ")]) == 20
    assert p.artists["test"] and p.artists["val"] and all(len(s) == 1 for s in splits.values())
    assert p.summary()["split"]["compilation_tracks"] == 40
    assert "40 compilation track(s) (comp, or album artist = va_name) split by their track artist" in \
        taxonomy.format_plan(p)
    assert "compilation" not in taxonomy.format_plan(taxonomy.plan(tracks[40:] + _tracks([("x", "pop")] * 6),
                                                                   min_tracks=5))


COMPILATIONS = "va_name: Verschiedene Interpreten\n"  # beets' own option, not the plugin's


def compilation_library(env, artists=4, tracks_per_artist=2):
    """The three families by ``artists`` artists each, on two compilation albums: one whose album artist is
    the configured va_name, one flagged ``comp`` with a label as album artist (the last artist of each family)."""
    from beets.library import Item

    albums = {"Verschiedene Interpreten": [], "Film Label": []}
    for gi, (kind, spellings) in enumerate(FAMILIES.items()):
        for a in range(artists):
            albumartist = "Film Label" if a == artists - 1 else "Verschiedene Interpreten"
            for k in range(tracks_per_artist):
                path = env.music / f"{kind}-{a}-{k}.wav"
                sf.write(str(path), family_clip(kind, seed=1000 * gi + 10 * a + k), SR)
                item = Item(path=os.fsencode(str(path)), title=path.stem, artist=f"{kind.title()} Artist {a}",
                            albumartist=albumartist, album=f"{albumartist} hits", comp=albumartist == "Film Label",
                            length=6.0, format="WAV")
                genres_attr(item, [spellings[0]])
                albums[albumartist].append(item)
    lib = env.library()
    for items in albums.values():
        lib.add_album(items)
    lib._close()
    return sum(map(len, albums.values()))


def test_a_compilation_trains_with_held_out_artists_and_evaluates(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent, extra_config=ALIASES + COMPILATIONS)
    n = compilation_library(env)
    proc = env.run("crnntrain", "--min-tracks", "5", "--val-fraction", "0.25", "--test-fraction", "0.25",
                   "--from-scratch", *TINY, "--epochs", "1", "--max-steps", "1", "--crops", "1")
    assert f"{n} compilation track(s)" in proc.stdout
    arts = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("artists")][0]
    assert [int(x) for x in arts] == [6, 3, 3]  # 12 track artists, not two album artists
    from beetsplug.crnn.model import ModelCard

    folder = model_folders(env)[0]
    card = ModelCard.load(folder)
    split = card.extra["training"]["library"]["split"]
    assert split["compilation_tracks"] == n and "track artist on compilations" in split["by"]
    held = split["artists"]["test"]
    assert len(held) == 3 and not set(held) & set(split["artists"]["train"])
    assert all(a.endswith(tuple("0123")) and "artist" in a for a in held)
    assert card.extra["metrics"]["test"]["library"]["tracks"] == 6
    proc = env.run("crnneval", "--model", folder, "--json", env.root / "eval.json")
    report = json.loads((env.root / "eval.json").read_text())
    assert report["tracks"] == 6 and report["artists"] == 3, proc.stdout
    assert "6 tracks by 3 artists" in proc.stdout


def test_names_data_rule(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "m.csv").write_text("path,genre\n")
    assert library_train.names_data([str(tmp_path / "set"), str(tmp_path / "m.csv")])
    assert not library_train.names_data([])
    assert not library_train.names_data([str(tmp_path / "set"), "genre:rock"])
    assert not library_train.names_data([str(tmp_path / "set")], library_flag=True)


def test_init_from_defaults_to_the_shipped_model():
    from beetsplug.crnn.model import default_weights_dir

    parse = library_train.build_train_parser().parse_args
    assert library_train.resolve_init(parse([])) == str(default_weights_dir())
    assert library_train.resolve_init(parse(["--from-scratch"])) is None
    assert library_train.resolve_init(parse(["--init-from", "/x"])) == "/x"
    with pytest.raises(CrnnError, match="exclude each other"):
        library_train.resolve_init(parse(["--from-scratch", "--init-from", "/x"]))
    ns = parse(["genre:rock"])
    assert ns.query == ["genre:rock"] and ns.max_minutes == 60 and ns.min_tracks == 30 and ns.max_genres == 20


# ---- the excerpt cache ----

def test_excerpt_cache_matches_serving_and_caps_its_size(tmp_path):
    long = write_clip(tmp_path / "long.flac", 200.0, sr=44100, kind="tonal", seed=3)
    short = write_clip(tmp_path / "short.wav", 50.0, kind="beat", seed=4)
    cache = excerpts.ExcerptCache(tmp_path / "ex", 2)
    whole = dataset.MelCache(tmp_path / "whole")
    parts, starts, n = cache.entry(long)
    assert len(parts) == 2 and n == 200 * SR  # two spans around the two windows, not the whole track
    assert sum(p.shape[1] for p in parts) < 0.5 * whole.get(long)[0].shape[1]
    np.testing.assert_allclose(cache.serving(long, 2), whole.serving(long, 2), atol=0.2)  # float16 rounding
    assert isinstance(cache.get(long)[0], list)
    # a track the spans cover is cached whole, exactly as manifest training caches it
    np.testing.assert_array_equal(cache.get(short)[0].astype(np.float32), whole.get(short)[0])
    np.testing.assert_array_equal(cache.serving(short, 2), whole.serving(short, 2))
    # size cap: the entries used longest ago go, this run's never
    capped = excerpts.ExcerptCache(tmp_path / "ex", 2, max_bytes=1)
    old = cache._key(Path(long))
    os.utime(old, (time.time() - 1000, time.time() - 1000))
    removed, left = capped.prune(keep=[short])
    assert removed == 1 and not old.exists() and cache.has(short) and left > 1


# ---- teacher targets line up with the file, not with a cached span ----

TEACHER_HOP_S = 2.992


def time_teacher(monkeypatch, asked):
    """A fake ``teacher.compute`` whose targets encode time: window w (centred at (w + 0.5) * hop s) says
    w on every tag and -w on every embedding dimension. Records the paths it is asked for."""
    from beetsplug.crnn.training import teacher

    def compute(paths, cache, log=print, runner=None):
        paths = [str(p) for p in paths]
        asked.extend(paths)
        for p in paths:
            seconds = sf.info(p).duration
            w = np.arange(int(seconds // TEACHER_HOP_S), dtype=np.float32)[:, None]
            cache.put(p, np.repeat(w, 50, axis=1), -np.repeat(w, 200, axis=1), TEACHER_HOP_S, seconds)
        return len(paths)

    monkeypatch.setattr(teacher, "compute", compute)
    monkeypatch.setattr(teacher, "tag_names", lambda: [f"tag{i}" for i in range(50)])


def where_in_file(crop, whole, bands=slice(None)) -> tuple[int, float]:
    """(start frame, mean abs difference) of the best match of a model-input crop in a whole-file log-mel.

    The file is searched independently of any span bookkeeping: every start, every 50th frame compared.
    """
    from beetsplug.crnn.features import FLOOR_DB, SILENCE_DB

    cols = np.arange(0, audio.WINDOW_FRAMES, 50)
    peak = np.maximum(np.lib.stride_tricks.sliding_window_view(whole.max(axis=0), audio.WINDOW_FRAMES).max(axis=1),
                      SILENCE_DB)
    best = (None, np.inf)
    for s in range(len(peak)):
        cand = np.maximum(whole[bands, s + cols] - peak[s], -FLOOR_DB)
        d = float(np.abs(cand - crop[bands, cols]).mean())
        if d < best[1]:
            best = (s, d)
    return best


def test_teacher_targets_follow_a_crop_to_its_place_in_the_file(tmp_path, monkeypatch):
    """A long track cached as spans: a crop in its second span gets the teacher windows at its true time
    in the file (found by matching the crop against the whole file's log-mel), for codec versions too."""
    from beetsplug.crnn.training import train
    from beetsplug.crnn.audio import HOP_LENGTH

    long = write_clip(tmp_path / "long.wav", 200.0, kind="beat", seed=3)  # noise bursts: every frame differs
    short = write_clip(tmp_path / "short.wav", 8.0, kind="tonal", seed=4)
    recs = [dataset.Record(long, "a", "train", "A", "library"), dataset.Record(short, "b", "train", "B", "library")]
    cache = excerpts.ExcerptCache(tmp_path / "ex", 2)
    asked = []
    time_teacher(monkeypatch, asked)
    trainer = train.Trainer(recs, cache, log=lambda m: None, teacher="musicnn", teacher_dir=tmp_path / "teacher",
                            versions=("mp3-64k",), version_dir=tmp_path / "versions")
    assert sorted(asked) == sorted(map(str, (long, short)))  # whole files, the clean originals
    parts, starts, _ = cache.entry(long)
    assert len(parts) == 2 and 0 < starts[0] < starts[1]  # two spans, neither at the start of the file
    assert trainer.train_starts == [starts, [0]]
    whole = dataset.MelCache(tmp_path / "whole").get(long)[0]
    crop_s = audio.WINDOW_FRAMES * HOP_LENGTH / SR
    centres = (np.arange(int(200.0 // TEACHER_HOP_S)) + 0.5) * TEACHER_HOP_S

    def check(version_p, bands):
        x, targets = trainer.epoch_data(np.random.default_rng(1), 8, 0.0, version_p=version_p)
        found = []
        for k in np.flatnonzero(targets["genres"][:, 0] == 1):  # the long track's crops
            at, d = where_in_file(x[k, ..., 0], whole, bands)
            assert d < 1.0, (k, at, d)
            t0 = at * HOP_LENGTH / SR
            inside = (centres >= t0) & (centres <= t0 + crop_s)
            np.testing.assert_allclose(targets["tags"][k, :50], np.flatnonzero(inside).mean(), atol=0.02)
            np.testing.assert_allclose(targets["teacher_emb"][k, :200], -np.flatnonzero(inside).mean(), atol=0.02)
            found.append(at)
        assert len(found) >= 4 and any(a >= starts[1] for a in found), found  # crops in the later span too

    check(0.0, slice(None))  # the cached spans themselves
    # their mp3 versions (64k low-passes: the top bands differ), cached as their own spans; an mp3 decodes to
    # the same length here, so its spans start where the original's do: this checks the version crops' targets,
    # not a version whose spans moved
    check(1.0, slice(0, 64))


# ---- new genre output on a model that knows other genres ----

def test_init_from_with_new_head_keeps_every_other_layer(tmp_path, tiny_model):
    from beetsplug.crnn.training import train
    from beetsplug.crnn.model import build_for, ModelCard

    recs = []
    for g, kind in (("drone", "drone"), ("bells", "bells")):
        for i, split in enumerate(("train", "train", "val")):
            path = tmp_path / f"{g}{i}.wav"
            sf.write(str(path), family_clip(kind, i), SR)
            recs.append(dataset.Record(path, g, split, f"{g} {i}", "library"))
    trainer = train.Trainer(recs, excerpts.ExcerptCache(tmp_path / "c", 2), log=lambda m: None)
    with pytest.raises(CrnnError, match="--init-from model knows"):
        trainer.fit(epochs=1, init_from=str(tiny_model.weights.parent), max_steps=1)
    full, arch, info = trainer.fit(epochs=1, init_from=str(tiny_model.weights.parent), new_head=True, lr=0.0,
                                   max_steps=1, recalibrate=False)
    start = build_for(ModelCard.load(tiny_model.weights.parent))
    start.load_weights(str(tiny_model.weights))
    for name in ("conv1", "conv4", "gru1", "gru2"):
        for a, b in zip(full.get_layer(name).get_weights(), start.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert full.get_layer("genres").get_weights()[0].shape == (arch["gru_units"], 2)
    assert arch["conv_filters"] == list(tiny_model.architecture["conv_filters"])


def test_time_budget_starts_at_the_first_batch():
    """The budget is for training: time spent before the first batch (the teacher, codec versions) is not
    charged, or every epoch would stop after one batch."""

    class Model:
        stop_training = False

    budget = library_train.time_budget(0.5 / 60)  # half a second
    budget.set_model(Model())
    time.sleep(0.6)  # the Trainer's preparation
    budget.on_train_batch_end(0)
    assert not budget.model.stop_training
    time.sleep(0.6)
    budget.on_train_batch_end(1)
    assert budget.model.stop_training


# ---- through beets' CLI ----

def test_dry_run_prints_taxonomy_with_aliases_and_multi_genre(lib_env):
    proc = lib_env.run("crnntrain", "--min-tracks", "5", "--dry-run", "--from-scratch")
    out = proc.stdout
    assert "genre" in out and "train" in out
    # three spellings of hip-hop and two aliases of electronic are one genre each
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert set(lines) >= {"classical", "electronic", "hip-hop"}
    assert sum(map(int, lines["hip-hop"])) == 15 + 1  # 15 spellings + the multi-genre track
    assert sum(map(int, lines["electronic"])) == 15 + 1 + 1  # + multi-genre + the broken file
    assert "1 track(s) have several of these genres" in out
    assert "1 without a genre" in out and "polka 1" in out
    assert not (lib_env.root / "crnn_cache").exists()  # nothing decoded


def test_no_genres_or_one_genre_is_a_one_line_error(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent)
    for i in range(3):
        add_track(env, write_clip(env.music / f"t{i}.wav", 2.0, seed=i), f"A{i}")
    proc = env.run("crnntrain", check=False)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == ["error: none of the 3 tracks in the library has a 'genre': tag them (MusicBrainz, lastgenre) "
                   "or choose another field with --field"]
    for i in range(3):
        add_track(env, write_clip(env.music / f"r{i}.wav", 2.0, seed=i), f"B{i}", ["Rock"])
    proc = env.run("crnntrain", "--min-tracks", "1", check=False)
    assert proc.returncode != 0 and "training needs at least two genres" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    proc = env.run("crnntrain", "title:nothing-matches", check=False)
    assert proc.returncode != 0 and "no tracks match the query 'title:nothing-matches'" in proc.stderr


def test_field_option_reads_a_flexible_attribute(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent)
    for i in range(8):
        add_track(env, write_clip(env.music / f"t{i}.wav", 2.0, seed=i), f"A{i % 4}",
                  mood="calm, dark" if i % 2 else "happy")
    proc = env.run("crnntrain", "--field", "mood", "--min-tracks", "2", "--dry-run", "--from-scratch")
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.split()}
    assert {"calm", "dark", "happy"} <= set(lines)
    assert "4 track(s) have several of these genres" in proc.stdout


@pytest.mark.slow
def test_crnntrain_learns_the_library_and_crnneval_compares(lib_env, tiny_model):
    env = lib_env
    # two test artists per genre, so same-genre neighbours by other artists exist for precision@5
    split = ["--val-fraction", "0.2", "--test-fraction", "0.3"]
    proc = env.run("crnntrain", "--min-tracks", "5", *split, "--init-from", tiny_model.weights.parent,
                   "--epochs", "8", "--patience", "8", "--crops", "4", "--lr", "0.003", timeout=1800)
    out, err = proc.stdout, proc.stderr
    # the taxonomy first, then decoding (the broken file: one line, left out), then epochs
    bad = [line for line in err.splitlines() if "broken.wav" in line]
    assert len(bad) == 1 and "left out" in bad[0]
    assert out.index("hip-hop") < out.index("epoch 1/8")
    assert "epoch 3/8" in out and "val acc" in out and "left" in out
    folders = model_folders(env)
    assert len(folders) == 1
    folder = folders[0]
    assert f"crnn: {{model: {folder}}}" in out and "beet crnnembed" in out
    from beetsplug.crnn.model import Embedder, ModelCard

    card = ModelCard.load(folder)
    assert card.model_id == folder.name and card.genres == ["classical", "electronic", "hip-hop"]
    lib = card.extra["training"]["library"]
    assert lib["query"] == "" and lib["field"] == "genre" and lib["decode_failed"] == 1
    assert lib["tracks_per_genre"]["hip-hop"]["test"] >= 3
    arts = lib["split"]["artists"]
    assert not set(arts["test"]) & set(arts["train"]) and not set(arts["val"]) & set(arts["train"])
    assert card.extra["training"]["new_head"] and card.extra["training"]["init_from"] == str(tiny_model.weights.parent)
    test = card.extra["metrics"]["test"]["library"]
    assert test["tracks"] >= 15 and test["artists"] >= 6
    assert test["accuracy"] >= 0.67, test  # chance is 1/3
    assert test["precision_at_k"]["cosine"] >= 0.6, test
    Embedder(card)  # loadable

    # a second run decodes nothing again (the broken file is tried, and reported, again)
    cached = sorted(p.name for p in (env.root / "crnn_cache" / "mels").glob("*.npz"))
    assert len(cached) == 49 - 3  # every track with a usable genre, but the broken one
    proc = env.run("crnntrain", "--min-tracks", "5", *split, "--init-from", tiny_model.weights.parent,
                   "--epochs", "1", "--max-steps", "1", "--out", env.root / "again")
    assert sorted(p.name for p in (env.root / "crnn_cache" / "mels").glob("*.npz")) == cached
    assert "broken.wav" in proc.stderr
    assert ModelCard.load(env.root / "again").genres == card.genres

    # crnneval: the trained model and the configured one (the tiny random model) side by side
    proc = env.run("crnneval", "--model", folder, "--json", env.root / "eval.json")
    assert card.model_id in proc.stdout and "precision@5 genre-aware" in proc.stdout
    report = json.loads((env.root / "eval.json").read_text())
    assert report["tracks"] == test["tracks"]
    mine = report["models"][card.model_id]
    assert mine["accuracy"] == pytest.approx(test["accuracy"])
    assert mine["precision_at_k"]["cosine"] == pytest.approx(test["precision_at_k"]["cosine"])
    configured = report["models"][f"{tiny_model.model_id} (configured)"]
    assert configured["tracks"] == mine["tracks"] and configured["genres_scored"] == ["classical", "electronic"]
    assert f"{tiny_model.model_id} (configured)" in proc.stdout.splitlines()[1]  # one header row, both columns
    # the shipped model is a third column, or one line says why it is not
    assert any("(shipped)" in name for name in report["models"]) or "shipped model not compared" in proc.stdout


def _interrupt_env(tmp_path, tiny_model):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent, extra_config=ALIASES)
    family_library(env, artists_per_genre=3, tracks_per_artist=2, extras=False)
    return env


@pytest.mark.slow
def test_ctrl_c_mid_epoch_writes_the_best_epoch(tmp_path, tiny_model):
    env = _interrupt_env(tmp_path, tiny_model)
    cmd = [sys.executable, "-m", "beets", "crnntrain", "--min-tracks", "2", "--from-scratch", *TINY,
           "--epochs", "500", "--patience", "500", "--crops", "30"]
    # Progress lines may go to stdout or stderr (beets' logger): read both as one stream.
    proc = subprocess.Popen(cmd, env={**env.env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_default)
    guard = threading.Timer(300, proc.kill)  # a test must never hang the suite
    guard.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.lstrip().startswith("epoch 2/"):  # epoch 3 (30 crops a track) takes seconds: it lands inside it
                proc.send_signal(signal.SIGINT)
                break
        out, _ = proc.communicate(timeout=300)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + (out or "")
    err = out
    assert proc.returncode == 0, out
    assert "interrupted: keeping the best epoch so far" in err
    folders = model_folders(env)
    assert len(folders) == 1 and "crnn: {model:" in out
    from beetsplug.crnn.model import Embedder, ModelCard

    card = ModelCard.load(folders[0])
    training = card.extra["training"]
    assert training["stopped"] == "interrupted" and training["epochs_run"] == 2 and training["best_epoch"] in (1, 2)
    assert "metrics" not in card.extra  # evaluation is skipped after Ctrl-C
    emb, probs = Embedder(card)(np.full((1, 96, 1366), -30.0, np.float32))
    assert emb.shape == (1, 4) and probs.shape == (1, 3)
    assert not list((env.root / "crnn_models").glob(".training-*"))


@pytest.mark.slow
def test_max_minutes_ends_training_with_a_usable_model(tmp_path, tiny_model):
    env = _interrupt_env(tmp_path, tiny_model)
    t = time.time()
    proc = env.run("crnntrain", "--min-tracks", "2", "--from-scratch", *TINY, "--epochs", "500",
                   "--patience", "500", "--crops", "30", "--max-minutes", "0.01")
    assert time.time() - t < 300
    assert "time limit of 0.01 minutes reached" in proc.stderr
    from beetsplug.crnn.model import ModelCard

    card = ModelCard.load(model_folders(env)[0])
    assert card.extra["training"]["stopped"] == "time limit" and card.extra["training"]["epochs_run"] == 1
    assert "test" in card.extra["metrics"]


def test_library_options_are_refused_with_data(beets_env, tmp_path):
    data = tmp_path / "set"
    data.mkdir()
    proc = beets_env.run("crnntrain", data, "--field", "mood", check=False)
    assert proc.returncode != 0 and "--field is for a library query" in proc.stderr
    proc = beets_env.run("crnntrain", data, "--unfreeze", "gru", check=False)  # crnn-finetune has its own
    assert proc.returncode != 0 and "--unfreeze is for a library query" in proc.stderr
    proc = beets_env.run("crnneval", "genre:rock", "--robustness", check=False)
    assert proc.returncode != 0 and "--robustness is for evaluating DATA" in proc.stderr


# ---- a teacher on the library ----

def test_plan_with_a_teacher_trains_genre_less_tracks_by_artist():
    spec = [(f"R{i % 6}", "Rock") for i in range(36)] + [(f"J{i % 6}", "jazz") for i in range(36)]
    spare = [("R0", None), ("R1", "Polka"), ("J2", None), ("J3", None)] + [(f"Solo {i}", None) for i in range(10)]
    tracks = _tracks(spec + spare)
    without = taxonomy.plan(tracks, min_tracks=30)
    p = taxonomy.plan(tracks, min_tracks=30, unlabelled=True)
    assert without.unlabelled == [] and "unlabelled" not in without.summary()
    assert p.records == without.records  # the labelled split does not move
    assert len(p.unlabelled) == len(spare) and p.left_out == without.left_out
    split_of = {r.artist: r.split for r in p.records}
    for r in p.unlabelled:
        assert r.genre == "" and r.more == () and r.source == taxonomy.UNLABELLED
        if r.artist in split_of:  # an artist with labelled tracks: the same split
            assert r.split == split_of[r.artist]
    solo = {r.artist: r.split for r in p.unlabelled if r.artist.startswith("solo")}
    assert sorted(solo.values()).count("test") >= 1 and sorted(solo.values()).count("train") >= 1
    for s in dataset.SPLITS:  # every artist in exactly one split, the genre-less ones recorded too (crnneval)
        assert set(p.artists[s]) >= set(without.artists[s])
        assert {a for a, sp in solo.items() if sp == s} <= set(p.artists[s])
    assert sum(len(a) for a in p.artists.values()) == len({r.artist for r in p.records + p.unlabelled})
    assert p.summary()["unlabelled"] == {s: sum(r.split == s for r in p.unlabelled) for s in dataset.SPLITS}
    assert "teacher only (no usable genre):" in taxonomy.format_plan(p)
    assert taxonomy.format_plan(without) == taxonomy.format_plan(p).rsplit("\n", 1)[0]


def teacher_library(root, seconds=3.0):
    """Two families, three artists each with two tagged tracks and one without a genre, and three artists
    with only untagged tracks: (tracks, {path: artist})."""
    tracks = []
    for gi, kind in enumerate(("drone", "bells")):
        for a in range(3):
            for k, genre in enumerate((kind, kind, None)):
                path = root / f"{kind}-{a}-{k}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), family_clip(kind, 100 * gi + 10 * a + k, seconds), SR)
                tracks.append(taxonomy.Track(len(tracks), str(path), f"{kind} artist {a}", [genre] if genre else []))
    for a in range(3):
        path = write_clip(root / f"solo-{a}.wav", seconds, kind="beat", seed=a)
        tracks.append(taxonomy.Track(len(tracks), str(path), f"solo {a}", []))
    return tracks


TEACHER_SPLIT = ["--min-tracks", "2", "--val-fraction", "0.2", "--test-fraction", "0.3"]


def test_library_teacher_trains_on_train_artists_only(tmp_path, monkeypatch):
    """What `beet crnntrain --teacher` hands the trainer: no test (or val) artist's track among the fit
    records, genre-less tracks of training artists as unlabelled, held-out genre-less tracks never decoded."""
    from beetsplug.crnn.training import teacher, train

    tracks = teacher_library(tmp_path / "music")
    checks, seen = [], {}
    monkeypatch.setattr(teacher, "check_installed", lambda: checks.append(1))

    class Stop(Exception):
        pass

    def run(args, log=print, records=None, cache=None, unlabelled=(), **kwargs):
        seen.update(records=list(records), unlabelled=list(unlabelled), args=args, cache=cache)
        raise Stop

    monkeypatch.setattr(train, "run", run)
    args = library_train.build_train_parser().parse_args(["--teacher", "musicnn", "--from-scratch", *TEACHER_SPLIT])
    config = tmp_path / "config"
    with pytest.raises(Stop):
        library_train.train_library(args, tracks, config, log=lambda m: None, say=lambda m: None, workers=1)
    assert checks == [1]
    p = taxonomy.plan(tracks, min_tracks=2, val_fraction=0.2, test_fraction=0.3, unlabelled=True)
    held = set(p.artists["test"]) | set(p.artists["val"])
    assert p.artists["test"] and set(p.artists["train"]) & {"solo 0", "solo 1", "solo 2"}
    records, unlabelled = seen["records"], seen["unlabelled"]
    assert records and not any(r.split == "test" for r in records)  # val validates; the Trainer fits on train alone
    assert not {r.artist for r in records} & set(p.artists["test"])
    assert {r.path for r in records} == {r.path for r in p.records if r.split != "test"}
    assert unlabelled and all(r.split == "train" and r.genre == "" and r.artist not in held for r in unlabelled)
    assert {r.path for r in unlabelled} == {r.path for r in p.unlabelled if r.split == "train"}
    cache = seen["cache"]
    for r in p.unlabelled:  # decoded only when it trains
        assert cache.has(r.path) == (r.split == "train")
    assert seen["args"].teacher == "musicnn"
    assert seen["args"].teacher_cache == str(config / library_train.CACHE_DIR / library_train.TEACHER_DIR)

    # --unlabelled DIR stays for manifest training: one line saying why
    args = library_train.build_train_parser().parse_args(["--teacher", "musicnn", "--unlabelled", str(tmp_path)])
    with pytest.raises(CrnnError, match=r"^--unlabelled DIR is for training on DATA \(its files have no artist"):
        library_train.train_library(args, tracks, config, log=lambda m: None, say=lambda m: None)


# The real `beet` CLI in a subprocess, with the fake teacher of test_teacher.py as the teacher's runner (its
# cache folder is where library training must keep teacher outputs) and the records the Trainer receives
# written down. argv: fake teacher script, its call log, teacher cache folder, spy file, then beet's arguments.
TEACHER_CLI = """\
import json, sys
from beetsplug.crnn.training import teacher, train

script, counter, cache_dir, spy = sys.argv[1:5]
real = teacher.compute
teacher.compute = lambda paths, cache, log=print, runner=None: real(
    paths, cache, log=log, runner=[sys.executable, script, counter, cache_dir])
teacher.check_installed = lambda: None
teacher.tag_names = lambda: [f"tag{i}" for i in range(50)]
init = train.Trainer.__init__


def spy_init(self, records, *args, unlabelled=(), **kwargs):
    rows = lambda rs: [[str(r.path), r.split, r.artist, r.genre] for r in rs]
    with open(spy, "w") as f:
        json.dump({"records": rows(records), "unlabelled": rows(unlabelled)}, f)
    init(self, records, *args, unlabelled=unlabelled, **kwargs)


train.Trainer.__init__ = spy_init
from beets.ui import main

main(sys.argv[5:])
"""


@pytest.mark.slow
def test_crnntrain_with_the_teacher_through_beets(tmp_path, tiny_model):
    from test_teacher import FAKE_TEACHER, _calls

    from beetsplug.crnn.model import ModelCard

    env = BeetsEnv(tmp_path, tiny_model.weights.parent, extra_config=ALIASES)
    family_library(env, artists_per_genre=3, tracks_per_artist=2, extras=False)
    for kind in FAMILIES:
        for a in range(3):  # a track without a genre by every artist
            add_track(env, write_clip(env.music / f"{kind}-{a}-untagged.wav", 6.0, kind="tonal", seed=a), f"{kind.title()} Artist {a}")
    for a in range(3):
        add_track(env, write_clip(env.music / f"solo-{a}.wav", 6.0, kind="beat", seed=a), f"Solo {a}")
    (tmp_path / "fake_teacher.py").write_text(FAKE_TEACHER)
    (tmp_path / "cli.py").write_text(TEACHER_CLI)
    counter, spy = tmp_path / "calls.txt", tmp_path / "spy.json"
    tcache = env.root / library_train.CACHE_DIR / library_train.TEACHER_DIR
    proc = subprocess.run([sys.executable, str(tmp_path / "cli.py"), str(tmp_path / "fake_teacher.py"), str(counter),
                           str(tcache), str(spy), "crnntrain", "--teacher", "musicnn", *TEACHER_SPLIT, "--from-scratch",
                           *TINY, "--epochs", "1", "--max-steps", "1", "--crops", "1"],
                          env=env.env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "teacher only (no usable genre):" in proc.stdout
    folders = model_folders(env)
    assert len(folders) == 1
    card = ModelCard.load(folders[0])
    training = card.extra["training"]
    assert training["teacher"]["name"] == "musicnn" and training["teacher"]["model"] == "MSD_musicnn"
    assert training["teacher"]["target"] == "both" and training["loss"]["teacher_emb"] == "teacher_emb_loss"
    assert len(card.tags) == 50  # the tag head ships
    arts = training["library"]["split"]["artists"]
    assert arts["test"] and not set(arts["test"]) & set(arts["train"])

    fed = json.loads(spy.read_text())
    records, unlabelled = fed["records"], fed["unlabelled"]
    assert not [r for r in records if r[1] == "test"]  # no test-split track reaches the trainer
    assert not [r for r in records + unlabelled if r[2] in arts["test"]]
    assert unlabelled and all(r[1] == "train" and r[2] in arts["train"] and r[3] == "" for r in unlabelled)
    assert training["clips"]["unlabelled"] == len(unlabelled)
    assert training["teacher"]["unlabelled"] == {"folders": [], "clips": len(unlabelled)}  # a library has no folders
    assert training["library"]["unlabelled"]["train"] == len(unlabelled)
    # the teacher was asked once, for the training split alone (labelled and genre-less), never val or test
    fit = [r[0] for r in records if r[1] == "train"] + [r[0] for r in unlabelled]
    calls = _calls(counter)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(fit)
    assert f"teacher targets for {len(fit)} of {len(fit)} clips" in proc.stderr  # read back from that folder
    assert len(list(tcache.glob("*.npz"))) == len({content_id(p) for p in fit})  # files with the same bytes share one


def test_crnntrain_teacher_without_the_extra_is_one_line(tmp_path, tiny_model):
    from test_teacher import hiding_prelude

    env = BeetsEnv(tmp_path, tiny_model.weights.parent)
    for i in range(4):
        add_track(env, write_clip(env.music / f"t{i}.wav", 1.0, seed=i), f"A{i}", ["rock" if i % 2 else "jazz"])
    # musicnn cannot be found; tf_keras and librosa can (stand-ins where they are not installed)
    hide = hiding_prelude("musicnn") + "import sys\nfrom beets.ui import main\nmain(sys.argv[1:])\n"
    proc = subprocess.run([sys.executable, "-c", hide, "crnntrain", "--teacher", "musicnn", "--min-tracks", "1"],
                          env=env.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: the musicnn teacher needs musicnn: pip install"), proc.stderr
    assert not (env.root / library_train.CACHE_DIR).exists()  # stopped before any decoding
