"""Train on a lent GPU machine (Keras 3 on JAX; no TensorFlow, beets, ffmpeg or audio there) from pack.py's shards.

    python3 research/gpu/train_gpu.py /tmp/data /tmp/runs/A -- <crnntrain options>

Everything but where the Trainer's data comes from is the project's own training code:
``train.run`` with its ``fit``, ``epoch_data``, averaging and card. The package imports without
beets (there is none there); TensorFlow imports become no-ops, ``length_batches`` (tf.data)
becomes a Keras PyDataset, and the ONNX export is left to ``crnn-export`` on the CPU machine.
The card's ``trained_on`` says where and how the model was trained.
"""
import lzma
import os
import pickle
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several runs share one GPU

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # the checkout's package (it needs no beets); pack.py

import numpy as np  # noqa: E402

from beetsplug.crnn import model as model_mod  # noqa: E402
from beetsplug.crnn.training import fit, sampling, train  # noqa: E402
from beetsplug.crnn.training import teacher as teacher_mod  # noqa: E402
from pack import META_KEYS, restore  # noqa: E402

META, ARRAYS = {}, []


def _no_tensorflow(*args, **kwargs):
    return None


def _no_export(card):
    raise ImportError("ONNX export is done afterwards on the CPU machine (python -m beetsplug.crnn.training.export)")


model_mod.import_tensorflow = model_mod.require_tensorflow = _no_tensorflow
teacher_mod.check_installed = _no_tensorflow
teacher_mod.tag_names = lambda: list(META["tag_names"])
_export = types.ModuleType("beetsplug.crnn.training.export")
_export.export_card = _no_export
sys.modules["beetsplug.crnn.training.export"] = _export


def length_batches_any_backend(crops, targets, batch_size, rng):
    """``sampling.length_batches`` without tf.data: the same batches, as a Keras PyDataset."""
    import keras

    batches = sampling.length_groups(crops, batch_size, rng)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()

        def __len__(self):
            return len(batches)

        def __getitem__(self, k):
            idx = batches[k]
            return np.stack([crops[i] for i in idx]), {name: v[idx] for name, v in targets.items()}

    return Batches()


fit.length_batches = length_batches_any_backend


def load(data_dir: Path):
    meta = pickle.loads(lzma.decompress((data_dir / "meta.xz").read_bytes()))
    arrays = []
    for f in sorted(data_dir.glob("m[0-9]*.xz"), key=lambda p: int(p.stem[1:])):
        arrays += pickle.loads(lzma.decompress(f.read_bytes()))
    return meta, arrays


class PackedTrainer(train.Trainer):
    """A Trainer whose data comes from pack.py's shards instead of the caches and the audio."""

    def __init__(self, records, cache_dir=None, genres=None, n_windows=2, log=print, workers=2, versions=(),
                 version_dir=None, teacher=None, teacher_dir=None, unlabelled=()):
        self.log = log
        for k in META_KEYS:
            setattr(self, k, META[k])
        step = META["step"]
        self.cache = None
        self.train_mels = [None] * len(self.train_records)
        self.train_versions = [[None] * n for n in META["n_versions"]]
        for kind, i, j, a in ARRAYS:
            if kind == "mel":
                self.train_mels[i] = restore(a, step)
            else:
                self.train_versions[i][j] = restore(a, step)
        if any(x is None for x in self.train_mels) or any(x is None for v in self.train_versions for x in v):
            raise SystemExit("the packed data is incomplete: a shard is missing")
        if tuple(versions) != tuple(self.versions):
            raise SystemExit(f"packed with versions {self.versions}, asked for {tuple(versions)}")
        if not teacher:
            self.teacher, self.tag_names, self.teacher_dim = None, [], 0
        self.val_windows = [restore(a, step) for a in META["val"]]
        log(f"packed data: {len(self.train_mels)} train clips, {sum(map(len, self.train_versions))} codec versions, "
            f"{len(self.val_windows)} val clips")


def main():
    global META, ARRAYS
    data_dir, out = Path(sys.argv[1]), sys.argv[2]
    opts = sys.argv[sys.argv.index("--") + 1:]
    t = time.time()
    META, ARRAYS = load(data_dir)
    print(f"loaded the packed data in {time.time() - t:.0f} s", flush=True)
    train.Trainer = PackedTrainer
    data = META.get("data", ["../shared/data/emotify", "../shared/data/gtzan"])
    args = train.build_parser().parse_args([*data, "--out", out, *opts])
    args.command = " ".join(["python -m beetsplug.crnn.training.train", *data, *opts])
    import keras

    where = keras.backend.backend()
    if where == "jax":
        import jax

        where = f"JAX {jax.__version__}, {jax.devices()[0].device_kind}"
    extra = {"trained_on": f"Keras {keras.__version__} on {where} (research/gpu/train_gpu.py); log-mels packed as "
                           f"uint8 steps of {META['step']:g} dB (research/gpu/pack.py)"}
    card = train.run(args, log=lambda s: print(s, flush=True), records=META["records"], card_extra=extra)
    print("model", card.model_id, flush=True)


if __name__ == "__main__":
    main()
