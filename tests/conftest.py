"""Fixtures: a tiny CRNN built by the tests, and a real beets library on disk driven through `beet`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "emotify"
GENRES = ["classical", "electronic", "pop", "rock"]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))


def sigint_default() -> None:
    """``preexec_fn`` for a child the test Ctrl-Cs: SIGINT back to its default. A suite started in the
    background (``nohup ... &``) ignores SIGINT, children inherit that, and Python then never raises
    KeyboardInterrupt in them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_model(folder, genres=GENRES, conv_filters=(8, 12, 12, 12), gru_units=8, seed=0, tags=()):
    """A small, randomly initialised CRNN with a valid card: enough to exercise every code path fast
    (with ``tags``, a tag head too)."""
    from beetsplug.crnn.model import build
    from beetsplug.crnn.training.card import save_model

    import keras

    keras.utils.set_random_seed(seed)
    arch = {"conv_filters": list(conv_filters), "gru_units": gru_units, "dropout": 0.1}
    net = build(len(genres), conv_filters, gru_units, n_tags=len(tags))
    return save_model(net, folder, genres, arch, {"training": {"note": "random weights made by the test suite"}},
                      name="test", tags=tags)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"))


class BeetsEnv:
    """A beets config dir + library in a temp folder; `run` calls the real `beet` entry point."""

    def __init__(self, root: Path, model_dir: Path | None, extra_config: str = ""):
        self.root = root
        self.music = root / "music"
        self.music.mkdir(parents=True, exist_ok=True)
        self.db = root / "library.db"
        model = f"  model: {model_dir}\n" if model_dir else ""
        (root / "config.yaml").write_text(
            textwrap.dedent(
                f"""\
                directory: {root / 'lib'}
                library: {self.db}
                plugins: crnn
                import:
                  copy: no
                  write: no
                  autotag: no
                crnn:
                """
            )
            + model
            + extra_config
        )

    def env(self):
        env = dict(os.environ)
        env["BEETSDIR"] = str(self.root)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.pop("CI_BEETS_NOTHING", None)
        return env

    def run(self, *args, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "beets", *map(str, args)], env=self.env(), capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"beet {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def library(self):
        from beets.library import Library

        return Library(str(self.db), str(self.root / "lib"))

    def add(self, path, artist="Artist", title=None, album="Album"):
        """Add a file to the library as `beet import -A` would, without the import UI."""
        from beets.library import Item

        lib = self.library()
        item = Item.from_path(str(path))
        item.artist = artist
        item.title = title or Path(path).stem
        item.album = album
        lib.add(item)
        lib._close()
        return item.id


@pytest.fixture
def beets_env(tmp_path, tiny_model):
    return BeetsEnv(tmp_path, tiny_model.weights.parent)


@pytest.fixture
def shared_data():
    if not (SHARED_DATA / "metadata.csv").is_file():
        pytest.skip("../shared/data/emotify is not present")
    return SHARED_DATA
