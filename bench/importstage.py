"""What `auto: yes` adds to `beet import`: a 10-track album imported with the plugin analysing it, and without the plugin.

    nice -n 19 python bench/importstage.py                  # 10 generated 3-minute 44.1 kHz stereo MP3s, 3 rounds
    nice -n 19 python bench/importstage.py --tracks 10 --rounds 5 --runtime keras

Each round imports the album into a fresh temp library twice, as fresh processes (`beet import
-q -A`, no autotagging, no copying): once with `plugins: crnn` and `crnn: {auto: yes}`, once
with no plugins. Rounds alternate the order, so drift in machine load hits both alike. Prints
the walls, the median of the differences (what the plugin adds) and one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import textwrap
from pathlib import Path

from _common import beet, machine, mib, print_json, table  # noqa: E402
from embed import generated_files, log  # noqa: E402


def config(beetsdir: Path, plugin: bool, model_dir: Path, runtime: str) -> None:
    beetsdir.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(f"""\
        directory: {beetsdir / 'lib'}
        library: {beetsdir / 'library.db'}
        import:
          copy: no
          write: no
          autotag: no
        """)
    if plugin:
        text += f"plugins: crnn\ncrnn:\n  auto: yes\n  model: {model_dir}\n  runtime: {runtime}\n"
    else:
        text += "plugins: []\n"
    (beetsdir / "config.yaml").write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", default="auto", help="crnn.runtime (auto, onnx, keras)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    args = p.parse_args(argv)
    from beetsplug.crnn.model import default_weights_dir

    model_dir = Path(args.model) if args.model else default_weights_dir()
    tmp = Path(tempfile.mkdtemp(prefix="crnn-bench-import-"))
    walls = {"with": [], "without": []}
    rss = []
    try:
        album = tmp / "album"
        generated_files(args.tracks, 180.0, 44100, 2, min(args.tracks, 8), album)
        for f in album.iterdir():  # page cache warm for both
            f.read_bytes()
        for i in range(args.rounds):
            order = ("with", "without") if i % 2 == 0 else ("without", "with")
            for which in order:
                beetsdir = tmp / f"beets-{i}-{which}"
                config(beetsdir, which == "with", model_dir, args.runtime)
                r = beet(beetsdir, "import", "-q", "-A", str(album)).check()
                if which == "with" and "crnn" in r.stderr and "error" in r.stderr.lower():
                    raise SystemExit(r.stderr[-3000:])
                walls[which].append(r.wall)
                if which == "with":
                    rss.append(mib(r.rss))
                    from beets.library import Library

                    lib = Library(str(beetsdir / "library.db"), str(beetsdir / "lib"))
                    done = sum(1 for item in lib.items() if item.get("crnn_embedding"))
                    lib._close()
                    if done != args.tracks:
                        raise SystemExit(f"the import stage analysed {done} of {args.tracks} tracks:\n{r.stderr[-3000:]}")
                log(f"round {i + 1} {which} the plugin: {r.wall:.2f} s")
                shutil.rmtree(beetsdir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    added = [a - b for a, b in zip(walls["with"], walls["without"])]
    record = {"bench": "importstage", "machine": machine(), "tracks": args.tracks, "runtime": args.runtime,
              "walls_with": walls["with"], "walls_without": walls["without"], "added_s": added,
              "added_median_s": statistics.median(added), "peak_rss_mib_with": max(rss)}
    rows = [[i + 1, w, wo, a] for i, (w, wo, a) in enumerate(zip(walls["with"], walls["without"], added))]
    print(f"beet import of a {args.tracks}-track album (generated 3-minute 44.1 kHz stereo MP3), "
          f"crnn.runtime {args.runtime}, load {record['machine']['loadavg_1m']:.1f}")
    print(table(rows, ["round", "with crnn auto s", "without plugin s", "added s"]))
    print(f"median added: {record['added_median_s']:.2f} s; peak RSS with the plugin {record['peak_rss_mib_with']:.0f} MiB")
    print_json(record)


if __name__ == "__main__":
    main()
