"""The one scoring path: teacher-forced next-token statistics for every scored position of a batch.

``fit()``'s periodic evaluation, ``pretrain``'s final held-out figures and ``nexttok eval`` all come
from :func:`score_batch`: one forward pass in which only the scored positions go through the output
layer (the training loss's own selection), then, per position, the true token's log-probability, its
rank, the entropy, the top-1 probability and whether it was right.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np
import torch

from nexttok import distributed
from nexttok.loss import MODEL_KEYS, trained_positions_only

T = TypeVar("T")
ROWS = 256  # positions per chunk of the vocabulary-wide statistics: bounds their temporaries


@dataclass
class Positions:
    """Per scored position, in text order: numpy arrays of equal length."""

    token: np.ndarray  # int64: the true next token
    logprob: np.ndarray  # float64: log p(token), nats
    rank: np.ndarray  # int64: 1 + how many tokens were strictly more likely
    entropy: np.ndarray  # float32: nats
    confidence: np.ndarray  # float32: the top-1 probability
    correct: np.ndarray  # bool: the top-1 token is the true one
    sum_sq: np.ndarray  # float32: sum of p^2 over the vocabulary (for the Brier score)
    context: np.ndarray  # int64: tokens before it in its window (-1 where unknown)
    top_ids: np.ndarray | None = None  # (N, k) the k most likely tokens, when asked for
    top_probs: np.ndarray | None = None  # (N, k)

    def __len__(self) -> int:
        return len(self.token)

    @classmethod
    def cat(cls, parts: Iterable[Positions]) -> Positions:
        parts = list(parts)
        if not parts:
            return cls.empty()
        out = {}
        for f in fields(cls):
            vals = [getattr(p, f.name) for p in parts]
            out[f.name] = None if any(v is None for v in vals) else np.concatenate(vals)
        return cls(**out)

    @classmethod
    def empty(cls) -> Positions:
        types = (np.int64, np.float64, np.int64, np.float32, np.float32, bool, np.float32, np.int64)
        return cls(*(np.zeros(0, dtype=t) for t in types))


@torch.no_grad()
def position_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, top: int = 0) -> Positions:
    """The statistics of (N, V) ``logits`` against (N,) ``targets``, ROWS positions at a time."""
    rows = min(ROWS, len(targets))
    # Two scratch buffers reused by every chunk: fresh vocabulary-wide temporaries per chunk cost more in
    # page faults than the arithmetic (measured: docs/internals/eval.md).
    bufs = [torch.empty((rows, logits.shape[-1]), dtype=torch.float32, device=logits.device) for _ in range(2)]
    return Positions.cat(_chunk_stats(logits[lo : lo + ROWS], targets[lo : lo + ROWS], temperature, top, bufs)
                         for lo in range(0, len(targets), ROWS))  # fmt: skip


def _chunk_stats(z: torch.Tensor, y: torch.Tensor, temperature: float, top: int, bufs) -> Positions:
    # Few passes over the vocabulary: with d = z - max, e = exp(d), s = sum e: log p = d - log s, the top-1
    # probability is 1/s, the entropy log s - E_p[d], and sum p^2 = sum e^2 / s^2. Everything is taken from
    # d, not z: logits of a few hundred lose digits to float32 when two large numbers are subtracted.
    n = len(y)
    z = z.float() if temperature == 1 else z.float() / temperature  # (n, V)
    y = y.to(z.device)  # (n,)
    d, e = bufs[0][:n], bufs[1][:n]  # (n, V) each
    top1 = z.amax(dim=-1)  # (n,)
    torch.sub(z, top1[:, None], out=d)
    torch.exp(d, out=e)
    s = e.sum(-1)  # (n,)
    log_s = s.log()  # (n,)
    dy = d.gather(1, y[:, None])[:, 0]  # (n,) the true token's z - max
    e_d = torch.bmm(e[:, None, :], d[:, :, None])[:, 0, 0]  # (n,) sum_v e_v d_v
    e_e = torch.bmm(e[:, None, :], e[:, :, None])[:, 0, 0]  # (n,)
    rank = torch.gt(d, dy[:, None], out=e).sum(-1) + 1  # (n,) as float: exact below 2**24; e is spent
    tops = d.topk(top, dim=-1) if top else None
    return Positions(
        token=_np(y),
        logprob=_np(dy - log_s).astype(np.float64),
        rank=_np(rank).astype(np.int64),
        entropy=_np(log_s - e_d / s),
        confidence=_np(1.0 / s),
        correct=_np(dy >= 0),  # the true token has the top score
        sum_sq=_np(e_e / (s * s)),
        context=np.full(n, -1, dtype=np.int64),
        top_ids=_np(tops.indices) if tops else None,
        top_probs=_np((tops.values - log_s[:, None]).exp()) if tops else None,
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def batch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the (N, V) logits at the scored positions and the (N,) tokens they score.
    As in the training loss, position t's logits score the label at t+1 and only those go through the
    output layer."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1)
    keep = labels != -100  # (B, T-1)
    with trained_positions_only(model, keep):
        logits = model(**inputs, use_cache=False).logits  # (N, V) when selected, else (B, T, V)
    if logits.dim() == 3:
        logits = logits[:, :-1][keep]  # (N, V)
    return logits, labels[keep]


@torch.no_grad()
def scored(model: torch.nn.Module, batch: dict[str, torch.Tensor], top: int = 0):
    """One batch's (N, V) logits, (N,) true tokens and :class:`Positions` (their ``context`` from the batch
    when it carries one)."""
    logits, targets = batch_logits(model, batch)
    out = position_stats(logits, targets, top=top)
    if "context" in batch:
        out.context = batch["context"].numpy().astype(np.int64)
    return logits, targets, out


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], top: int = 0) -> Positions:
    """:class:`Positions` of one batch."""
    return scored(model, batch, top)[2]


def mine(items: Iterable[T]) -> Iterator[tuple[int, T]]:
    """(index, item) of this rank's share of ``items``: every world-th (all of them in one process)."""
    world, rank = distributed.world(), distributed.rank()
    return ((i, x) for i, x in enumerate(items) if i % world == rank)


def gather(parts: list[tuple[int, object]]) -> list[object]:
    """Every rank's (index, item) pairs, merged in index order: the same list on every rank, and the
    same one process would have built, so totals agree to the bit."""
    merged = [pair for rank_parts in distributed.gather_objects(parts) for pair in rank_parts]
    return [item for _, item in sorted(merged, key=lambda pair: pair[0])]
