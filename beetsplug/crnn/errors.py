"""One root exception, so the plugin glue and the console scripts can turn any failure into a one-line message."""

import os
import sys


def display_path(path) -> str:
    """A path for messages: text even when the name is not valid UTF-8 (str or bytes in)."""
    return os.fsencode(path).decode("utf-8", "replace")


class CrnnError(Exception):
    """Base class of every error beets-crnn raises on purpose."""


class AudioError(CrnnError):
    """A file could not be decoded (unreadable, corrupt, unsupported, or timed out)."""


class ModelError(CrnnError):
    """Weights or model card are missing, mismatched or corrupt."""


class SimilarityIndexError(CrnnError):
    """The similarity index file is missing, stale or unreadable."""


class StoreError(CrnnError):
    """A stored attribute (e.g. the embedding) cannot be decoded."""


class PlaylistError(CrnnError):
    """A playlist could not be written."""


def command_main(prog: str, parse, run, interrupted: str = "interrupted") -> int:
    """A console script's body: ``run(parse())``; a CrnnError is one line and status 1, Ctrl-C one line and 130."""
    args = parse()
    try:
        run(args)
    except CrnnError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return 0
