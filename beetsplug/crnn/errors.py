"""One root exception, so the plugin glue can turn any failure into a one-line message."""

import os


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
