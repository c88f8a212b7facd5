"""How much of a model's next-token choice its training corpus explains: at every position of a held-out
text, the model's top-1 beside the infinity-gram's (the longest suffix of the context the corpus holds,
and what most often followed it), bucketed by that suffix's length. What does not agree is reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nexttok.corpus import search
from nexttok.corpus.index import CorpusIndex

if TYPE_CHECKING:
    from nexttok.lm import LM

BUCKETS = ((0, 0, "0 (unseen)"), (1, 1, "1"), (2, 2, "2"), (3, 4, "3-4"), (5, 8, "5-8"), (9, 16, "9-16"))
BUCKETS += ((17, 1 << 62, ">16"),)
SCHEMA = "nexttok.patterns/1"


@dataclass
class Bucket:
    label: str
    positions: int
    share: float  # of all positions
    agreement: float  # model top-1 == corpus top-1
    model_accuracy: float
    corpus_accuracy: float


@dataclass
class Patterns:
    """The agreement table, and per position: the suffix length, the corpus's and the model's top-1."""

    model: str
    corpus: str
    source: str
    positions: int
    agreement: float
    unexplained: float  # the share of positions where the model's top-1 is not the corpus's
    unexplained_correct: float  # ... and the model is right there
    buckets: list[Bucket]
    suffix_length: np.ndarray = field(repr=False)
    corpus_top1: np.ndarray = field(repr=False)
    model_top1: np.ndarray = field(repr=False)
    target: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        keys = ("model", "corpus", "source", "positions", "agreement", "unexplained", "unexplained_correct")
        out = {"schema": SCHEMA, **{k: getattr(self, k) for k in keys}}
        out["median_suffix_length"] = float(np.median(self.suffix_length)) if self.positions else 0.0
        return out | {"buckets": [vars(b) for b in self.buckets]}


def infgram_top1(index: CorpusIndex, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position t of ``ids`` (predicting ids[t] from ids[:t]): the longest continued suffix's
    length and the corpus's most frequent next token there."""
    ks, _, top, _ = search.sweep(index.tokens, index.sa, np.asarray(ids, dtype=np.uint32), 0)
    return ks, top


def patterns(lm: LM, index: CorpusIndex, data, progress: bool = False, **eval_options) -> Patterns:
    """Score ``data`` with ``lm`` (``eval_options`` as :func:`nexttok.evaluate` takes them) and set each
    position's top-1 beside the corpus's."""
    from nexttok.evaluation import evaluate

    index.check_tokenizer(lm)  # a library caller may pass an index opened without the model
    result = evaluate(lm, data, top=1, progress=progress, **eval_options)
    per_doc = {d: infgram_top1(index, a) for d, a in enumerate(result.text.ids) if len(a)}
    ks, ctop = [], []
    for j in result.jobs:  # positions come in job order, each job's scored targets in text order
        k, top = per_doc[j.doc]
        ks.append(k[j.window.scored_from : j.window.stop])
        ctop.append(top[j.window.scored_from : j.window.stop])
    pos = result.positions
    return summarize(result.model, str(index.folder), result.source, np.concatenate(ks), np.concatenate(ctop),
                     pos.top_ids[:, 0], pos.token)  # fmt: skip


def summarize(model: str, corpus: str, source: str, k, corpus_top1, model_top1, target) -> Patterns:
    agree, m_ok, c_ok = model_top1 == corpus_top1, model_top1 == target, corpus_top1 == target
    n = len(target)
    buckets = []
    for lo, hi, label in BUCKETS:
        sel = (k >= lo) & (k <= hi)
        c = int(sel.sum())
        mean = lambda x, sel=sel, c=c: float(x[sel].mean()) if c else float("nan")  # noqa: E731
        buckets.append(Bucket(label, c, c / max(n, 1), mean(agree), mean(m_ok), mean(c_ok)))
    return Patterns(
        model, corpus, source, n, float(agree.mean()), float((~agree).mean()), float((~agree & m_ok).mean()),
        buckets, k, corpus_top1, model_top1, target,
    )  # fmt: skip
