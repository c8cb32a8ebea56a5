"""Reliability on a real on-disk library: bad files, hangs, interruptions, concurrent use, corrupt state, bad arguments.

The cases run the real `beet` command in a subprocess, except two that need a hook inside one
process (ffmpeg's time limit, Ctrl-C in the middle of a database write). The rule checked: every
decodable file gets a complete embedding; each failure is one line "path: reason" and leaves
nothing partial behind; the database stays sound; the exit status tells the truth; no traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from audiogen import has_ffmpeg, signal as make_signal, write
from beetsplug.crnn import store
from conftest import GENRES, BeetsEnv, sigint_default

# ---- helpers ----


def crnn_rows(db) -> dict[int, dict]:
    """{item id: {crnn_* key: value}} read straight from SQLite (waits politely for a writer)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT entity_id, key, value FROM item_attributes WHERE key LIKE 'crnn\\_%' ESCAPE '\\'")
        out: dict[int, dict] = {}
        for entity_id, key, value in rows:
            out.setdefault(entity_id, {})[key] = value
        return out
    finally:
        con.close()


def embedded_ids(db) -> set[int]:
    return {i for i, values in crnn_rows(db).items() if store.EMBEDDING in values}


def assert_db_sound(env, model):
    """integrity_check is ok, and every item with any crnn_* attribute has all of them, valid."""
    con = sqlite3.connect(str(env.db), timeout=30)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    full = {store.EMBEDDING, store.GENRE, store.GENRE_PROB, store.MODEL, store.MTIME, store.STAMP}
    full |= {store.prob_field(g) for g in model.genres}
    for item_id, values in crnn_rows(env.db).items():
        assert set(values) == full, f"item {item_id} has a partial analysis: {sorted(values)}"
        vec = store.decode_vector(values[store.EMBEDDING], model.architecture["gru_units"])
        assert np.all(np.isfinite(vec))
        assert values[store.MODEL] == model.model_id
        assert values[store.GENRE] in model.genres
        probs = [float(values[store.prob_field(g)]) for g in model.genres]
        assert all(0 <= p <= 1 for p in probs) and math.isfinite(float(values[store.MTIME]))


def lines_naming(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


def popen_beet(env, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "beets", *map(str, args)], env=env.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)


