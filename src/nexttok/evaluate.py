"""Held-out metrics: loss (nats per token), perplexity, and bits per byte / per character.

Loss per token depends on the tokenizer; bits per byte (or per character) divide the total loss
by the amount of text predicted, so models with different tokenizers compare fairly.
"""

from __future__ import annotations

import math

import torch

from nexttok import distributed
from nexttok.loss import token_loss_sum

LN2 = math.log(2)


@torch.no_grad()
def evaluate(model: torch.nn.Module, source, batch_size: int, limit: int) -> dict[str, float]:
    """Mean held-out loss over at most ``limit`` batches of ``source.eval_batches``; with several
    processes each rank takes every world-th batch and the sums are combined."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss (nats), tokens, bytes, chars
    world, rank = distributed.world(), distributed.rank()
    for i, batch in enumerate(source.eval_batches(batch_size, limit)):
        if i % world != rank:
            continue
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss, n = token_loss_sum(model, batch)
        sums[0] += float(loss)
        sums[1] += n
        sums[2] += float(batch.get("n_bytes", 0))
        sums[3] += float(batch.get("n_chars", 0))
    model.train(was_training)
    return metrics_from_sums(*distributed.all_sum(sums))


def metrics_from_sums(loss: float, tokens: float, n_bytes: float = 0, n_chars: float = 0) -> dict[str, float]:
    """Metrics from totals: the loss is summed nats over ``tokens`` predicted tokens."""
    if tokens == 0:
        return {}
    mean = loss / tokens
    out = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}
    if n_bytes:
        out["bits_per_byte"] = loss / LN2 / n_bytes
    if n_chars:
        out["bits_per_char"] = loss / LN2 / n_chars
    return out
