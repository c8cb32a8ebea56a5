"""``beet crnntrain`` and ``beet crnneval``: on the library's own genres (QUERY) or on labelled audio (DATA).

One rule tells data from a query (``library_train.names_data``): arguments that all name existing
files or folders are labelled data sets; anything else, or nothing, is a beets query (``--library``
forces a query). DATA goes to ``train.run`` / ``evaluate.run`` as ``crnn-train`` / ``crnn-eval``
would run it; a query reads the items here and hands ``library_train`` / ``library_eval`` plain values.
"""

from __future__ import annotations

import os
from pathlib import Path

from beets import config as beets_config
from beets import ui
from beets.ui import UserError

from ..errors import CrnnError
from .common import adopt_argparse, argv_from, progress, user_errors, yaml_scalar

TRAIN_HELP = ("train the CRNN on your library's genres (QUERY) or on labelled audio (DATA: manifest CSV or genre "
              "folders)")
EVAL_HELP = "evaluate a CRNN on your library's held-out artists (QUERY) or on labelled audio (DATA)"


def add_train_options(parser) -> None:
    from ..training.library_train import build_train_parser

    adopt_argparse(parser, build_train_parser())
    parser.usage = "%prog [options] [QUERY | DATA...]"


def add_eval_options(parser) -> None:
    from ..training.library_train import build_eval_parser

    adopt_argparse(parser, build_eval_parser())
    parser.usage = "%prog [options] [QUERY | DATA...]"


def run_train(plugin, lib, opts, args) -> None:
    from ..model import require_tensorflow
    from ..training import library_train

    if not getattr(opts, "dry_run", False):
        with user_errors():
            require_tensorflow()  # before the library is decoded
    if not library_train.names_data(args, opts.library):
        return train_library(plugin, lib, opts, args)
    from ..training.train import build_parser, run, train_into

    _refuse_library_options(opts, library_train.LIBRARY_OPTIONS, "training on DATA")
    argv = argv_from(opts, args)
    ns = build_parser(out_required=False).parse_args(argv)
    ns.command = "beet crnntrain " + " ".join(argv)

    def write(folder):
        ns.out = str(folder)
        return run(ns, log=lambda m: plugin._log.info("{}", m))

    with user_errors():
        if ns.out:  # the user's folder
            write(ns.out)
            return
        # as on a library: crnn_models/<model id> in the beets config directory, never the working directory
        card, folder = train_into(Path(beets_config.config_dir()) / library_train.MODELS_DIR, write)
    _wrote(card, folder)


def run_eval(plugin, lib, opts, args) -> None:
    from ..training.library_train import build_eval_parser, names_data

    ns = build_eval_parser().parse_args(argv_from(opts, args))  # the parser --help shows, for both forms
    if not names_data(ns.args, ns.library):
        return eval_library(plugin, lib, ns)
    from ..training.evaluate import run

    _refuse_library_options(opts, ("library", "field"), "evaluating DATA")
    ns.data = ns.args
    with user_errors():
        ui.print_(run(ns))


def train_library(plugin, lib, opts, args) -> None:
    from ..training import library_train

    argv = argv_from(opts, args)
    ns = library_train.build_train_parser().parse_args(argv)
    ns.command = "beet crnntrain " + " ".join(argv)
    tracks = _library_tracks(lib, args, ns.field)
    with user_errors():
        result = library_train.train_library(
            ns, tracks, beets_config.config_dir(), _aliases(plugin), query=" ".join(args),
            log=lambda m: plugin._log.info("{}", m), warn=lambda m: plugin._log.warning("{}", m), say=ui.print_,
            progress=lambda total: progress(total), workers=plugin.config["workers"].get(int) or None,
            timeout=plugin.config["timeout"].as_number() or None, windows=plugin.config["windows"].get(int))
    if "card" in result:  # not with --dry-run
        _wrote(result["card"], result["folder"])


def _wrote(card, folder) -> None:
    """Where the model is and how to use it."""
    folder = os.path.abspath(str(folder))
    ui.print_(f"wrote model {card.model_id} to {folder}")
    ui.print_("to use it, set this in your beets config (beet config -e):")
    ui.print_(f"    crnn: {{model: {yaml_scalar(folder)}}}")
    ui.print_("then run beet crnnembed: the model id changed, so every track is analysed again")


