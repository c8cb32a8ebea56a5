"""Benchmark `beet crnnembed` against its floors, on the same files in the same run.

    nice -n 19 python bench/embed.py                      # emotify clips if present, else generated
    nice -n 19 python bench/embed.py --source generated --tracks 200 --windows 1,2,3

For each windows-per-track value it measures, in this order (so drift in machine load hits all alike):

- floor 1, decode only: exactly the spans the windows need (audio.load_windows), on the
  same number of threads crnnembed decodes with;
- floor 2, decode + log-mel (pipeline.track_mels), no model;
- `beet crnnembed -f -q --windows W` as a fresh process on a temp beets library holding the
  files (wall, peak RSS), for each ``--runtime`` (onnx, keras) and ``--precision``: on 1 track
  (start-up: the time to the first stored track, imports and model load included), on a quarter
  of the tracks and on all of them (peak RSS must stay flat), and the steady rate without the
  fixed start-up cost;
- the model alone (the runtime's embedder on ready log-mels, windows/s), to show what bounds the rest.

Sources: `emotify` = the real one-minute clips in ../shared/data/emotify (mono 22,050 Hz MP3);
`generated` = 3-minute 44.1 kHz stereo MP3s (a few unique ones, copied to N files, cached in
.cache/bench-audio). The model is --model DIR, else the shipped one, else the paper's full
architecture with random weights built into a temp dir (speed does not depend on the weights).
Prints a table and one JSON line (the last line of output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _common import ROOT, SHARED_EMOTIFY, beet, machine, mib, print_json, table, write_config  # noqa: E402

GENRES = ["classical", "electronic", "pop", "rock"]


_LOG = None


def log(msg):
    global _LOG
    if _LOG is None:  # a copy of stderr: the floors silence fd 2 (libmpg123 prints its warnings there)
        _LOG = os.fdopen(os.dup(2), "w", buffering=1)
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=_LOG, flush=True)


@contextlib.contextmanager
def quiet_fd2():
    """Send C-level stderr (decoder warnings about damaged frames) to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---- inputs ----


def resolve_model(arg, tmp: Path):
    """(model dir, how it was chosen)."""
    from beetsplug.crnn.model import CARD_NAME, DEFAULT_ARCHITECTURE, build, default_weights_dir
    from beetsplug.crnn.training.card import save_model

    if arg:
        return Path(arg), f"--model {arg}"
    # This checkout's model_weights/ first: an installed copy of the plugin elsewhere must not stand in.
    for shipped in (ROOT / "model_weights", default_weights_dir()):
        if (shipped / CARD_NAME).is_file():
            return shipped, f"shipped model {shipped}"
    folder = tmp / "model"
    arch = DEFAULT_ARCHITECTURE
    net = build(len(GENRES), arch["conv_filters"], arch["gru_units"], arch["dropout"])
    card = save_model(net, folder, GENRES, arch,
                      {"training": {"note": "random weights made by bench/embed.py: speed does not depend on them"}},
                      name="bench-random")
    return folder, f"no shipped model: built the paper architecture (conv 68-137-137-137, GRU 68) with random weights ({card.model_id})"


def emotify_files():
    return sorted(p for p in SHARED_EMOTIFY.glob("*/*.mp3"))


