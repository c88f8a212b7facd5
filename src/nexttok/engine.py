"""The model side of the loop: one prefill, then one position per call, on a preallocated KV cache.

The transformer is the Hugging Face model itself; this module only decides how it is called:
a ``StaticCache`` sized once (no per-step concatenation), the final norm's output for the last
position only through the output layer, and N samples of one prompt sharing one prefill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nexttok.lm import LM


class Decoder:
    """Runs ``lm``'s model over a sequence of at most ``max_len`` positions.

    ``prefill(ids, batch)`` reads the prompt once and returns the next-token logits of ``batch``
    identical rows, shape (B, V); each ``step(tokens)`` feeds one token per row and returns the
    next logits. ``forward_calls`` counts model calls (a test checks N samples use one prefill).
    """

    def __init__(self, lm: LM, max_len: int):
        from transformers import StaticCache

        self.model = lm.model
        self.cache = StaticCache(config=self.model.config, max_cache_len=max_len)
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
            self._repeat_cache(batch)
            logits = logits.expand(batch, -1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens.view(-1, 1).to(self.model.device))  # (B, 1) -> (B, V)

    def _repeat_cache(self, batch: int) -> None:
        # StaticCache has no batch_repeat_interleave in transformers 5.x: copy each layer's (1, H, L, D)
        # keys/values into (B, H, L, D) buffers; the shared length counter stays as it is.
        for layer in self.cache.layers:
            layer.keys = layer.keys.expand(batch, -1, -1, -1).contiguous()
            layer.values = layer.values.expand(batch, -1, -1, -1).contiguous()
            layer.batch_size = batch
