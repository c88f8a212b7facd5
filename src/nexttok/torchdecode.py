"""The torch decoder: any Hugging Face causal LM, through its own forward pass and transformers' cache.

Rows of different lengths share one ``DynamicCache``, left-padded (:class:`RowCache`): each step passes
the attention mask and each row's positions, as batched generation with padding does. On the CPU the
model runs through an inference copy whose linear layers pick a faster kernel per call shape
(:class:`InferenceLinear`); only the last position goes through the output layer. ``LM.last_logits``
(``predict``) runs on the same copy.
"""

from __future__ import annotations

import copy
import inspect
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from nexttok.decode import Batched
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM


# oneDNN's x86 GEMM (measured faster than MKL's here); other builds and CPUs keep nn.Linear's kernels.
ONEDNN = (
    torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` on oneDNN's GEMM; ``weight`` is (out, in) or oneDNN's blocked copy of it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class InferenceLinear(nn.Module):
    """A bias-free linear layer with a kernel chosen per call shape (measured, see docs/generate.md).

    One row (a decode step of one sample) is a matrix-vector product bound by memory reads. With
    several threads, oneDNN spreads one row's product over them and reads the large layers (gate, up,
    down, the output layer) fastest; MKL barely gains from a second thread. With one thread, or for
    the square q and o layers, MKL streams an (in, out) copy of a widening layer's weight faster than
    nn.Linear's (out, in) one; the copy is made on first use, so it costs memory only where used.
    A decode step of N samples (N rows, one position each) is bound by GEMM compute, where MKL runs
    a generic kernel on this AMD CPU: it goes to oneDNN's AVX-512 GEMM on a copy of the weight in
    oneDNN's own blocked layout, made on the first such step (so only N-sample runs pay its memory).
    Several positions of one sample (a prefill, predict's forward pass) use oneDNN on the plain
    weight: faster than MKL's GEMM here at every size but the small k, v layers at up to 16 rows,
    which keep the original layer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        out_f, in_f = linear.weight.shape
        self.transposed = out_f >= in_f  # widening or square: q, o, gate, up, the output layer
        self.weight_t: torch.Tensor | None = None  # (in, out), made on the first one-row call that uses it
        self.packed: torch.Tensor | None = None  # oneDNN's blocked layout, made on the first N-sample step
        self.onednn = ONEDNN and linear.weight.numel() >= 2**18  # all but the small k, v projections
        self.onednn_row = ONEDNN and linear.weight.numel() >= 2**19  # gate, up, down, the output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        fp32 = x.dtype == torch.float32
        if rows == 1:
            return self._one_row(x, fp32)
        if ONEDNN and fp32 and rows == x.shape[0] and rows <= 16:  # (N, 1, in) or (N, in): N samples
            if self.packed is None:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.linear.weight.detach(), rows)
            return onednn_linear(x, self.packed)
        if ONEDNN and fp32 and (self.onednn or rows > 16):
            return onednn_linear(x, self.linear.weight)
        return self.linear(x)

    def _one_row(self, x: torch.Tensor, fp32: bool) -> torch.Tensor:
        if self.onednn_row and fp32 and torch.get_num_threads() > 1:
            return onednn_linear(x, self.linear.weight)  # oneDNN splits one row's product over the threads
        if self.transposed:
            if self.weight_t is None:
                self.weight_t = self.linear.weight.detach().t().contiguous()
            return torch.matmul(x, self.weight_t)  # (1, 1, in) @ (in, out)
        return self.linear(x)


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before. A wrong name is swallowed by ``**kwargs`` and the model runs each step
    without the earlier positions, so it is read from the signature, never assumed."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference on the CPU: the same modules and the same (shared) parameters,
    except that each bias-free ``nn.Linear`` picks its kernel by call shape (:class:`InferenceLinear`).
    ``model`` is not changed; the LM's weight cache keeps the copy (``nexttok.weights.WeightCache``)."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fast = copy.deepcopy(model, memo=shared)  # new module objects, the very same tensors
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, InferenceLinear(child))
    return fast


class RowCache:
    """Rows of different lengths in one transformers ``DynamicCache`` (B, heads, W, hd) per layer, aligned
    on the right: a row shorter than the widest has zeros on its left, and ``mask`` (B, W) says which
    columns hold its positions. A row that skips a step gets a masked column too."""

    def __init__(self):
        self._clear()

    def _clear(self) -> None:
        self.cache = None  # the DynamicCache of every row, or None with no row
        self.rows: list[int] = []  # row ids, in the cache's batch order
        self.mask = torch.zeros(0, 0, dtype=torch.bool)  # (B, W)

    def join(self, row: int, cache, length: int) -> None:
        """Append ``row``, whose prefill left its ``length`` positions in ``cache`` (a batch of one)."""
        new = torch.ones(1, length, dtype=torch.bool)
        if self.cache is None:
            self.cache, self.rows, self.mask = cache, [row], new
            return
        width = self.mask.shape[1]
        if length > width:
            self._pad(self.cache, length - width)
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), length - width), self.mask], 1)
        elif length < width:
            self._pad(cache, width - length)
            new = torch.cat([new.new_zeros(1, width - length), new], 1)
        for layer, other in zip(self.cache.layers, cache.layers, strict=True):
            layer.keys, layer.values = torch.cat([layer.keys, other.keys]), torch.cat([layer.values, other.values])
        self.rows, self.mask = [*self.rows, row], torch.cat([self.mask, new])

    def select(self, indices: list[int], ids: list[int]) -> None:
        """Keep the batch rows at ``indices`` (repeats copy a row), which become rows ``ids``."""
        if not indices:
            self._clear()
            return
        self.cache.batch_select_indices(torch.tensor(indices, device=self._device()))
        self.rows, self.mask = ids, self.mask[indices]
        self._trim()

    def _device(self) -> torch.device:
        return self.cache.layers[0].keys.device

    @staticmethod
    def _plain(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _pad(self, cache, columns: int) -> None:
        """``columns`` empty positions on the left of every row of ``cache``."""
        if not self._plain(cache):
            raise NexttokError(
                "this model's cache (sliding-window layers) cannot hold prompts of different lengths together; "
                "decode them one at a time"
            )
        for layer in cache.layers:
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], columns, layer.keys.shape[3])
            layer.keys, layer.values = torch.cat([pad, layer.keys], 2), torch.cat([pad, layer.values], 2)

    def _trim(self) -> None:
        """Drop the columns on the left that no row uses any more (after the longest rows left)."""
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first and self._plain(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


class TorchDecoder(Batched):
    """The :class:`~nexttok.decode.Decoder` for any Hugging Face causal LM, on any device.

    ``fast`` (on the CPU): the model runs as its inference copy (:func:`inference_copy`), made on first use.
    ``forward_calls`` counts model calls (a test checks that N samples share one prefill)."""

    def __init__(self, lm: LM, fast: bool = True, reason: str = "torch decoder"):
        self.reason, self.forward_calls = reason, 0
        self._lm, self._fast = lm, fast and lm.model.device.type == "cpu"
        self._model = None
        self._cache_arg = cache_argument(lm.model)
        self.rows = RowCache()
        self._ids = 0

    @property
    def model(self) -> nn.Module:
        """The model the decoder runs: the inference copy on the CPU (made on first use), else the model."""
        if self._model is None:
            self._model = self._lm.weights.inference_model() if self._fast else self._lm.model
        return self._model

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, cache, **extra) -> torch.Tensor:
        """Logits for the last position of each row of (B, T) ``input_ids``, shape (B, V), on the CPU."""
        self.forward_calls += 1
        # The whole causal-LM forward (any architecture: GPT-2's decoder is .transformer, Gemma caps its
        # logits after the output layer), with only the last position through the output layer.
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}, **extra)
        return out.logits[:, -1].float().cpu()

    def prompt(self, ids: Sequence[int]) -> tuple[torch.Tensor, object]:
        """Prefill ``ids`` alone: the logits after them (1, V) and a DynamicCache of their keys and values."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self._lm.model.config)
        return self._forward(torch.tensor([list(ids)], device=self._lm.model.device), cache), cache

    def add(self, ids: Sequence[int], reserve: int = 0) -> tuple[int, torch.Tensor]:
        if not ids:
            raise NexttokError("a row needs at least one token", param="prompt")
        logits, cache = self.prompt(ids)
        row, self._ids = self._ids, self._ids + 1
        self.rows.join(row, cache, len(ids))
        return row, logits[0]

    def fork(self, row: int, n: int) -> list[int]:
        new = list(range(self._ids, self._ids + n))
        self._ids += n
        at = self.rows.rows.index(row)
        everyone = list(range(len(self.rows.rows)))
        self.rows.select(everyone + [at] * n, self.rows.rows + new)
        return new

    def drop(self, row: int) -> None:
        kept = [i for i, r in enumerate(self.rows.rows) if r != row]
        self.rows.select(kept, [self.rows.rows[i] for i in kept])

    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        order = {r: i for i, r in enumerate(self.rows.rows)}
        at = [order[r] for r in rows]
        batch, device = len(order), self._lm.model.device
        ids = torch.zeros(batch, 1, dtype=torch.long)
        ids[at, 0] = torch.tensor(list(tokens), dtype=torch.long)
        stepping = torch.zeros(batch, 1, dtype=torch.bool)
        stepping[at] = True
        mask = torch.cat([self.rows.mask, stepping], 1)  # (B, W + 1)
        extra = {}
        if not bool(mask.all()):  # some row is padded or skips this step: say where each row is
            positions = self.rows.mask.sum(1, keepdim=True)  # (B, 1): each row's next position
            extra = {"attention_mask": mask.long().to(device), "position_ids": positions.to(device)}
        logits = self._forward(ids.to(device), self.rows.cache, **extra)  # (B, V)
        self.rows.mask = mask
        return logits[at]

    def score(self, ids: Sequence[int], positions: Sequence[int] | None = None) -> torch.Tensor:
        return score(self.model, ids, positions)


@torch.inference_mode()
def score(model: nn.Module, ids: Sequence[int], positions: Sequence[int] | None = None) -> torch.Tensor:
    """The logits after each of ``positions`` of ``ids`` (default every one), (len(positions), V), float32
    on the CPU: one forward pass, only those positions through the output layer."""
    if not ids:
        raise NexttokError("nothing to score: the text has no tokens", param="ids")
    keep = torch.arange(len(ids)) if positions is None else torch.tensor(list(positions), dtype=torch.long)
    if len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= len(ids)):
        raise NexttokError(f"positions must lie in 0..{len(ids) - 1}", param="positions")
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False, logits_to_keep=keep.to(device))
    return out.logits[0].float().cpu()