def wait_for(predicate, proc, limit=90.0, step=0.02):
    """Poll until predicate() is true; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"beet ended ({proc.returncode}) before the expected state:\n{out}\n{err}")
        time.sleep(step)
    proc.kill()
    raise AssertionError("timed out waiting for beet to reach the expected state")


def add_many(env, paths, artists):
    """Add files in one library session (env.add opens the library once per file)."""
    from beets.library import Item

    lib = env.library()
    ids = []
    for i, (path, artist) in enumerate(zip(paths, artists)):
        item = Item.from_path(os.fsencode(path))
        item.artist, item.title, item.album = artist, f"track {i}", "Album"
        lib.add(item)
        ids.append(item.id)
    lib._close()
    return ids


def preembed(env, model, item_id, vec, mtime=None):
    """Store an analysis through the project's own storage code (mtime: the file's, so it counts as current)."""
    lib = env.library()
    item = lib.get_item(item_id)
    if mtime is None:
        mtime = os.stat(item.path).st_mtime
    probs = np.full(len(model.genres), 0.25, np.float32)
    item.update(store.fields_for(vec, probs, model.genres, model.model_id, mtime, time.time()))
    item.store()
    lib._close()


def unit(rng, dim):
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def make_env(tmp_path, tiny_model, crnn_extra="", top_extra=""):
    env = BeetsEnv(tmp_path, tiny_model.weights.parent, crnn_extra)
    if top_extra:
        with open(env.root / "config.yaml", "a") as f:
            f.write(top_extra)
    return env


def no_traceback(proc_or_text):
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr + proc_or_text.stdout
    assert "Traceback" not in text, text


# ---- bad audio ----


def test_bad_and_odd_audio_in_one_batch(tmp_path, tiny_model):
    """Odd but decodable files are embedded; each broken one is one line, keeps nothing, and the batch goes on.

    One file hangs: a FIFO nobody writes to blocks its reader forever inside libsndfile, like a file on
    a stalled network share. crnn.timeout stops it; the stuck thread neither stalls the other files nor
    keeps the command from exiting.
    """
    env = make_env(tmp_path, tiny_model, "  timeout: 5\n  workers: 2\n")
    m = env.music
    good = {
        "silence.wav": write(m / "silence.wav", 10.0, kind="silence"),
        "clip.wav": write(m / "clip.wav", 0.5),
        "rate8k.wav": write(m / "rate8k.wav", 6.0, sr=8000),
        "rate96k.flac": write(m / "rate96k.flac", 6.0, sr=96000, kind="beat"),
        "six.wav": write(m / "six.wav", 6.0, sr=48000, channels=6),
        "Ünïcødé – 日本語 ♫.flac": write(m / "Ünïcødé – 日本語 ♫.flac", 5.0, seed=3),
        # A file name at the usual 255-byte limit.
        ("L" * 251 + ".wav"): write(m / ("L" * 251 + ".wav"), 4.0, seed=4),
    }
    # Not valid UTF-8 (a Latin-1 name from an old system): beets keeps paths as bytes.
    latin1 = os.fsencode(m) + b"/caf\xe9.wav"
    sf.write(latin1, make_signal(4.0, 22050, seed=5), 22050)
    good["caf"] = latin1
    # Truncated mid-stream: the header promises 60 s, the data stops after about half.
    full = write(m / "src.mp3", 60.0, seed=6)
    data = full.read_bytes()
    (m / "cut.mp3").write_bytes(data[: len(data) // 2])
    full.unlink()
    good["cut.mp3"] = m / "cut.mp3"

    # Each broken file is imported while it is fine, then broken: beets itself cannot import a broken file.
    rng = np.random.default_rng(0)
    bad = {
        "zero.mp3": ("empty file", lambda p: p.write_bytes(b"")),
        "noise.mp3": ("cannot decode", lambda p: p.write_bytes(rng.bytes(64 << 10))),
        "noise.wav": ("cannot decode", lambda p: p.write_bytes(rng.bytes(64 << 10))),
        "headonly.flac": ("cannot decode", lambda p: p.write_bytes(p.read_bytes()[:2000])),  # cut in the 1st frame
        "gone.flac": ("file not found", lambda p: p.unlink()),
        # Analysed once, then replaced by garbage: its old analysis no longer describes the file.
        "was_good.wav": ("cannot decode", lambda p: p.write_bytes(rng.bytes(32 << 10))),
    }
    if os.geteuid() != 0:  # root reads anything: there is no unreadable file to make
        bad["locked.wav"] = ("permission denied", lambda p: os.chmod(p, 0))
    bad["x.wav"] = ("decoding took longer than 5 s", lambda p: (p.unlink(), os.mkfifo(p)))
    if has_ffmpeg():  # formats libsndfile cannot read go through ffmpeg
        good["ok.m4a"] = write(m / "ok.m4a", 4.0, seed=8)
        bad["cut.m4a"] = ("cannot decode", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    for i, name in enumerate(bad):
        write(m / name, 30.0 if name == "headonly.flac" else 3.0, seed=10 + i)
    if "cut.m4a" in bad:  # with its index at the end, as ffmpeg writes it by default
        assert b"moov" in (m / "cut.m4a").read_bytes()[(m / "cut.m4a").stat().st_size // 2:]

    names = list(good) + list(bad)
    paths = [good[n] if n in good else m / n for n in names]
    ids = dict(zip(names, add_many(env, paths, [f"A{i:02d}" for i in range(len(names))])))
    preembed(env, tiny_model, ids["was_good.wav"], unit(rng, tiny_model.architecture["gru_units"]))
    for name, (_, breaker) in bad.items():
        breaker(m / name)

    t = time.monotonic()
    proc = env.run("crnnembed", check=False, timeout=120)
    took = time.monotonic() - t
    no_traceback(proc)
    err = proc.stderr
    assert proc.returncode == 1, err
    assert f"embedded {len(good)}, up to date 0, failed {len(bad)}" in err, err
    assert f"error: {len(bad)} file(s) could not be analysed" in err

    got = embedded_ids(env.db)
    for name in good:
        assert ids[name] in got, f"{name} was not embedded:\n{err}"
    for name, (reason, _) in bad.items():
        lines = lines_naming(err, str(m / name))
        assert len(lines) == 1, (name, err)
        assert reason in lines[0], (name, lines[0])
        assert ids[name] not in crnn_rows(env.db), f"{name} kept an analysis"
    assert "removed its analysis of an earlier version" in lines_naming(err, "was_good.wav")[0]
    # The truncated file is analysed over what decodes, and says so in one line.
    cut = lines_naming(err, "cut.mp3")
    assert len(cut) == 1 and "truncated" in cut[0], err
    for name, path in good.items():  # no other decodable file has a line of its own
        if name not in ("cut.mp3", "caf"):
            assert not lines_naming(err, str(path)), (name, err)
    assert_db_sound(env, tiny_model)
    assert took < 60, took  # the thread stuck on the FIFO does not keep the process alive


@pytest.mark.skipif(not has_ffmpeg(), reason="ffmpeg is not installed")
def test_ffmpeg_decoder_is_killed_at_the_time_limit(tmp_path):
    """Formats read through ffmpeg: a run over the limit is killed (no ffmpeg left behind) and reported."""
    from beetsplug.crnn import audio
    from beetsplug.crnn.errors import AudioError

    path = write(tmp_path / "x.m4a", 3.0)
    assert audio.AudioFile(path, timeout=60).windows(1)[0].shape == (audio.WINDOW_SAMPLES,)
    f = audio.AudioFile(path, timeout=0.001)  # ffmpeg cannot even start in a millisecond
    with pytest.raises(AudioError, match=r"x\.m4a: decoding took longer than 0\.001 s"):
        f.windows(1)
    assert f._proc is None
    f = audio.AudioFile(path, timeout=60)
    f.abort()  # what the pipeline does when the file's time is up
    with pytest.raises(AudioError, match="decoding was stopped"):
        f.windows(1)


def test_decode_all_is_the_one_pool_loop_for_embedding_and_library_training(tmp_path):
    """pipeline.decode_all: results in job order, one line per failure (ours, or over the time limit),
    numpy's BLAS on one thread inside the workers, and excerpts.decode runs on it too."""
    import threading

    from threadpoolctl import threadpool_info

    from beetsplug.crnn import pipeline

    from beetsplug.crnn.training import dataset, excerpts
    from beetsplug.crnn.errors import AudioError

    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    release = threading.Event()
    seen = []

    def work(task):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        if task.key == 1:
            raise AudioError(f"{task.path}: not audio")
        if task.key == 2:
            release.wait(5)  # runs over the limit
        return task.key * 10

    jobs = [(k, tmp_path / f"{k}.wav") for k in range(4)]
    out = [(t.key, t.value, err) for t, err in pipeline.decode_all(jobs, work, workers=2, timeout=0.5)]
    release.set()
    assert [k for k, _, _ in out] == [0, 1, 2, 3]
    assert out[0][1:] == (0, None) and out[3][1:] == (30, None)
    assert out[1][2].endswith("1.wav: not audio")
    assert out[2][2].endswith("2.wav: decoding took longer than 0.5 s")
    assert all(n == 1 for row in seen for n in row)
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas  # restored after

    good = write(tmp_path / "good.wav", 3.0)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    records = [dataset.Record(good, "rock", "train", "a", "lib"),
               dataset.Record(bad, "rock", "train", "b", "lib")]
    errors = []
    ready = excerpts.decode(records, excerpts.ExcerptCache(tmp_path / "cache"), workers=2, on_error=errors.append)
    assert [r.path for r in ready] == [good]
    assert len(errors) == 1 and "bad.wav" in errors[0]


