"""``beet crnntrain QUERY``: train on the user's own beets library, its ``genre`` field (or another) the labels.

The taxonomy and the artist split come from ``taxonomy``, the log-mels from ``excerpts``;
training is ``train.run`` (the same Trainer, augmentation and card as training on DATA), or
``finetune`` for a model of the MSD CRNN family; the held-out artists are then scored
(``library_eval``). Both commands' argument parsers are here. No beets import: the plugin
glue (``commands/train.py``) reads the items and passes plain values.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .. import audio
from ..errors import CrnnError
from ..msd import UNFREEZE
from . import dataset
from .excerpts import ExcerptCache, decode
from .library_eval import SOURCE, front_cache, held_out_line, score
from .taxonomy import Plan, format_plan, plan

MODELS_DIR = "crnn_models"
CACHE_DIR = "crnn_cache"
TEACHER_DIR = "teacher"  # teacher outputs, beside the log-mels in CACHE_DIR (keyed by file, not by windows)
DEFAULT_CACHE_GB = 5.0
DEFAULT_MAX_MINUTES = 60.0

# Options that only mean something when training on (or evaluating) the library.
LIBRARY_OPTIONS = ("library", "field", "genres", "min_tracks", "max_genres", "from_scratch", "unfreeze",
                   "val_fraction", "test_fraction", "cache_max_gb", "dry_run")


def query_options(group, field_default, field_help) -> None:
    """What makes the arguments a library query, and the item field holding the genres (both commands)."""
    group.add_argument("--library", action="store_true",
                       help="the arguments are a beets query even if they name existing files or folders")
    group.add_argument("--field", default=field_default, help=field_help)


def add_library_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("training on the library (beet crnntrain [QUERY])")
    query_options(g, "genre", "item field holding the genres (default: genre; a flexible attribute works too)")
    g.add_argument("--genres", default=None, help="comma-separated genres to learn (default: the common ones)")
    g.add_argument("--min-tracks", type=int, default=30, help="genres need at least this many tracks (default 30)")
    g.add_argument("--max-genres", type=int, default=20, help="at most this many genres, the largest (default 20)")
    g.add_argument("--from-scratch", action="store_true",
                   help="start from random weights instead of fine-tuning the shipped model")
    g.add_argument("--unfreeze", choices=UNFREEZE, default="none",
                   help="from a model of the MSD CRNN family (the shipped one): what trains. none (default): the "
                        "network and its embedding stay, a genre head is fitted on them in seconds; gru: the GRUs "
                        "and both heads train for --epochs; conv4: conv4 too")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of each genre's tracks (by artist) for val")
    g.add_argument("--test-fraction", type=float, default=0.1, help="share of each genre's tracks (by artist) for test")
    g.add_argument("--cache-max-gb", type=float, default=DEFAULT_CACHE_GB,
                   help=f"keep the log-mel cache under this size (default {DEFAULT_CACHE_GB:g} GB; this run's "
                        "tracks are always kept)")
    g.add_argument("--dry-run", action="store_true", help="print the genres and the split, then stop")
    return p


def build_train_parser() -> argparse.ArgumentParser:
    """`beet crnntrain [QUERY]`: the training options of ``train`` with library defaults, and the library's own."""
    from . import train

    p = argparse.ArgumentParser(prog="beet crnntrain", description="Train the CRNN on your beets library's genres.")
    p.add_argument("query", nargs="*", help="a beets query (default: the whole library)")
    train.add_options(p)
    add_library_options(p)
    # Library defaults: a model folder and a cache under the beets config directory, an hour's budget.
    p.set_defaults(out=None, cache=None, version_cache=None, teacher_cache=None, max_minutes=DEFAULT_MAX_MINUTES,
                   name="crnn-library", windows=None)
    _say_defaults(p, "with a QUERY: default", {
        "cache": f"{CACHE_DIR}/mels in the beets config directory",
        "teacher_cache": f"{CACHE_DIR}/{TEACHER_DIR} in the beets config directory",
        "max_minutes": f"{DEFAULT_MAX_MINUTES:g}", "windows": "crnn.windows", "name": "crnn-library"})
    _say_defaults(p, "default", {"out": f"{MODELS_DIR}/<model id> in the beets config directory"})
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    """`beet crnneval [QUERY | DATA...]`, both forms: ``evaluate``'s options, and a library query's own."""
    from . import evaluate

    p = argparse.ArgumentParser(prog="beet crnneval", description="Evaluate a CRNN on your library's held-out "
                                                                  "artists (QUERY) or on labelled audio (DATA).")
    p.add_argument("args", nargs="*", metavar="QUERY | DATA",
                   help="a beets query (default: the whole library), or labelled sets (manifest CSV or folder)")
    evaluate.add_options(p)
    p.set_defaults(cache=None, windows=None)  # each form has its own (evaluate.run, eval_library)
    _say_defaults(p, "with a QUERY", {
        "model": "the newest in crnn_models/, else crnn.model",
        "split": "test: tracks by artists the model neither trained nor validated on; val: its validation artists",
        "cache": f"{CACHE_DIR}/mels in the beets config directory", "windows": "crnn.windows"})
    g = p.add_argument_group("evaluating on the library (beet crnneval [QUERY])")
    query_options(g, None, "item field holding the genres (default: the model's, else genre)")
    return p


