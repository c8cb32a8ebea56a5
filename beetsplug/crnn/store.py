"""What crnnembed stores on an item, as plain attribute values (no beets import here).

The embedding is base64 of little-endian float16: 68 dims -> 184 characters, about a
fifth of a decimal list, and float16's ~1e-3 precision is far below what moves a cosine ranking.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

import numpy as np

from .errors import StoreError

EMBEDDING = "crnn_embedding"
GENRE = "crnn_genre"
GENRE_PROB = "crnn_genre_prob"
MODEL = "crnn_model"
MTIME = "crnn_mtime"
# Changes on every (re-)embedding: the index fingerprint sums it, so a re-embedded item makes the index stale.
STAMP = "crnn_stamp"
PROB_PREFIX = "crnn_prob_"
# The tag head's strongest tags, "rock, indie": a string field, so `beet ls crnn_tags:indie` matches a substring.
TAGS = "crnn_tags"
TAG_SEPARATOR = ", "
# write_genre on beets 2.14+: the prediction it put first in `genres` that the item did not have before (absent
# when the item had it), so the next analysis replaces that prediction instead of piling predictions up.
GENRE_ADDED = "crnn_genre_added"
WRITE_GENRE_MODES = (False, True, "replace")
# musicnn's MSD tags are rare (most under a few percent of tracks), so its sigmoid outputs sit near 0 for
# tags that do not apply; 0.3 keeps a track's clear tags and drops the ones the model is merely unsure of.
DEFAULT_TAG_THRESHOLD = 0.3
DEFAULT_MAX_TAGS = 5


def prob_field(genre: str) -> str:
    """Attribute holding one genre's probability, e.g. crnn_prob_rock ('hip hop' -> crnn_prob_hip_hop)."""
    return PROB_PREFIX + re.sub(r"[^0-9a-z]+", "_", genre.lower()).strip("_")


def encode_vector(v) -> str:
    v = np.asarray(v, dtype="<f2")
    return base64.b64encode(v.tobytes()).decode("ascii")


def vector_bytes(text) -> bytes:
    """The raw float16 bytes of a stored embedding; StoreError if it is empty or not base64."""
    if not isinstance(text, (str, bytes)) or not text:
        raise StoreError("embedding is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise StoreError("embedding is not valid base64") from None


def decode_vector(text, dim: int | None = None) -> np.ndarray:
    """The unit vector stored in ``text``; StoreError if it is not a valid embedding."""
    raw = vector_bytes(text)
    if len(raw) % 2 or (dim is not None and len(raw) != 2 * dim):
        raise StoreError(f"embedding has {len(raw) // 2} values, expected {dim}")
    v = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    norm = float(np.linalg.norm(v)) if len(v) else 0.0
    if not math.isfinite(norm) or abs(norm - 1.0) > 0.01:
        raise StoreError(f"embedding is not a unit vector (norm {norm:.3g})")
    return v / norm


def top_tags(tag_probs, tag_names, threshold: float = DEFAULT_TAG_THRESHOLD, limit: int = DEFAULT_MAX_TAGS) -> str:
    """The tags at or above ``threshold``, most probable first (ties in the card's order), at most
    ``limit`` of them (0: no limit), joined by ", "; "" when none pass."""
    tag_probs = np.asarray(tag_probs, dtype=np.float64).reshape(-1)
    if len(tag_probs) != len(tag_names):
        raise StoreError(f"{len(tag_probs)} tag probabilities for {len(tag_names)} tag names")
    order = sorted(range(len(tag_names)), key=lambda i: -tag_probs[i])  # stable: ties keep the card's order
    chosen = [str(tag_names[i]) for i in order if tag_probs[i] >= threshold]
    return TAG_SEPARATOR.join(chosen[:limit] if limit else chosen)


def split_tags(text) -> list:
    """A stored crnn_tags value as a list of tag names."""
    return [t.strip() for t in str(text or "").split(TAG_SEPARATOR.strip()) if t.strip()]


def fields_for(embedding, probs, genres, model_id: str, mtime: float, stamp: float, tags=None, tag_names=(),
               tag_threshold: float = DEFAULT_TAG_THRESHOLD, max_tags: int = DEFAULT_MAX_TAGS) -> dict:
    """Attribute values describing one analysed track.

    ``tags`` (the track's tag probabilities, named by ``tag_names``) adds crnn_tags; without it
    there is no crnn_tags value (the caller removes one an earlier model left).
    """
    probs = np.asarray(probs, dtype=np.float64)
    top = int(np.argmax(probs))
    values = {
        EMBEDDING: encode_vector(embedding),
        GENRE: genres[top],
        GENRE_PROB: round(float(probs[top]), 4),
        MODEL: model_id,
        MTIME: float(mtime),
        STAMP: float(stamp),
    }
    for genre, p in zip(genres, probs):
        values[prob_field(genre)] = round(float(p), 4)
    if tags is not None:
        values[TAGS] = top_tags(tags, tag_names, tag_threshold, max_tags)
    return values


def probs_from(values: dict, genres) -> np.ndarray:
    """The genre probability vector from stored attributes (missing ones count as 0)."""
    return np.array([float(values.get(prob_field(g)) or 0.0) for g in genres], dtype=np.float32)


def is_current(values: dict, model_id: str, mtime: float | None) -> bool:
    """Stored analysis matches this model and the file has not changed since."""
    if values.get(MODEL) != model_id or not values.get(EMBEDDING):
        return False
    stored = values.get(MTIME)
    return stored is not None and mtime is not None and abs(float(stored) - float(mtime)) < 1e-3


def genre_key(name) -> str:
    """Genre identity (write_genre; library training's taxonomy and aliases): case, spaces, hyphens,
    underscores and dots do not count."""
    return re.sub(r"[\s\-_.]+", "", str(name).casefold())


def written_genres(prediction: str, current, added: str = "", replace: bool = False) -> tuple[list, str]:
    """(``genres`` after write_genre, the value for GENRE_ADDED: "" when nothing was added).

    ``current`` is the item's ``genres`` now and ``added`` what an earlier write_genre put there (its
    GENRE_ADDED). That earlier prediction is taken out first, then the new prediction goes first
    and the user's own genres follow in their order; a genre the user already has (in any
    spelling) moves to the front in theirs and is not recorded as added. ``replace``: the
    prediction alone.
    """
    if replace:
        return [prediction], ""
    own = [str(g) for g in current or () if str(g).strip()]
    if added:
        stale = [i for i, g in enumerate(own) if genre_key(g) == genre_key(added)]
        if stale:
            del own[stale[0]]
    same = [g for g in own if genre_key(g) == genre_key(prediction)]
    rest = [g for g in own if genre_key(g) != genre_key(prediction)]
    return ([same[0]] if same else [prediction]) + rest, ("" if same else prediction)


def is_stale_genre(value, previous_prediction, genres) -> bool:
    """A flexible ``genre`` attribute on beets 2.14+ that an earlier write_genre wrote: it holds the track's
    previous prediction or a genre of the model in use (beets 2.14 keeps genres in ``genres``)."""
    key = genre_key(value or "")
    return bool(key) and key in {genre_key(g) for g in [previous_prediction or "", *genres] if g}