def _rss_of_beet(env, *args) -> tuple[int, subprocess.CompletedProcess]:
    """Peak resident memory (bytes) of one `beet` run, measured on that process alone."""
    probe = (
        "import json, resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode, p.stdout, p.stderr]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "beets", *args], env=env.env(),
                         capture_output=True, text=True, timeout=300, check=True)
    kib, rc, stdout, stderr = json.loads(out.stdout)
    return kib * 1024, subprocess.CompletedProcess(args, rc, stdout, stderr)


def test_one_hour_file_stays_within_memory(tmp_path, tiny_model):
    """Only the analysis windows are decoded: an hour of audio costs no more memory than a few seconds."""
    env = make_env(tmp_path, tiny_model)
    short = env.add(write(env.music / "short.wav", 5.0))
    hour = env.music / "hour.flac"
    sr, block = 8000, 8000 * 60
    with sf.SoundFile(hour, "w", sr, 1, format="FLAC", subtype="PCM_16") as f:
        minute = make_signal(60.0, sr, kind="tonal")[:block]
        for i in range(60):
            f.write(np.roll(minute, 997 * i))
    assert sf.info(hour).duration == pytest.approx(3600, abs=1)

    base_rss, proc = _rss_of_beet(env, "crnnembed")
    assert proc.returncode == 0, proc.stderr
    hour_id = env.add(hour)
    t = time.monotonic()
    rss, proc = _rss_of_beet(env, "crnnembed")
    took = time.monotonic() - t
    assert proc.returncode == 0, proc.stderr
    assert "embedded 1, up to date 1, failed 0" in proc.stderr
    assert embedded_ids(env.db) == {short, hour_id}
    assert rss < 1.5 * 2**30, f"peak RSS {rss / 2**20:.0f} MiB"
    # Decoding the whole hour would hold >300 MB of 22 kHz float samples; the windows are ~8 MB.
    assert rss - base_rss < 150 * 2**20, f"{base_rss / 2**20:.0f} -> {rss / 2**20:.0f} MiB"
    assert took < 120, took


