"""Ranking for ``beet similar``: cosine (method 1) and genre-aware (method 2) scores.

The genre-aware score adds agreement between predicted genre distributions to the
embedding cosine, because listeners preferred recommendations that stay in genre.
Pure numpy; no beets imports so it can be tested and reused by the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

MODES = ("genre", "cosine")
DEFAULT_GENRE_WEIGHT = 0.5

_EPS = 1e-12  # keeps logs finite and lets all-zero probability vectors normalise


def _as_distribution(x: np.ndarray) -> np.ndarray:
    """Rows of independent sigmoid outputs -> rows summing to 1 (they need not beforehand)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, None) + _EPS
    return x / x.sum(axis=-1, keepdims=True)


def genre_agreement(p, Q) -> np.ndarray:
    """1 - Jensen-Shannon distance (base 2) between ``p`` (g,) and each row of ``Q`` (n, g).

    Base-2 logs bound the divergence by 1, so the agreement lies in [0, 1] with
    1 for identical genre profiles and ~0 for disjoint ones.
    """
    P = _as_distribution(np.asarray(p, dtype=np.float64).reshape(1, -1))
    Q = _as_distribution(np.atleast_2d(np.asarray(Q, dtype=np.float64)))
    if Q.shape[1] != P.shape[1]:
        raise ValueError(f"genre vectors differ in length: {P.shape[1]} vs {Q.shape[1]}")
    M = 0.5 * (P + Q)
    kl_pm = np.sum(P * np.log2(P / M), axis=1)
    kl_qm = np.sum(Q * np.log2(Q / M), axis=1)
    jsd = np.clip(0.5 * (kl_pm + kl_qm), 0.0, 1.0)  # rounding can stray just outside
    return 1.0 - np.sqrt(jsd)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero so they score cosine 0."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def scores(
    seed_vec,
    seed_probs,
    cand_vecs=None,
    cand_cos=None,
    cand_probs=None,
    mode: str = "genre",
    genre_weight: float = DEFAULT_GENRE_WEIGHT,
) -> np.ndarray:
    """Score candidates against a seed: cosine, plus ``genre_weight`` * agreement in "genre" mode.

    ``cand_cos`` lets callers pass cosines an index already computed (e.g. from annoy
    distances); otherwise they are computed from ``cand_vecs``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; expected one of {MODES}")
    if cand_cos is not None:
        cos = np.asarray(cand_cos, dtype=np.float64).reshape(-1)
    elif cand_vecs is not None:
        seed = _unit_rows(np.asarray(seed_vec, dtype=np.float64).reshape(-1))
        cos = _unit_rows(np.atleast_2d(cand_vecs)) @ seed
    else:
        raise ValueError("need either cand_vecs or cand_cos")
    if mode == "cosine":
        return cos
    if seed_probs is None or cand_probs is None:
        raise ValueError('mode "genre" needs seed_probs and cand_probs')
    agree = genre_agreement(seed_probs, cand_probs)
    if agree.shape[0] != cos.shape[0]:
        raise ValueError(f"{cos.shape[0]} cosines but {agree.shape[0]} probability rows")
    return cos + float(genre_weight) * agree


def centroid(vectors) -> np.ndarray:
    """Unit-length mean direction of several seed embeddings (each normalised first).

    Raises ValueError when there is nothing to average or the directions cancel out,
    since no meaningful neighbour query exists then.
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim == 1:
        v = v.reshape(1, -1)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError("centroid needs a non-empty (k, d) array of vectors")
    mean = _unit_rows(v).mean(axis=0)
    norm = np.linalg.norm(mean)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError("seed vectors cancel out: their mean is zero")
    return mean / norm


@dataclass
class Candidate:
    """One ranked recommendation (a track, or an album with its album artist and title).

    ``genre`` is the model's predicted top genre; ``mbid`` the MusicBrainz id (``mb_trackid``,
    or ``mb_albumid`` for albums), empty when beets has none.
    """

    item_id: int
    score: float
    cosine: float
    artist: str
    title: str
    genre: str
    mbid: str = ""


def norm_text(s) -> str:
    """Text as compared for identity (artists, titles, genres): case and runs of whitespace do not count."""
    return " ".join(str(s or "").casefold().split())


DEFAULT_VA_NAME = "Various Artists"  # beets' default ``va_name``


