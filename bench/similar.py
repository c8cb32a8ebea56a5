"""Benchmark the similarity side at library scale: index build, `beet similar`, recall.

    nice -n 19 python bench/similar.py --items 100000
    nice -n 19 python bench/similar.py --items 1000000 --keep /tmp/sim1m   # reuse later with --reuse

Builds a synthetic beets library of N items whose crnn attributes are produced by the
project's own storage code (store.fields_for) and bulk-inserted into beets' tables (the
schema comes from beets' own Library()). Embeddings are clustered: gaussian clusters
around N(0, I) centres in 68-d, so the exact neighbours of a track are mostly its cluster.
Then it measures, each as what a user would see:

- `beet crnnindex` as a fresh process (wall, peak RSS), plus an in-process breakdown
  (SQL read of the embeddings, Annoy build);
- the staleness check (library.fingerprint) with and without its SQL index;
- `beet similar` as a fresh process, by id and by an artist/title query, its imports
  (no tensorflow/keras/librosa allowed) and peak RSS;
- in-process query latency and recall@10 against exact cosine on the stored vectors;
- index file sizes and this script's own peak RSS.

Prints a table and one JSON line (the last line of output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, beet, machine, mib, print_json, self_peak_rss, table, write_config  # noqa: E402

GENRES = ["classical", "electronic", "pop", "rock"]
DIM = 68
FORBIDDEN_IMPORTS = ("tensorflow", "keras", "librosa", "numba", "torch")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- synthetic library ----


def make_card(folder: Path, genres):
    """A model card (plain JSON) naming a placeholder weights file: `beet similar` never loads weights."""
    from beetsplug.crnn.model import WEIGHTS_NAME, ModelCard, sha256_of

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(b"placeholder: bench/similar.py never runs the model\n")
    sha = sha256_of(weights)
    card = ModelCard(model_id=f"bench-{sha[:10]}", genres=list(genres), weights=weights, sha256=sha,
                     extra={"note": "made by bench/similar.py; weights are a placeholder"})
    card.save(folder / "crnn.json")
    return card


def synthetic_chunk(rng, centres, sigma, n, genre_of_cluster, n_genres):
    cluster = rng.integers(0, len(centres), n)
    vec = centres[cluster] + sigma * rng.standard_normal((n, centres.shape[1]))
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    top = genre_of_cluster[cluster]
    probs = rng.dirichlet(np.ones(n_genres), n) * 0.4
    probs[np.arange(n), top] += 0.6
    return vec.astype(np.float32), probs, cluster


def create_library(beetsdir: Path, n: int, card, clusters: int, sigma: float, seed: int, chunk: int = 20_000):
    """Schema from beets' Library(); rows bulk-inserted in one transaction with executemany."""
    from beets.library import Item, Library

    from beetsplug.crnn import store

    db_path = beetsdir / "library.db"
    with contextlib.redirect_stdout(io.StringIO()):  # beets prints a line per schema migration backup
        lib = Library(str(db_path), str(beetsdir / "lib"))
    lib._close()
    for leftover in beetsdir.glob("library.db-before-*.bak"):
        leftover.unlink()  # beets' migration backups of an empty database
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    genre_of_cluster = rng.integers(0, len(card.genres), clusters)
    con = sqlite3.connect(str(db_path))
    cols = [r[1] for r in con.execute("PRAGMA table_info(items)")]
    base = {c: (Item._fields[c].to_sql(Item._fields[c].null) if c in Item._fields else None) for c in cols}
    genres_type = Item._fields.get("genres")
    item_sql = f"INSERT INTO items ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"
    attr_sql = "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)"
    now = time.time()
    con.execute("PRAGMA synchronous = OFF")  # bench set-up only; beets' own writes are unchanged
    with con:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            vecs, probs, cluster = synthetic_chunk(rng, centres, sigma, m, genre_of_cluster, len(card.genres))
            item_rows, attr_rows = [], []
            for j in range(m):
                item_id = start + j + 1
                c = int(cluster[j])
                values = store.fields_for(vecs[j], probs[j], card.genres, card.model_id, now, now + item_id * 1e-3)
                row = dict(base)
                genre = card.genres[int(np.argmax(probs[j]))]
                row.update(
                    id=item_id,
                    path=f"/music/Artist {c:05d}/Album {item_id // 12:06d}/{item_id:07d} Track {item_id}.mp3".encode(),
                    title=f"Track {item_id}",
                    artist=f"Artist {item_id % (n // 8 + 1):06d}",
                    albumartist=f"Artist {item_id % (n // 8 + 1):06d}",
                    album=f"Album {item_id // 12:06d}",
                    track=item_id % 12 + 1,
                    length=180.0 + item_id % 120,
                    added=now,
                    mtime=now,
                    format="MP3",
                    bitrate=256000,
                    samplerate=44100,
                    channels=2,
                    year=1960 + item_id % 60,
                )
                if genres_type is not None and "genres" in row:
                    row["genres"] = genres_type.to_sql([genre])
                item_rows.append(tuple(row[c] for c in cols))
                attr_rows.extend((item_id, k, v) for k, v in values.items())
            con.executemany(item_sql, item_rows)
            con.executemany(attr_sql, attr_rows)
            if start // chunk % 10 == 0:
                log(f"  inserted {start + m}/{n}")
    con.close()
    return db_path


