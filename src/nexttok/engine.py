"""The model side of the loop: one prefill, then one position per call, on a preallocated KV cache.

The transformer is the Hugging Face model itself; this module only decides how it is called:
transformers' ``DynamicCache`` (measured faster here than a ``StaticCache`` in eager mode: a static
cache attends over its whole preallocated length through a mask), the final norm's output for the
last position only through the output layer, N samples of one prompt sharing one prefill, and a
decode copy of the model whose widening linear layers read transposed weights.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nexttok.lm import LM


class _InputMajorLinear(nn.Module):
    """A bias-free linear layer that also keeps its weight as (in, out). For a single row the product is a
    matrix-vector product bound by memory reads, and MKL streams an (in, out) matrix markedly faster on
    this CPU than nn.Linear's (out, in) weight; for several rows (prefill, N samples) the original
    layout is as fast or faster, so those calls go to the original layer (see docs/generate.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)  # (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:  # one row: (1, 1, in) @ (in, out)
            return torch.matmul(x, self.weight_t)
        return self.linear(x)


def _weights_version(model: nn.Module) -> tuple[int, ...]:
    # In-place updates (optimizer steps, load_state_dict) bump a tensor's version: the copy is then stale.
    # Tensors made under inference_mode have no version counter: -1 (they cannot be updated in place later).
    return tuple(p._version if not p.is_inference() else -1 for p in model.parameters()) + tuple(
        id(p) for p in model.parameters()
    )


def decode_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for decoding: the same modules and the same (shared) parameters, except that
    each bias-free ``nn.Linear`` that does not narrow its input reads a transposed copy of its weight.
    Built once and cached on the model; rebuilt when the model's weights change."""
    version = _weights_version(model)
    cached = getattr(model, "_nexttok_decode", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    shared[id(cached)] = None  # a stale copy is not copied along
    fast = copy.deepcopy(model, memo=shared)  # new module objects, the very same tensors
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            # Measured (bench/gemv shapes in docs/generate.md): (in, out) streams faster when the layer
            # widens or keeps its width (q, o, gate, up, lm_head); narrowing layers (k, v, down) stay as they are.
            if isinstance(child, nn.Linear) and child.bias is None and child.out_features >= child.in_features:
                setattr(parent, name, _InputMajorLinear(child))
    object.__setattr__(model, "_nexttok_decode", (version, fast))  # not a submodule: no state_dict entry
    return fast


class Decoder:
    """Runs ``lm``'s model over a growing sequence, reusing every earlier position's keys and values.

    ``prefill(ids, batch)`` reads the prompt once and returns the next-token logits of ``batch``
    identical rows, shape (B, V); each ``step(tokens)`` feeds one token per row and returns the
    next logits. ``forward_calls`` counts model calls (a test checks N samples use one prefill).
    """

    def __init__(self, lm: LM, fast: bool = True):
        from transformers import DynamicCache

        self.model = decode_model(lm.model) if fast and lm.model.device.type == "cpu" else lm.model
        self.cache = DynamicCache(config=self.model.config)
        self.forward_calls = 0

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for the last position of each row of (B, T) ``input_ids``, shape (B, V)."""
        self.forward_calls += 1
        hidden = self.model.model(input_ids=input_ids, cache=self.cache, use_cache=True).last_hidden_state  # (B, T, H)
        return self.model.lm_head(hidden[:, -1]).float()  # (B, V): only the last position is projected

    def prefill(self, ids: list[int], batch: int = 1) -> torch.Tensor:
        logits = self._forward(torch.tensor([ids], device=self.model.device))  # (1, V)
        if batch > 1:
            # One prompt, many samples: copy the prompt's keys/values instead of recomputing them.
            self.cache.batch_repeat_interleave(batch)
            logits = logits.expand(batch, -1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens.view(-1, 1).to(self.model.device))  # (B, 1) -> (B, V)
