"""Nearest tracks (or albums) that pass the user's filters: the search behind `beet similar`.

The index answers "nearest by cosine"; filters (beets queries), the genre, duplicates and
the artist cap then throw candidates away. So the search asks the index for a few hundred,
and asks again for four times as many until it has enough or has looked at the whole
library. What the glue knows about a candidate (its tags, whether it passes the filters) is
looked up once per command and cached, so widening and a path's many steps cost no
repeated SQL. Pure numpy; the lookups are callbacks, so nothing here imports beets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from . import rank
from .errors import CrnnError

ORDERS = ("score", "smooth")


@dataclass
class Settings:
    """How one result list is ranked and trimmed (the options `similar`, `crnnpath` and saved mixes share)."""

    mode: str = "genre"
    genre_weight: float = rank.DEFAULT_GENRE_WEIGHT
    max_per_artist: int | None = None
    genre: str | None = None
    order: str = "score"
    filters: list = field(default_factory=list)
    search_k: int = -1


class Catalogue:
    """Fields of index entries and whether they pass the filters, looked up once each.

    ``lookup(ids)`` gives {id: (artist, title, genre, mbid)} for the ids that still exist;
    ``matches(ids)`` the set of those that pass every filter (None: no filters).
    """

    def __init__(self, lookup: Callable[[list], dict], matches: Callable[[list], set] | None = None):
        self._lookup = lookup
        self._matches = matches
        self._known: dict[int, tuple | None] = {}

    def fields(self, ids: Iterable[int]) -> dict:
        """{id: fields} for the ids that exist and pass the filters."""
        ids = [int(i) for i in ids]
        new = [i for i in dict.fromkeys(ids) if i not in self._known]
        if new:
            found = self._lookup(new)
            ok = set(found) if self._matches is None else self._matches([i for i in new if i in found])
            for i in new:
                self._known[i] = found[i] if i in ok else None
        return {i: self._known[i] for i in ids if self._known[i] is not None}


def checked(settings: Settings, where: str = "") -> Settings:
    """``settings`` when its mode and order are known ones; ``where`` names their place in the error."""
    for key, known in (("mode", rank.MODES), ("order", ORDERS)):
        value = getattr(settings, key)
        if value not in known:
            raise CrnnError(f"{where}{key} must be one of {', '.join(known)}, not {value!r}")
    return settings


def first_batch(n: int) -> int:
    """Candidates asked of the index first: enough that duplicates and an artist cap rarely run it dry."""
    return max(10 * n, 100)


def nearest(index, vector, probs, n: int, picker: rank.Picker, catalogue: Catalogue, settings: Settings,
            exclude=()) -> tuple[list[rank.Candidate], bool]:
    """Up to ``n`` candidates nearest ``vector`` that ``picker`` allows, best first, and whether
    the whole index was looked at (so a short list is all there is). ``picker`` is not changed.
    """
    want = first_batch(n)
    exclude = list(exclude)
    while True:
        ids, cos = index.query(vector, want, search_k=settings.search_k, exclude=exclude)
        known = catalogue.fields(ids.tolist())
        keep = np.array([i in known for i in ids.tolist()], dtype=bool)
        ids, cos = ids[keep], cos[keep]
        chosen = []
        if len(ids):
            scores = rank.scores(vector, probs, cand_cos=cos, cand_probs=index.probs[index.rows_of(ids)],
                                 mode=settings.mode, genre_weight=settings.genre_weight)
            candidates = [rank.Candidate(i, float(s), float(c), *known[i])
                          for i, s, c in zip(ids.tolist(), scores, cos)]
            chosen = picker.choose(candidates, n)
        whole = want >= len(index)
        if len(chosen) >= n or whole:
            return chosen, whole
        want *= 4  # filters, duplicates or the cap ate the candidates: look further