# ---- measurements ----


def fingerprint_sql_timings(db_path: Path, stamp_key: str, repeats: int = 3) -> dict:
    """The staleness aggregate with the planner forced to scan the table, and as the plugin runs it."""
    con = sqlite3.connect(str(db_path))
    sql = ("SELECT COUNT(*), TOTAL(entity_id), TOTAL(CAST(value AS REAL)), MAX(CAST(value AS REAL)) "
           "FROM item_attributes NOT INDEXED WHERE key = ?")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        con.execute(sql, (stamp_key,)).fetchall()
        times.append(time.perf_counter() - t)
    con.close()
    return {"scan_s": min(times)}


def time_fingerprint(lib, model_id, repeats=5) -> float:
    from beetsplug.crnn import library

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        library.fingerprint(lib, model_id)
        times.append(time.perf_counter() - t)
    return min(times)


def imported_modules(importtime_stderr: str) -> set[str]:
    mods = set()
    for line in importtime_stderr.splitlines():
        m = re.match(r"import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S.*)$", line)
        if m:
            mods.add(m.group(1).strip())
    return mods


def exact_top(unit: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k rows for each query row, the query itself excluded (chunked: bounded memory)."""
    out = np.empty((len(rows), k), dtype=np.int64)
    for s in range(0, len(rows), 64):
        q = unit[rows[s:s + 64]]
        sims = q @ unit.T
        sims[np.arange(len(q)), rows[s:s + 64]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[s:s + 64] = np.take_along_axis(top, order, axis=1)
    return out


def recall_and_latency(index, ids, unit, rows, truth, search_k=-1):
    hits, lat = 0, []
    for r, t in zip(rows, truth):
        t0 = time.perf_counter()
        got, _ = index.query(unit[r], 10, search_k=search_k, exclude=[int(ids[r])])
        lat.append(time.perf_counter() - t0)
        hits += len(set(got.tolist()) & set(ids[t].tolist()))
    lat = np.array(lat) * 1e3
    return hits / (10 * len(rows)), float(np.median(lat)), float(np.percentile(lat, 95))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000, help="library size N (10000, 100000, 1000000)")
    p.add_argument("--clusters", type=int, default=2000, help="gaussian clusters of embeddings")
    p.add_argument("--sigma", type=float, default=1.0,
                   help="noise around a cluster centre (centres ~ N(0, I)); 1.0 puts within-cluster cosine near 0.5")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and latency")
    p.add_argument("--runs", type=int, default=5, help="fresh `beet similar` processes per query kind")
    p.add_argument("--sweep", default="", help="comma-separated search_k values to report recall/latency for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where to build the library (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (to --reuse it)")
    p.add_argument("--reuse", action="store_true", help="reuse the library already in --workdir")
    p.add_argument("--skip-cli-index", action="store_true", help="skip the `beet crnnindex` fresh-process run")
    args = p.parse_args(argv)

    n = args.items
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"crnn-bench-similar-{n}-"))
    keep = args.keep or args.reuse or bool(args.workdir)
    beetsdir, model_dir = work / "beets", work / "model"
    result = {"bench": "similar", "items": n, "clusters": args.clusters, "sigma": args.sigma, "dim": DIM,
              "genres": len(GENRES), "machine": machine()}
    try:
        from beetsplug.crnn import index as index_mod
        from beetsplug.crnn import library as library_mod
        from beetsplug.crnn import store
        from beetsplug.crnn.model import ModelCard

        if args.reuse and (beetsdir / "library.db").exists():
            card = ModelCard.load(model_dir)
            db_path = beetsdir / "library.db"
            log(f"reusing {db_path}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            card = make_card(model_dir, GENRES)
            write_config(beetsdir, model_dir)
            log(f"building a synthetic library of {n} items in {beetsdir}")
            t = time.perf_counter()
            db_path = create_library(beetsdir, n, card, args.clusters, args.sigma, args.seed)
            result["insert_s"] = time.perf_counter() - t
            log(f"  inserted in {result['insert_s']:.1f} s")
        result["db_mib"] = mib(db_path.stat().st_size)
        index_path = beetsdir / "crnn_index.npz"

        # Staleness aggregate on a plain table scan (what it cost before the plugin's SQL index).
        result["fingerprint_scan_s"] = fingerprint_sql_timings(db_path, store.STAMP)["scan_s"]

        # beet crnnindex as the user runs it.
        if not args.skip_cli_index:
            log("beet crnnindex")
            r = beet(beetsdir, "crnnindex").check()
            result["cli_index_wall_s"], result["cli_index_rss_mib"] = r.wall, mib(r.rss)
            m = re.search(r"indexed (\d+) tracks", r.stderr)
            result["cli_index_tracks"] = int(m.group(1)) if m else None
            log(f"  {r.wall:.1f} s, peak RSS {mib(r.rss):.0f} MiB")

        from beets.library import Library

        lib = Library(str(db_path), str(beetsdir / "lib"))
        result["fingerprint_s"] = time_fingerprint(lib, card.model_id)
        idx_names = [r[0] for r in sqlite3.connect(str(db_path)).execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'item_attributes'")]
        result["attribute_indexes"] = idx_names

        # In-process breakdown of a build (and the vectors for the ground truth).
        log("in-process: read embeddings")
        t = time.perf_counter()
        ids, vectors, probs, skipped = library_mod.read_embeddings(lib, card.model_id, card.genres)
        result["read_embeddings_s"] = time.perf_counter() - t
        assert len(ids) == n and not skipped, (len(ids), skipped)
        log(f"  {result['read_embeddings_s']:.1f} s")
        log("in-process: Annoy build")
        t = time.perf_counter()
        built = index_mod.SimilarityIndex.build(ids, vectors, probs, card.genres, "bench")
        result["annoy_build_s"] = time.perf_counter() - t
        result["n_trees"] = built.n_trees
        log(f"  {result['annoy_build_s']:.1f} s ({built.n_trees} trees)")
        del built
        if args.skip_cli_index or not index_path.exists():
            log("no index from the CLI: saving one through the plugin")
            r = beet(beetsdir, "crnnindex").check()

        # Index files.
        t = time.perf_counter()
        index = index_mod.SimilarityIndex.load(index_path)
        result["index_load_s"] = time.perf_counter() - t
        anns = [q for q in index_path.parent.iterdir() if q.suffix == ".ann"]
        result["index_npz_mib"] = mib(index_path.stat().st_size)
        result["index_ann_mib"] = mib(sum(q.stat().st_size for q in anns))

        # Fresh `beet similar` processes: by id (our own cost) and by a beets text query (adds a table scan).
        rng = np.random.default_rng(args.seed + 1)
        seed_rows = rng.choice(n, args.runs, replace=False)
        kinds = {
            "id": [[f"id:{int(ids[r])}"] for r in seed_rows],
            "artist_title": [[f"artist:Artist {int(ids[r]) % (n // 8 + 1):06d}", f"title:Track {int(ids[r])}"]
                             for r in seed_rows],
        }
        log("beet version (beets start-up + plugin load)")
        startup = [beet(beetsdir, "version").check() for _ in range(3)]
        result["beet_version_wall_s"] = statistics.median(r.wall for r in startup)
        for kind, queries in kinds.items():
            walls, rss = [], []
            for q in queries:
                r = beet(beetsdir, "similar", *q, "-n", "10").check()
                if "rebuilding" in r.stderr:
                    raise SystemExit(f"beet similar rebuilt the index: {r.stderr}")
                if len(r.stdout.splitlines()) != 10:
                    raise SystemExit(f"beet similar printed {len(r.stdout.splitlines())} lines:\n{r.stdout}{r.stderr}")
                walls.append(r.wall)
                rss.append(r.rss)
            result[f"similar_{kind}_wall_s"] = statistics.median(walls)
            result[f"similar_{kind}_wall_max_s"] = max(walls)
            result[f"similar_{kind}_rss_mib"] = mib(max(rss))
            log(f"beet similar {kind}: median {statistics.median(walls):.2f} s, max {max(walls):.2f} s")
        r = beet(beetsdir, "similar", *kinds["id"][0], "-n", "10", python_flags=["-X", "importtime"]).check()
        mods = imported_modules(r.stderr)
        bad = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN_IMPORTS)
        result["similar_heavy_imports"] = sorted({m.split(".")[0] for m in bad})
        result["similar_modules_imported"] = len(mods)

        # Recall and latency in-process.
        log(f"recall@10 on {args.queries} queries (exact cosine ground truth)")
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = rng.choice(n, min(args.queries, n), replace=False)
        truth = exact_top(unit, rows, 10)
        recall, p50, p95 = recall_and_latency(index, ids, unit, rows, truth)
        result.update(recall_at_10=recall, query_p50_ms=p50, query_p95_ms=p95,
                      default_search_k=index_mod.default_search_k(n, index.n_trees, 10))
        sweep = []
        for sk in [int(s) for s in args.sweep.split(",") if s.strip()]:
            rc, a, b = recall_and_latency(index, ids, unit, rows, truth, search_k=sk)
            sweep.append({"search_k": sk, "recall_at_10": rc, "p50_ms": a, "p95_ms": b})
            log(f"  search_k {sk}: recall {rc:.3f}, p50 {a:.2f} ms")
        if sweep:
            result["sweep"] = sweep
        lib._close()
        result["bench_peak_rss_mib"] = mib(self_peak_rss())
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [
        ["items", n],
        ["library insert (s)", result.get("insert_s", "reused")],
        ["library.db (MiB)", result["db_mib"]],
        ["fingerprint, table scan (s)", result["fingerprint_scan_s"]],
        ["fingerprint, as the plugin runs it (s)", result["fingerprint_s"]],
        ["beet crnnindex wall (s)", result.get("cli_index_wall_s", "skipped")],
        ["beet crnnindex peak RSS (MiB)", result.get("cli_index_rss_mib", "skipped")],
        ["  read embeddings, in-process (s)", result["read_embeddings_s"]],
        [f"  Annoy add + build, {result['n_trees']} trees (s)", result["annoy_build_s"]],
        ["index .npz / .ann (MiB)", f"{result['index_npz_mib']:.1f} / {result['index_ann_mib']:.0f}"],
        ["index load, in-process (s)", result["index_load_s"]],
        ["beet version, fresh process (s)", result["beet_version_wall_s"]],
        ["beet similar id:N, fresh (s, median/max)",
         f"{result['similar_id_wall_s']:.2f} / {result['similar_id_wall_max_s']:.2f}"],
        ["beet similar artist: title:, fresh (s, median/max)",
         f"{result['similar_artist_title_wall_s']:.2f} / {result['similar_artist_title_wall_max_s']:.2f}"],
        ["beet similar peak RSS (MiB)", max(result["similar_id_rss_mib"], result["similar_artist_title_rss_mib"])],
        ["heavy imports in beet similar", ", ".join(result["similar_heavy_imports"]) or "none"],
        [f"query p50 / p95 (ms), search_k {result['default_search_k']}",
         f"{result['query_p50_ms']:.2f} / {result['query_p95_ms']:.2f}"],
        ["recall@10 vs exact cosine", result["recall_at_10"]],
        ["bench process peak RSS (MiB)", result["bench_peak_rss_mib"]],
    ]
    print(table(rows, ["similar benchmark", "value"]))
    if result.get("sweep"):
        print()
        print(table([[s["search_k"], s["recall_at_10"], s["p50_ms"], s["p95_ms"]] for s in result["sweep"]],
                    ["search_k", "recall@10", "p50 ms", "p95 ms"]))
    print_json(result)


if __name__ == "__main__":
    main()
