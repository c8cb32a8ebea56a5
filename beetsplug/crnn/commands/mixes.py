"""``beet crnnplaylists``: regenerate the saved mixes in ``crnn.playlists`` (and, with crnn.auto, after imports).

``mixes`` reads and checks the config; each mix is a `beet similar` or `beet crnnpath` search
(``similar.find``) written as a playlist into ``crnn.playlist_dir``.
"""

from __future__ import annotations

import os

from beets.ui import UserError

from .common import user_errors
from .similar import configured, find, write_playlist

HELP = "regenerate the saved mixes in crnn.playlists (all, or those named)"


def add_options(parser) -> None:
    parser.usage = "%prog [NAME...]"


def run(plugin, lib, opts, args) -> None:
    written, failed = update(plugin, lib, args)
    if not written and not failed:
        plugin._log.info("no saved mixes: add some to crnn.playlists")
    if failed:
        raise UserError(f"{failed} of {written + failed} saved mixes could not be written")


def imported(plugin, lib, paths) -> None:
    """After `beet import` (with auto on): the saved mixes follow the library."""
    if plugin.config["playlists"].get():
        try:
            update(plugin, lib)
        except UserError as exc:
            plugin._log.warning("{}", exc)


def update(plugin, lib, names=()) -> tuple[int, int]:
    """Regenerate saved mixes; a mix that fails is one warning line and does not stop the others.

    Returns (written, failed).
    """
    from beets.dbcore.query import ParsingError

    from .. import mixes

    with user_errors():
        todo = mixes.chosen(mixes.parse(plugin.config["playlists"].get(), configured(plugin)), names)
    playlist_dir = os.path.expanduser(plugin.config["playlist_dir"].as_str())
    written = failed = 0
    for mix in todo:
        try:
            found = find(plugin, lib, mix.query, mix.n, mix.settings, to=mix.to, albums=mix.albums)
            write_playlist(plugin, lib, os.path.join(playlist_dir, mix.file_name), False,
                           found.playlist(mix.include_seed))
            written += 1
        except (UserError, ParsingError) as exc:  # a bad seed query is beets' ParsingError
            failed += 1
            plugin._log.warning("mix {}: {}", mix.name, exc)
    return written, failed
