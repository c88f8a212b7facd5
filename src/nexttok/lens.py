"""The logit lens: the next-token distribution read off every layer's hidden state at the last position.

Each layer's hidden state goes through the model's final norm and its output layer (then the model's own
logit cap or scale, where it has one), as if the model stopped there. Hugging Face returns the last
layer's state already normed, so that one skips the norm: the lens's last row is then the model's own
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from nexttok.distribution import Distribution, show_token
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel

    from nexttok.lm import LM

# (backbone attribute, final norm attribute) per family: Llama/Qwen/Mistral-like, GPT-2, GPT-NeoX.
FINAL_NORMS = (("model", "norm"), ("transformer", "ln_f"), ("gpt_neox", "final_layer_norm"))
TAIL = 50  # characters of the context shown in titles


@dataclass(frozen=True)
class LensLayer:
    """One layer's reading of the last position. ``probs`` are the probabilities at this layer of the
    final layer's top tokens (:attr:`Lens.columns`), in that order."""

    layer: int  # 0 is the embeddings, L the last layer
    label: str  # "embed", "1", ..., "L"
    top_id: int
    top_text: str
    top_prob: float
    entropy_bits: float
    final_prob: float  # probability of the final layer's top-1 token here
    final_rank: int  # its 1-based rank among the whole vocabulary here
    probs: list[float]


@dataclass(frozen=True)
class Lens:
    """The logit lens of one prompt: one :class:`LensLayer` per hidden state (embeddings first)."""

    prompt: str
    chat: bool
    context_ids: list[int]
    context_text: str
    columns: list[int]  # the final layer's top token ids, best first
    column_texts: list[str]
    layers: list[LensLayer]
    logprobs: torch.Tensor = field(repr=False, compare=False)  # (L+1, V) float32, on the CPU

    @property
    def num_layers(self) -> int:
        return len(self.layers) - 1


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (its adapters stay in the modules), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_norm(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    """The model's stack of layers (the part that returns hidden states) and its final norm."""
    for outer, inner in FINAL_NORMS:
        backbone = getattr(model, outer, None)
        norm = getattr(backbone, inner, None)
        if isinstance(norm, nn.Module):
            return backbone, norm
    raise NexttokError(
        f"the logit lens does not know where {type(model).__name__} keeps its final norm; it reads "
        "Llama-like (model.norm), GPT-2 (transformer.ln_f) and GPT-NeoX (gpt_neox.final_layer_norm) models",
        param="layers",
    )


@torch.inference_mode()
def layer_logits(lm: LM, ids: list[int]) -> torch.Tensor:
    """Scores for the token after ``ids`` read off every hidden state, shape (L+1, V), float32 on the CPU."""
    model = unwrap(lm.model)
    backbone, norm = backbone_and_norm(model)
    input_ids = torch.tensor([ids], device=model.device)  # (1, T)
    # The backbone alone: no output layer over every position, only over the last one below.
    hidden = backbone(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    last = torch.stack([h[0, -1] for h in hidden])  # (L+1, H)
    # HF hands back the last state already through the final norm: norming it twice would change the answer.
    normed = torch.cat([norm(last[:-1]), last[-1:]])  # (L+1, H)
    return after_head(model.config, model.get_output_embeddings()(normed)).float().cpu()  # (L+1, V)


def after_head(config, logits: torch.Tensor) -> torch.Tensor:
    """What the model does to its logits after the output layer: Cohere scales them, Gemma 2 and 3 cap
    them with ``cap * tanh(z / cap)``. Without it the lens's last row would not be the model's distribution."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logit_lens(lm: LM, text: str, chat: bool = False, top: int = 10) -> Lens:
    """The logit lens for the token after ``text``: the top token and its probability at every layer,
    and each layer's probabilities of the final layer's ``top`` best tokens (at temperature 1)."""
    if top < 1:
        raise NexttokError(f"top must be at least 1 (got {top})", param="top")
    ids = lm.encode(text, chat=chat)
    logprobs = torch.log_softmax(layer_logits(lm, ids), dim=-1)  # (L+1, V)
    columns = torch.topk(logprobs[-1], min(top, logprobs.shape[1])).indices.tolist()
    layers = [_layer(lm, i, lp, ids, columns) for i, lp in enumerate(logprobs)]
    context = "".join(lm.token_text(i) for i in ids)
    texts = [lm.token_text(c) for c in columns]
    return Lens(text, chat, ids, context, columns, texts, layers, logprobs)


def _layer(lm: LM, index: int, logprobs: torch.Tensor, ids: list[int], columns: list[int]) -> LensLayer:
    d = Distribution(logprobs, lm, ids)  # this layer's reading, with predict's top, rank and entropy
    best, final = d.top(1)[0], columns[0]
    return LensLayer(
        layer=index,
        label="embed" if index == 0 else str(index),
        top_id=best.id,
        top_text=best.text,
        top_prob=best.prob,
        entropy_bits=d.entropy_bits,
        final_prob=float(d.probs[final]),
        final_rank=d.rank_of(final),
        probs=[float(d.probs[c]) for c in columns],
    )


def lens_report(lens: Lens) -> dict:
    """The lens as plain data (the ``layers`` key of ``nexttok predict --layers --json``)."""
    tokens = [
        {"id": i, "text": t, "shown": show_token(t)} for i, t in zip(lens.columns, lens.column_texts, strict=True)
    ]
    rows = [
        {
            "layer": r.layer,
            "label": r.label,
            "top": {"id": r.top_id, "text": r.top_text, "shown": show_token(r.top_text), "prob": r.top_prob},
            "entropy_bits": r.entropy_bits,
            "final_prob": r.final_prob,
            "final_rank": r.final_rank,
            "probs": r.probs,
        }
        for r in lens.layers
    ]
    return {"num_layers": lens.num_layers, "context_tail": lens.context_text[-TAIL:], "tokens": tokens, "rows": rows}


def print_lens(lens: Lens, console: Console) -> None:
    """The lens as a table: each layer's top token, and where the final answer stands at that layer."""
    from rich.table import Table

    final = show_token(lens.column_texts[0])
    table = Table(title=f"logit lens: the last position at each of {lens.num_layers} layers (+ embeddings)")
    for col, just in [("layer", "right"), ("top token", "left"), ("prob", "right")]:
        table.add_column(col, justify=just)
    table.add_column(f"p({final})", justify="right")
    table.add_column(f"rank of {final}", justify="right")
    for r in lens.layers:
        table.add_row(r.label, show_token(r.top_text), f"{r.top_prob:.4f}", f"{r.final_prob:.4f}", f"{r.final_rank:,}")
    console.print(table)
