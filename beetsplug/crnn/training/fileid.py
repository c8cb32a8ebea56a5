"""Cache keys for labelled audio by content, not by path and mtime.

A data set that is copied, restored or provisioned again gets new mtimes (and maybe a new
place) with the same bytes; its log-mels, codec versions and teacher targets stay valid, and
re-making them costs a quarter of an hour of ffmpeg and musicnn. A changed file hashes
differently, so it is analysed again.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_memo: dict[tuple, str] = {}
_lock = threading.Lock()


def content_id(path) -> str:
    """sha1 of the file's bytes; hashed once per process while its size and mtime stay the same."""
    path = Path(path)
    st = path.stat()
    seen = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        known = _memo.get(seen)
    if known is not None:
        return known
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    with _lock:
        _memo[seen] = digest.hexdigest()
    return _memo[seen]
