"""The training caches (log-mels, codec versions, teacher targets) follow a file's bytes: a data set
copied or provisioned again with new mtimes keeps them, and a changed file is analysed again."""

from __future__ import annotations

import os
import shutil

import numpy as np

from audiogen import write
from beetsplug.crnn.training import augment, dataset, teacher
from beetsplug.crnn.training.fileid import content_id


def test_a_copy_with_a_new_mtime_hits_every_cache_and_a_changed_file_misses(tmp_path):
    src = write(tmp_path / "a" / "clip.wav", 3.0, seed=1)
    copy = tmp_path / "b" / "clip.wav"
    copy.parent.mkdir()
    shutil.copyfile(src, copy)
    os.utime(copy, (2_000_000_000, 2_000_000_000))
    assert content_id(src) == content_id(copy)

    mels = dataset.MelCache(tmp_path / "mels")
    first, n = mels.get(src)
    (stored,) = list((tmp_path / "mels").glob("*.npz"))
    os.utime(stored, (1_000_000, 1_000_000))  # a recomputation would rewrite it
    again, n2 = mels.get(copy)
    assert n2 == n and np.array_equal(first, again)
    assert list((tmp_path / "mels").glob("*.npz")) == [stored] and stored.stat().st_mtime == 1_000_000

    assert augment.version_path(src, "mp3-64k", tmp_path / "v") == augment.version_path(copy, "mp3-64k", tmp_path / "v")
    tcache = teacher.TeacherCache(tmp_path / "t")
    tcache.put(src, np.zeros((1, 50)), np.zeros((1, 200)), 3.0, 3.0)
    assert tcache.has(copy)

    # Other bytes (same size, same path): a new key everywhere.
    write(copy, 3.0, seed=2)
    assert content_id(copy) != content_id(src)
    assert not tcache.has(copy)
    assert augment.version_path(src, "mp3-64k", tmp_path / "v") != augment.version_path(copy, "mp3-64k", tmp_path / "v")
    mels.get(copy)
    assert len(list((tmp_path / "mels").glob("*.npz"))) == 2