def _say_defaults(p: argparse.ArgumentParser, how: str, defaults: dict) -> None:
    """Add each library default to its option's help."""
    for action in p._actions:
        if action.dest in defaults:
            action.help = f"{action.help or action.dest} ({how}: {defaults[action.dest]})"


def names_data(args, library_flag=False) -> bool:
    """The one rule for `beet crnntrain ARGS` / `beet crnneval ARGS`: arguments that all name existing files
    or folders are labelled data sets (manifest or genre folders); anything else, or none, is a library query
    (``--library`` makes it a query whatever it names)."""
    return bool(args) and not library_flag and all(os.path.exists(os.path.expanduser(a)) for a in args)


def library_paths(config_dir, args) -> tuple[Path, Path]:
    """(cache folder, models folder) for a library run."""
    base = Path(config_dir)
    cache = Path(os.path.expanduser(args.cache)) if args.cache else base / CACHE_DIR / "mels"
    return cache, base / MODELS_DIR


def resolve_init(args) -> str | None:
    """Where training starts: --init-from, else random weights with --from-scratch, else the shipped model."""
    from ..model import default_weights_dir

    if args.from_scratch and args.init_from:
        raise CrnnError("--from-scratch and --init-from exclude each other")
    if args.from_scratch:
        return None
    return args.init_from or str(default_weights_dir())


def check_args(args) -> None:
    if args.min_tracks < 1:
        raise CrnnError("--min-tracks must be at least 1")
    if args.max_genres < 2:
        raise CrnnError("--max-genres must be at least 2")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(args, name)
        if not 0 <= v < 0.5:
            raise CrnnError(f"--{name.replace('_', '-')} must be from 0 to 0.5")
    if args.unlabelled:  # a folder's files have no artist: the split could not keep held-out artists out
        raise CrnnError("--unlabelled DIR is for training on DATA (its files have no artist to split by); on a "
                        "library, --teacher trains the matching tracks without a usable genre, split by artist")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise CrnnError("--max-minutes must be above 0")


def time_budget(minutes):
    """A Keras callback that ends an epoch early once ``minutes`` have passed since the first training
    batch: the epoch is then validated as it stands, and ``fit``'s own time check ends training.

    The clock starts at the first batch, as ``fit``'s does, not when the callback is made: what the
    Trainer does first (codec versions, the teacher over every training file) can take long, and a
    deadline already past would cut every epoch to one batch.
    """
    from ..model import import_tensorflow

    import_tensorflow()
    import keras

    class TimeBudget(keras.callbacks.Callback):
        deadline = None

        def on_train_batch_end(self, batch, logs=None):
            now = time.time()
            if self.deadline is None:  # the same callback serves every epoch's Keras fit
                self.deadline = now + minutes * 60
            if now > self.deadline:
                self.model.stop_training = True

    return TimeBudget()


def epoch_line(row, epochs, max_minutes) -> str:
    """One progress line per epoch: loss, val metrics, and how long is left at most."""
    done = row["minutes"]
    per = done / row["epoch"]
    left = per * (epochs - row["epoch"])
    if max_minutes is not None:
        left = min(left, max(max_minutes - done, 0.0))
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}"]
    if "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.4f}", f"val acc {row['val_acc']:.3f}"]
    parts.append("best so far" if row.get("best") else "")
    parts.append(f"{per:.1f} min/epoch, at most {left:.0f} min left" if left >= 1 else
                 f"{per * 60:.0f} s/epoch, at most {left * 60:.0f} s left")
    return "  ".join(p for p in parts if p)


