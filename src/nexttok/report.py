"""Plain-data (JSON) views of a prediction; the schema is ``schemas/predict.schema.json``."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from nexttok.distribution import Distribution, show_token

if TYPE_CHECKING:
    from nexttok.lm import LM

SCHEMA_VERSION = 2


def distribution_report(dist: Distribution, top: int, queries: list[str | int]) -> dict:
    rows = [{**asdict(r), "shown": r.shown} for r in dist.top(top)]
    return {
        "temperature": dist.temperature,
        "entropy_nats": dist.entropy,
        "entropy_bits": dist.entropy_bits,
        "tokens_for_90pct": dist.mass_cover(0.9),
        "top": rows,
        "tokens": [asdict(dist.prob(q)) for q in queries],
    }


def predict_report(
    lm: LM, prompt: str, chat: bool, dists: list[Distribution], top: int, queries: list[str | int]
) -> dict:
    """Everything ``nexttok predict`` shows, as plain data."""
    ids = dists[0].context_ids
    return {
        "schema_version": SCHEMA_VERSION,
        "model": lm.source.location if lm.source.kind != "default" else "default",
        "prompt": prompt,
        "chat": chat,
        "prompt_tokens": [{"id": i, "text": lm.token_text(i), "shown": show_token(lm.token_text(i))} for i in ids],
        "vocab_size": dists[0].vocab_size,
        "distributions": [distribution_report(d, top, queries) for d in dists],
    }
