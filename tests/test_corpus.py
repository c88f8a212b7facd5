"""The corpus index against brute-force scans of random corpora, and where positions map back to."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nexttok.corpus import CorpusIndex, count, coverage, infgram, locate, next_counts, spans
from nexttok.corpus.index import Document, build
from nexttok.errors import NexttokError


def random_docs(rng, vocab: int, n_docs: int = 5, size: int = 300, base: int = 0) -> list[np.ndarray]:
    # Few distinct ids (plus an offset above 65,535 when `base` is) so sequences repeat.
    return [(base + rng.integers(0, vocab, rng.integers(1, size))).astype(np.uint32) for _ in range(n_docs)]


def make_index(tmp_path, docs: list[np.ndarray], name: str = "idx") -> CorpusIndex:
    return build(
        [Document(d, i, 1) for i, d in enumerate(docs)], [f"f{i}" for i in range(len(docs))], tmp_path / name, {}
    )


def occurrences(docs, q) -> list[tuple[int, int]]:
    q, m = list(q), len(q)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - m + 1) if list(doc[i : i + m]) == q]


def brute_next(docs, q) -> Counter:
    return Counter(int(docs[d][i + len(q)]) for d, i in occurrences(docs, q) if i + len(q) < len(docs[d]))


def brute_suffix(docs, ctx) -> int:
    return max(k for k in range(len(ctx) + 1) if sum(brute_next(docs, ctx[len(ctx) - k :]).values()))


@pytest.fixture(params=[(3, 0), (4, 70_000)], ids=["small-vocab", "ids-above-65535"])
def corpus(request, tmp_path):
    vocab, base = request.param
    docs = random_docs(np.random.default_rng(vocab), vocab, base=base)
    return docs, make_index(tmp_path, docs), base


def queries(docs, rng, base):
    yield from (docs[0][:3], docs[-1][-4:], docs[-1][-1:], [base], [base, base, base])
    yield np.concatenate([docs[0][-2:], docs[1][:2]])  # across a document boundary: must not match
    for _ in range(40):
        d = docs[rng.integers(len(docs))]
        i = rng.integers(len(d))
        yield d[i : i + rng.integers(1, 7)]


def test_count_next_and_locate_equal_a_scan(corpus):
    docs, index, base = corpus
    for q in queries(docs, np.random.default_rng(1), base):
        found = occurrences(docs, q)
        assert count(index, q) == len(found)
        assert dict(next_counts(index, q)) == brute_next(docs, q)
        starts = [int(sum(len(x) + 1 for x in docs[:d]) + i) for d, i in found]
        assert [loc.position + int(index.doc_starts[loc.document]) for loc in locate(index, q, 1000)] == starts


def test_boundary_sequences_do_not_match(corpus):
    docs, index, _ = corpus
    across = np.concatenate([docs[0][-2:], docs[1][:2]])
    assert count(index, across) == len(occurrences(docs, across))
    assert next_counts(index, docs[-1][-(len(docs[-1])) :]) == []  # a whole last document: nothing follows


def test_longest_suffix_equals_a_scan(corpus):
    docs, index, base = corpus
    rng = np.random.default_rng(2)
    for _ in range(30):
        ctx = (base + rng.integers(0, 5, rng.integers(0, 12))).astype(np.uint32)
        if rng.random() < 0.5:  # a real stretch of a document, then noise
            d = docs[rng.integers(len(docs))]
            ctx = np.concatenate([ctx, d[: rng.integers(1, len(d) + 1)]])
        g = infgram(index, ctx)
        assert g.length == brute_suffix(docs, list(ctx))
        want = brute_next(docs, list(ctx[len(ctx) - g.length :]))
        assert dict(g.next) == want and g.occurrences == sum(want.values())


def brute_spans(docs, ids, min_span) -> list[tuple[int, int]]:
    occurs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids) + 1) if occurrences(docs, ids[i:j])]
    maximal = [(i, j) for i, j in occurs if not any(a <= i and j <= b and (a, b) != (i, j) for a, b in occurs)]
    return sorted(s for s in maximal if s[1] - s[0] >= min_span)


@pytest.mark.parametrize("min_span", [1, 3, 6])
def test_spans_equal_a_brute_force_search(corpus, min_span):
    docs, index, base = corpus
    rng = np.random.default_rng(3)
    for _ in range(4):
        d = docs[rng.integers(len(docs))]
        ids = np.concatenate([d[:10], (base + rng.integers(0, 8, 5)).astype(np.uint32), docs[0][-8:]])
        got = spans(index, ids, min_span)
        assert [(s.start, s.stop) for s in got] == brute_spans(docs, list(ids), min_span)
        for s in got:
            assert s.occurrences == len(occurrences(docs, ids[s.start : s.stop]))
        covered = {p for a, b in brute_spans(docs, list(ids), min_span) for p in range(a, b)}
        assert coverage(got, len(ids)) == pytest.approx(len(covered) / len(ids))


def test_empty_corpus_and_bad_min_span_are_one_line_errors(tmp_path):
    with pytest.raises(NexttokError, match="corpus is empty"):
        build([Document(np.zeros(0, dtype=np.uint32), 0, 1)], ["f"], tmp_path / "x", {})
    index = make_index(tmp_path, [np.arange(10, dtype=np.uint32)])
    with pytest.raises(NexttokError, match="--min-span"):
        spans(index, [1, 2, 3], 0)
    with pytest.raises(NexttokError, match="not a corpus index"):
        CorpusIndex(tmp_path)


def test_index_loads_memory_mapped_and_takes_under_16_bytes_per_token(tmp_path):
    docs = random_docs(np.random.default_rng(0), 50_000, n_docs=20, size=5000)
    index = make_index(tmp_path, docs)
    assert isinstance(index.tokens, np.memmap) and isinstance(index.sa, np.memmap)
    assert index.manifest["bytes_on_disk"] / index.manifest["tokens"] <= 16
