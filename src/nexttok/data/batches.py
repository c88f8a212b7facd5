"""Batch builders for fine-tuning: rendered examples -> (input_ids, labels, masks) micro-batches.

Two layouts, both deterministic in the micro-batch index (so ``fit()`` can resume exactly and DDP
ranks read disjoint batches):

- ``pad``: one example per row, rows padded to the longest in the batch. Examples are bucketed by
  length (sorted within chunks of several batches) so a batch holds similar lengths and little padding.
- ``pack``: several examples per row, up to ``max_length`` tokens. Each example's positions restart at
  0 and a block-diagonal causal mask keeps attention inside the example, so a packed example gets the
  same loss as the example alone; its first label is -100 so no example predicts across a boundary.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from nexttok.data.chat import IGNORE, Example
from nexttok.errors import NexttokError

LAYOUTS = ("pack", "pad")


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with a (B, T) attention mask; padding carries label -100."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        ids[b, : len(e)] = torch.tensor(e.input_ids)
        labels[b, : len(e)] = torch.tensor(e.labels)
        mask[b, : len(e)] = 1
    n_bytes = torch.tensor(sum(e.n_bytes for e in examples))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_bytes": n_bytes}


def pack_batch(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several examples each: per-example positions and a block-diagonal causal 4D mask.

    The mask is boolean (True = may attend), shape (B, 1, T, T), which the sdpa attention of
    ``transformers`` takes as given. Row padding forms its own block, so no query row is all-masked.
    """
    width = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)  # (B, T)
    positions = torch.zeros((B, width), dtype=torch.long)  # (B, T)
    segment = torch.zeros((B, width), dtype=torch.long)  # (B, T): which example each token belongs to
    for b, row in enumerate(rows):
        start = 0
        for s, e in enumerate(row):
            end = start + len(e)
            ids[b, start:end] = torch.tensor(e.input_ids)
            labels[b, start:end] = torch.tensor(e.labels)  # labels[start] is -100 already
            positions[b, start:end] = torch.arange(len(e))
            segment[b, start:end] = s
            start = end
        positions[b, start:] = torch.arange(width - start)
        segment[b, start:] = len(row)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T)
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    n_bytes = torch.tensor(sum(e.n_bytes for row in rows for e in row))
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": mask[:, None],  # (B, 1, T, T)
        "n_bytes": n_bytes,
    }


def first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack example indices (visited in ``order``) into rows of at most ``capacity`` tokens: each goes
    into the first row with room, else a new row."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        r = next((r for r, room in enumerate(free) if room >= n), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(capacity)
        rows[r].append(i)
        free[r] -= n
    return rows


def bucket_rows(lengths: Sequence[int], order: Sequence[int], batch_size: int, chunk: int) -> list[list[int]]:
    """One example per row; within chunks of ``chunk`` batches, sort by length so batches are even."""
    rows: list[list[int]] = []
    span = batch_size * chunk
    for c in range(0, len(order), span):
        rows += [[i] for i in sorted(order[c : c + span], key=lambda i: lengths[i])]
    return rows


class FinetuneBatches:
    """The fine-tuning ``BatchSource`` for ``fit()``: epochs of shuffled, padded or packed batches.

    ``batch(index, batch_size)`` is the micro-batch with global index ``index``; epoch ``k`` is the
    examples shuffled with ``seed + k`` and laid out as ``layout`` says.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        pad_id: int,
        layout: str = "pack",
        max_length: int = 512,
        seed: int = 0,
        bucket_chunk: int = 16,
    ):
        if layout not in LAYOUTS:
            raise NexttokError(f"--layout must be one of {', '.join(LAYOUTS)} (got '{layout}')", param="layout")
        if not examples:
            raise NexttokError("no examples to batch; give a dataset with at least one usable record", "data")
        longest = max(len(e) for e in examples)
        if layout == "pack" and longest > max_length:
            raise NexttokError(f"an example has {longest} tokens, more than --max-length {max_length}", "max_length")
        self.examples, self.pad_id, self.layout = list(examples), pad_id, layout
        self.max_length, self.seed, self.bucket_chunk = max_length, seed, bucket_chunk
        self.lengths = [len(e) for e in self.examples]
        self._cache: dict[tuple[int, int], list[list[list[int]]]] = {}
        self._sizes: dict[tuple[int, int], int] = {}

    def epoch(self, epoch: int, batch_size: int) -> list[list[list[int]]]:
        """Epoch ``epoch`` as batches of rows of example indices (the latest two are cached)."""
        key = (epoch, batch_size)
        if key not in self._cache:
            order = list(range(len(self.examples)))
            rng = random.Random(self.seed + epoch)
            rng.shuffle(order)
            if self.layout == "pack":
                rows = first_fit(self.lengths, order, self.max_length)
            else:
                rows = bucket_rows(self.lengths, order, batch_size, self.bucket_chunk)
            batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
            rng.shuffle(batches)  # bucketed batches otherwise run short-to-long
            self._cache = {k: v for k, v in list(self._cache.items())[-1:]} | {key: batches}
            self._sizes[key] = len(batches)
        return self._cache[key]

    def epoch_size(self, epoch: int, batch_size: int) -> int:
        """Batches in epoch ``epoch`` (packing makes it vary a little from epoch to epoch)."""
        key = (epoch, batch_size)
        return self._sizes[key] if key in self._sizes else len(self.epoch(epoch, batch_size))

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.epoch_size(0, batch_size)

    def locate(self, index: int, batch_size: int) -> tuple[int, int]:
        """(epoch, batch within it) of global micro-batch ``index``."""
        epoch = 0
        while index >= (n := self.epoch_size(epoch, batch_size)):
            index -= n
            epoch += 1
        return epoch, index

    def batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The micro-batch with global index ``index``."""
        epoch, i = self.locate(index, batch_size)
        return self._build(self.epoch(epoch, batch_size)[i])

    def eval_batches(self, batch_size: int, limit: int) -> Iterator[dict[str, torch.Tensor]]:
        """The first ``limit`` batches of epoch 0 (the same every time, so evaluations compare)."""
        for rows in self.epoch(0, batch_size)[:limit]:
            yield self._build(rows)

    def _build(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.layout == "pad":
            return pad_batch([self.examples[r[0]] for r in rows], self.pad_id)
        return pack_batch([[self.examples[i] for i in row] for row in rows], self.pad_id)
