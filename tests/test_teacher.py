"""The musicnn teacher: cached targets computed once, a clear message when the extra is missing, crop
targets, and a distillation run that learns the teacher (through a fake teacher; the real one is optional)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from audiogen import write
from beetsplug.crnn.training import dataset, teacher, train
from beetsplug.crnn.audio import HOP_LENGTH, SAMPLE_RATE, WINDOW_FRAMES
from conftest import ROOT

FAKE_TEACHER = textwrap.dedent(
    """\
    import json, os, sys
    import numpy as np
    from beetsplug.crnn.training.teacher import TeacherCache

    counter, cache_dir = sys.argv[1], sys.argv[2]
    paths = json.loads(sys.stdin.read())
    with open(counter, "a") as f:
        f.write(json.dumps(paths) + "\\n")
    cache = TeacherCache(cache_dir)
    rng = np.random.default_rng(len(paths))
    for p in paths:
        if os.path.basename(p).startswith("bad"):
            print(f"error {p}: teacher could not analyse it: boom", flush=True)
            continue
        if os.path.basename(p).startswith("slow"):  # hangs until it is stopped, after saying so
            open(p + ".started", "w").close()
            import time; time.sleep(120)
        cache.put(p, rng.random((3, 50)), rng.standard_normal((3, 200)), 2.992, 9.0)
        print("ok " + p, flush=True)
    if os.environ.get("FAKE_TEACHER_EXIT"):
        print("something went wrong\\nfatal: out of memory", file=sys.stderr)
        sys.exit(int(os.environ["FAKE_TEACHER_EXIT"]))
    """
)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(runner command, counter file) for a fake teacher; check_installed counts its calls instead of checking."""
    script = tmp_path / "fake_teacher.py"
    script.write_text(FAKE_TEACHER)
    counter = tmp_path / "calls.txt"
    checks = []
    monkeypatch.setattr(teacher, "check_installed", lambda: checks.append(1))
    cache = teacher.TeacherCache(tmp_path / "tcache")
    return cache, (lambda: [sys.executable, str(script), str(counter), str(cache.folder)]), counter, checks


def _calls(counter):
    return [json.loads(line) for line in counter.read_text().splitlines()] if counter.exists() else []


def test_compute_runs_once_and_reuses_the_cache(tmp_path, fake):
    cache, runner, counter, checks = fake
    paths = [write(tmp_path / f"c{i}.wav", 0.2, seed=i) for i in range(3)]
    lines = []
    assert teacher.compute(paths + [paths[0]], cache, log=lines.append, runner=runner()) == 3
    assert _calls(counter) == [[str(p) for p in paths]]  # one run, each file once
    assert checks == [1]
    assert lines[-1] == "teacher targets computed for 3 of 3 files"
    for p in paths:
        e = cache.get(p)
        assert e["tags"].shape == (3, 50) and e["emb"].shape == (3, 200) and e["tags"].dtype == np.float32
        assert e["hop"] == pytest.approx(2.992) and e["seconds"] == 9.0

    # Everything cached: no subprocess, no installation check.
    assert teacher.compute(paths, cache, log=lines.append, runner=runner()) == 0
    assert len(_calls(counter)) == 1 and checks == [1]

    # A changed file is recomputed alone.
    write(paths[1], 0.3, seed=7)
    os.utime(paths[1], (2_000_000_000, 2_000_000_000))
    assert not cache.has(paths[1])
    assert teacher.compute(paths, cache, log=lines.append, runner=runner()) == 1
    assert _calls(counter)[-1] == [str(paths[1])]


def test_compute_reports_bad_files_and_a_failed_teacher(tmp_path, fake, monkeypatch):
    cache, runner, counter, _ = fake
    good, bad = write(tmp_path / "good.wav", 0.2), write(tmp_path / "bad.wav", 0.2, seed=1)
    lines = []
    assert teacher.compute([good, bad], cache, log=lines.append, runner=runner()) == 1
    assert f"{bad}: teacher could not analyse it: boom" in lines
    assert lines[-1] == "teacher targets computed for 1 of 2 files"
    assert cache.has(good) and not cache.has(bad)

    monkeypatch.setenv("FAKE_TEACHER_EXIT", "3")
    with pytest.raises(teacher.TeacherError, match=r"stopped \(exit 3\): fatal: out of memory"):
        teacher.compute([bad], cache, log=lines.append, runner=runner())


