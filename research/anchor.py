"""Anchor benchmark: public networks trained on the Million Song Dataset, frozen with a linear probe, and a
beets-crnn model, side by side, same clips, same protocol.

    nice -n 19 python research/anchor.py                          # every set in ../shared/data, the shipped model
    nice -n 19 python research/anchor.py --model DIR --json anchor.json
    nice -n 19 python research/anchor.py --model /tmp/smoke --limit 6 --clips-per-genre 1   # a quick dry run
    nice -n 19 python research/anchor.py --frozen msd,msd+tags    # without musicnn (not installed, or too slow)

Every labelled set under --data (a folder with metadata.csv; default ../shared/data) is used,
through beetsplug.crnn.training.dataset.read_records. Analysers (--frozen picks the frozen ones):

- musicnn MSD (Pons and Serra 2019), through beetsplug.crnn.training.teacher: per-3 s-window tags and
  200-d 'penultimate' embeddings, computed in a subprocess and cached (TeacherCache). A clip's
  embedding is the mean over its windows, L2-normalised. musicnn has no genre output for these
  sets, so its genres come from a probe: softmax regression on the standardised clip embeddings,
  fitted on the train + val clips only (L2 strength chosen on val log-loss, then refitted on
  train + val). Test clips never reach a probe.
- MSD CRNN (Choi, Fazekas, Sandler and Cho 2017; beetsplug.crnn.msd, the released weights in
  ../shared/pretrained or $BEETS_CRNN_MSD_WEIGHTS), frozen (finetune.Frozen through its
  FeatureCache): its 32-d gru2 state and 50 tags on the 2 served windows of its own front end
  (12 kHz). A clip's embedding is the mean of the unit states, L2-normalised; genres from the
  same probe. 'msd+tags': the same network, its probe reading [state, mean of the 50 tag
  logits]; its cosine rows use the state, so they repeat MSD CRNN's.
- ours: the model analysed exactly like `beet crnnembed` (robustness.analyse_file: the plugin's
  windows, log-mels, the CRNN with the plugin's batch size and precision, pooling); its own
  genre outputs, no probe.

Rows, per set X (clips of genres the model does not know are left out of both columns):
- X test, accuracy / macro-F1: top genre among X's genres (the model knows); macro-F1 of the
  top-genre decisions, and classification_report's macro-F1 (each genre column thresholded at
  0.5: sigmoid outputs for ours, softmax probabilities for the probe, so the two columns are not
  like for like there; the top-genre one is);
- X test, p@5: of each clip's 5 nearest clips by other artists, the fraction with its genre
  (metrics.precision_at_k): the frozen networks by cosine, ours genre-aware (the plugin's
  default), then all by cosine;
- versions (one set, --versions-set; the first --clips-per-genre test clips per genre): each
  clip as 'flac44-loud', 'mp3-128k-quiet', 'vorbis48' (augment.make_version); robustness.summarise
  over the original + 3 versions: same-clip neighbours (k = 3), all 4 files share the top genre
  (frozen networks: the X probe), 5th percentile of cosine to the original;
- cross-set: X test scored by a probe fitted on Y's train + val only (genres X and Y share);
  ours only where its card says it was not trained on X (evaluate.training_sources), else n/a. And X test scored by a probe
  fitted on all sets' train + val (the union of genres; top genre among X's): the probe that
  matches a model trained on all sets; ours repeats its X test numbers there;
- time: wall seconds per clip, steady (start-up left out) and start-up, where measured.

Caches: musicnn outputs of train/val clips are read from (and, if missing, written to)
--teacher-cache (default .cache/teacher, where training keeps them); test clips, versions and
their musicnn outputs go to --cache (default .cache/anchor), the MSD CRNN's outputs of every
file to --cache/msd (about 120 KB a file: FeatureCache keeps the stem output too). A second run
computes no output of a frozen network and reports their timing from when it was computed.
Ours is always recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' helpers

from _common import ROOT, machine, table  # noqa: E402
from _anchor_probe import (Caches, clip_embedding, fit_probe, msd_features, rate, read_times, restrict,  # noqa: E402
                           runner_command)

VERSIONS = ("flac44-loud", "mp3-128k-quiet", "vorbis48")
FROZEN = {"musicnn": "musicnn MSD", "msd": "MSD CRNN", "msd+tags": "MSD CRNN + tags"}  # --frozen: key -> column
MSD_WINDOWS = 2  # the windows the plugin serves
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def plugin_default(key, fallback):
    """A crnn config default as the plugin declares it."""
    try:
        from beetsplug.crnn import CrnnPlugin

        return CrnnPlugin().config[key].get()
    except Exception:
        return fallback


# ---- inputs ----


def find_sets(data: Path) -> list[Path]:
    if not data.is_dir():
        return []
    return sorted(p for p in data.iterdir() if (p / "metadata.csv").is_file())


def limit_records(records, n):
    """At most ``n`` records per split, taken round-robin over genres in manifest order (all genres early)."""
    if not n:
        return list(records)
    out = []
    for split in ("train", "val", "test"):
        by_genre: dict = {}
        for r in records:
            if r.split == split:
                by_genre.setdefault(r.genre, []).append(r)
        queues = [list(v) for _, v in sorted(by_genre.items())]
        taken = []
        while len(taken) < n and any(queues):
            for q in queues:
                if q and len(taken) < n:
                    taken.append(q.pop(0))
        keep = set(map(id, taken))
        out.extend(r for r in records if id(r) in keep)
    return out


def resolve_model(arg):
    from beetsplug.crnn.model import CARD_NAME, ModelCard

    folder = Path(arg) if arg else ROOT / "model_weights"
    if not arg and not (folder / CARD_NAME).is_file():
        raise SystemExit(f"anchor: no model card in {folder}: pass --model DIR")
    try:
        return ModelCard.load(folder)
    except Exception as exc:
        raise SystemExit(f"anchor: cannot load the model in {folder}: {exc}")


# ---- the frozen networks ----


class Times:
    """An analyser's timings per group of files, kept in the cache folder so a run that computes nothing can still show them."""

    def __init__(self, cache_dir: Path, name: str):
        self.path = cache_dir / f"{name}-timing.json"
        try:
            self.saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.saved = {}
        self.now: dict = {}

    def record(self, group, times):
        if times:
            self.now[group] = dict(times, measured="this run")
            if times["clips"] >= 2 or group not in self.saved:
                self.saved[group] = dict(times, measured=time.strftime("%Y-%m-%d %H:%M"))
                self.path.write_text(json.dumps(self.saved, indent=2) + "\n")

    def get(self, group):
        if group in self.now:
            return self.now[group], True
        return self.saved.get(group), False

    def cell(self, group, key):
        """(a table cell, whether it was measured in an earlier run)."""
        t, now = self.get(group)
        if not t or t.get(key) is None:
            return ("cached" if not t else "n/a"), False
        return (float(t[key]), False) if now else (f"{t[key]:.2f}*", True)


