"""The corpus a model learned from, queryable: a suffix array over its token ids (:mod:`index`), the
infinity-gram distribution and verbatim spans (:mod:`query`), and memorization (:mod:`memorization`)."""

from nexttok.corpus.index import CorpusIndex, Location
from nexttok.corpus.query import InfGram, Span, count, coverage, infgram, locate, next_counts, spans
from nexttok.corpus.sources import index_corpus

__all__ = [
    "CorpusIndex",
    "InfGram",
    "Location",
    "Span",
    "count",
    "coverage",
    "index_corpus",
    "infgram",
    "locate",
    "next_counts",
    "spans",
]