# ---- the optional extra ----

TEACHER_MODULES = ("musicnn", "tf_keras", "librosa")  # what teacher.check_installed looks for


def _hiding(real, hidden, teacher_modules):
    """A find_spec that answers None for ``hidden`` and, for the teacher's other modules where they are not
    installed, a stand-in spec: check_installed then names exactly ``hidden``, whatever this machine has
    (a fresh one has neither musicnn nor tf_keras). Anything else is found as usual."""
    import importlib.machinery

    def find_spec(name, *args, **kwargs):
        if name in hidden:
            return None
        spec = real(name, *args, **kwargs)
        if spec is None and name in teacher_modules:
            return importlib.machinery.ModuleSpec(name, None)
        return spec

    return find_spec


def hiding_prelude(*hidden) -> str:
    """``_hiding`` as source to run first in a child process (``python -c``)."""
    return (inspect.getsource(_hiding) + "import importlib.util\n"
            f"importlib.util.find_spec = _hiding(importlib.util.find_spec, {hidden!r}, {TEACHER_MODULES!r})\n")


def _hide(monkeypatch, *names):
    monkeypatch.setattr(importlib.util, "find_spec", _hiding(importlib.util.find_spec, names, TEACHER_MODULES))


def test_missing_extra_is_named(monkeypatch):
    _hide(monkeypatch, "musicnn")
    with pytest.raises(teacher.TeacherError) as err:
        teacher.check_installed()
    msg = str(err.value)
    assert "pip install" in msg and "musicnn" in msg and "\n" not in msg
    assert msg.startswith("the musicnn teacher needs musicnn:")
    monkeypatch.undo()
    _hide(monkeypatch, "tf_keras")
    with pytest.raises(teacher.TeacherError, match=r"needs tf_keras: .*pip install --no-deps tf-keras"):
        teacher.check_installed()
    monkeypatch.undo()
    _hide(monkeypatch, *TEACHER_MODULES)  # the list above is the teacher's: all three are named, in its order
    with pytest.raises(teacher.TeacherError, match="needs musicnn and tf_keras and librosa: "):
        teacher.check_installed()
    monkeypatch.undo()
    _hide(monkeypatch)  # nothing hidden: the stand-ins make the check pass on any machine
    teacher.check_installed()


def _manifest_only(root):
    """A labelled set's manifest (no audio: the teacher check comes before any file is read)."""
    root.mkdir(parents=True)
    (root / "metadata.csv").write_text("path,genre,split\na.wav,rock,train\nb.wav,pop,val\n")
    return root


