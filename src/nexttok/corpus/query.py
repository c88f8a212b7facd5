"""What a corpus says about a sequence of ids: how often it occurs, what follows it, the longest suffix
of a context it holds (the infinity-gram distribution, Liu et al. 2024), and the verbatim spans of a
text (OLMoTrace-style). All on ids; text is the caller's edge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nexttok.corpus import search
from nexttok.corpus.index import CorpusIndex, Location
from nexttok.errors import NexttokError


def _ids(index: CorpusIndex, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    q = np.asarray(ids, dtype=np.int64)
    if q.size and (q.min() < 0 or q.max() >= search.SEP):
        raise NexttokError("token ids must be between 0 and 2**32 - 2", param="ids")
    return q.astype(np.uint32)


def count(index: CorpusIndex, ids: Sequence[int]) -> int:
    """How many times ``ids`` occurs (within one document)."""
    lo, hi = search.find(index.tokens, index.sa, _ids(index, ids))
    return int(hi - lo)


def next_counts(index: CorpusIndex, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(token id, count) of what follows ``ids`` in the corpus, the most frequent first."""
    q = _ids(index, ids)
    lo, hi = search.find(index.tokens, index.sa, q)
    return _runs(index, lo, hi, len(q))


def _runs(index: CorpusIndex, lo: int, hi: int, k: int) -> list[tuple[int, int]]:
    lo, hi = search.continued(index.tokens, index.sa, lo, hi, k)
    tok, n = search.next_runs(index.tokens, index.sa, lo, hi, k)
    order = np.lexsort((tok, -n))
    return [(int(tok[i]), int(n[i])) for i in order]


def locate(index: CorpusIndex, ids: Sequence[int], limit: int = 5) -> list[Location]:
    """Where ``ids`` occurs: the first ``limit`` occurrences in corpus order."""
    lo, hi = search.find(index.tokens, index.sa, _ids(index, ids))
    return _places(index, lo, hi, limit)


def _places(index: CorpusIndex, lo: int, hi: int, limit: int) -> list[Location]:
    positions = np.sort(np.asarray(index.sa[lo:hi], dtype=np.int64))[:limit]
    return [index.where(int(p)) for p in positions]


@dataclass
class InfGram:
    """The infinity-gram distribution after a context: its longest suffix that the corpus holds followed
    by a token (``suffix``, ``length`` tokens, ``occurrences`` times), and what followed it."""

    suffix: list[int]
    occurrences: int
    next: list[tuple[int, int]]  # (id, count), most frequent first
    where: list[Location] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.suffix)

    @property
    def top1(self) -> int | None:
        return self.next[0][0] if self.next else None

    def share(self, token_id: int) -> float:
        return next((n for t, n in self.next if t == token_id), 0) / max(self.occurrences, 1)


def infgram(index: CorpusIndex, context: Sequence[int], locate_limit: int = 3) -> InfGram:
    """The infinity-gram distribution after ``context`` (length 0: the corpus's unigram counts)."""
    ctx = _ids(index, context)
    k, lo, hi = search.longest_suffix(index.tokens, index.sa, ctx)
    runs = _runs(index, lo, hi, k)
    suffix = [int(t) for t in ctx[len(ctx) - k :]] if k else []
    return InfGram(suffix, int(hi - lo), runs, _places(index, lo, hi, locate_limit) if k else [])


@dataclass
class Span:
    """A maximal run ``ids[start:stop]`` that occurs verbatim in the corpus."""

    start: int
    stop: int
    occurrences: int
    where: list[Location]

    @property
    def length(self) -> int:
        return self.stop - self.start


def spans(index: CorpusIndex, ids: Sequence[int], min_span: int = 8, locate_limit: int = 3) -> list[Span]:
    """The maximal verbatim spans of at least ``min_span`` tokens (none inside another), in order."""
    if min_span < 1:
        raise NexttokError(f"--min-span must be at least 1 (got {min_span})", param="min_span")
    q = _ids(index, ids)
    lengths, los, his = search.matching_lengths(index.tokens, index.sa, q)  # (n,) each
    out, reach = [], 0
    for i, n in enumerate(lengths.tolist()):
        if i + n > reach and n >= min_span:
            lo, hi = int(los[i]), int(his[i])
            out.append(Span(i, i + n, hi - lo, _places(index, lo, hi, locate_limit)))
        reach = max(reach, i + n)
    return out


def coverage(found: list[Span], n: int) -> float:
    """The share of ``n`` positions inside at least one span."""
    covered = np.zeros(n, dtype=bool)
    for s in found:
        covered[s.start : s.stop] = True
    return float(covered.mean()) if n else 0.0
