"""Several labelled sets: per-source label masks, the masked loss, and test clips that never reach training."""

from __future__ import annotations

import csv
import json
import zlib

import numpy as np
import pytest
import soundfile as sf

from audiogen import has_ffmpeg, signal, write
from beetsplug.crnn import audio, model
from beetsplug.crnn.training import dataset, fit, losses, sampling, train
from beetsplug.crnn.errors import CrnnError

# ---- the masked genre loss ----

Y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
P = np.array([[0.8, 0.3, 0.6], [0.4, 0.7, 0.2], [0.9, 0.9, 0.05]], np.float32)
MASK = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], np.float32)  # clip 2: a source that labels none of these


def _by_hand():
    """Per clip: the mean BCE over its masked-in genres, written out term by term."""
    ln = np.log
    clip0 = -(ln(0.8) + ln(1 - 0.3)) / 2  # genres 0 (label 1) and 1 (label 0); genre 2 masked out
    clip1 = -(ln(1 - 0.4) + ln(0.7) + ln(1 - 0.2)) / 3
    clip2 = 0.0
    return np.array([clip0, clip1, clip2])


def test_masked_bce_by_hand():
    from keras import ops

    got = ops.convert_to_numpy(losses.masked_bce(np.concatenate([Y, MASK], axis=1), P))
    np.testing.assert_allclose(got, _by_hand(), rtol=1e-5)
    # The numpy twin used for validation gives the batch mean Keras reports.
    assert losses._bce(Y, P, MASK) == pytest.approx(float(np.mean(_by_hand())), rel=1e-5)
    assert losses._bce(Y, P, MASK) == pytest.approx(float(np.mean(got)), rel=1e-5)
    # Unmasked: the plain mean over every cell.
    assert losses._bce(Y, P) == pytest.approx(float(np.mean(-(Y * np.log(P) + (1 - Y) * np.log(1 - P)))), rel=1e-5)
    assert losses._bce(Y, P, np.ones_like(Y)) == pytest.approx(losses._bce(Y, P), rel=1e-5)


def test_clip_without_labels_contributes_nothing():
    from keras import ops

    wrong = np.array([[1e-9, 1 - 1e-9, 1 - 1e-9]], np.float32)  # as wrong as can be, clipped to 1e-7
    loss = ops.convert_to_numpy(losses.masked_bce(np.concatenate([Y[:1], np.zeros((1, 3), np.float32)], axis=1), wrong))
    assert loss.tolist() == [0.0]
    assert losses._bce(Y[:1], wrong, np.zeros((1, 3), np.float32)) == 0.0
    # Adding an unlabelled clip to a batch only changes the mean's denominator.
    two = losses._bce(Y[:2], P[:2], MASK[:2])
    assert losses._bce(Y, P, MASK) == pytest.approx(two * 2 / 3, rel=1e-6)


def test_teacher_emb_loss_is_one_minus_cosine_and_masked():
    from keras import ops

    t = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0]], np.float32)
    p = np.array([[3, 0, 0], [1, 0, 0], [5, 5, 5]], np.float32)
    has = np.array([[1], [1], [0]], np.float32)
    got = ops.convert_to_numpy(losses.teacher_emb_loss(np.concatenate([t, has], axis=1), p))
    np.testing.assert_allclose(got, [0.0, 1.0, 0.0], atol=1e-6)


def test_pair_loss_by_hand():
    """NT-Xent: each row's partner (2j <-> 2j + 1) against every other row of the batch, at temperature 0.1."""
    from keras import ops

    z = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], np.float32)  # unit rows
    partner = [1, 0, 3, 2]
    want = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        logits = np.array([z[i] @ z[j] / losses.PAIR_TEMPERATURE for j in others])
        want.append(-(logits[others.index(partner[i])] - np.log(np.exp(logits).sum())))
    got = ops.convert_to_numpy(losses.pair_loss(np.zeros((4, 1), np.float32), 3 * z))  # the length does not count
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # Partners that are each other's nearest row cost less than partners that are not.
    swapped = z[[0, 2, 1, 3]]
    assert float(np.mean(got)) < float(np.mean(ops.convert_to_numpy(losses.pair_loss(np.zeros((4, 1)), swapped))))