def log_times(t):
    if t:
        steady = f"{t['steady_s_per_clip']:.2f} s/clip steady" if t["steady_s_per_clip"] is not None else "1 clip"
        log(f"  {t['clips']} files in {t['wall_s']:.1f} s ({steady})")


def musicnn_compute(paths, cache, lookup, group, times: Times):
    """musicnn outputs for the paths not yet in any cache, computed into ``cache`` and timed."""
    from beetsplug.crnn.training import teacher

    todo = [str(p) for p in dict.fromkeys(paths) if not lookup.has(p)]
    if not todo:
        log(f"musicnn, {group}: all {len(set(map(str, paths)))} cached")
        return
    log(f"musicnn, {group}: computing {len(todo)} files into {cache.folder}")
    with tempfile.TemporaryDirectory(prefix="anchor-times-") as tmp:
        tfile = Path(tmp) / "times.json"
        try:
            teacher.compute(todo, cache, log=lambda m: log(f"  musicnn: {m}"), runner=runner_command(tfile, cache.folder))
        except teacher.TeacherError as exc:
            raise SystemExit(f"anchor: {exc}")
        t = read_times(tfile)
    times.record(group, t)
    log_times(t)


class MsdOutputs:
    """The frozen MSD CRNN's clip features (msd_features) of each file, from a finetune.FeatureCache; what is
    missing is computed one file at a time (decode, front end, network, cache write) and timed."""

    def __init__(self, folder: Path, times: Times):
        from beetsplug.crnn.training.finetune import FeatureCache

        self.cache = FeatureCache(folder)
        if not self.cache.start.path.is_file():
            raise SystemExit(f"anchor: the MSD CRNN weights are not at {self.cache.start.path} (set "
                             f"BEETS_CRNN_MSD_WEIGHTS, or leave it out: --frozen musicnn)")
        self.times = times
        self.memo: dict = {}
        self.built = False

    def features(self, path):
        key = str(path)
        if key not in self.memo:
            entry = self.cache.load(key, MSD_WINDOWS)
            self.memo[key] = msd_features(entry) if entry is not None else None
        return self.memo[key]

    def compute(self, paths, group):
        todo = [p for p in dict.fromkeys(map(str, paths)) if self.features(p) is None]
        if not todo:
            log(f"MSD CRNN, {group}: all {len(set(map(str, paths)))} cached")
            return
        log(f"MSD CRNN, {group}: computing {len(todo)} files into {self.cache.folder}")
        warm, load_s = self.built, 0.0
        if not warm:
            t = time.perf_counter()
            self.cache.frozen  # builds the network; the first clip then traces it
            load_s, self.built = time.perf_counter() - t, True
        seconds = []
        for p in todo:

            def left_out(msg, path=p):  # fill's other lines count files: one at a time, they say nothing
                if msg.startswith("left out"):
                    log(f"  MSD CRNN: {path}: {msg}")

            t = time.perf_counter()
            got = self.cache.fill([(p, MSD_WINDOWS)], workers=1, log=left_out)
            if got:
                seconds.append(time.perf_counter() - t)
                self.memo[p] = msd_features(got[(p, MSD_WINDOWS)])
        t = rate(seconds, load_s=load_s, warm=warm)
        self.times.record(group, t)
        if t and t["startup_s"] is not None:
            self.times.record("start-up", t)
        log_times(t)


