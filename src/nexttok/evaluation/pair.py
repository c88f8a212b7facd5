"""Two models on the same text: each one's metrics, and what separates them position by position
(llama.cpp's ``--kl-divergence``, plus where they differ most, shown with the text before it).
KL is in nats, like the loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from nexttok.distribution import show_token
from nexttok.errors import NexttokError
from nexttok.evaluation.metrics import Metrics, summarize
from nexttok.evaluation.pipeline import SCHEMA, batches, model_name, prepare, run, scored_counts
from nexttok.evaluation.scoring import Positions, scored

if TYPE_CHECKING:
    from nexttok.lm import LM

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
SHOWN = 10  # positions where the models differ most
CONTEXT_CHARS = 60


@dataclass
class Difference:
    """A position where KL(A‖B) is among the largest."""

    doc: int
    position: int
    kl: float
    before: str  # the text just before the token
    token: str  # the true next token, shown
    p_true_a: float
    p_true_b: float
    top_a: str
    top_b: str


@dataclass
class PairResult:
    model_a: str
    model_b: str
    source: str
    windows: dict
    a: Metrics
    b: Metrics
    perplexity_ratio: float  # B's perplexity over A's
    kl: dict[str, float]  # mean, median, p99, max (nats)
    top1_agreement: float
    delta_p_true: dict[str, float]  # p_B(true) - p_A(true): mean and percentiles
    differ_most: list[Difference] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "pair": True, **asdict(self)}


def same_tokenizer(a: LM, b: LM) -> None:
    if len(a.tokenizer) != len(b.tokenizer) or a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise NexttokError(
            f"the two models have different tokenizers ({len(a.tokenizer):,} and {len(b.tokenizer):,} tokens): "
            "two-model eval scores the same token ids under both; give a model and its fine-tune or another copy",
            param="model",
        )


@torch.inference_mode()
def evaluate_pair(a: LM, b: LM, data, *, context=None, stride=None, windows="strided", bos=None, split="all",
                  holdout_fraction=0.1, text_field="text", limit_tokens=None, batch_size=None,
                  progress=False) -> PairResult:  # fmt: skip
    """:func:`nexttok.evaluate`'s figures for both models on the same windows, and their divergence."""
    same_tokenizer(a, b)
    text, setup, jobs, size = prepare([a, b], data, context, stride, windows, bos, split, holdout_fraction,
                                      text_field, limit_tokens, batch_size, progress)  # fmt: skip
    parts = run(
        batches(a, text, jobs, size), lambda batch: _both(a, b, batch), sum(j.window.scored for j in jobs), progress
    )
    pa, pb = Positions.cat(p[0] for p in parts), Positions.cat(p[1] for p in parts)
    kl = np.concatenate([p[2] for p in parts])
    counts = scored_counts(a, text, jobs)
    ma, mb = summarize(pa, *counts, text.words), summarize(pb, *counts, text.words)
    dp = np.exp(pb.logprob) - np.exp(pa.logprob)
    return PairResult(
        model_name(a), model_name(b), text.source, setup | {"windows": len(jobs), "batch_size": size},
        ma, mb, mb.perplexity / ma.perplexity,
        {"mean": float(kl.mean()), "median": float(np.median(kl)), "p99": float(np.percentile(kl, 99)),
         "max": float(kl.max())},
        float((pa.top_ids[:, 0] == pb.top_ids[:, 0]).mean()),
        {"mean": float(dp.mean())} | {f"p{q}": float(np.percentile(dp, q)) for q in PERCENTILES},
        _differ_most(a, text, jobs, kl, pa, pb),
    )  # fmt: skip


def _both(a: LM, b: LM, batch: dict):
    la, _, pa = scored(a.model, batch, top=1)
    lb, _, pb = scored(b.model, batch, top=1)
    lpa, lpb = torch.log_softmax(la.float(), -1), torch.log_softmax(lb.float().to(la.device), -1)  # (N, V)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp_min(0)  # (N,)
    return pa, pb, kl.cpu().numpy()


def _differ_most(lm: LM, text, jobs, kl: np.ndarray, pa: Positions, pb: Positions) -> list[Difference]:
    where = [(j.doc, p) for j in jobs for p in range(j.window.scored_from, j.window.stop)]
    out = []
    for i in np.argsort(-kl, kind="stable")[:SHOWN]:
        doc, p = where[i]
        ids = text.ids[doc]
        before = lm.tokenizer.decode(ids[max(0, p - 32) : p].tolist())[-CONTEXT_CHARS:]
        out.append(Difference(
            doc, p, float(kl[i]), before, show_token(lm.token_text(int(ids[p]))),
            float(np.exp(pa.logprob[i])), float(np.exp(pb.logprob[i])),
            show_token(lm.token_text(int(pa.top_ids[i, 0]))), show_token(lm.token_text(int(pb.top_ids[i, 0]))),
        ))  # fmt: skip
    return out
