"""The compiled CPU decoder: :class:`nexttok.decode.Decoder` on the block walk (``walk.run``)."""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from nexttok.cpu import schedule, walk
from nexttok.cpu.buffers import BLOCK, Buffers, Slots
from nexttok.cpu.model import ModelArrays
from nexttok.cpu.primitives import OUT_ROWS, WIDE
from nexttok.decode import Batched, Lookahead, Scores
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM

_log = logging.getLogger(__name__)  # unconfigured, a warning is one plain line on stderr

# Greedy steps run in one go under a Lookahead: Steps then come in bursts of up to this many tokens (~0.1 s here).
AHEAD = 8


class Summary(NamedTuple):
    """One row's logits in brief, computed by the walk while they were in cache."""

    argmax: int  # the first index of the highest logit (as torch.argmax)
    logsumexp: float  # log of softmax's denominator: log p(i) = logits[i] - logsumexp
    entropy: float  # of softmax(logits), in nats
    top_ids: np.ndarray  # (top,) the highest logits' ids, highest first
    top_logits: np.ndarray  # (top,) their logits


class CompiledDecoder(Batched):
    """Rows of a Llama-family float32 model on the CPU, each with its own key/value slot (``buffers.Slots``).

    A prompt of up to :attr:`PREFILL_MAX` tokens is read by the walk in blocks of ``buffers.BLOCK``; a longer
    one by the model's own forward pass (faster there: its GEMMs read the weights once), whose keys and
    values then move into the row's slot. A step of one row streams the weights once with their packed
    copy when there is one, and its Summary comes with the logits; a step of several rows takes up to
    :attr:`STEP_ROWS` rows per call. Scoring a text (teacher forcing) is the model's forward pass."""

    # Longest prompt the walk prefills (measurements: docs/internals/cpu-decoder.md).
    PREFILL_MAX = 48 if WIDE else 96
    STEP_ROWS = 64  # rows per call: bounds the scratch; the weights are read once per call

    def __init__(self, lm: LM, reason: str = "compiled CPU decoder", prefill_max: int | None = None):
        from nexttok.torchdecode import TorchDecoder

        self.reason, self.forward_calls = reason, 0
        # 0: every prompt through the model's forward, so a row's first logits are exactly lm.distribution's
        self.prefill_max = self.PREFILL_MAX if prefill_max is None else prefill_max
        model = lm.model
        self._weights = lm.weights
        self.arrays = ModelArrays(model, lm.weights.packed())
        layers, d = len(model.model.layers), self.arrays.dims
        self.slots = Slots(model, layers, d.nkv, d.hd)
        self.buffers = Buffers(d, layers, -(-self.arrays.weights.head.shape[0] // OUT_ROWS))
        self.counters = schedule.counters(layers)
        self.scale = np.float32(model.model.layers[0].self_attn.scaling)
        self.eps = np.float32(model.config.rms_norm_eps)
        self.torch = TorchDecoder(lm, reason=reason)  # for long prompts and for scoring
        self.rows: dict[int, int] = {}  # row id -> slot
        self._ids = 0
        self._last: np.ndarray | None = None  # the last one-row call's logits (V,), which Summary describes
        self._ahead: Lookahead | None = None
        self._left, self._pending = 0, []
        if not walk.compiled_on_disk():
            _log.warning("nexttok: compiling the decoder for this CPU (once after install: about a minute on 2 cores)")

    # -- the row operations -------------------------------------------------------------------------------

    def add(self, ids: Sequence[int], reserve: int = 0) -> tuple[int, torch.Tensor]:
        if not ids:
            raise NexttokError("a row needs at least one token", param="prompt")
        ids = list(ids)
        slot = self.slots.take()[0]
        self.slots.reserve(len(ids) + reserve)
        if len(ids) <= self.prefill_max:
            for lo in range(0, len(ids), BLOCK):
                logits = self._call([slot], ids[lo : lo + BLOCK], [len(ids[lo : lo + BLOCK])])
        else:
            logits = self._load_prompt(slot, ids)
        row, self._ids = self._ids, self._ids + 1
        self.rows[row] = slot
        return row, logits[0]

    def fork(self, row: int, n: int) -> list[int]:
        targets = self.slots.take(n)
        self.slots.copy(self.rows[row], targets)
        new = list(range(self._ids, self._ids + n))
        self._ids += n
        self.rows.update(zip(new, targets, strict=True))
        return new

    def drop(self, row: int) -> None:
        self.slots.give_back(self.rows.pop(row))

    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        slots = [self.rows[r] for r in rows]
        self.slots.reserve(max(self.slots.length[s] for s in slots) + 1)
        self._move_when_due(1)
        tokens, n = list(tokens), self.STEP_ROWS
        groups = [(slots[i : i + n], tokens[i : i + n]) for i in range(0, len(slots), n)]
        parts = [self._call(group, fed, [1] * len(group)) for group, fed in groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def score(self, ids: Sequence[int], positions: Sequence[int] | None = None) -> torch.Tensor:
        return self.torch.score(ids, positions)

    # -- the loop's side: greedy steps run ahead ----------------------------------------------------------

    def start(self, ids, rows=1, top=0, lookahead=None, reserve=0) -> Scores:
        scores = super().start(ids, rows, top, lookahead, reserve)
        self._ahead = lookahead if rows == 1 and top > 0 else None
        self._left, self._pending = (lookahead.steps if self._ahead else 0), []
        return scores

    def next(self, tokens: torch.Tensor, keep: Sequence[int] | None = None) -> Scores:
        if self._ahead is None:
            return super().next(tokens, keep)
        if not self._pending:  # the next steps' tokens are their predecessors' argmax: run them now
            self._pending = self.greedy(int(tokens.view(-1)[0]), min(AHEAD, self._left), self._top, self._ahead.stop)
        self._left -= 1
        return Scores(None, self._pending.pop(0))

    def greedy(self, token: int, n: int, top: int, stop: Container[int] = ()) -> list[Summary]:
        """Up to ``n`` greedy steps of the batch's one row in a row: feed ``token``, then each step's argmax,
        ending after an argmax in ``stop``; each step's Summary (with the ``top`` highest logits).

        Why: a step streams the weights through every cache, so the Python that runs between two steps
        (building a token's record) finds its own code and data evicted; here only this short loop runs
        between steps, and the records are built after, warm."""
        slot = self.rows[self._batch[0]]
        self.slots.reserve(self.slots.length[slot] + n)
        self._move_when_due(n)  # counts the n asked for (an early end leaves the count a few ahead)
        summaries, threads = [], schedule.threads()
        logits = np.empty((1, self.arrays.weights.head.shape[0]), np.float32)  # one buffer for all n steps
        for _ in range(n):
            self._call([slot], [token], [1], threads, logits)
            summaries.append(self.summary(top))
            token = summaries[-1].argmax
            if token in stop:
                break
        return summaries

    def summary(self, top: int) -> Summary | None:
        """The last one-row call's Summary, with the ``top`` highest logits (None if the last call had more rows)."""
        if self._last is None:
            return None
        b = self.buffers
        return Summary(*walk.summarize(self._last, b.stats, b.argmax, top))

    # -- below: one compiled call -------------------------------------------------------------------------

    def _call(self, slots, tokens, counts, threads: int = 0, logits: np.ndarray | None = None) -> torch.Tensor:
        """Feed ``counts[r]`` of ``tokens`` (in order) to slot ``slots[r]``; each row's last logits (R, V)."""
        n, rows = len(tokens), len(slots)
        s = self.buffers.ready(n)
        x = s.x
        x[:, :n] = self.arrays.embed[tokens]  # each thread's copy of the residual stream
        x[:, n : self.buffers.positions] = 0.0  # padding positions restart from zero: they stay small
        first = np.zeros(rows, np.int64)
        first[1:] = np.cumsum(counts[:-1])
        start = np.array([self.slots.length[i] for i in slots], np.int64)
        batch = walk.Batch(n, first, np.array(counts, np.int64), start, np.array(slots, np.int64))
        if logits is None:
            logits = np.empty((1 if rows == 1 else -(-rows // 4) * 4, self.arrays.weights.head.shape[0]), np.float32)
        out = walk.Out(logits, self.buffers.stats, self.buffers.argmax)
        walk.run(threads or schedule.threads(), batch, self.arrays.weights, self.arrays.dims, s, self.slots.cache,
                 self.scale, self.eps, self.counters, out)  # fmt: skip
        for slot, count in zip(slots, counts, strict=True):
            self.slots.length[slot] += count
        self.forward_calls += 1
        self._last = logits[0] if rows == 1 else None
        return torch.from_numpy(logits[:rows])

    def _load_prompt(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Prefill through the model's forward pass; its keys and values into ``slot``. Logits (1, V)."""
        logits, cache = self.torch.prompt(ids)
        self.forward_calls += 1
        for i, layer in enumerate(cache.layers):  # (1, nkv, T, hd) each
            self.slots.k[slot, i, :, : len(ids)] = layer.keys[0].numpy()
            self.slots.v[slot, i, :, : len(ids)] = layer.values[0].numpy()
        self.slots.length[slot] = len(ids)
        self._last = None
        return logits

    def _move_when_due(self, steps: int) -> None:
        """Before ``steps`` more steps: when they reach ``weights.RELAYOUT_AFTER``, relay the weights out
        (huge pages, packed copy) and read them from there."""
        if self._weights.count_steps(steps) and self._weights.relayout():
            self.arrays.bind(self._weights.packed())