class Column:
    """A frozen network as a table column: per file (probe input, unit embedding) or None; genres from probes."""

    def __init__(self, key, features, times: Times, startup_group=None):
        self.key, self.title, self.features, self.times = key, FROZEN[key], features, times
        self.startup_group = startup_group  # None: start-up is in each test group's timing
        self.memo: dict = {}

    def get(self, path):
        key = str(path)
        if key not in self.memo:
            self.memo[key] = self.features(key)
        return self.memo[key]

    def arrays(self, paths):
        """(probe inputs, unit embeddings) of files that all have outputs."""
        pairs = [self.get(p) for p in paths]
        return np.array([x for x, _ in pairs]), np.array([e for _, e in pairs])


# ---- ours ----


class Ours:
    def __init__(self, card, windows, batch_size, precision):
        from beetsplug.crnn.model import Embedder

        t = time.perf_counter()
        self.embedder = Embedder(card, batch_size=batch_size, precision=precision)
        self.load_s = time.perf_counter() - t
        self.windows = windows
        self.first_s = None  # the first analysis (traces the inference function)
        self.memo: dict = {}

    def analyse(self, path):
        """(unit embedding, genre probs, wall s) or None when the file cannot be analysed."""
        from beetsplug.crnn.errors import CrnnError
        from beetsplug.crnn.training.robustness import analyse_file

        key = str(path)
        if key not in self.memo:
            t = time.perf_counter()
            try:
                e, p = analyse_file(path, self.embedder, self.windows)
            except CrnnError as exc:
                log(f"ours: {path}: left out: {exc}")
                self.memo[key] = None
                return None
            s = time.perf_counter() - t
            if self.first_s is None:
                self.first_s = s
                self.memo[key] = (e, p, None)  # not counted in the steady rate
            else:
                self.memo[key] = (e, p, s)
        return self.memo[key]


