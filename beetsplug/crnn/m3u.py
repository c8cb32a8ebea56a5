"""Extended M3U playlists (``.m3u`` / ``.m3u8``), written atomically.

Text (the ``#EXTINF`` artist and title) is always UTF-8. Paths differ: in M3U8 they are UTF-8
too, while plain ``.m3u`` gets each path's raw filesystem bytes (``os.fsencode``), so a player
on the same machine opens exactly the file beets knows even when its name is not valid UTF-8.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass

from .errors import PlaylistError

# Everything str.splitlines() breaks on: a player might too.
_LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")


@dataclass(frozen=True)
class Entry:
    path: bytes | str  # absolute path of the track (beets stores bytes)
    seconds: float | None  # duration; None -> -1 ("unknown") in EXTINF
    artist: str
    title: str


def _one_line(text) -> str:
    return _LINE_BREAKS.sub(" ", str(text)).strip()


def _path_text(path, base_dir) -> str:
    """The path as written: absolute, or relative to ``base_dir`` (``../`` where needed)."""
    p = os.fsdecode(path)  # undecodable bytes survive as surrogates, restored by fsencode
    if base_dir is not None:
        try:
            p = os.path.relpath(p, os.fsdecode(base_dir))
        except ValueError:  # Windows: another drive has no relative path; keep it absolute
            pass
    if "\n" in p or "\r" in p:
        raise PlaylistError(f"cannot write playlist: track path {p!r} contains a line break")
    return p


def render(entries, base_dir=None, utf8=True) -> bytes:
    """The playlist file's bytes (see the module docstring for encodings)."""
    out = [b"#EXTM3U\n"]
    for e in entries:
        s = e.seconds
        secs = -1 if s is None or not math.isfinite(s) else round(s)
        artist, title = _one_line(e.artist), _one_line(e.title)
        label = f"{artist} - {title}" if artist else title
        out.append(f"#EXTINF:{secs},{label}\n".encode("utf-8"))
        p = _path_text(e.path, base_dir)
        # surrogateescape: a name that is not valid UTF-8 is still written byte for byte.
        out.append((p.encode("utf-8", "surrogateescape") if utf8 else os.fsencode(p)) + b"\n")
    return b"".join(out)


def is_m3u8(path, force_utf8=False) -> bool:
    """Whether to write UTF-8 paths: asked for, or implied by a ``.m3u8`` suffix."""
    return force_utf8 or os.path.splitext(os.fsdecode(path))[1].lower() == ".m3u8"


def write(path, entries, base_dir=None, utf8=True) -> None:
    """Write atomically (temp file beside it, fsync, rename): readers see the old or the new playlist."""
    data = render(entries, base_dir, utf8)
    path = os.fsdecode(path)
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        try:  # keep an existing playlist's permissions; mkstemp's 0600 would hide it from e.g. MPD
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        reason = e.strerror or str(e)
        raise PlaylistError(f"cannot write playlist {path}: {reason}") from e