# ---- interruption ----


def _gated_library(tmp_path, tiny_model, n=12, gate_at=8):
    """n short tracks in a known order (by artist); track `gate_at` is a FIFO, so the run stalls there
    with exactly the tracks before it stored: an interruption is sure to land half-way."""
    env = make_env(tmp_path, tiny_model, "  timeout: 120\n  workers: 2\n  batch_size: 1\n  windows: 1\n")
    paths = [write(env.music / f"t{i:02d}.wav", 2.0, seed=i) for i in range(n)]
    ids = add_many(env, paths, [f"A{i:02d}" for i in range(n)])
    gate = paths[gate_at]
    gate.unlink()
    os.mkfifo(gate)
    return env, ids, gate


def _ungate(gate):
    gate.unlink()
    write(gate, 2.0, seed=99)


def test_sigkill_and_sigint_halfway_then_rerun(tmp_path, tiny_model):
    n, gate_at = 10, 6
    env, ids, gate = _gated_library(tmp_path, tiny_model, n, gate_at)

    # SIGKILL while items are being written.
    proc = popen_beet(env, "crnnembed")
    wait_for(lambda: len(embedded_ids(env.db)) >= gate_at // 2, proc)
    proc.kill()
    proc.wait(30)
    assert_db_sound(env, tiny_model)
    killed_at = len(embedded_ids(env.db))
    assert gate_at // 2 <= killed_at <= gate_at
    if killed_at == gate_at:
        # The kill landed after the last track before the gate: forget that track's analysis, so that the next
        # run has one to store before it stalls. Otherwise the wait below would already be satisfied, and the
        # SIGINT could reach the process while it starts up (beets ends quietly with status 0 then).
        lib = env.library()
        item = lib.get_item(ids[gate_at - 1])
        for key in [k for k in item.keys() if k.startswith("crnn_")]:
            del item[key]
        item.store()
        lib._close()
        killed_at -= 1

    # SIGINT: a short message, non-zero exit, no traceback; returns although a decoder thread is stuck on the FIFO.
    proc = popen_beet(env, "crnnembed")
    wait_for(lambda: len(embedded_ids(env.db)) == gate_at, proc)
    time.sleep(0.3)  # now blocked on the gate
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"crnnembed did not stop within 30 s of SIGINT:\n{out}\n{err}")
    assert time.monotonic() - t < 15
    no_traceback(err + out)
    assert proc.returncode == 1, err
    assert f"interrupted: embedded {gate_at - killed_at} of {n - killed_at}" in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert_db_sound(env, tiny_model)
    assert embedded_ids(env.db) == set(ids[:gate_at])

    # The rerun does only what is missing.
    _ungate(gate)
    proc = env.run("crnnembed")
    assert f"embedded {n - gate_at}, up to date {gate_at}, failed 0" in proc.stderr
    assert embedded_ids(env.db) == set(ids)
    assert_db_sound(env, tiny_model)