def steady(seconds):
    s = [x for x in seconds if x is not None]
    return float(np.mean(s)) if s else math.nan


# ---- scoring ----


def scores(y, P, labels):
    from beetsplug.crnn.training.metrics import classification_report, confusion_macro_f1

    rep = classification_report(y, P, labels)
    return {"accuracy": rep["accuracy"], "macro_f1_top": confusion_macro_f1(rep["confusion"]), "macro_f1_threshold": rep["macro"]["f1"],
            "n": rep["n"], "report": rep}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of labelled sets (default: ../shared/data)")
    p.add_argument("--model", default=None, help="beets-crnn model folder (default: this checkout's model_weights/)")
    p.add_argument("--frozen", default=",".join(FROZEN),
                   help=f"frozen networks with probes, comma-separated from {', '.join(FROZEN)}; 'none': ours alone "
                        "(default: all)")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "anchor"),
                   help="versions, musicnn outputs of test clips and versions, MSD CRNN outputs in msd/ "
                        "(default: .cache/anchor)")
    p.add_argument("--teacher-cache", default=str(ROOT / ".cache" / "teacher"),
                   help="musicnn outputs of train/val clips, shared with training (default: .cache/teacher)")
    p.add_argument("--versions-set", default="emotify", help="set whose test clips get codec versions ('none': skip)")
    p.add_argument("--clips-per-genre", type=int, default=5, help="versions of the first N test clips per genre")
    p.add_argument("--limit", type=int, default=0, help="development: at most N clips per set per split")
    p.add_argument("--k", type=int, default=5, help="neighbours for precision@k")
    p.add_argument("--windows", type=int, default=None, help="ours: analysis windows per track (default: the plugin's)")
    p.add_argument("--json", default=None, help="also write everything here")
    args = p.parse_args(argv)
    frozen = [] if args.frozen.strip().lower() == "none" else [k.strip() for k in args.frozen.split(",") if k.strip()]
    if unknown_keys := [k for k in frozen if k not in FROZEN]:
        raise SystemExit(f"anchor: --frozen {', '.join(unknown_keys)}: not one of {', '.join(FROZEN)}")

    from beetsplug.crnn.training import augment, dataset
    from beetsplug.crnn.training.evaluate import training_sources
    from beetsplug.crnn.training.metrics import precision_at_k
    from beetsplug.crnn.training.robustness import pick_clips, summarise
    from beetsplug.crnn.training.teacher import TeacherCache

    t_start = time.perf_counter()
    set_dirs = find_sets(Path(args.data))
    if not set_dirs:
        raise SystemExit(f"anchor: no labelled sets (folders with metadata.csv) under {args.data}")
    sets, genres = {}, {}
    for d in set_dirs:
        full = dataset.read_records(d)
        name = full[0].source if full else d.name
        sets[name] = limit_records(full, args.limit)
        genres[name] = sorted({r.genre for r in full})  # the set's genres, whatever --limit keeps
    card = resolve_model(args.model)
    trained_on = training_sources(card)
    windows = args.windows or int(plugin_default("windows", 2))
    batch_size = int(plugin_default("batch_size", 4))
    precision = str(plugin_default("precision", "auto"))
    log(f"sets: {', '.join(f'{k} ({len(v)} clips)' for k, v in sets.items())}; model {card.model_id} "
        f"(trained on {', '.join(sorted(trained_on)) or 'unknown'}); frozen: {', '.join(frozen) or 'none'}")

    cache = TeacherCache(args.cache)
    version_dir = cache.folder / "versions"

    # versions: made first so that one run of each frozen network covers them
    vset = None if args.versions_set.lower() == "none" else args.versions_set
    if vset and vset not in sets:
        raise SystemExit(f"anchor: --versions-set {vset}: no such set (have {', '.join(sets)})")
    vclips = []  # (record, [original, version files...])
    if vset:
        chosen = pick_clips([r for r in sets[vset] if r.split == "test" and r.genre in card.genres], args.clips_per_genre)
        log(f"versions of {len(chosen)} {vset} test clips: {', '.join(VERSIONS)}")
        for r in chosen:
            try:
                vclips.append((r, [Path(r.path)] + [augment.make_version(r.path, v, version_dir) for v in VERSIONS]))
            except Exception as exc:
                log(f"versions: {r.path}: left out: {exc}")

    # the frozen networks' outputs, by group: train+val, each set's test clips, the versions
    groups = [("train+val", [r.path for recs in sets.values() for r in recs if r.split != "test"])]
    groups += [(f"{name} test", [r.path for r in recs if r.split == "test"]) for name, recs in sets.items()]
    if vclips:
        groups.append((f"{vset} versions", [f for _, files in vclips for f in files[1:]]))
    cols = []
    if "musicnn" in frozen:  # train/val into the training cache, test and versions into ours
        tcache = TeacherCache(args.teacher_cache)
        lookup = Caches(tcache, cache)
        mtimes = Times(cache.folder, "musicnn")
        for group, paths in groups:
            musicnn_compute(paths, tcache if group == "train+val" else cache, lookup, group, mtimes)

        def musicnn_features(path):
            e = clip_embedding(lookup.get(path)) if lookup.has(path) else None
            return None if e is None else (e, e)

        cols.append(Column("musicnn", musicnn_features, mtimes))
    if {"msd", "msd+tags"} & set(frozen):
        msd = MsdOutputs(cache.folder / "msd", Times(cache.folder, "msd"))
        for group, paths in groups:
            msd.compute(paths, group)
        cols += [Column(key, lambda path, i=i: _pick(msd.features(path), i), msd.times, "start-up")
                 for key, i in (("msd", 0), ("msd+tags", 1)) if key in frozen]
    cols.sort(key=lambda c: frozen.index(c.key))
    for c in cols:
        missing = [str(r.path) for recs in sets.values() for r in recs if c.get(r.path) is None]
        if missing:
            log(f"{c.title}: no output for {len(missing)} files (left out): {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}")

    # probes: per frozen network, per set over its genres, and one over all sets
    def probe_for(c, records, labels, what):
        fit = {s: [r for r in records if r.split == s and c.get(r.path) is not None and r.genre in labels]
               for s in ("train", "val")}
        if not fit["train"] and not fit["val"]:
            raise SystemExit(f"anchor: no train/val clips with {c.title} outputs for the probe on {what}")
        X = {s: c.arrays([r.path for r in v])[0].reshape(len(v), -1) for s, v in fit.items()}
        y = {s: np.array([labels.index(r.genre) for r in v], np.int64) for s, v in fit.items()}
        probe, info = fit_probe(labels, X["train"], y["train"], X["val"], y["val"])
        log(f"{c.title}: probe on {what}: {len(labels)} genres, {info['train']} train + {info['val']} val clips, "
            f"L2 {info['l2']:g}, {info['method']}")
        return probe, info

    probes = {c.key: {name: probe_for(c, recs, genres[name], f"{name} train+val") for name, recs in sets.items()}
              for c in cols}
    union = sorted(set().union(*genres.values()))
    all_records = [r for recs in sets.values() for r in recs]
    probe_all = {c.key: probe_for(c, all_records, union, "all sets' train+val") for c in cols} if len(sets) > 1 else {}

    # ours
    log(f"ours: loading {card.model_id} (windows {windows}, batch size {batch_size}, precision {precision})")
    ours = Ours(card, windows, batch_size, precision)
    result = {"bench": "anchor", "machine": machine(), "args": vars(args), "model_id": card.model_id,
              "trained_on": sorted(trained_on), "ours_settings": {"windows": windows, "batch_size": batch_size,
                                                                "precision": ours.embedder.precision},
              "probes": {c.key: {name: info for name, (_, info) in probes[c.key].items()} for c in cols},
              "sets": {}, "cross": {}}
    for key, (_, info) in probe_all.items():
        result["probes"][key]["all"] = info
    keys = [c.key for c in cols]  # the frozen columns' keys, in table order
    blank = [""] * (len(cols) + 2)
    rows, notes = [], []
    ours_col = f"ours ({card.model_id})"
    test = {}
    for name, recs in sets.items():
        scored = [g for g in genres[name] if g in card.genres]
        tests = [r for r in recs if r.split == "test"]
        unknown = [r for r in tests if r.genre not in card.genres]
        log(f"ours: analysing {len(tests) - len(unknown)} {name} test clips")
        kept, E, P = [], [], []
        for r in tests:
            if r.genre not in card.genres:
                continue
            o = ours.analyse(r.path)
            if o is None or any(c.get(r.path) is None for c in cols):
                continue
            kept.append(r)
            E.append(o[0])
            P.append(o[1])
        if not kept:
            notes.append(f"{name}: no test clip analysed by every analyser; left out")
            continue
        E, P = np.array(E), np.array(P)
        X = {c.key: c.arrays([r.path for r in kept]) for c in cols}
        test[name] = (kept, E, P, X)
        y = np.array([scored.index(r.genre) for r in kept])
        g_of = [r.genre for r in kept]
        artists = [r.artist or str(r.path) for r in kept]
        m, pk = {}, {}
        for key, (F, M) in X.items():
            probs = probes[key][name][0].predict_proba(F)
            m[key] = scores(y, restrict(probs, [genres[name].index(g) for g in scored]), scored)
            pk[f"{key}_cosine"] = precision_at_k(M, probs, g_of, artists, k=args.k, mode="cosine")
            pk[f"{key}_genre_probe"] = precision_at_k(M, probs, g_of, artists, k=args.k, mode="genre")
        m["ours"] = scores(y, P[:, [card.genres.index(g) for g in scored]], scored)
        pk["ours_genre"] = precision_at_k(E, P, g_of, artists, k=args.k, mode="genre")
        pk["ours_cosine"] = precision_at_k(E, P, g_of, artists, k=args.k, mode="cosine")
        cos = [pk[f"{k}_cosine"] for k in keys]
        dropped = len(tests) - len(unknown) - len(kept)
        label = f"{name} test ({len(kept)} clips, {len(scored)} genres)"
        rows += [blank] if rows else []
        rows += [[f"{label}: accuracy", *(m[k]["accuracy"] for k in keys + ["ours"])],
                 [f"{name} test: macro-F1 (top genre)", *(m[k]["macro_f1_top"] for k in keys + ["ours"])],
                 [f"{name} test: macro-F1 (each genre >= 0.5)", *(m[k]["macro_f1_threshold"] for k in keys + ["ours"])],
                 [f"{name} test: p@{args.k} (frozen cosine, ours genre-aware)", *cos, pk["ours_genre"]],
                 [f"{name} test: p@{args.k} (all cosine)", *cos, pk["ours_cosine"]]]
        if unknown:
            notes.append(f"{name}: {len(unknown)} test clips of genres the model does not know left out of every column "
                         f"({', '.join(sorted({r.genre for r in unknown}))})")
        if dropped:
            notes.append(f"{name}: {dropped} test clips left out of every column (an analyser could not read them)")
        result["sets"][name] = {"clips": len(kept), "genres_scored": scored, "in_training": name in trained_on,
                                "left_out_unknown_genre": len(unknown), "left_out_unreadable": dropped,
                                **m, "precision_at_k": dict(pk, k=args.k),
                                "ours_seconds_per_clip": steady([ours.memo[str(r.path)][2] for r in kept])}

        if name == vset and vclips:
            log(f"ours: analysing {len(vclips)} x {len(VERSIONS)} versions")
            VE, VP, vkept = [], [], []
            for r, files in vclips:
                oa = [ours.analyse(f) for f in files]
                if any(x is None for x in oa) or any(c.get(f) is None for c in cols for f in files):
                    notes.append(f"versions: {r.path} left out (a version could not be analysed)")
                    continue
                vkept.append(files)
                VE.append([x[0] for x in oa])
                VP.append([x[1] for x in oa])
            if len(vkept) >= 2:
                names = ["original", *VERSIONS]
                sv = {}
                for c in cols:
                    probe = probes[c.key][name][0]
                    FM = [c.arrays(files) for files in vkept]
                    sv[c.key] = summarise(np.array([M for _, M in FM]), np.array([probe.predict_proba(F) for F, _ in FM]),
                                          names, [genres[name].index(g) for g in scored])
                sv["ours"] = summarise(np.array(VE), np.array(VP), names, [card.genres.index(g) for g in scored])
                vlabel = f"{name} versions ({len(vkept)} clips x 4 files)"
                k3 = sv["ours"]["k"]
                rows += [[f"{vlabel}: same-clip neighbours (k = {k3})", *(sv[k]["same_clip_neighbours"] for k in keys + ["ours"])],
                         [f"{name} versions: all 4 files same top genre", *(sv[k]["same_top_genre"] for k in keys + ["ours"])],
                         [f"{name} versions: 5th pct cosine to original", *(sv[k]["p5_cosine"] for k in keys + ["ours"])]]
                vsec = [ours.memo[str(f)][2] for _, files in vclips for f in files[1:] if ours.memo.get(str(f))]
                result["versions"] = {"set": name, "clips": len(vkept), "versions": list(VERSIONS), **sv,
                                      "ours_seconds_per_file": steady(vsec)}
            else:
                notes.append("versions: fewer than 2 clips with all versions analysed; no versions rows")

    # cross-set
    rows.append(blank)
    for x, (kept, E, P, X) in test.items():
        for ysrc in sets:
            if ysrc == x:
                continue
            shared = [g for g in genres[x] if g in genres[ysrc] and g in card.genres]
            label = f"{x} test, probe on {ysrc} only ({len(shared)} shared genres)"
            idx = [i for i, r in enumerate(kept) if r.genre in shared]
            if len(shared) < 2 or not idx:
                rows.append([label, *["n/a"] * len(cols), "n/a (< 2 genres)"])
                continue
            yy = np.array([shared.index(kept[i].genre) for i in idx])
            m = {k: scores(yy, restrict(probes[k][ysrc][0].predict_proba(X[k][0][idx]),
                                        [genres[ysrc].index(g) for g in shared]), shared) for k in keys}
            if x in trained_on or not trained_on:
                m["ours"] = None
                ocell = oc2 = f"n/a (trained on {x})" if trained_on else "n/a (card names no training sets)"
            else:
                m["ours"] = scores(yy, P[idx][:, [card.genres.index(g) for g in shared]], shared)
                ocell, oc2 = m["ours"]["accuracy"], m["ours"]["macro_f1_top"]
            rows += [[f"{label}: accuracy ({len(idx)} clip{'s' if len(idx) != 1 else ''})",
                      *(m[k]["accuracy"] for k in keys), ocell],
                     [f"{x} test, probe on {ysrc} only: macro-F1 (top genre)", *(m[k]["macro_f1_top"] for k in keys), oc2]]
            result["cross"][f"{x}<-{ysrc}"] = {"shared": shared, "clips": len(idx), **m}
        if probe_all:
            scored = [g for g in genres[x] if g in card.genres]
            y = np.array([scored.index(r.genre) for r in kept])
            m = {k: scores(y, restrict(probe_all[k][0].predict_proba(X[k][0]), [union.index(g) for g in scored]), scored)
                 for k in keys}
            o = result["sets"][x]["ours"]
            rows += [[f"{x} test, probe on all sets ({len(union)} genres): accuracy",
                      *(m[k]["accuracy"] for k in keys), o["accuracy"]],
                     [f"{x} test, probe on all sets: macro-F1 (top genre)", *(m[k]["macro_f1_top"] for k in keys),
                      o["macro_f1_top"]]]
            result["cross"][f"{x}<-all"] = {"labels": union, "clips": len(kept), **m}

    # time
    rows.append(blank)
    earlier = set()

    def tcells(key, group=None):
        """The frozen columns' cells for a group's timing (None: each column's start-up group)."""
        out = []
        for c in cols:
            cell, old = c.times.cell(group or c.startup_group or f"{first} test", key)
            out.append(cell)
            if old:
                earlier.add(str(c.times.path))
        return out

    first = next(iter(test), None)
    for name in test:
        rows.append([f"time: {name} test, s per clip (steady)", *tcells("steady_s_per_clip", f"{name} test"),
                     result["sets"][name]["ours_seconds_per_clip"]])
    if "versions" in result:
        rows.append([f"time: {vset} versions, s per file (steady)", *tcells("steady_s_per_clip", f"{vset} versions"),
                     result["versions"]["ours_seconds_per_file"]])
    if first:
        startup_ours = ours.load_s + (ours.first_s or 0.0) - (result["sets"][first]["ours_seconds_per_clip"] or 0.0)
        rows.append(["time: start-up s (musicnn: per worker run; others: model load + trace)",
                     *tcells("startup_s"), startup_ours])
        result["ours_startup_s"] = startup_ours
    result["frozen_times"] = {c.key: {"this_run": c.times.now, "saved": c.times.saved} for c in cols}

    result["wall_s"] = time.perf_counter() - t_start
    mc = result["machine"]
    print(f"anchor benchmark: sets {', '.join(f'{k} ({len(v)} clips)' for k, v in sets.items())}"
          f"{f' (--limit {args.limit} per split)' if args.limit else ''}; {mc['cores']} cores, nice {mc['nice']}, "
          f"load {mc['loadavg_1m']}")
    print(f"ours: {card.model_id}, trained on {', '.join(sorted(trained_on)) or 'unknown sets'}; "
          f"{windows} windows, batch {batch_size}, {ours.embedder.precision}")
    for c in cols:
        print(f"{c.title} genres: probe " + "; ".join(f"{n}: L2 {i['l2']:g} on {i['train']}+{i['val']} train+val clips"
                                                      for n, i in result["probes"][c.key].items()))
    print()
    print(table(rows, ["", *(c.title for c in cols), ours_col]))
    print()
    if cols:
        notes.append(f"{', '.join(c.title for c in cols)}: frozen; genres from a softmax probe on the clip embeddings "
                     "fitted on train+val only; ours are the model's own outputs; top genre among the scored set's genres")
        notes.append("macro-F1 (each genre >= 0.5) thresholds sigmoid outputs (ours) but softmax probabilities (probes): "
                     "compare the top-genre rows")
    if "msd+tags" in keys:
        notes.append("MSD CRNN + tags: the probe reads [32-d state, mean of the 50 tag logits]; its cosine rows use "
                     "the state, as MSD CRNN's")
    if probe_all:
        notes.append("probe on all sets: ours repeats its own X test numbers (a model trained on all sets is the "
                     "like-for-like); probe on Y only: ours only where the model was not trained on X")
    notes.append("5th pct cosine: each analyser's own embedding space, not comparable in scale; same-clip neighbours is")
    notes.append(f"time: one clip at a time; musicnn (1 TF thread) runs every 3 s window of the clip, MSD CRNN "
                 f"{MSD_WINDOWS} windows of 29 s (and writes its cache), ours {windows} windows of "
                 f"{card.front.window_samples / card.front.sample_rate:.0f} s (TF default threads); other load on the "
                 "machine counts")
    if earlier:
        notes.append(f"* measured in an earlier run, when those outputs were computed (kept in {', '.join(sorted(earlier))})")
    for n in notes:
        print(f"- {n}")
    print(f"total {result['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        log(f"wrote {args.json}")


def _pick(pair, i):
    """(probe input, unit embedding) from msd_features' (state, [state, tag logits]): the state is the embedding."""
    return None if pair is None else (pair[i], pair[0])


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    main()
