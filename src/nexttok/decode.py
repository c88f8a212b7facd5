"""The Decoder interface: the one thing the generate loop, the server and evaluation talk to.

A decoder holds rows: each row a token sequence whose keys and values it keeps. ``add`` prefills a new
row from its prompt; ``step`` feeds one token to each of some rows; ``fork`` copies a row (N samples of one
prompt share one prefill); ``drop`` ends a row; ``score`` gives the logits at chosen positions of a text
(teacher forcing) without keeping it. Rows may have different prompts and lengths and join or leave between
steps; a row's logits are the same as decoding its sequence alone. Two implementations:
:class:`nexttok.torchdecode.TorchDecoder` (any Hugging Face causal LM) and
:class:`nexttok.cpu.decoder.CompiledDecoder` (Llama family, float32, on the CPU);
:func:`nexttok.decoders.make_decoder` picks one by what the model is, and says why.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from nexttok.errors import NexttokError
from nexttok.memory import available_bytes

if TYPE_CHECKING:
    from nexttok.lm import LM


@dataclass
class Scores:
    """The next-token scores of each row of the loop's batch, as a decoder gives them."""

    logits: torch.Tensor | None  # (B, V) on the CPU; None for a step run ahead (its summary says enough)
    summary: Any = None  # one row: the compiled decoder's Summary of the logits (argmax, top, ...), else None


@dataclass
class Lookahead:
    """Greedy decoding with no stage and no trace: each next token is the last step's argmax, so a
    decoder may run up to ``steps`` steps ahead, ending after an argmax in ``stop``."""

    steps: int
    stop: Container[int] = ()


@runtime_checkable
class Decoder(Protocol):
    """Rows of token sequences and their next-token logits (V,) per row, on the CPU in float32."""

    reason: str  # which decoder this is and why it was chosen
    forward_calls: int  # model calls so far (prefills and steps)

    def add(self, ids: Sequence[int], reserve: int = 0) -> tuple[int, torch.Tensor]:
        """Prefill a new row with ``ids`` (room for ``reserve`` more positions); its id and logits (V,)."""
        ...

    def fork(self, row: int, n: int) -> list[int]:
        """``n`` new rows, each a copy of ``row`` as it stands; their ids."""
        ...

    def drop(self, row: int) -> None:
        """End ``row``: its keys and values are freed (or reused)."""
        ...

    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to ``rows[i]``; the next logits of each, (len(rows), V)."""
        ...

    def score(self, ids: Sequence[int], positions: Sequence[int] | None = None) -> torch.Tensor:
        """The logits after each of ``positions`` of ``ids`` (default: all), (len(positions), V); no row kept."""
        ...

    def start(
        self, ids: Sequence[int], rows: int = 1, top: int = 0, lookahead: Lookahead | None = None, reserve: int = 0
    ) -> Scores:
        """The loop's side: ``rows`` rows of prompt ``ids`` (one prefill); their first Scores."""
        ...

    def next(self, tokens: torch.Tensor, keep: Sequence[int] | None = None) -> Scores:
        """The loop's side: the batch's rows at ``keep`` (default all) go on with ``tokens`` (one per row of
        the batch), the others are dropped; the next Scores of those kept."""
        ...


class Batched:
    """``start`` and ``next`` of :class:`Decoder`, over its row operations: a batch of rows in a fixed order.

    N rows of one prompt are forked only when the first step comes: a run of one new token copies nothing."""

    _batch: list[int]
    _forks: int = 0
    _top: int = 0

    def start(
        self, ids: Sequence[int], rows: int = 1, top: int = 0, lookahead: Lookahead | None = None, reserve: int = 0
    ) -> Scores:
        row, logits = self.add(ids, reserve)
        self._batch, self._forks, self._top = [row], rows - 1, top
        return Scores(logits[None].expand(rows, -1), self.summary(top) if rows == 1 else None)

    def next(self, tokens: torch.Tensor, keep: Sequence[int] | None = None) -> Scores:
        if self._forks:
            self._batch += self.fork(self._batch[0], self._forks)
            self._forks = 0
        keep = list(range(len(self._batch))) if keep is None else list(keep)
        for j in sorted(set(range(len(self._batch))) - set(keep)):
            self.drop(self._batch[j])
        self._batch = [self._batch[j] for j in keep]
        logits = self.step(self._batch, tokens.view(-1)[keep].tolist())
        return Scores(logits, self.summary(self._top) if len(self._batch) == 1 else None)

    def summary(self, top: int) -> Any:
        """A summary of the last one-row logits, where the decoder makes one (the compiled decoder); else None."""
        return None


# Vocabulary-sized float32 buffers a row may hold at once: its logits, and one made from them (the loop
# works through the batch's rows in groups, so its own temporaries do not grow with the rows).
VOCAB_BUFFERS = 2


def row_bytes(lm: LM, positions: int) -> int:
    """Memory one row of ``positions`` positions takes: its keys and values and its vocabulary buffers."""
    cfg = lm.model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    element = 4 if lm.model.dtype == torch.float32 or lm.model.device.type == "cpu" else 2
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * element * positions + VOCAB_BUFFERS * 4 * lm.vocab_size


def check_rows(lm: LM, rows: int, positions: int) -> None:
    """An error before any work when ``rows`` rows of ``positions`` positions would not fit in memory."""
    need, free = rows * row_bytes(lm, positions), available_bytes()
    if free is not None and need > 0.8 * free:
        raise NexttokError(
            f"{rows} samples of {positions} positions need about {need / 2**30:.1f} GiB for their keys, values "
            f"and scores, and {free / 2**30:.1f} GiB is available; ask for fewer samples or fewer new tokens",
            param="num_samples",
        )
