"""The shifted next-token loss: the one definition ``fit()`` trains on and evaluation measures."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the trained positions, and how many there are.
    Labels are not pre-shifted: position t's logits predict the label at t+1. Only the trained
    positions go through the output layer (see :func:`trained_positions_only`)."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    labels = batch["labels"][:, 1:]  # (B, T-1)
    keep = labels != -100  # (B, T-1)
    with trained_positions_only(model, keep):
        logits = model(**inputs, use_cache=False).logits  # (N, V) when selected, else (B, T, V)
    if logits.dim() == 2:
        loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")  # ()
    else:
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )  # ()
    return loss, int(keep.sum())


@contextmanager
def trained_positions_only(model: torch.nn.Module, keep: torch.Tensor):
    """While active, the output layer projects only the hidden states of trained positions.

    With a 49k vocabulary the output layer and its cross-entropy are a large share of a step's work,
    and fine-tuning trains on a fraction of the positions (completions, assistant turns): the rest
    need no logits. A pre-hook on the output layer turns its (B, T, H) input into the (N, H) rows
    that ``keep`` marks; the model returns those N rows of logits unchanged. It works through DDP
    and peft wrappers. Skipped under torch.compile (a hook added per step would recompile) and when
    the layer's input is not the expected (B, T, H)."""
    raw = getattr(model, "module", model)  # DDP
    get = getattr(raw, "get_output_embeddings", None)
    layer = get() if get is not None and not hasattr(model, "_orig_mod") else None
    if layer is None:
        yield
        return

    def select(_module, args):
        hidden = args[0]  # (B, T, H)
        if hidden.dim() != 3 or hidden.shape[:2] != (keep.shape[0], keep.shape[1] + 1):
            return None
        return (hidden[:, :-1][keep], *args[1:])  # (N, H)

    handle = layer.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())
