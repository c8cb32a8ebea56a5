"""Pack what a training run reads (log-mels, codec versions, teacher targets) for a machine without the audio.

    python research/gpu/pack.py .gpu ../shared/data/emotify ../shared/data/gtzan -- --versions default --teacher musicnn

A GPU machine that is lent for a few minutes has no ffmpeg, no musicnn and no data sets, and takes
at most 64 MiB per call. This builds the Trainer here, exactly as ``crnntrain`` does (caches filled
on first use), and writes its data as lzma shards grouped into folders ``c1``, ``c2``, ... of at
most ``--call-mib`` each (the first holds ``meta.xz``); ``train_gpu.py`` rebuilds the Trainer from
them. Log-mels travel as uint8 steps of ``--step`` dB below each array's maximum (255 steps; the
model input floors at 80 dB below a window's maximum, so 1 dB steps keep that range), and a clip
shorter than a window, cached as its loop over 1366 frames, travels as one period of that loop.
"""
import argparse
import lzma
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from beetsplug.crnn.training import augment, dataset, train  # noqa: E402
from beetsplug.crnn.audio import HOP_LENGTH, WINDOW_FRAMES, WINDOW_SAMPLES  # noqa: E402

META_KEYS = ("n_windows", "train_records", "val_records", "unlabelled", "genres", "label_sets", "train_samples",
             "train_starts", "train_y", "train_hot", "train_mask", "train_source", "val_y", "val_hot", "val_mask",
             "versions", "train_version_starts", "teacher", "tag_names", "teacher_dim")


def quantise(mel: np.ndarray, n_samples: int, step: float) -> dict:
    """uint8 steps below the array's maximum (a log-mel, or a stack of windows); a looped short clip
    keeps one period of its loop."""
    top = float(mel.max())
    period = None
    if n_samples < WINDOW_SAMPLES:
        period = int(round(n_samples / HOP_LENGTH))
        if 2 * period < mel.shape[1]:
            mel = mel[:, :period]
        else:
            period = None
    q = np.clip(np.round((top - mel) / step), 0, 255).astype(np.uint8)
    return {"q": q, "top": top, "period": period}


def restore(a: dict, step: float) -> np.ndarray:
    """The float32 log-mel of ``quantise``'s output; a loop's period is tiled back to a window."""
    mel = np.float32(a["top"]) - a["q"].astype(np.float32) * np.float32(step)
    if a["period"]:
        mel = np.tile(mel, (1, -(-WINDOW_FRAMES // a["period"])))[:, :WINDOW_FRAMES]
    return np.ascontiguousarray(mel)


def pack(data, argv, out: Path, step=1.0, preset=6, call_mib=55.0, log=print) -> list[Path]:
    args = train.build_parser(out_required=False).parse_args([*data, *argv])  # packs data: writes no model
    records = dataset.read_sources(args.data)
    versions = train._names(args.versions, list(augment.CODEC_VERSIONS), augment.TRAIN_VERSIONS, what="codec version")
    tr = train.Trainer(records, args.cache, n_windows=args.windows, log=log, versions=versions,
                       version_dir=args.version_cache, teacher=args.teacher, teacher_dir=args.teacher_cache)
    meta = {k: getattr(tr, k) for k in META_KEYS}
    meta.update(records=records, data=[str(d) for d in data], step=step,
                n_versions=[len(v) for v in tr.train_versions],
                val=[quantise(w, WINDOW_SAMPLES, step) for w in tr.val_windows])  # whole windows: nothing looped
    blobs = [("meta.xz", lzma.compress(pickle.dumps(meta, protocol=5), preset=preset))]
    arrays, size = [], 0
    items = [(("mel", i, -1), mel, tr.train_samples[i]) for i, mel in enumerate(tr.train_mels)]
    items += [(("ver", i, j), v, tr.train_version_samples[i][j])
              for i, vs in enumerate(tr.train_versions) for j, v in enumerate(vs)]
    for n, ((kind, i, j), mel, n_samples) in enumerate(items, 1):
        a = quantise(mel, n_samples, step)
        arrays.append((kind, i, j, a))
        size += a["q"].nbytes
        if size > 58 * 2**20 or n == len(items):
            blobs.append((f"m{len(blobs)}.xz", lzma.compress(pickle.dumps(arrays, protocol=5), preset=preset)))
            log(f"{blobs[-1][0]}: {len(arrays)} arrays, {len(blobs[-1][1]) / 2**20:.1f} MiB")
            arrays, size = [], 0
    folders, used = [], call_mib * 2**20  # shards into call-sized folders, in order
    for name, blob in blobs:
        if used + len(blob) > call_mib * 2**20:
            folders.append(out / f"c{len(folders) + 1}")
            folders[-1].mkdir(parents=True, exist_ok=True)
            used = 0
        (folders[-1] / name).write_bytes(blob)
        used += len(blob)
    return folders


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="pack.py", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("data", nargs="+")
    p.add_argument("--step", type=float, default=1.0, help="dB per uint8 step")
    p.add_argument("--preset", type=int, default=6, help="lzma preset")
    p.add_argument("--call-mib", type=float, default=55.0, help="MiB of shards per folder (one device call each)")
    args = p.parse_args(argv[:split])
    t = time.time()
    folders = pack(args.data, argv[split + 1:], args.out, args.step, args.preset, args.call_mib)
    for f in folders:
        print(f, f"{sum(x.stat().st_size for x in f.iterdir()) / 2**20:.1f} MiB")
    print(f"packed in {time.time() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