def train_library(args, tracks, config_dir, aliases=None, query="", log=print, say=print, warn=None, progress=None,
                  workers=None, timeout=audio.DEFAULT_TIMEOUT, windows=audio.DEFAULT_WINDOWS) -> dict:
    """`beet crnntrain [QUERY]`: plan, decode, train with ``train.run``, evaluate, and file the model.

    ``say`` prints what the user must see (the taxonomy, progress per epoch); ``warn`` a file that
    cannot be decoded (one line each); ``log`` the rest.
    ``progress(total)`` gives an object with ``update(n)``/``close()`` (a progress bar) or None.
    Returns {"card", "folder", "plan", "failed"} (only "plan" with --dry-run).
    """
    from . import train

    check_args(args)
    init_from = resolve_init(args)
    args.windows = args.windows or windows
    genres = [g.strip() for g in args.genres.split(",") if g.strip()] if args.genres else None
    p = plan(tracks, args.field, aliases, genres, args.min_tracks, args.max_genres, args.val_fraction,
             args.test_fraction, args.seed, query, unlabelled=bool(args.teacher))
    say(f"{len(p.records)} of {len(tracks)} tracks, {len(p.genres)} genres from {args.field!r}, split by artist "
        f"(seed {args.seed}):")
    say(format_plan(p))
    if not any(r.split == "train" for r in p.records):
        raise CrnnError("no training tracks after the artist split")
    if init_from is not None:  # a starting model that cannot be read stops the run before any decoding
        from ..model import ModelCard

        try:
            start = ModelCard.load(init_from)
            start.verify()
        except CrnnError as exc:
            raise CrnnError(f"cannot fine-tune from {init_from} ({exc}); --from-scratch or --init-from DIR "
                            "start elsewhere") from None
        if start.family == "msd-crnn" and args.unfreeze == "none":
            say(f"fitting a genre head for these {len(p.genres)} genres on {start.model_id}: its network and "
                "embedding stay as they are (--unfreeze none)")
        else:
            say(f"fine-tuning {start.model_id}: its layers, a new output for these {len(p.genres)} genres")
    else:
        say("training from scratch")
    if args.teacher:  # a missing extra stops the run before any decoding, in one line
        from .teacher import check_installed

        check_installed()
    if args.dry_run:
        return {"plan": p}
    if init_from is not None and start.family == "msd-crnn":
        return _train_library_msd(args, p, start, config_dir, log, say, warn, workers)
    cache_dir, models_dir = library_paths(config_dir, args)
    max_bytes = int(args.cache_max_gb * 1e9) if args.cache_max_gb and args.cache_max_gb > 0 else None
    cache = ExcerptCache(cache_dir, args.windows, max_bytes=max_bytes)

    # Decode once, on crnnembed's decoder; a file that fails is one line and is left out.
    # Genre-less tracks by val/test artists are never decoded: nothing of theirs trains.
    wanted = p.records + [r for r in p.unlabelled if r.split == "train"]
    failed = []
    bar = progress(len(wanted)) if progress is not None else None
    t = time.time()
    try:
        ok = decode(wanted, cache, workers, timeout, progress=(lambda: bar.update(1)) if bar else None,
                    on_error=lambda m: (failed.append(m), (warn or log)(f"{m} (left out)")))
    except KeyboardInterrupt:
        raise CrnnError("interrupted while decoding: what was decoded is cached, run the command again") from None
    finally:
        if bar is not None:
            bar.close()
    log(f"log-mels ready for {len(ok)} tracks in {time.time() - t:.0f} s ({len(failed)} left out) in {cache_dir}")
    removed, left = cache.prune(keep=[r.path for r in ok])
    if removed:
        log(f"log-mel cache over {args.cache_max_gb:g} GB: removed the {removed} entries used longest ago")
    if max_bytes and left > max_bytes:
        log(f"log-mel cache: this run's tracks alone take {left / 1e9:.1f} GB, over --cache-max-gb")
    kept = {id(r) for r in ok}
    records = [r for r in p.records if id(r) in kept]
    unlabelled = [r for r in wanted[len(p.records):] if id(r) in kept]
    trained = {r.genre for r in records if r.split == "train"} | {g for r in records if r.split == "train" for g in r.more}
    if len(trained) < 2:
        raise CrnnError("fewer than two genres have training tracks that decode")
    missing = [g for g in p.genres if g not in trained]
    if missing:  # every decoded record must carry only genres the model has
        raise CrnnError(f"no training track of {', '.join(missing)} could be decoded; leave it out with --genres")

    # Train: the manifest code, with this data, an excerpt cache and a new genre output.
    args.init_from = init_from
    args.new_head = init_from is not None
    args.data = []
    args.version_cache = args.version_cache or str(cache_dir / "versions")
    args.teacher_cache = args.teacher_cache or str(Path(config_dir) / CACHE_DIR / TEACHER_DIR)
    callbacks = [time_budget(args.max_minutes)] if args.max_minutes else []
    summary = p.summary()
    summary["decode_failed"] = len(failed)
    summary["tracks"] = {s: sum(r.split == s for r in records) for s in dataset.SPLITS}
    if "unlabelled" in summary:
        summary["unlabelled"]["train"] = len(unlabelled)  # those that decode

    def write(out):
        args.out = str(out)
        return train.run(args, log=log, records=[r for r in records if r.split != "test"], cache=cache,
                         unlabelled=unlabelled,
                         on_epoch=lambda row: say(epoch_line(row, args.epochs, args.max_minutes)),
                         callbacks=callbacks, card_extra={"library": summary})

    folder = _write_model(args.out, models_dir, write)
    from ..model import ModelCard

    card = ModelCard.load(folder)
    stopped = card.extra["training"].get("stopped")
    if stopped == "interrupted":
        log("evaluation skipped (interrupted): beet crnneval measures the model")
    else:
        try:
            _score_held_out(card, folder, {s: [r for r in records if r.split == s] for s in ("val", "test")}, cache,
                            args.windows, say)
        except KeyboardInterrupt:
            log("evaluation interrupted: the model is written; beet crnneval measures it")
    return {"card": card, "folder": folder, "plan": p, "failed": failed}


