"""The autoregressive loop: predict a distribution, pick a token, append it, repeat.

:func:`generate` is an iterator of :class:`Step` records (the trace): one prefill over the prompt,
then one model call per new token with the KV cache. N samples of one prompt run as one batch that
shares the prefill. Text appears only at the edge: each step carries the token's text and the
``delta`` that is safe to print (held back while it could still become a stop string). What turns
each step's scores into tokens is :class:`nexttok.samples.Samples`, which the server shares.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nexttok.decode import Lookahead, check_rows
from nexttok.decoders import make_decoder
from nexttok.errors import NexttokError
from nexttok.lm import LM
from nexttok.processors import StageRecord, apply, build_processors
from nexttok.samples import Alternative, Samples, Step, eos_ids, resolve_bias
from nexttok.sampling import SamplingConfig

__all__ = ["Alternative", "Step", "check_context", "eos_ids", "generate", "resolve_bias", "stage_records"]


def check_context(lm: LM, n_prompt: int, max_new_tokens: int) -> None:
    """A prompt plus its new tokens must fit the model's context: an error, never a silent cut."""
    limit = lm.context_length
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise NexttokError(
            f"the prompt is {n_prompt} tokens and max_new_tokens is {max_new_tokens}: {n_prompt + max_new_tokens} "
            f"is more than the model's context of {limit}; shorten the prompt or lower --max-new-tokens",
            param="max_new_tokens",
        )


def stage_records(lm: LM, prompt: str | list[int], config: SamplingConfig, chat: bool = False) -> list[StageRecord]:
    """What each sampling stage of ``config`` does to the next-token distribution after ``prompt``:
    the model's own distribution first, then one record per stage in the fixed order."""
    ids = lm.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
    stages = build_processors(config, resolve_bias(lm, config.logit_bias))
    _, records = apply(stages, torch.tensor([ids]), lm.last_logits(ids).float()[None], trace=True)
    return records[0]


def generate(
    lm: LM,
    prompt: str | list[int],
    config: SamplingConfig | None = None,
    *,
    num_samples: int = 1,
    chat: bool = False,
    trace: bool = False,
    alternatives: int = 3,
) -> Iterator[Step]:
    """Generate from ``prompt`` (text, or token ids), yielding one :class:`Step` per new token per sample.

    One prefill reads the prompt; each later step runs the model on one new token per sample with the
    KV cache. ``num_samples`` samples share the prefill and run as one batch; sample i uses seed
    ``config.seed + i``. ``chat`` renders a text prompt as a user message. ``trace`` records what each
    sampling stage kept. A prompt plus ``max_new_tokens`` longer than the context is an error.
    """
    config = config or SamplingConfig()
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise NexttokError(f"num_samples must be at least 1 (got {num_samples})", param="num_samples")
    ids = lm.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
    check_context(lm, len(ids), config.max_new_tokens)
    check_rows(lm, num_samples, len(ids) + config.max_new_tokens)
    # Not a generator itself: bad input raises here, at the call, before any model work.
    return _loop(lm, Samples(lm, ids, config, num_samples, trace, alternatives))


def _loop(lm: LM, run: Samples) -> Iterator[Step]:
    """Prefill, then per position: the distribution -> stages -> sample -> Steps -> append the chosen tokens."""
    decoder, config = make_decoder(lm), run.config
    # Greedy with no stage: every token will be the argmax, which a decoder may compute steps ahead.
    plain = run.generators is None and not run.stages and not run.trace
    ahead = Lookahead(config.max_new_tokens - 1, run.eos) if plain else None
    scores = decoder.start(run.ids, run.n, run.top, ahead, reserve=config.max_new_tokens)  # (B, V) first logits
    while True:
        chosen, keep, steps = run.pick(scores)  # (B,) tokens; the batch positions that go on
        yield from steps
        if not keep:
            return
        scores = decoder.next(chosen, keep)