def test_ctrl_c_in_the_middle_of_a_store_is_held_until_the_item_is_saved(tmp_path, tiny_model, monkeypatch):
    """beets commits whatever ran when an exception passes through its transaction, so a Ctrl-C between two
    attribute writes would save half an item. crnnembed holds SIGINT for the length of a store: here the
    signal arrives right after the first write, and the item still ends up whole, then the interrupt comes."""
    from beets.dbcore import db

    from beetsplug.crnn.commands.embed import _sigint_held

    env = make_env(tmp_path, tiny_model)
    item_id = env.add(write(env.music / "x.wav", 1.0))
    lib = env.library()
    item = lib.get_item(item_id)
    item.update(store.fields_for(np.eye(tiny_model.architecture["gru_units"])[0], np.full(4, 0.25), GENRES,
                                 tiny_model.model_id, os.stat(item.path).st_mtime, time.time()))
    real_mutate, writes = db.Transaction.mutate, []

    def mutate(tx, statement, subvals=()):
        result = real_mutate(tx, statement, subvals)
        writes.append(statement)
        if len(writes) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the first of several writes
        return result

    monkeypatch.setattr(db.Transaction, "mutate", mutate)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even in a background suite
    try:
        with pytest.raises(KeyboardInterrupt):
            with _sigint_held():
                item.store()
    finally:
        signal.signal(signal.SIGINT, before)
    monkeypatch.undo()
    lib._close()
    assert len(writes) > 1
    assert_db_sound(env, tiny_model)
    assert embedded_ids(env.db) == {item_id}


# ---- concurrency ----


def test_similar_while_crnnembed_writes(tmp_path, tiny_model):
    """`beet similar` runs while crnnembed stores tracks: no crash or lock error, and every answer is the
    exact answer for some moment of the run (the pre-embedded tracks plus a prefix of the new ones)."""
    dim = tiny_model.architecture["gru_units"]
    env = make_env(tmp_path, tiny_model, "  batch_size: 1\n  windows: 1\n  workers: 2\n")
    rng = np.random.default_rng(1)
    n_pre, n_new = 6, 40
    pre_paths = [write(env.music / f"p{i}.wav", 1.0, seed=100 + i) for i in range(n_pre)]
    new_paths = [write(env.music / f"n{i:03d}.wav", 1.0, kind="beat" if i % 2 else "tonal", seed=i)
                 for i in range(n_new)]
    pre_ids = add_many(env, pre_paths, [f"P{i}" for i in range(n_pre)])
    new_ids = add_many(env, new_paths, [f"N{i:03d}" for i in range(n_new)])
    for item_id in pre_ids:
        preembed(env, tiny_model, item_id, unit(rng, dim))
    seed = pre_ids[0]

    embed = popen_beet(env, "crnnembed")
    wait_for(lambda: len(embedded_ids(env.db)) > n_pre, embed)
    answers = []
    while embed.poll() is None:
        before = len(embedded_ids(env.db)) - n_pre
        if before == n_new:
            break
        proc = env.run("similar", f"id:{seed}", "-n", "5", "--mode", "cosine", "-f", "$id", check=False)
        answers.append((before, proc))
    out, err = embed.communicate()
    assert embed.returncode == 0, err
    assert any(before < n_new for before, _ in answers), "no similar ran while crnnembed was writing"

    vectors = {i: store.decode_vector(v[store.EMBEDDING]) for i, v in crnn_rows(env.db).items()}
    assert len(vectors) == n_pre + n_new
    cos = {i: float(v @ vectors[seed]) for i, v in vectors.items() if i != seed}
    for before, proc in answers:
        no_traceback(proc)
        assert proc.returncode == 0, proc.stderr
        assert "locked" not in proc.stderr
        got = [int(x) for x in proc.stdout.split()]
        assert len(got) == 5 and len(set(got)) == 5 and seed not in got
        # Some prefix p (at least what was stored when it started) explains the answer exactly.
        assert any(_is_top(got, set(pre_ids[1:]) | set(new_ids[:p]), cos) for p in range(before, n_new + 1)), got


