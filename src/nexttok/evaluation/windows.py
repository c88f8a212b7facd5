"""How a long text is cut into model-sized windows, and which tokens each window scores.

A window is ``[BOS] + ids[start:stop]`` (the BOS when the tokenizer has one and it is asked for). Every
text token is scored exactly once, in the window that gives it the most context:

* ``strided`` (the Hugging Face perplexity guide's loop): windows start every ``stride`` tokens and score
  the tokens the previous window did not, so each has at least ``context - stride`` tokens before it;
* ``disjoint`` (lm-evaluation-harness's rolling windows): back-to-back windows that share one token, the
  BOS only in the first; a token's context is whatever precedes it inside its window.

Without a BOS the text's first token has nothing to be predicted from and is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nexttok.errors import NexttokError

MODES = ("strided", "disjoint")


@dataclass(frozen=True)
class Window:
    start: int  # first text position in the window
    stop: int  # one past the last
    scored_from: int  # first text position this window scores
    bos: bool  # whether a BOS comes before ids[start]

    @property
    def scored(self) -> int:
        return self.stop - self.scored_from

    def context(self) -> np.ndarray:
        """Tokens before each scored position inside this window (the BOS counts as one)."""
        return np.arange(self.scored_from, self.stop) - self.start + int(self.bos)


def plan(n: int, context: int, stride: int | None = None, mode: str = "strided", bos: bool = False) -> list[Window]:
    """The windows over a text of ``n`` tokens; ``stride`` defaults to ``context // 2``. (A one-token text
    gets one window, which scores its token only after a BOS.)"""
    stride = context // 2 if stride is None else stride
    check(max(n, 2), context, stride, mode, bos)
    if mode == "disjoint":
        return _disjoint(n, context, bos)
    width, out, done, start = context - int(bos), [], 0 if bos else 1, 0
    while True:
        stop = min(start + width, n)
        out.append(Window(start, stop, max(done, start + int(not bos)), bos))
        if stop == n:
            return out
        done, start = stop, start + stride


def _disjoint(n: int, context: int, bos: bool) -> list[Window]:
    first = min(context - int(bos), n)
    out = [Window(0, first, 0 if bos else 1, bos)]
    while out[-1].stop < n:
        start = out[-1].stop - 1
        out.append(Window(start, min(start + context, n), start + 1, False))
    return out


def check(n: int, context: int, stride: int, mode: str, bos: bool) -> None:
    if mode not in MODES:
        raise NexttokError(f"--windows must be one of {', '.join(MODES)} (got '{mode}')", param="windows")
    if context < 2:
        raise NexttokError(f"--context must be at least 2 tokens (got {context})", param="context")
    if mode == "strided" and not 0 < stride < context:
        raise NexttokError(
            f"--stride must be between 1 and the context minus 1 ({context - 1}); got {stride}", param="stride"
        )
    if n < 2:
        raise NexttokError(
            f"the text is {n} token{'s' if n != 1 else ''} long; scoring needs at least two: give a longer text",
            param="data",
        )


def batch(ids: np.ndarray, windows: list[Window], bos_id: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of windows: ``input_ids`` and ``labels`` (B, T), the labels -100 where nothing is scored,
    so position t's logits score the label at t+1 (the training loss's convention); ``context`` (N,) the
    context length of each scored token in the order the scored positions come (row-major)."""
    T = max(w.stop - w.start + int(w.bos) for w in windows)
    x = np.full((len(windows), T), pad_id, dtype=np.int64)
    labels = np.full_like(x, -100)
    for j, w in enumerate(windows):
        row = ids[w.start : w.stop].astype(np.int64)
        if w.bos:
            row = np.concatenate([[bos_id], row])
        x[j, : len(row)] = row
        lo = w.scored_from - w.start + int(w.bos)  # where the first scored token sits in the row
        labels[j, lo : len(row)] = row[lo:]
    return {
        "input_ids": torch.from_numpy(x),  # (B, T)
        "labels": torch.from_numpy(labels),  # (B, T)
        "context": torch.from_numpy(np.concatenate([w.context() for w in windows])),  # (N,)
    }
