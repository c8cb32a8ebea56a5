"""How the shipped model's embedding space is laid out, and what two post-hoc fixes would buy.

    python research/space.py                          # emotify + gtzan val splits (never test)
    python research/space.py --sets emotify --model DIR

Why: the robustness report's same-clip neighbours (0.891 on emotify test) miss the 0.95
target although each version sits at cosine >= 0.97 of its original; this measures whether
the versions drift far or the clips sit close. Prints, per set's ``val`` split (each clip and
its ``augment.CODEC_VERSIONS`` analysed through crnnembed's path):

- the median cosine of a clip's least similar version, and of its nearest *other* clip;
- the robustness figures and same-genre precision@5 as shipped, and after two fixes fitted
  on the ``train`` splits only (their windows clean, as the 3 training codec versions and
  under the 4 log-mel edits):
  * ``lda kN``: a clip-discriminant projection (Fisher LDA with each train clip as a class:
    spread between clips over spread between a clip's versions) to N of the 68 dimensions;
  * ``head``: per-genre logistic regressions refitted on the train windows and their versions
    (class-balanced, masked per source as training is), replacing the genre output.

Versions go to ``--version-cache`` (the same folder ``crnneval --robustness`` uses), log-mels
to ``.cache/mels``. Needs scipy and scikit-learn (librosa brings both). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' helpers

from _common import ROOT, print_json  # noqa: E402

from beetsplug.crnn.training import augment, dataset  # noqa: E402
from beetsplug.crnn.audio import DEFAULT_WINDOWS  # noqa: E402
from beetsplug.crnn.training.metrics import classification_report, precision_at_k  # noqa: E402
from beetsplug.crnn.model import ModelCard, embedder_for, l2_normalise  # noqa: E402
from beetsplug.crnn.pipeline import track_mels  # noqa: E402
from beetsplug.crnn.training.robustness import summarise  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def train_windows(embedder, records, cache, version_dir, rng):
    """Unit window embeddings of the train clips: clean (n, d), variants (v, n, d), clip index, source."""
    names = list(augment.TRAIN_VERSIONS)
    made = dataset.prepare_versions(records, names, version_dir, cache, 2, print)
    clean, variants, clip, source = [], [], [], []
    for i, r in enumerate(records):
        mel, n = cache.get(r.path)
        w = dataset.serving_windows(mel, n, DEFAULT_WINDOWS)
        batch = [w]
        for v in names:
            p = made[r.path].get(v)
            vw = dataset.serving_windows(*cache.get(p), DEFAULT_WINDOWS) if p is not None else w
            batch.append(vw if vw.shape == w.shape else w)
        for edit in augment.MEL_EDITS:
            one = augment.MelAugmenter((edit,), 1.0)
            batch.append(np.stack([one(x, rng) for x in w]))
        e, _ = embedder(np.concatenate(batch))
        e = e.reshape(len(batch), len(w), -1)
        clean.append(e[0])
        variants.append(e[1:])
        clip += [i] * len(w)
        source += [r.source] * len(w)
    return np.concatenate(clean), np.concatenate(variants, axis=1), np.array(clip), np.array(source)


def version_windows(embedder, records, version_dir):
    """Per clip, per file (original + CODEC_VERSIONS): the unit window embeddings and mean genre probs."""
    names = list(augment.CODEC_VERSIONS)
    E, P = [], []
    for r in records:
        files = [Path(r.path)] + [augment.make_version(r.path, v, version_dir) for v in names]
        es, ps = [], []
        for f in files:
            mels, _, _ = track_mels(f, DEFAULT_WINDOWS, 120)
            e, p = embedder(mels)
            es.append(e)
            ps.append(p)
        E.append(es)
        P.append(ps)
    return E, P, ["original"] + names


def lda(clean, variants, k, ridge=1e-3):
    """(mean, (d, k) projection): directions that separate clips most relative to how versions move them."""
    from scipy.linalg import eigh

    diffs = (variants - clean[None]).reshape(-1, clean.shape[1])
    within = np.cov(diffs.T)
    within += ridge * np.trace(within) / len(within) * np.eye(len(within))
    lam, vec = eigh(np.cov(clean.T), within)
    return clean.mean(0), vec[:, np.argsort(-lam)[:k]]


def refit_head(X, genre, source, label_sets, genres, C=1.0):
    from sklearn.linear_model import LogisticRegression

    W, b = np.zeros((X.shape[1], len(genres))), np.zeros(len(genres))
    for j, g in enumerate(genres):
        m = np.array([g in label_sets[s] for s in source])
        fit = LogisticRegression(C=C, class_weight="balanced", max_iter=3000).fit(X[m], genre[m] == j)
        W[:, j], b[j] = fit.coef_[0], fit.intercept_[0]
    return W, b


def score(E, P, names, records, set_genres, card, project=None, head=None) -> dict:
    """Robustness and in-domain figures with an optional projection / refitted head."""
    cols = [card.genres.index(g) for g in set_genres]
    emb, prob = [], []
    for es, ps in zip(E, P):
        z = [project(e) if project else e for e in es]
        emb.append([l2_normalise(l2_normalise(x).mean(0)) for x in z])
        prob.append([(1 / (1 + np.exp(-(e @ head[0] + head[1])))).mean(0) if head else p.mean(0) for e, p in zip(es, ps)])
    emb, prob = np.array(emb), np.array(prob)
    rep = summarise(emb, prob, names, cols)
    genres = [r.genre for r in records]
    artists = [r.artist or str(r.path) for r in records]
    cr = classification_report(np.array([set_genres.index(g) for g in genres]), prob[:, 0][:, cols], set_genres)
    flat = emb.reshape(-1, emb.shape[-1])
    clip = np.repeat(np.arange(len(emb)), emb.shape[1])
    nearest_other = [float(np.max(np.where(clip == c, -1, flat @ emb[c, 0]))) for c in range(len(emb))]
    own_min = np.einsum("cvd,cd->cv", emb[:, 1:], emb[:, 0]).min(1)
    return {"same_clip": rep["same_clip_neighbours"], "p5_cosine": rep["p5_cosine"],
            "one_top_genre": rep["same_top_genre"], "top1": cr["accuracy"], "macro_f1": cr["macro"]["f1"],
            "auc": cr["macro"]["roc_auc"],
            "p5_genre": precision_at_k(emb[:, 0], prob[:, 0], genres, artists, k=5, mode="genre", genre_weight=0.5),
            "own_least_cos": float(np.median(own_min)), "nearest_other_cos": float(np.median(nearest_other))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["emotify", "gtzan"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--split", default="val", help="where to score (default val: choosing on test would be fitting it)")
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--version-cache", default=str(ROOT / ".cache" / "versions"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "mels"))
    args = ap.parse_args(argv)
    card = ModelCard.load(args.model)
    embedder = embedder_for(card, precision="float32")
    cache = dataset.MelCache(args.cache)
    rng = np.random.default_rng(0)
    records = {s: dataset.read_records(SHARED / s) for s in args.sets}
    train = [r for s in args.sets for r in records[s] if r.split == "train" and r.genre in card.genres]
    clean, variants, clip, source = train_windows(embedder, train, cache, args.version_cache, rng)
    label_sets = dataset.label_sets(train)
    genre = np.array([card.genres.index(train[c].genre) for c in clip])
    X = np.concatenate([clean, *variants])
    head = refit_head(X, np.tile(genre, len(variants) + 1), np.tile(source, len(variants) + 1), label_sets, card.genres)
    fixes = {"shipped": {}, "head": {"head": head}}
    for k in args.k:
        mu, W = lda(clean, variants, k)
        fixes[f"lda k{k}"] = {"project": lambda e, mu=mu, W=W: (e - mu) @ W}
    out = {}
    for s in args.sets:
        chosen = [r for r in records[s] if r.split == args.split and r.genre in card.genres]
        set_genres = [g for g in card.genres if g in {r.genre for r in records[s]}]
        E, P, names = version_windows(embedder, chosen, args.version_cache)
        print(f"== {s} {args.split}: {len(chosen)} clips x {len(names)} files ==")
        print(f"{'':10s} {'same clip':>9s} {'p5 cos':>7s} {'1 genre':>7s} {'top-1':>6s} {'F1':>6s} {'AUC':>6s} {'p@5 ga':>6s}")
        for name, fix in fixes.items():
            r = score(E, P, names, chosen, set_genres, card, **fix)
            out[f"{s}/{name}"] = r
            print(f"{name:10s} {r['same_clip']:9.3f} {r['p5_cosine']:7.3f} {r['one_top_genre']:7.3f} {r['top1']:6.3f} "
                  f"{r['macro_f1']:6.3f} {r['auc']:6.3f} {r['p5_genre']:6.3f}")
        r = out[f"{s}/shipped"]
        print(f"median cosine of a clip's least similar version {r['own_least_cos']:.4f}; "
              f"of its nearest other clip {r['nearest_other_cos']:.4f}")
    print_json({"model": card.model_id, "split": args.split, "results": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