def generated_files(n, seconds, sr, channels, unique, music: Path):
    """``unique`` generated tracks (cached), copied to ``n`` distinct files under ``music``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from audiogen import write

    cache = ROOT / ".cache" / "bench-audio" / f"{int(seconds)}s-{sr}hz-{channels}ch"
    cache.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(unique):
        path = cache / f"track{i:02d}.mp3"
        if not path.exists():
            log(f"  generating {path.name} ({seconds:.0f} s, {sr} Hz, {channels} ch)")
            tmp = path.with_name(f".{path.name}.tmp.mp3")
            write(tmp, seconds, sr=sr, kind=("tonal", "beat")[i % 2], seed=i, channels=channels)
            os.replace(tmp, path)
        sources.append(path)
    music.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dst = music / f"{i:05d}.mp3"
        shutil.copyfile(sources[i % unique], dst)
        out.append(dst)
    return out


def make_library(beetsdir: Path, model_dir: Path, files, batch_size=None):
    from beets.library import Item, Library

    db = write_config(beetsdir, model_dir, f"  batch_size: {batch_size}\n" if batch_size else "")
    with contextlib.redirect_stdout(io.StringIO()):  # beets prints a line per schema migration backup
        lib = Library(str(db), str(beetsdir / "lib"))
    for i, path in enumerate(files):
        item = Item.from_path(str(path))
        item.artist = item.artist or f"Artist {i % 50}"
        item.title = item.title or path.stem
        lib.add(item)
    lib._close()
    for leftover in beetsdir.glob("library.db-before-*.bak"):
        leftover.unlink()


# ---- floors ----


def timed_map(fn, files, workers):
    """(wall s, CPU s of this process, results): the benchmark process does nothing else meanwhile."""
    c, t = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench") as pool:
        out = list(pool.map(fn, files))
    return time.perf_counter() - t, time.process_time() - c, out


def floor_decode(files, windows, workers, front=None):
    from beetsplug.crnn import audio

    wall, cpu, out = timed_map(lambda p: len(audio.load_windows(p, windows, front=front)), files, workers)
    return wall, cpu, sum(out)


def floor_decode_mel(files, windows, workers, front=None):
    from beetsplug.crnn import audio, pipeline
    from beetsplug.crnn.features import LEVEL_FREE

    wall, cpu, out = timed_map(lambda p: len(pipeline.track_mels(p, windows, audio.DEFAULT_TIMEOUT,
                                                                 front=front or LEVEL_FREE)[0]), files, workers)
    return wall, cpu, sum(out)


def model_only(model_dir, n_windows, batch_size, runtime="onnx", precision="auto"):
    """Windows/s and CPU s per window of the CRNN alone on ready log-mels (the first batch not counted)."""
    from beetsplug.crnn.audio import N_MELS, WINDOW_FRAMES
    from beetsplug.crnn.model import ModelCard, embedder_for

    emb = embedder_for(ModelCard.load(model_dir), batch_size=batch_size, precision=precision, runtime=runtime)
    x = np.random.default_rng(0).normal(-30, 20, (batch_size, N_MELS, WINDOW_FRAMES)).astype(np.float32)  # both fronts: 96 x 1366
    emb(x)
    done, c, t = 0, time.process_time(), time.perf_counter()
    while done < n_windows:
        emb(x)
        done += len(x)
    return done / (time.perf_counter() - t), (time.process_time() - c) / done


# ---- crnnembed ----


def plugin_default(key, fallback):
    """A crnn config default as the plugin declares it."""
    try:
        from beetsplug.crnn import CrnnPlugin

        return CrnnPlugin().config[key].get()
    except Exception:
        return fallback


def embed_run(beetsdir, windows, query=()):
    r = beet(beetsdir, "crnnembed", "-f", "-q", "--windows", str(windows), *query).check()
    m = re.search(r"embedded (\d+), up to date (\d+), failed (\d+)", r.stderr)
    if not m:
        raise SystemExit(f"unexpected crnnembed output:\n{r.stderr[-3000:]}")
    done, failed = int(m.group(1)), int(m.group(3))
    if failed:
        raise SystemExit(f"crnnembed failed on {failed} files:\n{r.stderr[-3000:]}")
    return r, done


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["auto", "emotify", "generated"], default="auto",
                   help="auto: emotify clips when present, else generated 3-minute tracks")
    p.add_argument("--tracks", type=int, default=None, help="N (default: all 400 emotify clips, or 200 generated)")
    p.add_argument("--seconds", type=float, default=180.0, help="length of generated tracks")
    p.add_argument("--sr", type=int, default=44100, help="sample rate of generated tracks")
    p.add_argument("--channels", type=int, default=2, help="channels of generated tracks")
    p.add_argument("--unique", type=int, default=8, help="distinct generated tracks (copied to N files)")
    p.add_argument("--windows", default="1,2,3", help="comma-separated windows-per-track values to measure")
    p.add_argument("--model", default=None, help="model folder (default: shipped, else a random paper-size model)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads for the floors (0 = cores, as crnnembed)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="crnn.batch_size for crnnembed (default: the plugin's default)")
    p.add_argument("--runtime", default="onnx", help="comma-separated crnn.runtime values to measure (onnx, keras)")
    p.add_argument("--precision", default="auto",
                   help="crnn.precision for the keras runtime (auto, float32, bfloat16); onnx is always float32")
    p.add_argument("--quick", action="store_true", help="skip the quarter-size run (RSS flatness)")
    p.add_argument("--skip-model-only", action="store_true")
    args = p.parse_args(argv)

    from beetsplug.crnn import pipeline

    source = args.source
    if source == "auto":
        source = "emotify" if SHARED_EMOTIFY.is_dir() and emotify_files() else "generated"
    workers = args.workers or pipeline.default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="crnn-bench-embed-"))
    result = {"bench": "embed", "source": source, "machine": machine(), "workers": workers,
              "batch_size": args.batch_size or "default"}
    try:
        model_dir, model_note = resolve_model(args.model, tmp)
        log(model_note)
        from beetsplug.crnn.model import ModelCard

        card = ModelCard.load(model_dir)
        result.update(model=model_note, model_id=card.model_id, architecture=card.architecture)
        if source == "emotify":
            files = emotify_files()[: args.tracks or None]
            music = tmp / "music"
            music.mkdir()
            linked = []
            for i, f in enumerate(files):  # beets items need their own paths; symlinks keep the real bytes
                dst = music / f"{f.parent.name}-{f.name}"
                os.symlink(f, dst)
                linked.append(dst)
            files = linked
        else:
            files = generated_files(args.tracks or 200, args.seconds, args.sr, args.channels, args.unique, tmp / "music")
        n = len(files)
        import soundfile

        info = soundfile.info(str(files[0]))
        result.update(tracks=n, seconds=round(float(np.mean([soundfile.info(str(f)).duration for f in files])), 1),
                      sample_rate=info.samplerate, channels=info.channels)
        log(f"{n} tracks ({source}, ~{result['seconds']} s, {info.samplerate} Hz, {info.channels} ch); "
            f"{workers} decoding threads")
        beetsdir = tmp / "beets"
        make_library(beetsdir, model_dir, files, args.batch_size)
        for f in files:  # page cache warm for everyone
            Path(f).read_bytes()
        quarter = max(1, n // 4)
        with quiet_fd2():  # imports (scipy.fft, soxr), mel filters: paid once by crnnembed too, not per track
            floor_decode_mel(files[:1], 1, 1, card.front)
        per_windows = []
        runtimes = [x.strip() for x in args.runtime.split(",") if x.strip()]
        batch_line = f"  batch_size: {args.batch_size}\n" if args.batch_size else ""
        for w in [int(x) for x in args.windows.split(",") if x.strip()]:
            floor = {"windows": w}
            log(f"windows={w}: floor decode")
            with quiet_fd2():
                wall, cpu, nwin = floor_decode(files, w, workers, card.front)
            floor.update(decode_tps=n / wall, decode_cpu_per_track=cpu / n, windows_per_track=nwin / n)
            log(f"  {n / wall:.2f} tracks/s ({nwin} windows)")
            log(f"windows={w}: floor decode + log-mel")
            with quiet_fd2():
                wall, cpu, _ = floor_decode_mel(files, w, workers, card.front)
            floor.update(decode_mel_tps=n / wall, decode_mel_cpu_per_track=cpu / n)
            log(f"  {n / wall:.2f} tracks/s")
            for runtime in runtimes:
                precision = "float32" if runtime == "onnx" else args.precision
                row = dict(floor, runtime=runtime, precision=precision)
                write_config(beetsdir, model_dir, batch_line + f"  runtime: {runtime}\n  precision: {precision}\n")
                tag = f"windows={w} {runtime}/{precision}"
                log(f"{tag}: beet crnnembed on 1 track (start-up: time to the first stored track)")
                one, _ = embed_run(beetsdir, w, ["id:1"])
                row.update(embed1_wall_s=one.wall, embed1_cpu_s=one.cpu, embed1_rss_mib=mib(one.rss))
                log(f"  {one.wall:.2f} s")
                if not args.quick:
                    log(f"{tag}: beet crnnembed on {quarter} tracks")
                    r, done = embed_run(beetsdir, w, [f"id:1..{quarter}"])
                    assert done == quarter, done
                    row.update(embed_quarter_wall_s=r.wall, embed_quarter_rss_mib=mib(r.rss))
                log(f"{tag}: beet crnnembed on {n} tracks")
                r, done = embed_run(beetsdir, w)
                assert done == n, done
                row.update(embed_wall_s=r.wall, embed_rss_mib=mib(r.rss), embed_cpu_s=r.cpu,
                           embed_tps=n / r.wall,
                           embed_steady_tps=(n - 1) / max(r.wall - one.wall, 1e-9))
                row["ratio"] = row["decode_mel_tps"] / row["embed_tps"]
                row["ratio_steady"] = row["decode_mel_tps"] / row["embed_steady_tps"]
                # CPU seconds per track do not depend on what else the machine runs; the steady part
                # leaves out the 1-track run's start-up (imports, model build, tracing).
                row["embed_cpu_per_track"] = (r.cpu - one.cpu) / max(n - 1, 1)
                row["ratio_cpu"] = row["embed_cpu_per_track"] / row["decode_mel_cpu_per_track"]
                log(f"  {row['embed_tps']:.2f} tracks/s ({row['embed_steady_tps']:.2f} steady), "
                    f"peak RSS {row['embed_rss_mib']:.0f} MiB, embed/floor CPU {row['ratio_cpu']:.2f}")
                per_windows.append(row)
        if not args.skip_model_only:
            batch = args.batch_size or plugin_default("batch_size", 16)
            result["model_batch"] = batch
            for runtime in runtimes:
                precision = "float32" if runtime == "onnx" else args.precision
                log(f"model only ({runtime}/{precision} on ready log-mels)")
                wps, cpu_per_window = model_only(model_dir, max(48, 4 * batch), batch, runtime, precision)
                result.setdefault("model_only", {})[runtime] = {"windows_per_s": wps, "cpu_per_window": cpu_per_window}
                for row in per_windows:
                    if row["runtime"] == runtime:
                        row["model_only_tps"] = wps / row["windows_per_track"]
                        row["model_cpu_per_track"] = cpu_per_window * row["windows_per_track"]
        result["runs"] = per_windows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cores = result["machine"]["cores"]
    print(f"crnnembed benchmark: {result['tracks']} tracks ({source}, ~{result['seconds']} s, "
          f"{result['sample_rate']} Hz, {result['channels']} ch), {workers} decoding threads, "
          f"{cores} cores, nice {result['machine']['nice']}, batch_size {result['batch_size']}")
    print(f"model: {result['model']}")
    print()
    print("Wall clock, as measured in this run (tracks/s; start-up = a one-track crnnembed, to its stored track):")
    rows = []
    for r in result["runs"]:
        rss = " / ".join(f"{r[k]:.0f}" for k in ("embed1_rss_mib", "embed_quarter_rss_mib", "embed_rss_mib") if k in r)
        rows.append([r["windows"], f"{r['runtime']}/{r['precision']}", r["decode_tps"], r["decode_mel_tps"],
                     r.get("model_only_tps", float("nan")), r["embed_tps"], r["embed_steady_tps"], r["ratio_steady"],
                     r["embed1_wall_s"], rss])
    print(table(rows, ["windows", "runtime", "decode", "decode+mel", "model only", "crnnembed", "steady",
                       "steady/floor", "start-up s", "peak RSS MiB 1 / N/4 / N"]))
    print()
    print(f"CPU seconds per track (independent of other load), and the rate they allow on {cores} free cores:")
    rows = []
    for r in result["runs"]:
        rows.append([r["windows"], f"{r['runtime']}/{r['precision']}", r["decode_cpu_per_track"],
                     r["decode_mel_cpu_per_track"], r.get("model_cpu_per_track", float("nan")),
                     r["embed_cpu_per_track"], r["ratio_cpu"], cores / r["decode_mel_cpu_per_track"],
                     cores / r["embed_cpu_per_track"], r["embed1_cpu_s"]])
    print(table(rows, ["windows", "runtime", "decode", "decode+mel", "model only", "crnnembed", "embed/floor",
                       "floor t/s bound", "crnnembed t/s bound", "start-up CPU s"]))
    print("floor = decode + log-mel; steady = without the 1-track start-up; t/s bound = cores / CPU s per track")
    print_json(result)


if __name__ == "__main__":
    main()