# ---- several labelled sets ----

def _labelled_set(root, genres, with_audio=True, seconds=1.0):
    """A set with, per genre, two train clips, one val clip and one test clip."""
    rows = ["path,genre,artist,split"]
    for gi, g in enumerate(genres):
        for i, split in enumerate(("train", "train", "val", "test")):
            rel = f"{g}/{root.name}-{g}{i}.wav"
            if with_audio:
                # A little noise of its own makes every clip's bytes unique: caches follow content.
                y = signal(seconds, kind="beat" if gi % 2 else "tonal", seed=10 * gi + i)
                y += 1e-3 * np.random.default_rng(zlib.crc32(rel.encode())).standard_normal(len(y)).astype(np.float32)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(root / rel), y, audio.SAMPLE_RATE)
            rows.append(f"{rel},{g},{root.name} {g} artist {i},{split}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def two_sets(tmp_path):
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"])
    b = _labelled_set(tmp_path / "setB", ["jazz", "blues", "rock"])
    return a, b


def test_read_sources_tags_each_record_with_its_set(two_sets, tmp_path):
    a, b = two_sets
    records = dataset.read_sources([a, b / "metadata.csv"])  # a folder or its manifest
    assert len(records) == 4 * 2 + 4 * 3
    assert {r.source for r in records if r.path.parent.parent == a} == {"setA"}
    assert {r.source for r in records if r.path.parent.parent == b} == {"setB"}
    assert dataset.label_sets(records) == {"setA": ["pop", "rock"], "setB": ["blues", "jazz", "rock"]}
    assert dataset.read_records(a)[0].source == "setA"
    # A genre-folder tree (no manifest) is named after its folder too.
    tree = tmp_path / "tree"
    write(tree / "metal" / "m.wav", 0.5)
    assert {r.source for r in dataset.read_sources([tree])} == {"tree"}

    other = _labelled_set(tmp_path / "elsewhere" / "setA", ["metal"], with_audio=False)
    with pytest.raises(CrnnError, match="both named 'setA'"):
        dataset.read_sources([a, other])


def test_trainer_masks_per_source_and_never_sees_test(two_sets, tmp_path):
    records = dataset.read_sources(two_sets)
    test = [r for r in records if r.split == "test"]
    assert {r.source for r in test} == {"setA", "setB"}
    lines = []
    unlabelled = sampling.unlabelled_records(_unlabelled_folder(tmp_path / "extra"))
    trainer = train.Trainer(records, tmp_path / "mels", log=lines.append, unlabelled=unlabelled)

    assert trainer.genres == ["blues", "jazz", "pop", "rock"]  # the union, sorted
    assert trainer.label_sets == {"setA": ["pop", "rock"], "setB": ["blues", "jazz", "rock"]}
    fit = trainer.train_records + trainer.unlabelled
    assert len(trainer.train_mels) == len(fit) == len(trainer.train_mask) == len(trainer.train_y) == 10 + 2
    expect = {"setA": [0, 0, 1, 1], "setB": [1, 1, 0, 1]}
    for r, mask, y in zip(fit, trainer.train_mask, trainer.train_y):
        if r.genre:
            assert mask.tolist() == expect[r.source], r
            assert trainer.genres[y] == r.genre
        else:  # unlabelled audio: no genre speaks for it
            assert mask.tolist() == [0, 0, 0, 0] and y == -1
    for r, mask in zip(trainer.val_records, trainer.val_mask):
        assert mask.tolist() == expect[r.source]

    # Test clips are not in any list the trainer fits or validates on, and were never even decoded.
    held = {r.path for r in trainer.train_records + trainer.val_records + trainer.unlabelled}
    assert not held & {r.path for r in test}
    assert {r.split for r in trainer.train_records} == {"train"} and {r.split for r in trainer.val_records} == {"val"}
    assert len(trainer.val_windows) == len(trainer.val_records) == 5
    for r in test:
        assert not trainer.cache._key(r.path).exists()
    for r in trainer.train_records + trainer.val_records:
        assert trainer.cache._key(r.path).exists()
    assert any("5 test clips left out of training" in line for line in lines)

    # An epoch's targets: mixup stays within one source, so every mask row is exactly one source's mask.
    x, targets = trainer.epoch_data(np.random.default_rng(0), 2, mixup=0.4)
    y, mask = targets["genres"][:, :4], targets["genres"][:, 4:]
    assert x.shape[1:] == (96, 1366, 1) and x.max() <= 0.0 and x.min() >= -80.0
    allowed = {tuple(v) for v in expect.values()} | {(0, 0, 0, 0)}
    assert {tuple(m) for m in mask.tolist()} <= allowed
    assert np.all((mask == 0) <= (y == 0))  # a label is never set where the mask is off
    assert mask.sum(1).tolist().count(0.0) == 2 * 2  # the two unlabelled clips, two crops each


def _unlabelled_folder(root):
    write(root / "a.wav", 1.0, kind="tonal", seed=99)
    write(root / "sub" / "b.flac", 1.0, kind="beat", seed=98)
    (root / "notes.txt").write_text("not audio")
    return root


def test_unlabelled_records(tmp_path):
    recs = sampling.unlabelled_records(_unlabelled_folder(tmp_path / "extra"))
    assert [r.path.name for r in recs] == ["a.wav", "b.flac"]
    assert all(r.genre == "" and r.split == "train" and r.source == "unlabelled:extra" for r in recs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrnnError, match="no audio files under"):
        sampling.unlabelled_records(tmp_path / "empty")


def test_cli_rejects_bad_choices_in_one_line(two_sets, tmp_path, capsys):
    a, _ = two_sets
    for extra, message in ((["--augment", "gain,wobble"], "unknown augmentation: wobble"),
                           (["--versions", "mp3-1k"], "unknown codec version: mp3-1k"),
                           (["--unlabelled", str(tmp_path)], "--unlabelled needs --teacher")):
        assert train.main([str(a), "--out", str(tmp_path / "m"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("crnn-train: ") and message in err and "\n" not in err
    assert not (tmp_path / "m").exists()


def test_annealed_lr_is_constant_then_falls_along_a_cosine_to_a_tenth():
    assert fit.annealed_lr(1e-3, 0.5, 0.0) == 1e-3  # off
    assert fit.annealed_lr(1e-3, 0.6, 1 / 3) == 1e-3  # before the last third
    assert fit.annealed_lr(1e-3, 1 - 1 / 6, 1 / 3) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down
    assert fit.annealed_lr(1e-3, 1.0, 1 / 3) == pytest.approx(1e-4)
    assert fit.annealed_lr(1e-3, 1.3, 1 / 3) == pytest.approx(1e-4)  # an epoch that starts past the budget
    rates = [fit.annealed_lr(1.0, d, 0.5) for d in np.linspace(0, 1, 21)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_fit_anneals_and_records_it(two_sets, tmp_path):
    trainer = train.Trainer(dataset.read_sources(two_sets), tmp_path / "mels", log=lambda m: None)
    _, _, info = trainer.fit(epochs=4, patience=10, batch_size=4, lr=1e-3, anneal=0.5,
                             architecture={"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.0})
    # epochs start at 0, 1/4, 1/2 and 3/4 of the budget: the last two lie in the annealed half
    assert [round(h["lr"], 7) for h in info["history"]] == [1e-3, 1e-3, 1e-3, round(1e-3 * (0.1 + 0.45), 7)]
    assert info["optimizer"]["anneal"] == 0.5
    assert train.main([str(two_sets[0]), "--out", str(tmp_path / "m"), "--anneal", "1.5"]) == 1


def test_short_crops_cut_short_clips_short_and_train_on_batches_of_one_length(tmp_path):
    """--short-crops: a clip that fits in FRAMES frames gives crops of FRAMES frames of its loop, any other
    clip whole windows; mixup pairs crops of one length; batches hold one length and keep pairs together;
    the model trains on both and is saved as the whole-window model crnnembed serves."""
    a = _labelled_set(tmp_path / "setA", ["rock", "pop"], seconds=1.0)  # 43 frames: fits in 96
    b = _labelled_set(tmp_path / "setB", ["jazz", "rock"], seconds=4.0)  # 170 frames: does not
    trainer = train.Trainer(dataset.read_sources([a, b]), tmp_path / "mels", log=lambda m: None)
    every = np.arange(len(trainer.train_samples))
    lengths = trainer.crop_lengths(every, 96)
    assert set(lengths[trainer.train_source == "setA"]) == {96}
    assert set(lengths[trainer.train_source == "setB"]) == {audio.WINDOW_FRAMES}
    assert set(trainer.crop_lengths(every)) == {audio.WINDOW_FRAMES}  # off: every crop a window
    # --short-share: about that share of the short clips' crops is short, the rest whole looped windows
    many = np.repeat(every, 200)
    mixed = trainer.crop_lengths(many, 96, 0.25, np.random.default_rng(0))
    from_a = trainer.train_source[many] == "setA"
    assert 0.2 < np.mean(mixed[from_a] == 96) < 0.3 and set(mixed[from_a]) == {96, audio.WINDOW_FRAMES}
    assert set(mixed[~from_a]) == {audio.WINDOW_FRAMES}

    x, targets = trainer.epoch_data(np.random.default_rng(0), 2, mixup=0.4, short_frames=96)
    assert isinstance(x, list) and len(x) == len(targets["genres"])
    assert {c.shape for c in x} == {(audio.N_MELS, 96, 1), (audio.N_MELS, audio.WINDOW_FRAMES, 1)}
    n_genres = len(trainer.genres)
    # a crop's length follows its clip's set (the mask: setA never labels jazz); mixup, within one set and
    # one length, would have failed on two lengths
    for c, y in zip(x, targets["genres"]):
        assert (c.shape[1] == 96) == (y[n_genres + trainer.genres.index("jazz")] == 0)

    crops = [np.full((2, n, 1), k, np.float32) for k, n in enumerate((5, 5, 7, 7, 5, 5, 7, 7, 5, 5))]
    ds = sampling.length_batches(crops, {"pair": np.arange(10.0)[:, None]}, 4, np.random.default_rng(0))
    got = [(xb.numpy(), yb["pair"].numpy()[:, 0].astype(int)) for xb, yb in ds]
    assert sorted(len(rows) for _, rows in got) == [2, 4, 4]
    for xb, rows in got:
        assert xb.shape[2] == {5: 5, 7: 7}[crops[rows[0]].shape[1]]  # one length per batch ...
        assert [xb[j, 0, 0, 0] for j in range(len(rows))] == list(rows)  # ... and the rows' own crops
        assert sorted(rows[0::2]) == sorted(rows[1::2] - 1)  # pairs (2j, 2j + 1) intact

    arch = ["--conv-filters", "4,4,4,4", "--gru-units", "4", "--epochs", "2", "--batch-size", "4"]
    assert train.main([str(a), str(b), "--out", str(tmp_path / "m"), "--short-crops", "96", *arch]) == 0
    card = json.loads((tmp_path / "m" / "crnn.json").read_text())
    assert card["training"]["short_crops"] == {"frames": 96, "share": 1.0, "clips": 4}
    assert len(card["training"]["history"]) == 2
    net = model.build_for(model.ModelCard.load(tmp_path / "m"))  # the served shape: whole windows
    net.load_weights(str(tmp_path / "m" / "crnn.weights.h5"))
    assert net.input.shape[2] == audio.WINDOW_FRAMES
    assert train.main([str(a), "--out", str(tmp_path / "m2"), "--short-crops", "50"]) == 1
    assert train.main([str(a), "--out", str(tmp_path / "m2"), "--short-crops", "96", "--short-share", "0"]) == 1


# ---- the real shared data ----

def test_shared_sources_keep_test_out_of_training(shared_data, tmp_path):
    gtzan = shared_data.parent / "gtzan"
    if not (gtzan / "metadata.csv").is_file():
        pytest.skip("../shared/data/gtzan is not present")
    records = dataset.read_sources([shared_data, gtzan])
    sets = dataset.label_sets(records)
    assert set(sets) == {"emotify", "gtzan"}
    assert set(sets["emotify"]) < set(sets["gtzan"]) | {"electronic"}
    assert "electronic" in sets["emotify"] and "electronic" not in sets["gtzan"]
    by_split = {s: [r for r in records if r.split == s] for s in dataset.SPLITS}
    assert all(by_split[s] for s in dataset.SPLITS)
    assert {r.source for r in by_split["test"]} == {"emotify", "gtzan"}

    # No recording is in two splits: emotify by file, gtzan by its clip id (a long clip and its excerpt
    # are one recording).
    with open(gtzan / "metadata.csv", newline="") as f:
        clip_splits = {}
        for row in csv.DictReader(f):
            clip_splits.setdefault(row["clip"], set()).add(row["split"])
    assert all(len(s) == 1 for s in clip_splits.values())
    emotify_test = {r.path for r in by_split["test"] if r.source == "emotify"}
    assert not emotify_test & {r.path for r in records if r.source == "emotify" and r.split != "test"}

    # The trainer on a small sample of both sets, test clips included in what it is given.
    sample = []
    for src in ("emotify", "gtzan"):
        for split, k in (("train", 2), ("val", 1), ("test", 2)):
            picked = [r for r in by_split[split] if r.source == src]
            if src == "gtzan":  # the short excerpts decode fastest
                picked = [r for r in picked if ".excerpt." in r.path.name] or picked
            sample += picked[:k]
    trainer = train.Trainer(sample, tmp_path / "mels", genres=sorted({r.genre for r in records}), log=lambda m: None)
    fit = trainer.train_records + trainer.val_records + trainer.unlabelled
    assert len(trainer.train_records) == 4 and len(trainer.val_records) == 2
    assert not {r.path for r in fit} & {r.path for r in by_split["test"]}
    assert all(not trainer.cache._key(r.path).exists() for r in sample if r.split == "test")
    # The trainer learns each set's genres from the train and val records it holds; on the full data those
    # are every genre the set labels (no genre of either set lives only in its test split).
    assert dataset.label_sets(by_split["train"] + by_split["val"]) == sets
    for r, mask in zip(trainer.train_records, trainer.train_mask):
        assert [g for g, m in zip(trainer.genres, mask) if m] == trainer.label_sets[r.source]
        assert set(trainer.label_sets[r.source]) <= set(sets[r.source])


def test_pairs_are_two_views_of_one_place_and_training_pulls_them_together(two_sets, tmp_path):
    """--pairs: rows 2j and 2j + 1 come from one clip at one offset (the clip as it is, then one of its
    codec versions), with the same targets; mixup keeps them together; a short run lowers the pair loss."""
    if not has_ffmpeg():
        pytest.skip("ffmpeg is needed for codec versions")
    records = dataset.read_sources(two_sets)
    try:
        trainer = train.Trainer(records, tmp_path / "mels", log=lambda m: None, versions=("mp3-64k",),
                                version_dir=tmp_path / "versions")
    except CrnnError as exc:
        pytest.skip(f"no codec versions here: {exc}")
    if not any(trainer.train_versions):
        pytest.skip("ffmpeg could not make codec versions")
    rng = np.random.default_rng(0)
    x, targets = trainer.epoch_data(rng, 2, mixup=0.0, pairs=True)
    n = 2 * len(trainer.epoch_picks(np.random.default_rng(0), 1))  # crops_per_clip counts both views
    assert len(x) == n and targets["pair"].shape == (n, 1)
    g = targets["genres"]
    np.testing.assert_array_equal(g[0::2], g[1::2])  # both views of a pair: one clip
    assert not np.array_equal(x[0::2], x[1::2])  # ... heard two ways (clean, then mp3 at -6 dB)
    x2, t2 = trainer.epoch_data(np.random.default_rng(1), 2, mixup=0.4, pairs=True)
    np.testing.assert_allclose(t2["genres"][0::2], t2["genres"][1::2])  # mixed with the same partner, same amount

    with pytest.raises(CrnnError, match="even --batch-size"):
        trainer.fit(epochs=1, batch_size=3, pair_weight=1.0,
                    architecture={"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.0})
    _, _, info = trainer.fit(epochs=6, patience=10, crops_per_clip=4, batch_size=4, lr=3e-3, seed=0, pair_weight=1.0,
                             architecture={"conv_filters": [4, 4, 4, 4], "gru_units": 4, "dropout": 0.0},
                             version_p=0.5)
    hist = [h["pair_loss"] for h in info["history"]]
    assert hist[-1] < hist[0], hist
