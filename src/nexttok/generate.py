"""The autoregressive loop: predict a distribution, pick a token, append it, repeat.

:func:`generate` is an iterator of :class:`Step` records (the trace): one prefill over the prompt,
then one model call per new token with the KV cache. N samples of one prompt run as one batch that
shares the prefill. Text appears only at the edge: each step carries the token's text and the
``delta`` that is safe to print (held back while it could still become a stop string).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nexttok.decode import Lookahead, Scores, check_rows
from nexttok.decoders import make_decoder
from nexttok.errors import NexttokError
from nexttok.lm import LM
from nexttok.processors import StageRecord, apply, build_processors
from nexttok.sampling import SamplingConfig, make_generators, sample


@dataclass(frozen=True)
class Alternative:
    """One of the model's top candidates at a step."""

    id: int
    text: str
    prob: float


@dataclass(frozen=True)
class Step:
    """One generated token and how it was chosen.

    ``prob``, ``logprob``, ``rank`` and ``entropy`` (nats) describe the model's own distribution
    (before any stage); ``sampled_prob`` is the token's probability in the distribution it was drawn
    from (after every stage). ``finish_reason`` is set on a sample's last step: ``eos``, ``stop`` or
    ``length``. ``stages`` (with ``trace=True``) says what each sampling stage kept.
    """

    sample: int
    index: int
    position: int
    id: int
    text: str
    delta: str
    prob: float
    logprob: float
    rank: int
    entropy: float
    sampled_prob: float
    alternatives: list[Alternative]
    seed: int | None
    stages: list[StageRecord] | None = None
    finish_reason: str | None = None


def eos_ids(lm: LM) -> set[int]:
    """Every id that ends a turn: the model's generation config and the tokenizer's EOS."""
    found: set[int] = set()
    for value in (getattr(lm.model.generation_config, "eos_token_id", None), lm.tokenizer.eos_token_id):
        found.update(value if isinstance(value, list) else [] if value is None else [value])
    return found


def resolve_bias(lm: LM, bias: dict[str | int, float]) -> dict[int, float]:
    """Logit-bias keys (token text or id) as single token ids; a text of several tokens is an error."""
    out: dict[int, float] = {}
    for token, value in bias.items():
        key = int(token) if isinstance(token, str) and token.isdigit() else token
        ids = lm.token_ids(key)
        if len(ids) != 1:
            pieces = " + ".join(repr(lm.token_text(i)) for i in ids)
            raise NexttokError(
                f"logit bias token {token!r} is {len(ids)} tokens ({pieces}); bias one token: give its text or id",
                param="logit_bias",
            )
        out[ids[0]] = out.get(ids[0], 0.0) + float(value)
    return out


def check_context(lm: LM, n_prompt: int, max_new_tokens: int) -> None:
    """A prompt plus its new tokens must fit the model's context: an error, never a silent cut."""
    limit = lm.context_length
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise NexttokError(
            f"the prompt is {n_prompt} tokens and max_new_tokens is {max_new_tokens}: {n_prompt + max_new_tokens} "
            f"is more than the model's context of {limit}; shorten the prompt or lower --max-new-tokens",
            param="max_new_tokens",
        )


