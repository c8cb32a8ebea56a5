"""Quick start: a temp beets library of generated tracks -> import -> crnnembed -> similar -> M3U.

Run through scripts/quickstart.sh (which installs the plugin first). Prints every command
it runs and what it answered; leaves the library in a temp folder (pass --keep to see it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mediafile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from audiogen import write  # noqa: E402  the same generator the tests use


def beet(env, *args):
    print(f"$ beet {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "beets", *args], env=env, text=True, capture_output=True)
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print(out, flush=True)
    if proc.returncode != 0:
        sys.exit(f"quickstart: 'beet {' '.join(args)}' failed with exit status {proc.returncode}")
    return proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temp library and print where it is")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="beets-crnn-quickstart-"))
    try:
        music = root / "incoming"
        styles = [("Tonal Trio", "tonal"), ("Beat Unit", "beat")]
        for a, (artist, kind) in enumerate(styles):
            for n in range(4):
                path = write(music / artist / f"{n + 1:02d} {kind} {n + 1}.flac", 40.0 + 10 * n, kind=kind, seed=10 * a + n)
                f = mediafile.MediaFile(str(path))
                f.artist, f.title, f.album = artist, f"{kind.title()} {n + 1}", f"{artist} Demo"
                f.save()
        (root / "config.yaml").write_text(
            f"directory: {root / 'library'}\nlibrary: {root / 'library.db'}\nplugins: crnn\n"
            "import:\n  copy: no\n  write: no\n  autotag: no\n"
            f"crnn:\n  playlist_dir: {root}\n  relative_to: playlist\n"
        )
        env = dict(os.environ, BEETSDIR=str(root))
        beet(env, "import", "-q", "-A", str(music))
        beet(env, "crnnembed")
        beet(env, "ls", "-f", "$artist - $title: $crnn_genre ($crnn_genre_prob)")
        beet(env, "similar", "title:Tonal 1", "-n", "3", "--m3u", "similar.m3u")
        print(f"--- {root / 'similar.m3u'} ---")
        print((root / "similar.m3u").read_text())
    finally:
        if args.keep:
            print(f"library kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
