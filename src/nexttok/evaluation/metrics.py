"""What the scored positions say: loss, perplexity, bits per byte/char, word perplexity (each with a
standard error), next-token accuracy, and calibration.

Definitions follow lm-evaluation-harness: bits per byte = -sum log p / bytes / ln 2, word perplexity =
exp(-sum log p / words) with words counted as ``len(re.split(r"\\s+", text))``. Standard errors treat
positions as independent draws (they are not quite: neighbouring tokens correlate) and carry the
loss's error through each formula (delta method).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from nexttok.evaluation.scoring import Positions

LN2 = math.log(2)
RANK_BUCKETS = ((1, 1, "1"), (2, 10, "2-10"), (11, 100, "11-100"), (101, 1000, "101-1000"), (1001, None, ">1000"))
BINS = 10


@dataclass
class Bin:
    lo: float
    hi: float
    count: int
    confidence: float  # mean top-1 probability in the bin
    accuracy: float  # share of the bin whose top-1 was right


@dataclass
class Metrics:
    """How well a model predicted a text. Losses in nats per token; None where the text gives no count."""

    tokens: int
    loss: float
    loss_se: float
    perplexity: float
    perplexity_se: float
    bits_per_byte: float | None
    bits_per_byte_se: float | None
    bits_per_char: float | None
    bits_per_char_se: float | None
    word_perplexity: float | None
    word_perplexity_se: float | None
    bytes: int
    chars: int
    words: int
    context_min: int | None
    context_median: float | None
    top1: float
    top5: float
    mrr: float
    rank_histogram: dict[str, int]
    ece: float
    ece_equal_mass: float
    brier: float
    reliability: list[Bin] = field(default_factory=list)

    def headline(self) -> dict[str, float]:
        """The figures fit() logs at each evaluation (as ``eval_<name>``)."""
        out = {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "accuracy": self.top1}
        for k in ("bits_per_byte", "bits_per_char"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(pos: Positions, n_bytes: int = 0, n_chars: int = 0, n_words: int = 0) -> Metrics:
    n = len(pos)
    nll = -pos.logprob
    loss = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    ppl = math.exp(min(loss, 700.0))
    total = float(nll.sum())
    per = {}
    for name, count in (("bits_per_byte", n_bytes), ("bits_per_char", n_chars)):
        per[name] = total / LN2 / count if count else None
        per[name + "_se"] = se * n / count / LN2 if count else None
    word = math.exp(min(total / n_words, 700.0)) if n_words else None
    known = pos.context[pos.context >= 0]
    return Metrics(
        tokens=n,
        loss=loss,
        loss_se=se,
        perplexity=ppl,
        perplexity_se=ppl * se,
        **per,
        word_perplexity=word,
        word_perplexity_se=word * se * n / n_words if n_words else None,
        bytes=int(n_bytes),
        chars=int(n_chars),
        words=int(n_words),
        context_min=int(known.min()) if len(known) else None,
        context_median=float(np.median(known)) if len(known) else None,
        top1=float(pos.correct.mean()),
        top5=float((pos.rank <= 5).mean()),
        mrr=float((1.0 / pos.rank).mean()),
        rank_histogram=rank_histogram(pos.rank),
        ece=ece(pos.confidence, pos.correct),
        ece_equal_mass=ece(pos.confidence, pos.correct, mass=True),
        brier=brier(pos.sum_sq, np.exp(pos.logprob)),
        reliability=reliability(pos.confidence, pos.correct),
    )


def rank_histogram(rank: np.ndarray) -> dict[str, int]:
    return {name: int(((rank >= lo) & (rank <= (hi or np.inf))).sum()) for lo, hi, name in RANK_BUCKETS}


def _bins(conf: np.ndarray, bins: int, mass: bool) -> list[np.ndarray]:
    """Index sets: equal-width bins (0, 1/b], (1/b, 2/b], ... (0 in the first), or ``bins`` runs of nearly
    equal size in order of confidence."""
    if mass:
        return [b for b in np.array_split(np.argsort(conf, kind="stable"), bins) if len(b)]
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    return [np.flatnonzero(which == i) for i in range(bins)]


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = BINS, mass: bool = False) -> float:
    """Expected calibration error of top-1 confidence: sum over bins of |accuracy - confidence| weighted
    by the bin's share of positions (Guo et al. 2017)."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    gaps = [len(b) * abs(correct[b].mean() - conf[b].mean()) for b in _bins(conf, bins, mass) if len(b)]
    return float(sum(gaps) / len(conf))


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[Bin]:
    """The equal-width bins of the reliability diagram."""
    conf = np.asarray(conf, np.float64)
    out = []
    for i, b in enumerate(_bins(conf, bins, False)):
        filled = len(b) > 0
        mean_conf = float(conf[b].mean()) if filled else 0.0
        acc = float(np.asarray(correct)[b].mean()) if filled else 0.0
        out.append(Bin(i / bins, (i + 1) / bins, len(b), mean_conf, acc))
    return out


def brier(sum_sq: np.ndarray, p_true: np.ndarray) -> float:
    """The multi-class Brier score, mean over positions of sum_v (p_v - [v = true])^2, from each position's
    sum of p^2 and the true token's p: sum p^2 - 2 p_true + 1."""
    return float(np.mean(np.asarray(sum_sq, np.float64) - 2 * np.asarray(p_true, np.float64) + 1))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 50) -> float:
    """The temperature T minimizing the mean loss of softmax(logits / T) on (N, V) ``logits``.

    The loss is convex in b = 1/T: its derivative is E_p[z] - z_true and its second derivative Var_p[z],
    so Newton's method on b converges in a few steps."""
    z = logits.double()  # (N, V)
    zy = z.gather(1, targets.view(-1, 1).to(z.device))[:, 0]  # (N,)
    b = 1.0
    for _ in range(steps):
        p = torch.softmax(z * b, dim=-1)  # (N, V)
        mean = (p * z).sum(-1)  # (N,)
        grad = float((mean - zy).mean())
        hess = float(((p * z * z).sum(-1) - mean * mean).mean())
        if hess <= 0:
            break
        step = grad / hess
        b = min(max(b - step, b / 4), b * 4)  # damped: never more than 4x a step
        if abs(step) < 1e-10 * b:
            break
    return 1.0 / b