def test_cli_without_the_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    data = _manifest_only(tmp_path / "data")
    _hide(monkeypatch, "musicnn")
    assert train.main([str(data), "--teacher", "musicnn", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("crnn-train: the musicnn teacher needs musicnn") and "pip install" in err
    assert "\n" not in err and not (tmp_path / "m").exists()


def test_cli_entry_point_without_the_extra(tmp_path):
    """`python -m beetsplug.crnn.training.train DATA --teacher musicnn` with musicnn unimportable: exit 1, one line."""
    data = _manifest_only(tmp_path / "data")
    hide = ("import runpy, sys; sys.modules['musicnn'] = None; "  # find_spec() then answers None
            "sys.argv = ['crnn-train'] + sys.argv[1:]; "
            "runpy.run_module('beetsplug.crnn.training.train', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide, str(data), "--teacher", "musicnn", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crnn-train: ")
    assert "musicnn" in lines[0] and "pip install" in lines[0]


# ---- crop targets ----

def _entry(n, hop=2.992, seconds=None):
    tags = np.repeat(np.arange(n, dtype=np.float32)[:, None], 50, axis=1)  # window i: tags all i
    emb = np.repeat(np.arange(n, dtype=np.float32)[:, None], 200, axis=1) * -1
    return {"tags": tags, "emb": emb, "hop": hop, "seconds": n * hop if seconds is None else seconds}


def test_crop_targets_average_windows_centred_in_the_crop():
    crop_s = WINDOW_FRAMES * HOP_LENGTH / SAMPLE_RATE  # 31.7 s
    e = _entry(20)  # 59.8 s: window i centred at (i + 0.5) * 2.992 s
    tags, emb = teacher.crop_targets(e, 0, WINDOW_FRAMES)
    # [0, 31.7 s] holds the centres of windows 0..10 (window 10 at 31.4 s, window 11 at 34.4 s).
    assert tags.shape == (50,) and emb.shape == (200,)
    assert np.all(tags == np.mean(np.arange(11))) and np.all(emb == -np.mean(np.arange(11)))
    # Starting 430 frames (9.98 s) in: [9.98, 41.7 s] holds windows 3 (10.5 s) .. 13 (40.4 s).
    start = 430
    assert 9.5 < start * HOP_LENGTH / SAMPLE_RATE < 10.4
    tags, _ = teacher.crop_targets(e, start, WINDOW_FRAMES)
    assert np.all(tags == np.mean(np.arange(3, 14)))
    # The rule, for every start: the mean over windows whose centre lies inside the crop.
    centres = (np.arange(20) + 0.5) * 2.992
    for start in range(0, 1200, 97):
        t0 = start * HOP_LENGTH / SAMPLE_RATE
        inside = np.flatnonzero((centres >= t0) & (centres <= t0 + crop_s))
        assert teacher.crop_targets(e, start, WINDOW_FRAMES)[0][0] == pytest.approx(inside.mean())


def test_crop_targets_of_a_short_clip_is_the_whole_clip_mean():
    e = _entry(3, seconds=9.0)  # a 9 s clip, looped to fill the 31.7 s crop
    tags, emb = teacher.crop_targets(e, 0, WINDOW_FRAMES)
    assert np.all(tags == 1.0) and np.all(emb == -1.0)
    one = _entry(1, seconds=2.5)  # shorter than one teacher window (the worker loops it to one)
    assert np.all(teacher.crop_targets(one, 0, WINDOW_FRAMES)[0] == 0.0)
    # A crop with no window centred in it (targets cover less than the clip) takes the nearest window.
    odd = _entry(3, seconds=100.0)
    assert np.all(teacher.crop_targets(odd, 1000, WINDOW_FRAMES)[0] == 2.0)


# ---- distillation ----

def _tiny_dataset(root):
    """Two sound kinds as two genres (as in test_model.py), short clips."""
    rows = ["path,genre,artist,split"]
    for g, kind in (("calm", "tonal"), ("busy", "beat")):
        for i, split in enumerate(("train", "train", "train", "val", "test")):
            write(root / g / f"{g}{i}.wav", 3.0, kind=kind, seed=i)
            rows.append(f"{g}/{g}{i}.wav,{g},{g} artist {i},{split}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _fake_targets(kind):
    """What a teacher would say: 'beat' clips score high on the first 10 tags; embeddings point two ways."""
    tags = np.full((1, 50), 0.1, np.float32)
    emb = np.zeros((1, 200), np.float32)
    if kind == "beat":
        tags[:, :10] = 0.9
        emb[:, :100] = 1.0
    else:
        emb[:, 100:] = 1.0
    return tags, emb


def test_distillation_learns_the_teacher(tmp_path, monkeypatch):
    data = _tiny_dataset(tmp_path / "data")
    records = dataset.read_sources([data])
    tcache = teacher.TeacherCache(tmp_path / "teacher")
    for r in records:
        if r.split == "train":
            tags, emb = _fake_targets("beat" if r.genre == "busy" else "tonal")
            tcache.put(r.path, tags, emb, 2.992, 3.0)

    def compute(paths, cache, log=print, runner=None):
        assert all(cache.has(p) for p in paths), "the trainer asked for targets of a clip outside the fit set"
        return 0

    monkeypatch.setattr(teacher, "compute", compute)
    monkeypatch.setattr(teacher, "tag_names", lambda: [f"tag{i}" for i in range(50)])
    lines = []
    trainer = train.Trainer(records, tmp_path / "mels", log=lines.append, teacher="musicnn", teacher_dir=tcache.folder)
    assert all(e is not None for e in trainer.teacher) and len(trainer.teacher) == 6

    x, targets = trainer.epoch_data(np.random.default_rng(0), 1, 0.0)
    assert targets["tags"].shape == (6, 100) and np.all(targets["tags"][:, 50:] == 1.0)  # [tags | has]
    assert targets["teacher_emb"].shape == (6, 201) and np.all(targets["teacher_emb"][:, -1] == 1.0)

    full, arch, info = trainer.fit(epochs=6, patience=10, crops_per_clip=4, batch_size=4, lr=3e-3, seed=0,
                                   architecture={"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.0},
                                   teacher_target="both")
    hist = info["history"]
    assert len(hist) == 6
    assert {"loss", "genres_loss", "tags_loss", "teacher_emb_loss"} <= set(hist[0])
    assert hist[-1]["tags_loss"] < hist[0]["tags_loss"], [h["tags_loss"] for h in hist]
    assert hist[-1]["teacher_emb_loss"] < hist[0]["teacher_emb_loss"], [h["teacher_emb_loss"] for h in hist]
    assert info["tags"] == [f"tag{i}" for i in range(50)]
    assert info["losses"] == {"genres": "masked_bce", "tags": "masked_bce", "teacher_emb": "teacher_emb_loss"}
    assert len(full.outputs) == 3 and full.outputs[2].shape[-1] == 50  # the tag head ships; the projection does not


@pytest.mark.parametrize("target, head", [("tags", "tags_loss"), ("emb", "teacher_emb_loss")])
def test_one_teacher_target_trains(tmp_path, monkeypatch, target, head):
    """--teacher-target tags or emb: only that teacher loss is fitted (both used to be fed to one head)."""
    data = _tiny_dataset(tmp_path / "data")
    records = dataset.read_sources([data])
    tcache = teacher.TeacherCache(tmp_path / "teacher")
    for r in records:
        if r.split == "train":
            tcache.put(r.path, *_fake_targets("beat" if r.genre == "busy" else "tonal"), 2.992, 3.0)
    monkeypatch.setattr(teacher, "compute", lambda paths, cache, log=print, runner=None: 0)
    monkeypatch.setattr(teacher, "tag_names", lambda: [f"tag{i}" for i in range(50)])
    trainer = train.Trainer(records, tmp_path / "mels", log=lambda m: None, teacher="musicnn", teacher_dir=tcache.folder)
    full, _, info = trainer.fit(epochs=2, patience=10, crops_per_clip=2, batch_size=4, lr=3e-3, seed=0,
                                architecture={"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.0},
                                teacher_target=target)
    other = {"tags_loss", "teacher_emb_loss"} - {head}
    assert head in info["history"][0] and not other & set(info["history"][0])
    assert len(full.outputs) == (3 if target == "tags" else 2)  # the tag head ships only when it was trained


# ---- the real teacher (optional) ----

@pytest.mark.slow
def test_real_musicnn_teacher(tmp_path):
    if importlib.util.find_spec("musicnn") is None or importlib.util.find_spec("tf_keras") is None:
        pytest.skip("the optional musicnn teacher (musicnn, tf_keras) is not installed")
    clip = write(tmp_path / "clip.wav", 5.0, kind="beat", seed=1)
    cache = teacher.TeacherCache(tmp_path / "teacher")
    lines = []
    assert teacher.compute([clip], cache, log=lines.append) == 1, lines
    e = cache.get(clip)
    n = len(e["tags"])
    assert n >= 1 and e["tags"].shape == (n, 50) and e["emb"].shape == (n, 200)
    assert np.all(np.isfinite(e["tags"])) and np.all(np.isfinite(e["emb"]))
    assert e["tags"].min() >= 0.0 and e["tags"].max() <= 1.0
    assert e["hop"] == pytest.approx(2.992) and e["seconds"] == pytest.approx(5.0, abs=0.01)
    assert len(teacher.tag_names()) == 50
    assert teacher.compute([clip], cache, log=lines.append) == 0


def test_ctrl_c_stops_the_teacher_and_keeps_what_it_finished(tmp_path, fake):
    """Ctrl-C while the teacher runs: one line saying what is kept, no traceback, no teacher left running."""
    import signal
    import threading
    import time

    cache, runner, counter, _ = fake
    done, slow = write(tmp_path / "done.wav", 0.2), write(tmp_path / "slow.wav", 0.2, seed=1)
    started = tmp_path / "slow.wav.started"

    def ctrl_c():
        for _ in range(600):
            if started.exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    # A shell starts background jobs with SIGINT ignored; Ctrl-C at a terminal raises KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c, daemon=True).start()
        t = time.time()
        with pytest.raises(teacher.TeacherError, match=r"^interrupted while computing teacher targets: 1 of 2 "
                           r"files are done and cached; run the command again for the rest$"):
            teacher.compute([done, slow], cache, runner=runner())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.time() - t < 60  # the teacher was stopped, not waited for
    assert cache.has(done) and not cache.has(slow)
    assert not list(cache.folder.glob("*.tmp.npz"))