def eval_library(plugin, lib, ns) -> None:
    """`beet crnneval [QUERY]`: the newest model trained on the library (or --model) beside the configured and
    the shipped one, on the held-out artists."""
    from ..model import ModelCard
    from ..training import library_eval
    from ..training.library_train import library_paths

    for name in ("robustness", "clips_per_genre", "version_cache", "update_card"):
        if getattr(ns, name, None) not in (None, False):
            raise UserError(f"--{name.replace('_', '-')} is for evaluating DATA, not a library query")
    args = ns.args
    cache_dir, models_dir = library_paths(beets_config.config_dir(), ns)
    configured = plugin.config["model"].as_str() or None
    with user_errors():
        # --model, else the newest model trained on the library, else the configured one
        where = ns.model or library_eval.newest_model(models_dir)
        if not ns.model:
            if where is not None:
                plugin._log.info("evaluating the newest model in {} (--model chooses another)", models_dir)
            else:
                where = configured
                plugin._log.info("no model trained on the library yet (beet crnntrain): evaluating {}",
                                 where or "the shipped model")
        card = ModelCard.load(where)
        # beside it: the model in use (crnn.model) and the shipped one, each once
        others = []
        for role, path in (("configured", configured), ("shipped", None)):
            if role == "configured" and path is None:
                continue
            try:
                other = ModelCard.load(path)
            except CrnnError as exc:
                others.append((role, str(exc)))
                continue
            if other.model_id not in [card.model_id] + [o.model_id for _, o in others if not isinstance(o, str)]:
                others.append((role, other))
        field = ns.field or (library_eval.library_info(card) or {}).get("field") or "genre"
        text, _ = library_eval.eval_library(
            ns, _library_tracks(lib, args, field), card, others, cache_dir, _aliases(plugin), query=" ".join(args),
            log=lambda m: plugin._log.warning("{}", m), windows=plugin.config["windows"].get(int),
            workers=plugin.config["workers"].get(int) or None, timeout=plugin.config["timeout"].as_number() or None,
            progress=lambda total: progress(total))
    ui.print_(text)


def _library_tracks(lib, args, field):
    """The items matching the query as taxonomy.Track (id, path, split artist, genre values): the album
    artist, else the artist; the track artist on compilations (``comp``, or album artist = ``va_name``)."""
    from beets.dbcore.query import ParsingError

    from ..training.taxonomy import Track, split_artist

    try:
        items = list(lib.items(args))
    except ParsingError as exc:
        raise UserError(f"query {' '.join(args)!r}: {exc}") from None
    va_name = beets_config["va_name"].as_str()
    tracks = []
    for item in items:
        artist, comp = split_artist(item.get("artist"), item.get("albumartist"), item.get("comp"), va_name)
        tracks.append(Track(item.id, item.path, artist, _field_values(item, field), comp))
    return tracks


def _field_values(item, field):
    """The raw genre values of an item's field: a list (beets' multi-valued ``genres``) or a string.

    ``genre`` means the item's genres: the ``genres`` list where beets has one (2.14 and later) and
    it is set, else the ``genre`` string (a fixed field before, a legacy flexible attribute after).
    """
    if field in ("genre", "genres"):
        if "genres" in item._fields:
            values = item.get("genres")
            if values:
                return list(values)
        return [item.get("genre")] if "genre" in item.keys() and item.get("genre") else []
    value = item.get(field)
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _aliases(plugin) -> dict:
    aliases = plugin.config["genre_aliases"].get()
    if not aliases:
        return {}
    if not isinstance(aliases, dict):
        raise UserError("crnn.genre_aliases must be a mapping: {genre: [names that mean it]}")
    return aliases


def _refuse_library_options(opts, names, what):
    for name in names:
        if getattr(opts, name, None) not in (None, False):
            raise UserError(f"--{name.replace('_', '-')} is for a library query, not for {what} "
                            "(arguments that all name existing files or folders are data sets)")
