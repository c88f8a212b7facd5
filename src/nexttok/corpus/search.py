"""Suffix-array queries over token ids, compiled with numba.

``tokens`` is the corpus: uint32 ids, every document followed by ``SEP`` (larger than any id, so no
query can match across a document's end). ``sa`` sorts its suffixes. Every suffix in a range
``[lo, hi)`` of ``sa`` shares the query's first ``k`` tokens, so the token at offset ``k`` of those
suffixes is sorted too: narrowing by one more token, and the next-token counts, are binary searches.
"""

from __future__ import annotations

import numba as nb
import numpy as np

SEP = np.uint32(0xFFFFFFFF)
_SEP = np.int64(0xFFFFFFFF)


@nb.njit(cache=True)
def _key(tokens, sa, i, k):
    # The token at offset k of suffix sa[i]; -1 past the corpus's end (a shorter suffix sorts first).
    p = np.int64(sa[i]) + k
    return np.int64(tokens[p]) if p < tokens.shape[0] else np.int64(-1)


@nb.njit(cache=True)
def _first_at_least(tokens, sa, lo, hi, k, value):
    # The first i in [lo, hi) whose key at offset k is >= value (keys there are sorted).
    while lo < hi:
        mid = (lo + hi) // 2
        if _key(tokens, sa, mid, k) < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(cache=True)
def narrow(tokens, sa, lo, hi, k, value):
    """The sub-range of [lo, hi) whose token at offset k equals ``value``."""
    a = _first_at_least(tokens, sa, lo, hi, k, value)
    return a, _first_at_least(tokens, sa, a, hi, k, value + 1)


@nb.njit(cache=True)
def longest_prefix(tokens, sa, q):
    """(length, lo, hi): the longest prefix of ``q`` that occurs, and its range."""
    lo, hi = np.int64(0), np.int64(sa.shape[0])
    for k in range(q.shape[0]):
        a, b = narrow(tokens, sa, lo, hi, k, np.int64(q[k]))
        if a == b:
            return k, lo, hi
        lo, hi = a, b
    return q.shape[0], lo, hi


@nb.njit(cache=True)
def find(tokens, sa, q):
    """The range of suffixes that start with ``q`` (empty: lo == hi)."""
    k, lo, hi = longest_prefix(tokens, sa, q)
    return (lo, hi) if k == q.shape[0] else (lo, lo)


@nb.njit(cache=True)
def continued(tokens, sa, lo, hi, k):
    """The part of a length-k range whose suffixes go on within their document (a real next token)."""
    return _first_at_least(tokens, sa, lo, hi, k, 0), _first_at_least(tokens, sa, lo, hi, k, _SEP)


@nb.njit(cache=True)
def _suffix_range(tokens, sa, ctx, k):
    lo, hi = find(tokens, sa, ctx[ctx.shape[0] - k :])
    return continued(tokens, sa, lo, hi, k)


@nb.njit(cache=True)
def longest_suffix(tokens, sa, ctx):
    """(k, lo, hi): the longest suffix of ``ctx`` that occurs followed by a token, and the range of
    those occurrences (k = 0: the whole corpus). Occurring is monotone in k, so k is bisected."""
    good, bad = 0, ctx.shape[0] + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        lo, hi = _suffix_range(tokens, sa, ctx, mid)
        if lo < hi:
            good = mid
        else:
            bad = mid
    lo, hi = _suffix_range(tokens, sa, ctx, good)
    return good, lo, hi


@nb.njit(cache=True)
def next_runs(tokens, sa, lo, hi, k):
    """(ids, counts) of the tokens at offset k in a continued range, in id order."""
    ids, counts = [], []
    while lo < hi:
        v = _key(tokens, sa, lo, k)
        end = _first_at_least(tokens, sa, lo, hi, k, v + 1)
        ids.append(v)
        counts.append(end - lo)
        lo = end
    return np.array(ids, dtype=np.int64), np.array(counts, dtype=np.int64)


@nb.njit(cache=True)
def _top_run(tokens, sa, lo, hi, k):
    # The most frequent next token (the lowest id on a tie) and its count.
    best, best_n = np.int64(-1), np.int64(0)
    while lo < hi:
        v = _key(tokens, sa, lo, k)
        end = _first_at_least(tokens, sa, lo, hi, k, v + 1)
        if end - lo > best_n:
            best, best_n = v, end - lo
        lo = end
    return best, best_n


@nb.njit(cache=True)
def sweep(tokens, sa, ids, start):
    """For each position t >= start of a text: the longest continued suffix of ids[:t] (its length, the
    occurrences that go on) and the corpus's most frequent next token there. The suffix at t+1 is at
    most one token longer than at t, so each step starts from there and shrinks (amortized O(1) finds)."""
    n = ids.shape[0] - start
    ks, totals = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    top, top_n = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    k = 0
    for i in range(n):
        t = start + i
        k = min(k + 1, t)
        lo, hi = _suffix_range(tokens, sa, ids[:t], k)
        while lo == hi:
            k -= 1
            lo, hi = _suffix_range(tokens, sa, ids[:t], k)
        ks[i], totals[i] = k, hi - lo
        top[i], top_n[i] = _top_run(tokens, sa, lo, hi, k)
    return ks, totals, top, top_n


@nb.njit(cache=True)
def matching_lengths(tokens, sa, ids):
    """For each start i of ``ids``: the length of the longest prefix of ids[i:] that occurs, and the
    range of its occurrences."""
    n = ids.shape[0]
    out, los, his = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i in range(n):
        out[i], los[i], his[i] = longest_prefix(tokens, sa, ids[i:])
    return out, los, his