def is_compilation(albumartist, comp=False, va_name=DEFAULT_VA_NAME) -> bool:
    """An album of several artists: beets' ``comp`` flag, or an album artist equal to ``va_name``.

    Its album artist names no one: library training splits its tracks by their track artist, and
    ``similar -a`` counts it as no artist for ``--max-per-artist`` (as it counts untagged tracks).
    """
    return bool(comp) or bool(albumartist and va_name and norm_text(albumartist) == norm_text(va_name))


def dedup_key(artist, title) -> tuple[str, str]:
    """Case- and whitespace-insensitive identity, so re-releases/duplicates collapse."""
    return norm_text(artist), norm_text(title)


def identity_keys(artist, title, mbid="") -> set:
    """The keys under which two tracks count as the same recording.

    (artist, title) only when the title is set: files imported without tags all have an empty
    title, and they are different recordings, not duplicates of each other. Equal MusicBrainz
    recording ids are the same recording whatever the tags say.
    """
    keys = set()
    a, t = dedup_key(artist, title)
    if t:
        keys.add(("tags", a, t))
    m = norm_text(mbid)
    if m:
        keys.add(("mbid", m))
    return keys


class Picker:
    """What one result list has used up: seeds, recordings already in it, each artist's share.

    One Picker spans a whole list, so a song path's later steps skip what its earlier steps
    took. An empty artist is unknown, not one artist: untagged tracks are not capped together.
    """

    def __init__(self, seed_ids: Iterable[int] = (), seed_keys: Iterable[Sequence[str]] = (),
                 seed_mbids: Iterable[str] = (), max_per_artist: int | None = None, genre: str | None = None):
        if max_per_artist is not None and max_per_artist < 1:
            raise ValueError("max_per_artist must be a positive integer or None")
        self.used_ids = {int(i) for i in seed_ids}
        self.used_keys: set = set()
        for artist, title in seed_keys:
            self.used_keys |= identity_keys(artist, title)
        for mbid in seed_mbids:
            self.used_keys |= identity_keys("", "", mbid)
        self.max_per_artist = max_per_artist
        self.want_genre = norm_text(genre) if genre is not None else None
        self.per_artist: dict[str, int] = {}

    def allows(self, c: Candidate) -> bool:
        if c.item_id in self.used_ids:
            return False
        if self.want_genre is not None and norm_text(c.genre) != self.want_genre:
            return False
        if identity_keys(c.artist, c.title, c.mbid) & self.used_keys:
            return False
        artist = norm_text(c.artist)
        return not (self.max_per_artist is not None and artist
                    and self.per_artist.get(artist, 0) >= self.max_per_artist)

    def take(self, c: Candidate) -> None:
        self.used_ids.add(c.item_id)
        self.used_keys |= identity_keys(c.artist, c.title, c.mbid)
        artist = norm_text(c.artist)
        if artist:
            self.per_artist[artist] = self.per_artist.get(artist, 0) + 1

    def copy(self) -> "Picker":
        other = Picker.__new__(Picker)
        other.used_ids, other.used_keys = set(self.used_ids), set(self.used_keys)
        other.max_per_artist, other.want_genre = self.max_per_artist, self.want_genre
        other.per_artist = dict(self.per_artist)
        return other

    def choose(self, candidates: Iterable[Candidate], n: int) -> list[Candidate]:
        """The best ``n`` that this list still allows, best first; the Picker itself is unchanged.

        Ties are broken by item_id so output is deterministic.
        """
        if n <= 0:
            return []
        trial = self.copy()
        out: list[Candidate] = []
        for c in sorted(candidates, key=lambda c: (-float(c.score), c.item_id)):
            if trial.allows(c):
                trial.take(c)
                out.append(c)
                if len(out) >= n:
                    break
        return out


def select(
    candidates: Iterable[Candidate],
    n: int,
    seed_ids: Iterable[int] = (),
    seed_keys: Iterable[Sequence[str]] = (),
    max_per_artist: int | None = None,
    genre: str | None = None,
    seed_mbids: Iterable[str] = (),
) -> list[Candidate]:
    """Best ``n`` candidates after removing seeds, duplicates (see identity_keys),
    over-represented artists and (optionally) other genres.
    """
    picker = Picker(seed_ids, seed_keys, seed_mbids, max_per_artist=max_per_artist, genre=genre)
    return picker.choose(candidates, n)
