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


def fields_for(embedding, probs, genres, model_id: str, mtime: float, stamp: float) -> dict:
    """Attribute values describing one analysed track."""
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