class _Text:
    """Turns one sample's ids into printable text: cuts at a stop string, holds back what could
    still become one (or half of a UTF-8 character), so nothing printed is ever taken back.

    Incremental: each token decodes only a short window (the ids since the last complete
    character, after a few ids of context), not the whole sample, so a long generation costs
    the same per token at its end as at its start."""

    def __init__(self, lm: LM, stop: tuple[str, ...]):
        self.lm, self.stop, self.ids, self.emitted = lm, stop, [], 0
        self.text = ""  # the decoded text of ids[: self.read]: whole characters only
        self.prefix = self.read = 0  # ids[prefix:read] are decoded again as context for the new ids
        self.longest = max((len(s) for s in stop), default=0)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to print and whether a stop string was hit."""
        self.ids.append(token)
        context, new = self._window()
        if len(new) > len(context) and not new.endswith("\ufffd"):  # U+FFFD: half a character still arriving
            self.text += new[len(context) :]
            self.prefix, self.read = self.read, len(self.ids)
        full = self.text
        start = max(0, self.emitted - self.longest)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return self._take(full, min(hits)), True
        hold = 0
        for s in self.stop:  # the longest tail of the text that begins a stop string waits
            hold = max([hold] + [n for n in range(1, len(s)) if full.endswith(s[:n])])
        return self._take(full, max(len(full) - hold, self.emitted)), False

    def flush(self) -> str:
        context, new = self._window()
        return self._take(self.text + new[len(context) :], None)

    def _window(self) -> tuple[str, str]:
        # Decoding the new ids after some context keeps what depends on it (a SentencePiece word's
        # leading space) as decoding the whole sample would; the new text is what the context lacks.
        decode = self.lm.tokenizer.decode
        return decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])

    def _take(self, full: str, end: int | None) -> str:
        end = len(full) if end is None else end
        out, self.emitted = full[self.emitted : end], max(end, self.emitted)
        return out


@dataclass
class _Row:
    """Per-sample state of the loop."""

    text: _Text
    seed: int | None
    done: bool = False


def _choose(scores: Scores, processed: torch.Tensor | None, generators) -> torch.Tensor:
    """The next token of each row, (B,): drawn from the processed scores, or their argmax when greedy
    (a decoder's summary already knows the argmax of logits no stage changed)."""
    if generators is None and processed is scores.logits and scores.summary is not None:
        return torch.tensor([scores.summary.argmax])
    return sample(processed, generators)


def _describe(scores: Scores, processed, chosen: torch.Tensor, top: int) -> dict:
    """Per-row statistics of the chosen tokens, batched and moved to Python in one go. With a decoder's
    ``summary`` of the (one) row, no further pass over the vocabulary is needed."""
    logits, summary = scores.logits, scores.summary
    if summary is not None:
        return _describe_summary(logits, None if processed is logits else processed, int(chosen[0]), summary)
    logp = torch.log_softmax(logits, dim=-1)  # (B, V): the model's own distribution
    chosen_lp = logp.gather(1, chosen[:, None])  # (B, 1)
    alt_lp, alt_ids = torch.topk(logp, top, dim=-1)  # (B, top)
    return {
        "logprob": chosen_lp[:, 0].tolist(),
        "rank": ((logp > chosen_lp).sum(-1) + 1).tolist(),
        "entropy": (-(logp.exp() * logp).nan_to_num().sum(-1)).tolist(),
        "sampled": torch.softmax(processed, dim=-1).gather(1, chosen[:, None])[:, 0].tolist(),
        "alt_lp": alt_lp.tolist(),
        "alt_ids": alt_ids.tolist(),
    }


def _describe_summary(logits, scores, chosen: int, summary) -> dict[str, list]:
    """_describe for one row of (1, V) ``logits`` from a decoder's summary (same fields, same ranks);
    ``scores`` None when no stage changed them. The argmax needs only the summary (``logits`` may be None:
    a step run ahead keeps none)."""
    if chosen == summary.argmax:
        value, rank = float(summary.top_logits[0]), 1
    else:
        value = logits[0, chosen].item()
        rank = 1 if value >= summary.top_logits[0] else int((logits[0] > value).sum()) + 1
    lp = value - summary.logsumexp
    sampled = math.exp(lp) if scores is None else torch.softmax(scores[0], -1)[chosen].item()
    return {
        "logprob": [lp], "rank": [rank], "entropy": [summary.entropy], "sampled": [sampled],
        "alt_lp": [(summary.top_logits - summary.logsumexp).tolist()], "alt_ids": [summary.top_ids.tolist()],
    }  # fmt: skip


# Rows the stages, the draw and the statistics take at once: their vocabulary-sized temporaries are this
# many rows whatever the number of samples (decode.VOCAB_BUFFERS counts on it).
GROUP = 64


def _pick(scores: Scores, context: torch.Tensor, stages: list, generators, trace: bool, top: int):
    """distribution -> stages -> sample for every row, GROUP rows at a time: the chosen tokens (B,), their
    statistics and the stage records."""
    rows = context.shape[0]
    if rows <= GROUP:
        processed, records = apply(stages, context, scores.logits, trace)
        chosen = _choose(scores, processed, generators)
        return chosen, _describe(scores, processed, chosen, top), records
    chosen, info, records = [], {}, []
    for lo in range(0, rows, GROUP):
        part = Scores(scores.logits[lo : lo + GROUP])
        group = None if generators is None else generators[lo : lo + GROUP]
        c, i, r = _pick(part, context[lo : lo + GROUP], stages, group, trace, top)
        chosen.append(c)
        records += r
        for key, values in i.items():
            info.setdefault(key, []).extend(values)
    return torch.cat(chosen), info, records


def _finish(row: _Row, token: int, eos: set[int], last: bool) -> tuple[str, str | None]:
    """Feed one token to a sample's text; return the text to print and why the sample ends (or None)."""
    if token in eos:
        return row.text.flush(), "eos"
    delta, hit = row.text.push(token)
    if hit:
        return delta, "stop"
    if last:
        return delta + row.text.flush(), "length"
    return delta, None


def _step_records(lm: LM, rows: list[_Row], live: list[int], chosen: list[int], info: dict, ctx: dict):
    """The Step of each running sample (``live``: their indices, in the batch's order) at one position;
    marks the samples that finish."""
    for j, i in enumerate(live):
        row = rows[i]
        delta, reason = _finish(row, chosen[j], ctx["eos"], ctx["last"])
        row.done = reason is not None
        alts = [
            Alternative(a, lm.token_text(a), math.exp(lp))
            for a, lp in zip(info["alt_ids"][j], info["alt_lp"][j], strict=True)
        ]
        yield Step(
            sample=i, index=ctx["index"], position=ctx["position"], id=chosen[j], text=lm.token_text(chosen[j]),
            delta=delta, prob=math.exp(info["logprob"][j]), logprob=info["logprob"][j], rank=info["rank"][j],
            entropy=info["entropy"][j], sampled_prob=info["sampled"][j], alternatives=alts, seed=row.seed,
            stages=ctx["records"][j] if ctx["records"] else None, finish_reason=reason,
        )  # fmt: skip


def stage_records(lm: LM, prompt: str | list[int], config: SamplingConfig, chat: bool = False) -> list[StageRecord]:
    """What each sampling stage of ``config`` does to the next-token distribution after ``prompt``:
    the model's own distribution first, then one record per stage in the fixed order."""
    ids = lm.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
    stages = build_processors(config, resolve_bias(lm, config.logit_bias))
    _, records = apply(stages, torch.tensor([ids]), lm.last_logits(ids).float()[None], trace=True)
    return records[0]


def _seeds(config: SamplingConfig, n: int) -> list[int | None]:
    """Sample i draws with seed + i; without a seed, a fresh one is drawn so every run can be replayed."""
    if config.greedy:
        return [None] * n
    base = config.seed if config.seed is not None else secrets.randbits(62)
    return [base + i for i in range(n)]


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
    stages = build_processors(config, resolve_bias(lm, config.logit_bias))
    seeds = _seeds(config, num_samples)
    rows = [_Row(_Text(lm, config.stop), seed) for seed in seeds]
    # Not a generator itself: bad input raises here, at the call, before any model work.
    return _loop(lm, ids, config, stages, rows, trace, min(alternatives, lm.vocab_size))


def _loop(
    lm: LM, ids: list[int], config: SamplingConfig, stages: list, rows: list[_Row], trace: bool, top: int
) -> Iterator[Step]:
    """Prefill, then per position: the distribution -> stages -> sample -> Steps -> append the chosen tokens."""
    generators = None if config.greedy else make_generators([r.seed for r in rows])
    eos = set() if config.ignore_eos else eos_ids(lm)
    decoder = make_decoder(lm)
    live = list(range(len(rows)))  # the samples still running: the decoder's batch, in order
    context = torch.tensor([ids]).expand(len(rows), -1)  # (B, T): what the penalties look at
    # Greedy with no stage: every token will be the argmax, which a decoder may compute steps ahead.
    ahead = Lookahead(config.max_new_tokens - 1, eos) if generators is None and not stages and not trace else None
    scores = decoder.start(ids, len(rows), top, ahead, reserve=config.max_new_tokens)  # (B, V) first logits
    for index in range(config.max_new_tokens):
        chosen, info, records = _pick(scores, context, stages, generators, trace, top)  # (B,)
        ctx = {"index": index, "position": len(ids) + index, "eos": eos, "records": records}
        ctx["last"] = index + 1 == config.max_new_tokens
        yield from _step_records(lm, rows, live, chosen.tolist(), info, ctx)
        keep = [j for j, i in enumerate(live) if not rows[i].done]  # finished samples leave the batch
        if not keep:
            return
        live = [live[j] for j in keep]
        generators = None if generators is None else [generators[j] for j in keep]
        # (B', T + 1): what the penalties look at; with no stage, only its row count is read
        context = torch.cat([context[keep], chosen[keep, None]], dim=1) if stages else context[: len(keep)]
        scores = decoder.next(chosen, keep)
