"""The model side of the loop: one prefill, then one position per call, on a preallocated KV cache.

The transformer is the Hugging Face model itself; this module only decides how it is called. On a
model that ``kernels.py`` covers, one sample, or N samples of one prompt sharing one prefill, run
their prefill and steps there (numba, the model's own weights). Otherwise: transformers'
``DynamicCache`` (measured faster here than a ``StaticCache`` in eager mode: a static cache attends
over its whole preallocated length through a mask), the final norm's output for the last position
only through the output layer, N samples sharing one prefill, and an inference copy of the model
whose linear layers pick a faster kernel per call shape (InferenceLinear). ``LM.last_logits``
(``predict``) runs on the same copy.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import platform
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nexttok import gc_pause

if TYPE_CHECKING:
    from nexttok.lm import LM
    from nexttok.weights import WeightCache


_log = logging.getLogger(__name__)  # unconfigured, a warning is one plain line on stderr

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


@dataclass
class Scores:
    """The next-token scores of each row, as the loop gets them from a decoder."""

    logits: torch.Tensor | None  # (B, V) on the CPU; None for a step run ahead (its summary says enough)
    summary: Any = None  # one row: the compiled decoder's kernels.Summary of the logits (argmax, top, ...)


@dataclass
class Lookahead:
    """Greedy decoding with no stage and no trace: each next token is the last step's argmax, so a
    decoder may run up to ``steps`` steps ahead, ending after an argmax in ``stop``."""

    steps: int
    stop: Container[int] = ()


# Greedy steps the compiled decoder runs in one call under a Lookahead: Steps then come in bursts of up
# to this many tokens (~0.1 s here).
AHEAD = 8


class Decoder:
    """Runs ``lm``'s model over a growing sequence, reusing every earlier position's keys and values.

    The loop's side: ``start(ids, rows, top)`` reads the prompt once and returns the first :class:`Scores`
    of ``rows`` identical rows; ``next(tokens)`` feeds one token per row and returns the next. Below it,
    ``prefill`` and ``step`` give the logits, (B, V). Which model runs them (the compiled CPU decoder, or
    torch) is :func:`decoder_choice`'s; ``reason`` says why. ``forward_calls`` counts model calls (a test
    checks N samples use one prefill).
    """

    def __init__(self, lm: LM, fast: bool = True, kernel: bool = True):
        from transformers import DynamicCache

        self._fast = fast and lm.model.device.type == "cpu"
        self._model = None  # the model the torch path calls: made on its first call (:attr:`model`)
        self.cache = DynamicCache(config=lm.model.config)
        self.forward_calls = 0
        self._hf_model = lm.model
        self._weights = lm.weights
        self.kernel = None  # the compiled one-sample step (kernels.py), when it covers the model
        self.samples = None  # the compiled step of N samples of one prompt (kernels.SamplesKernel), likewise
        self._use_kernel, self.reason = decoder_choice(lm, fast and kernel)
        self._cache_arg = cache_argument(lm.model)
        self._top, self._ahead, self._left, self._pending = 0, None, 0, []

    def start(self, ids: list[int], rows: int = 1, top: int = 0, lookahead: Lookahead | None = None) -> Scores:
        """Prefill ``ids`` as ``rows`` rows; the first Scores. ``top``: how many of the highest logits a
        compiled step's summary keeps. ``lookahead``: the tokens will be each step's argmax."""
        logits = self.prefill(ids, rows)
        self._top, self._pending = top, []
        self._ahead = lookahead if self.kernel is not None and top > 0 else None  # only the compiled one-row step
        self._left = lookahead.steps if self._ahead is not None else 0
        return Scores(logits, self.summary(top))

    def next(self, tokens: torch.Tensor) -> Scores:
        """Feed one token per row; the next Scores (under a Lookahead, from steps already run)."""
        if self._ahead is None:
            logits = self.step(tokens)
            return Scores(logits, self.summary(self._top))
        if not self._pending:  # the next steps' tokens are their predecessors' argmax: run them now
            self._pending = self.greedy(int(tokens[0]), min(AHEAD, self._left), self._top, self._ahead.stop)
        self._left -= 1
        return Scores(None, self._pending.pop(0))

    @property
    def model(self) -> nn.Module:
        """The model the torch path runs: the inference copy (:func:`inference_copy`) on the CPU. Made on
        first use, so a run that the compiled kernel does alone skips its check of every parameter (~10 ms)."""
        if self._model is None:
            self._model = self._weights.inference_model() if self._fast else self._hf_model
        return self._model

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for the last position of each row of (B, T) ``input_ids``, shape (B, V)."""
        self.forward_calls += 1
        # The whole causal-LM forward (any architecture: GPT-2's decoder is .transformer, Gemma caps its
        # logits after the output layer), with only the last position through the output layer.
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        return out.logits[:, -1].float().cpu()  # (B, V), on the CPU, where processors and sampling run

    def prefill(self, ids: list[int], batch: int = 1) -> torch.Tensor:
        # On a model the compiled kernel covers, the kernel reads a short prompt too (faster up to
        # DecodeKernel.PREFILL_MAX tokens; a longer one goes through the HF model, its cache to the kernel).
        # N samples then continue from N copies of the prompt's keys and values, one compiled call per step.
        kernel = _decode_kernel(self._weights, len(ids), batch > 1) if self._use_kernel else None
        if kernel is not None and len(ids) <= kernel.PREFILL_MAX:
            self.forward_calls += 1
            logits = kernel.prefill(ids)  # (1, V)
        else:
            logits = self._forward(torch.tensor([ids], device=self._hf_model.device))  # (1, V)
            if kernel is not None:
                kernel.load_cache(self.cache, len(ids))
        if batch == 1:
            self.kernel = kernel
            return logits
        if kernel is not None:
            self.samples = kernel.samples(batch)
        else:  # one prompt, many samples: copy the prompt's keys/values instead of recomputing them
            self.cache.batch_repeat_interleave(batch)
        return logits.expand(batch, -1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            self.forward_calls += 1
            self._move_when_due(1)
            return self.kernel.step(int(tokens.view(-1)[0]))  # (1, V)
        if self.samples is not None:
            self.forward_calls += 1
            self._move_when_due(1)
            return self.samples.step(tokens.view(-1).tolist())  # (N, V)
        return self._forward(tokens.view(-1, 1).to(self._hf_model.device))  # (B, 1) -> (B, V)

    def greedy(self, token: int, n: int, top: int, stop: Container[int] = ()) -> list:
        """Up to ``n`` greedy steps of the compiled kernel in one call (``kernels.DecodeKernel.greedy``):
        feed ``token``, then each step's argmax, ending after an argmax in ``stop``; each step's summary."""
        # Counts the n steps asked for (an early end leaves the count a few ahead: it only times the move).
        self._move_when_due(n)
        summaries = self.kernel.greedy(token, n, top, stop)
        self.forward_calls += len(summaries)
        return summaries

    def _move_when_due(self, steps: int) -> None:
        """Before ``steps`` more kernel steps: when these steps reach ``weights.RELAYOUT_AFTER``, relay the
        weights out (huge pages, packed copy) and have the kernel read them from there."""
        if self._weights.count_steps(steps) and self._weights.relayout():
            (self.kernel or self.samples.kernel).rebind()  # the weights now live elsewhere

    def summary(self, top: int):
        """The last logits' ``kernels.Summary`` (argmax, logsumexp, entropy, ``top`` highest), which the
        compiled kernel computes while they are in cache; None when torch made them."""
        return None if self.kernel is None else self.kernel.summary(top)


def decoder_choice(lm: LM, fast: bool = True) -> tuple[bool, str]:
    """Whether the compiled CPU decoder runs ``lm``'s model, and why (or why not): the one place it is decided."""
    model = lm.model
    if not fast:
        return False, "torch decoder: the plain model was asked for"
    if model.device.type != "cpu":
        return False, f"torch decoder: the model is on {model.device} (the compiled decoder is CPU-only)"
    if os.environ.get("NEXTTOK_NUMBA", "1") == "0":
        return False, "torch decoder: NEXTTOK_NUMBA=0 turns the compiled decoder off"
    try:
        with gc_pause.paused(freeze=gc_pause.freeze_after_load):  # numba, llvmlite: long-lived objects
            from nexttok import kernels
    except ImportError as e:  # numba missing or broken on this platform
        return False, f"torch decoder: numba does not import here ({e})"
    why_not = kernels.unsupported(model)
    if why_not:
        return False, f"torch decoder: the compiled decoder does not cover this model ({why_not})"
    return True, f"compiled CPU decoder: a {type(model).__name__} in float32 on the CPU"


def _decode_kernel(weights: WeightCache, length: int, samples: bool = False):
    """kernels.DecodeKernel for the cache's model and a prompt of ``length`` tokens (continued as N
    ``samples``), on a model :func:`decoder_choice` gave to the compiled decoder."""
    from nexttok import kernels  # decoder_choice imported it

    model = weights.model
    if not kernels.compiled_on_disk(samples):
        _log.warning(
            "nexttok: compiling the decode kernel for this CPU (once after install: about a minute on 2 cores)"
        )
    return kernels.DecodeKernel(model, capacity=max(2 * length, length + 256), weights=weights)
