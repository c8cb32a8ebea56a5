"""crnn-train: train the CRNN on labelled audio and write weights + model card (its options and ``run``).

    crnn-train ../shared/data/emotify ../shared/data/gtzan --out DIR

The recipe is the paper's (Adam 0.001/0.9/0.999, sigmoid outputs, binary cross-entropy)
plus what a few hundred clips need: random hop-aligned crops, class-balanced epochs,
optional mixup, learning-rate halving on plateau and early stopping on the val split.

Several labelled sets train one model over the union of their genres. A set only vouches
for the genres it uses, so the genre loss is masked per source: an emotify clip is never
told it is not "metal", a genre emotify does not label. What real libraries do to audio
(codecs, levels, low-passes) comes in as cached codec versions and log-mel edits
(``augment``); a teacher (``teacher``) can add its tags and embedding as targets.

The losses are in ``losses``, the data of a run and how an epoch samples it in ``sampling``,
the fit loop in ``fit``, writing the model in ``card``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from .. import model as model_mod
from ..audio import DEFAULT_WINDOWS, WINDOW_FRAMES
from ..errors import CrnnError, command_main
from ..model import CARD_NAME, DEFAULT_ARCHITECTURE, ModelCard
from . import augment, dataset, teacher
from .card import save_model
from .fit import Trainer
from .losses import PAIR_TEMPERATURE
from .sampling import check_short_crops, unlabelled_records

TEACHER_TARGETS = ("tags", "emb", "both")


def build_parser(out_required=True) -> argparse.ArgumentParser:
    """crnn-train's parser; `beet crnntrain DATA` parses with ``out_required=False`` (it files the model itself)."""
    p = argparse.ArgumentParser(prog="crnn-train", description="Train the beets-crnn CRNN on labelled audio.")
    p.add_argument("data", nargs="+",
                   help="one or more labelled sets: a manifest CSV (path, genre, split, artist) or a folder "
                        "(with metadata.csv, or genre/ subfolders); the model learns the union of their genres")
    return add_options(p, out_required=out_required)


EXPERIMENTS = "experiments and smoke tests (measured, not shipped: docs/experiments)"


def add_options(p: argparse.ArgumentParser, out_required=False) -> argparse.ArgumentParser:
    """The training options of both forms (`beet crnntrain QUERY` trains on a library with the same ones), in groups.

    No default --out: a model written into the working directory could replace the checkout's own
    model_weights/, the one that loads. crnn-train requires it; `beet crnntrain` files the model in
    its config directory.
    """
    p.add_argument("--out", default=None, required=out_required,
                   help="folder for crnn.weights.h5 and crnn.json" + (" (required)" if out_required else ""))
    p.add_argument("--cache", default=str(dataset.DEFAULT_CACHE), help="log-mel cache folder")
    p.add_argument("--init-from", default=None, help="fine-tune from this model folder or card")
    p.add_argument("--name", default="crnn", help="prefix of the model id (kept in the card as its name)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="windows per clip when validating")
    p.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--patience", type=int, default=8)
    g.add_argument("--max-minutes", type=float, default=None, help="stop after this long (best weights kept)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--anneal", type=float, default=0.0, metavar="FRACTION",
                   help="in the last FRACTION of --max-minutes (else of --epochs) the learning rate falls along a "
                        "cosine to a tenth (0 = off: constant, halved on plateaus)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay as in AdamW, scaled by the learning rate (0 = plain Adam)")
    g.add_argument("--average", type=int, default=1,
                   help="average the weights of this many best epochs; kept if val loss improves (1 = off)")
    g.add_argument("--no-recalibrate", action="store_true",
                   help="keep Keras' running batch-norm statistics instead of recomputing them each epoch")

    g = p.add_argument_group("augmentation")
    g.add_argument("--crops", type=int, default=2, help="random crops per training clip per epoch")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--masking", action="store_true",
                   help="mask random mel bands and time spans of each crop (SpecAugment-style)")
    g.add_argument("--shift", type=int, default=0, help="shift crops by up to this many mel bands (0 = off)")
    g.add_argument("--augment", default="",
                   help=f"comma-separated log-mel edits applied to crops: {', '.join(augment.MEL_EDITS)}, or 'all'")
    g.add_argument("--augment-p", type=float, default=0.5, help="probability of each log-mel edit per crop")
    g.add_argument("--versions", default="",
                   help="comma-separated codec versions to train on, made once with ffmpeg and cached "
                        f"({', '.join(augment.CODEC_VERSIONS)}), or 'default' ({', '.join(augment.TRAIN_VERSIONS)})")
    g.add_argument("--version-p", type=float, default=0.5, help="probability that a crop comes from a codec version")
    g.add_argument("--version-cache", default=str(augment.DEFAULT_VERSION_DIR), help="folder for codec versions")

    g = p.add_argument_group("teacher (the [teacher] extra)")
    g.add_argument("--teacher", choices=teacher.TEACHERS, default=None, help="distil from this teacher too")
    g.add_argument("--teacher-target", choices=TEACHER_TARGETS, default="both",
                   help="what the student learns from the teacher: its 50 tags, its embedding, or both")
    g.add_argument("--teacher-weight", type=float, default=1.0, help="weight of each teacher loss beside the genre loss")
    g.add_argument("--teacher-cache", default=str(teacher.DEFAULT_CACHE), help="folder for teacher outputs")
    g.add_argument("--unlabelled", action="append", default=[],
                   help="DATA only: a folder of audio without genres that the teacher alone teaches (repeatable; "
                        "on a library, --teacher trains its tracks without a usable genre)")

    g = p.add_argument_group("architecture (from scratch; --init-from keeps the starting model's)")
    g.add_argument("--conv-filters", default=None, help="comma-separated widths of the 4 conv layers")
    g.add_argument("--gru-units", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None,
                   help=f"dropout after each conv block (default {DEFAULT_ARCHITECTURE['dropout']})")

    g = p.add_argument_group(EXPERIMENTS)
    g.add_argument("--pairs", type=float, default=0.0, metavar="WEIGHT",
                   help="train on pairs of views of one place in a clip (clean / codec version) with a contrastive "
                        "loss of this weight on the embedding, so versions of a clip land nearest each other (0 = off)")
    g.add_argument("--short-crops", type=int, default=0, metavar="FRAMES",
                   help="train clips that fit in FRAMES log-mel frames (3 s excerpts) on crops of FRAMES frames "
                        f"of their loop, not of a whole {WINDOW_FRAMES}-frame window: about FRAMES/1366 "
                        "of a window's CPU (0 = off)")
    g.add_argument("--short-share", type=float, default=1.0, metavar="FRACTION",
                   help="with --short-crops: the share of those clips' crops that are short; the rest are whole "
                        "looped windows, the length crnnembed analyses them at (1 = all short)")
    g.add_argument("--max-steps", type=int, default=None, help="batches per epoch at most (smoke tests)")
    return p