def _is_top(got, pool, cos, tol=1e-4):
    if not set(got) <= pool:
        return False
    scores = [cos[i] for i in got]
    if any(b > a + tol for a, b in zip(scores, scores[1:])):
        return False
    rest = [cos[i] for i in pool - set(got)]
    return not rest or max(rest) <= scores[-1] + tol


def test_locked_database_is_a_clear_error(tmp_path, tiny_model):
    """Another program holds the write lock longer than beets' timeout: one line, non-zero exit, no
    half-written item, and the next run finishes the job."""
    env = make_env(tmp_path, tiny_model, top_extra="timeout: 0.5\n")
    add_many(env, [write(env.music / f"t{i}.wav", 2.0, seed=i) for i in range(3)], ["A", "B", "C"])
    holder = sqlite3.connect(str(env.db), timeout=30)
    holder.execute("BEGIN IMMEDIATE")  # the write lock; readers still read
    try:
        proc = env.run("crnnembed", check=False, timeout=120)
    finally:
        holder.rollback()
        holder.close()
    no_traceback(proc)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "database" in errors[0] and "run beet crnnembed again" in errors[0], proc.stderr
    assert_db_sound(env, tiny_model)
    assert embedded_ids(env.db) == set()


# ---- corrupt state ----


def test_corrupt_index_files_are_rebuilt(tmp_path, tiny_model):
    env = make_env(tmp_path, tiny_model)
    dim = tiny_model.architecture["gru_units"]
    rng = np.random.default_rng(2)
    ids = add_many(env, [write(env.music / f"t{i}.wav", 0.5, seed=i) for i in range(8)], [f"A{i}" for i in range(8)])
    for item_id in ids:
        preembed(env, tiny_model, item_id, unit(rng, dim))
    first = env.run("similar", f"id:{ids[0]}", "-n", "3", "--mode", "cosine", "-f", "$id")
    expected = first.stdout.split()
    assert len(expected) == 3
    index = env.root / "crnn_index.npz"
    trees = [p for p in env.root.glob("crnn_index.*.ann")]  # the track index (crnn_index_albums.* is the album one)
    assert index.is_file() and len(trees) == 1

    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])  # truncated
    proc = env.run("similar", f"id:{ids[0]}", "-n", "3", "--mode", "cosine", "-f", "$id")
    assert "unreadable" in proc.stderr and "rebuilding" in proc.stderr
    assert proc.stdout.split() == expected
    assert "rebuilding" not in env.run("similar", f"id:{ids[0]}", "-n", "1").stderr  # the rebuilt one is used

    trees = list(env.root.glob("crnn_index.*.ann"))  # the track index's trees, not the album index's
    assert len(trees) == 1
    with open(trees[0], "r+b") as f:
        f.truncate(trees[0].stat().st_size // 2)
    proc = env.run("similar", f"id:{ids[0]}", "-n", "3", "--mode", "cosine", "-f", "$id")
    assert "unreadable" in proc.stderr and "rebuilding" in proc.stderr
    assert proc.stdout.split() == expected


def test_garbage_embedding_is_reported_and_skipped(tmp_path, tiny_model):
    env = make_env(tmp_path, tiny_model)
    ids = add_many(env, [write(env.music / f"t{i}.wav", 2.0, seed=i) for i in range(5)], [f"A{i}" for i in range(5)])
    rng = np.random.default_rng(3)
    for item_id in ids:  # analysed and current
        preembed(env, tiny_model, item_id, unit(rng, tiny_model.architecture["gru_units"]))
    victim, other = ids[2], ids[0]
    # What a stray `beet modify` or a hand edit of the database leaves behind.
    env.run("modify", "-y", "-W", f"id:{victim}", f"{store.EMBEDDING}=not-base64!")
    con = sqlite3.connect(str(env.db))
    with con:
        con.execute("UPDATE item_attributes SET value = ? WHERE entity_id = ? AND key = ?",
                    (store.encode_vector(np.zeros(4)), ids[3], store.EMBEDDING))  # valid base64, wrong length
    con.close()
    victim_path = str(env.music / "t2.wav")

    proc = env.run("crnnindex")
    no_traceback(proc)
    lines = lines_naming(proc.stderr, victim_path)
    assert len(lines) == 1 and "unusable" in lines[0], proc.stderr
    assert len(lines_naming(proc.stderr, str(env.music / "t3.wav"))) == 1
    assert "indexed 3 tracks" in proc.stderr

    # As a candidate: skipped. As the only seed: reported, then a one-line error.
    proc = env.run("similar", f"id:{other}", "-n", "10", "-f", "$id")
    got = [int(x) for x in proc.stdout.split()]
    assert victim not in got and ids[3] not in got and sorted(got) == sorted([ids[1], ids[4]])
    proc = env.run("similar", f"id:{victim}", check=False)
    no_traceback(proc)
    assert proc.returncode == 1
    assert len(lines_naming(proc.stderr, victim_path)) == 1 and "unusable" in proc.stderr
    assert "run beet crnnembed" in proc.stderr
    # With a good seed alongside, the good one is used and the bad one is named.
    proc = env.run("similar", f"id:{victim}", ",", f"id:{other}", "-n", "2", "-f", "$id")
    assert len(lines_naming(proc.stderr, victim_path)) == 1 and len(proc.stdout.split()) == 2

    # crnnembed does not count a garbage embedding as up to date: it analyses the file again.
    proc = env.run("crnnembed")
    assert len(lines_naming(proc.stderr, victim_path)) == 1
    assert "embedded 2, up to date 3, failed 0" in proc.stderr
    assert_db_sound(env, tiny_model)


def _model_copy(tmp_path, tiny_model, name):
    folder = tmp_path / name
    shutil.copytree(tiny_model.weights.parent, folder)
    return folder, json.loads((folder / "crnn.json").read_text())


@pytest.mark.parametrize("damage", ["weights_changed", "card_genres_mismatch"])
def test_model_that_does_not_match_is_a_clear_error(tmp_path, tiny_model, damage):
    folder, card = _model_copy(tmp_path, tiny_model, "model")
    if damage == "weights_changed":
        weights = folder / card["weights"]
        data = bytearray(weights.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # same size, other bytes
        weights.write_bytes(bytes(data))
        expected = "does not match its card"
    else:  # (a changed architecture in the card is tested in test_model.py)
        card["genres"] = card["genres"] + ["jazz"]  # 5 labels for a 4-output layer
        expected = "do not fit the architecture"
    (folder / "crnn.json").write_text(json.dumps(card))
    (tmp_path / "lib").mkdir()
    env = BeetsEnv(tmp_path / "lib", folder)
    item_id = env.add(write(env.music / "x.wav", 2.0))
    proc = env.run("crnnembed", check=False)
    no_traceback(proc)
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if expected in line
    ], proc.stderr
    assert item_id not in crnn_rows(env.db)


# ---- bad arguments ----


@pytest.mark.parametrize(
    "args, message",
    [
        (["crnnembed", "--bogus"], "no such option"),
        (["crnnembed", "--windows", "0"], "--windows must be at least 1"),
        (["crnnembed", "-w", "-2"], "--workers must be at least 1"),
        (["crnnembed", "-w", "many"], "invalid integer"),
        (["crnnembed", "title:nothing-matches"], "no tracks match"),
        (["similar", "title:x", "-n", "-3"], "at least 1"),
        (["similar", "title:x", "--max-per-artist", "-1"], "at least 0"),
        (["similar", "title:x", "--m3u", "{music}/x.wav/list.m3u"], "cannot write playlist"),
        (["similar", "title:x", "--m3u", "{music}"], "cannot write playlist"),
        (["crnnindex", "--bogus"], "no such option"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, tiny_model, args, message):
    env = make_env(tmp_path, tiny_model)
    item_id = env.add(write(env.music / "x.wav", 0.5))
    other = env.add(write(env.music / "y.wav", 0.5))
    preembed(env, tiny_model, item_id, np.eye(tiny_model.architecture["gru_units"], dtype=np.float32)[0])
    preembed(env, tiny_model, other, np.eye(tiny_model.architecture["gru_units"], dtype=np.float32)[1])
    proc = env.run(*[a.format(music=env.music) for a in args], check=False)
    no_traceback(proc)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if message in line]) == 1
