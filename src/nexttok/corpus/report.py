"""Plain-data (JSON) views of what a corpus index says: the infinity-gram distribution after a
context (``predict --corpus``) and the verbatim spans of an output (``generate --corpus``, the server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nexttok.corpus.index import CorpusIndex
from nexttok.corpus.query import InfGram, coverage, spans

if TYPE_CHECKING:
    from nexttok.lm import LM


def _where(locations) -> list[dict]:
    return [{"file": w.file, "name": w.name, "line": w.line} for w in locations]


def infgram_report(lm: LM, g: InfGram, top: int) -> dict:
    return {
        "suffix": [{"id": t, "text": lm.token_text(t)} for t in g.suffix],
        "suffix_text": "".join(lm.token_text(t) for t in g.suffix),
        "suffix_length": g.length,
        "occurrences": g.occurrences,
        "next": [
            {"id": t, "text": lm.token_text(t), "count": n, "share": n / max(g.occurrences, 1)} for t, n in g.next[:top]
        ],
        "distinct_next": len(g.next),
        "where": _where(g.where),
    }


def spans_report(lm: LM, index: CorpusIndex, ids: list[int], min_span: int = 8) -> dict:
    """The maximal spans of ``ids`` (an output) of at least ``min_span`` tokens found verbatim in the
    corpus, where each comes from, and the share of the output they cover."""
    found = spans(index, ids, min_span)
    return {
        "min_span": min_span,
        "tokens": len(ids),
        "coverage": coverage(found, len(ids)),
        "spans": [
            {
                "start": s.start,
                "stop": s.stop,
                "text": "".join(lm.token_text(t) for t in ids[s.start : s.stop]),
                "occurrences": s.occurrences,
                "where": _where(s.where),
            }
            for s in found
        ],
    }