def _names(value: str, known, default=(), what="value") -> list[str]:
    if not value:
        return []
    if value in ("all",):
        return list(known)
    if value == "default":
        return list(default)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CrnnError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def run(args, log=print, records=None, cache=None, on_epoch=None, callbacks=(), card_extra=None,
        unlabelled=()) -> ModelCard:
    """Train as ``args`` say and write the model to ``args.out``.

    A library (``library_train``) passes its own ``records``, genre-less ``unlabelled`` records (beside
    any ``--unlabelled`` folders) and excerpt ``cache`` instead of ``args.data``, ``on_epoch``/
    ``callbacks`` for its progress line and time budget, and ``card_extra`` for the card's
    training section; everything else is this same code.
    """
    model_mod.require_tensorflow()  # before any decoding: a plain install cannot train
    if not args.out:
        raise CrnnError("--out DIR: the folder to write the model to")
    records = dataset.read_sources(args.data) if records is None else records
    edits = _names(args.augment, augment.MEL_EDITS, what="augmentation")
    versions = _names(args.versions, list(augment.CODEC_VERSIONS), augment.TRAIN_VERSIONS, what="codec version")
    if args.pairs < 0:
        raise CrnnError("--pairs is a loss weight: 0 (off) or more")
    if not 0 <= args.anneal <= 1:
        raise CrnnError("--anneal is a fraction of the training budget: 0 (off) to 1")
    check_short_crops(args.short_crops)
    if (args.unlabelled or unlabelled) and not args.teacher:  # folders, or a library's genre-less tracks
        raise CrnnError("--unlabelled needs --teacher: without labels, only a teacher can say what the audio is")
    if args.teacher:
        from .teacher import check_installed

        check_installed()
    unlabelled = [r for folder in args.unlabelled for r in unlabelled_records(folder)] + list(unlabelled)
    trainer = Trainer(records, args.cache if cache is None else cache, n_windows=args.windows, log=log, versions=versions,
                      version_dir=args.version_cache, teacher=args.teacher, teacher_dir=args.teacher_cache,
                      unlabelled=unlabelled)
    augmenter = augment.MelAugmenter(edits, args.augment_p) if edits else None
    arch = {}
    if args.conv_filters:
        arch["conv_filters"] = [int(v) for v in args.conv_filters.split(",")]
    if args.gru_units:
        arch["gru_units"] = args.gru_units
    if args.dropout is not None:
        arch["dropout"] = args.dropout
    full, arch, info = trainer.fit(epochs=args.epochs, patience=args.patience, crops_per_clip=args.crops,
                                   batch_size=args.batch_size, mixup=args.mixup, lr=args.lr, seed=args.seed,
                                   architecture=arch, init_from=args.init_from, max_minutes=args.max_minutes,
                                   max_steps=args.max_steps, recalibrate=not args.no_recalibrate,
                                   masking=args.masking, shift=args.shift, average=args.average,
                                   weight_decay=args.weight_decay, augmenter=augmenter,
                                   version_p=args.version_p if versions else 0.0,
                                   teacher_target=args.teacher_target, teacher_weight=args.teacher_weight,
                                   new_head=getattr(args, "new_head", False), on_epoch=on_epoch, callbacks=callbacks,
                                   pair_weight=args.pairs, anneal=args.anneal, short_frames=args.short_crops,
                                   short_share=args.short_share)
    count = lambda recs: {g: sum(g in (r.genre, *r.more) for r in recs) for g in trainer.genres}  # noqa: E731
    extra = {
        "training": {
            "data": [str(d) for d in args.data],
            "sources": {src: {"genres": genres,
                              "train": sum(r.source == src for r in trainer.train_records),
                              "val": sum(r.source == src for r in trainer.val_records)}
                        for src, genres in trainer.label_sets.items()},
            "label_mask": "per source: a clip's genre loss counts only the genres its own set labels",
            "clips": {"train": len(trainer.train_records), "val": len(trainer.val_records),
                      "unlabelled": len(trainer.unlabelled)},
            "clips_per_genre": {"train": count(trainer.train_records), "val": count(trainer.val_records)},
            "command": getattr(args, "command", None) or " ".join(["python -m beetsplug.crnn.training.train"]
                                                                   + [shlex.quote(a) for a in sys.argv[1:]]),
            "optimizer": info["optimizer"],
            "loss": info["losses"], "loss_weights": info["loss_weights"],
            "crops_per_clip": args.crops, "batch_size": args.batch_size, "mixup": args.mixup, "masking": args.masking,
            "shift": args.shift, "average": args.average,
            "short_crops": ({"frames": args.short_crops, "share": args.short_share,
                             "clips": int(np.sum(trainer.crop_lengths(np.arange(len(trainer.train_samples)),
                                                                      args.short_crops) < WINDOW_FRAMES))}
                            if args.short_crops else None),
            "augmentation": {"log_mel_edits": augmenter.describe() if augmenter else None,
                             "codec_versions": {v: augment.CODEC_VERSIONS[v][1] for v in versions},
                             "version_p": args.version_p if versions else 0.0},
            "teacher": ({"name": args.teacher, "model": teacher.TEACHER_MODEL, "target": args.teacher_target,
                         "weight": args.teacher_weight, "on": "clean audio, per 3 s window, mean over each crop",
                         # audio only the teacher speaks for: --unlabelled folders and/or a library's genre-less tracks
                         "unlabelled": {"folders": [str(u) for u in args.unlabelled],
                                        "clips": len(trainer.unlabelled)}} if args.teacher else None),
            "pairs": ({"weight": args.pairs, "loss": "pair_loss (NT-Xent)", "temperature": PAIR_TEMPERATURE,
                       "views": "one place in a clip: as it is and as a codec version, each with its own edits"}
                      if args.pairs else None),
            "seed": args.seed,
            "batchnorm_recalibrated": not args.no_recalibrate, "init_from": args.init_from,
            **({"new_head": True} if getattr(args, "new_head", False) else {}),
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"], "minutes": info["minutes"],
            "stopped": info["stopped"],
            "history": info["history"],
            **({"averaging": info["averaging"]} if "averaging" in info else {}),
            **(card_extra or {}),
        },
    }
    card = save_model(full, args.out, trainer.genres, arch, extra, name=args.name, tags=info["tags"], log=log)
    log(f"wrote {card.weights} and {Path(args.out) / CARD_NAME} (model id {card.model_id})")
    return card


def train_into(models_dir, write) -> tuple[ModelCard, Path]:
    """``write(folder)`` writes a model (returning its card); the folder is ``models_dir/<model id>`` once written.

    The id is known only when the weights are, so the model is written beside, then renamed; a
    model with the same id (the same weights again) is replaced. Returns (card, folder).
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".training-{os.getpid()}"
    try:
        card = write(tmp)
        folder = models_dir / card.model_id
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return card, folder


def main(argv=None) -> int:
    return command_main("crnn-train", lambda: build_parser().parse_args(argv), run, "interrupted; no model written")


if __name__ == "__main__":
    sys.exit(main())