def _score_held_out(card, folder, held: dict, cache, windows, say) -> None:
    """Each split's held-out records ({split: records}) scored into the card's metrics, the card saved, and
    the test line said: what both library trainers do once the model is written."""
    from ..model import CARD_NAME

    metrics = card.extra.setdefault("metrics", {})
    for split, chosen in held.items():
        if chosen:
            metrics.setdefault(split, {})[SOURCE] = score(chosen, card, cache, windows)
    card.save(folder / CARD_NAME)
    test = metrics.get("test", {}).get(SOURCE)
    if test:
        say(held_out_line(test))


def _write_model(out, models_dir, write) -> Path:
    """``write(folder)`` into --out when given, else into crnn_models/<model id> (``train.train_into``)."""
    from .train import train_into

    if out:  # the user's folder: written like training on DATA writes --out (the two model files)
        folder = Path(os.path.expanduser(out))
        write(folder)
        return folder
    return train_into(models_dir, write)[1]


def _train_library_msd(args, p: Plan, start, config_dir, log, say, warn=None, workers=None) -> dict:
    """Library training from a model of the MSD CRNN family (the shipped one): ``finetune`` on the library's
    records, the start's stem cached once per track (decoding only the windows it reads), the start's tags as
    the tag head's teacher. Test artists' tracks are only scored."""
    from . import finetune
    from ..model import ModelCard

    cache_dir, models_dir = library_paths(config_dir, args)
    stem_cache = finetune.FeatureCache(cache_dir.parent / "msd", finetune.Start(start.weights.parent))
    versions = tuple(v for v in (args.versions or "").split(",") if v)
    runs = []

    def write(out):
        run = finetune.Run([r for r in p.records if r.split != "test"], stem_cache, Path(out), versions,
                           args.version_cache or str(cache_dir.parent / "versions"), unfreeze=args.unfreeze,
                           lr=args.lr, batch_size=max(args.batch_size, 16), seed=args.seed, workers=workers or 2,
                           log=log, warn=warn)
        runs.append(run)
        if args.unfreeze == "none":
            result = finetune.fit_probe_head(run)  # logs its own line
        else:
            result = run.fit(args.epochs, patience=args.patience)
            say(f"best epoch {result['best']['epoch']} of {result['epoch']}: val "
                f"{finetune._brief(result['best']['val'])}")
        return run.save(result, args.name, args.command if hasattr(args, "command") else "beet crnntrain",
                        extra={"library": p.summary()})

    folder = _write_model(args.out, models_dir, write)
    left_out = runs[0].left_out
    card = ModelCard.load(folder)
    mels = front_cache(cache_dir, card.front)
    held = {}
    for split in ("val", "test"):
        held[split] = []
        for r in p.records:
            if r.split != split or r.path in left_out:
                continue
            try:
                mels.serving(r.path, args.windows)
                held[split].append(r)
            except CrnnError as exc:  # a held-out file that cannot be decoded: one line, not scored
                (warn or log)(f"{exc} (left out)")
    _score_held_out(card, folder, held, mels, args.windows, say)
    return {"card": card, "folder": folder, "plan": p, "failed": []}
