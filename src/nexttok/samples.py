"""One prompt's samples in the loop: their sampling stages, draws, text and :class:`Step` records.

:class:`Samples` is what a caller of a :class:`~nexttok.decode.Decoder` needs to turn each step's scores
into tokens: ``generate()`` runs one, the server's scheduler one per request, on rows of one decoder.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nexttok.decode import Scores
from nexttok.errors import NexttokError
from nexttok.processors import StageRecord, apply_traced, build_processors, with_token
from nexttok.sampling import SamplingConfig, draw, make_generators

if TYPE_CHECKING:
    from nexttok.lm import LM


@dataclass(frozen=True)
class Alternative:
    """One of the model's top candidates at a step."""

    id: int
    text: str
    prob: float
    logprob: float


@dataclass(frozen=True)
class Step:
    """One generated token and how it was chosen.

    ``prob``, ``logprob``, ``rank`` and ``entropy`` (nats) describe the model's own distribution
    (before any stage); ``sampled_prob`` is the token's probability in the distribution it was drawn
    from (after every stage). ``finish_reason`` is set on a sample's last step: ``eos``, ``stop`` or
    ``length``. ``stages`` (with ``trace=True``) says what each sampling stage kept; ``uniform`` is the
    draw from the sample's generator (seeded with ``seed``) that picked the token.
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
    uniform: float | None = None  # the uniform number in [0, 1) that picked the token (None: greedy)


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


class TextStream:
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


def _choose(scores: Scores, processed: torch.Tensor | None, generators) -> tuple[torch.Tensor, list | None]:
    """The next token of each row, (B,), and the uniform draw that picked it: drawn from the processed
    scores, or their argmax when greedy (a decoder's summary already knows the argmax of logits no stage changed)."""
    if generators is None and processed is scores.logits and scores.summary is not None:
        return torch.tensor([scores.summary.argmax]), None
    return draw(processed, generators)


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
    statistics (with the uniform draws) and the stage records."""
    rows = context.shape[0]
    if rows <= GROUP:
        processed, records, history = apply_traced(stages, context, scores.logits, trace)
        chosen, uniform = _choose(scores, processed, generators)
        info = _describe(scores, processed, chosen, top)
        info["uniform"] = uniform or [None] * rows
        return chosen, info, with_token(records, history, chosen) if trace else records
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


@dataclass
class _Row:
    """Per-sample state."""

    text: TextStream
    seed: int | None
    done: bool = False


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


def _seeds(config: SamplingConfig, n: int) -> list[int | None]:
    """Sample i draws with seed + i; without a seed, a fresh one is drawn so every run can be replayed."""
    if config.greedy:
        return [None] * n
    # Fresh seeds stay below 2**52 so that base + i survives JSON in JavaScript (a double is exact to 2**53).
    base = config.seed if config.seed is not None else secrets.randbits(52)
    return [base + i for i in range(n)]


class Samples:
    """The samples of one prompt ``ids`` under ``config``: what turns each step's scores into tokens.

    ``pick(scores)`` takes the (B, V) scores of the samples still running (``live``, in that order), runs
    the stages, draws, and returns the chosen tokens, the positions in the batch that go on (``keep``) and
    one :class:`Step` per sample. Sample i draws from its own generator seeded ``config.seed + i``, so its
    tokens do not depend on which other rows share the decoder's batch."""

    def __init__(self, lm: LM, ids: list[int], config: SamplingConfig, n: int = 1, trace: bool = False, top: int = 3):
        self.lm, self.ids, self.config, self.trace = lm, list(ids), config, trace
        self.shown = min(max(0, top), lm.vocab_size)  # alternatives each Step carries
        self.top = max(1, self.shown)  # the statistics need the best token even when none is shown
        bias = resolve_bias(lm, config.logit_bias)
        self.stages = build_processors(config, bias)
        self.batch_key = self._batch_key(bias)
        self.seeds = _seeds(config, n)
        self.rows = [_Row(TextStream(lm, config.stop), seed) for seed in self.seeds]
        self.generators = None if config.greedy else make_generators(self.seeds)
        self.eos = set() if config.ignore_eos else eos_ids(lm)
        self.live = list(range(n))  # the samples still running: the decoder's batch, in order
        self.context = torch.tensor([self.ids]).expand(n, -1)  # (B, T): what the penalties look at
        self.index = 0  # new tokens so far per running sample

    @property
    def n(self) -> int:
        return len(self.rows)

    def _batch_key(self, bias: dict[int, float]) -> tuple | None:
        """Samples with equal keys can be picked in one batch (:func:`pick_together`): the same stages, none of
        which reads the context (the penalties do), and no trace. None: picked alone."""
        c = self.config
        if self.trace or c.repetition_penalty != 1.0 or c.presence_penalty or c.frequency_penalty:
            return None
        return (
            c.greedy,
            c.temperature,
            c.top_k,
            c.top_p,
            c.min_p,
            c.typical_p,
            c.min_tokens_to_keep,
            *sorted(bias.items()),
        )

    def pick(self, scores: Scores) -> tuple[torch.Tensor, list[int], list[Step]]:
        """The chosen tokens (B,), the batch positions that go on, and the Steps of this position."""
        return self.advance(*_pick(scores, self.context, self.stages, self.generators, self.trace, self.top))

    def advance(self, chosen: torch.Tensor, info: dict, records: list) -> tuple[torch.Tensor, list[int], list[Step]]:
        """:meth:`pick` after the tokens are chosen: the Steps, and the samples that go on."""
        last = self.index + 1 == self.config.max_new_tokens
        steps = list(self._steps(chosen.tolist(), info, records, last))
        self.index += 1
        keep = [j for j, i in enumerate(self.live) if not self.rows[i].done]  # finished samples leave
        self.live = [self.live[j] for j in keep]
        self.generators = None if self.generators is None else [self.generators[j] for j in keep]
        # (B', T + 1): what the penalties look at; with no stage, only its row count is read
        grown = torch.cat([self.context[keep], chosen[keep, None]], dim=1) if self.stages else None
        self.context = grown if grown is not None else self.context[: len(keep)]
        return chosen, keep, steps

    def _steps(self, chosen: list[int], info: dict, records: list, last: bool):
        lm, position = self.lm, len(self.ids) + self.index
        for j, i in enumerate(self.live):
            row = self.rows[i]
            delta, reason = _finish(row, chosen[j], self.eos, last)
            row.done = reason is not None
            alts = [
                Alternative(a, lm.token_text(a), math.exp(lp), lp)
                for a, lp in zip(info["alt_ids"][j][: self.shown], info["alt_lp"][j][: self.shown], strict=True)
            ]
            yield Step(
                sample=i, index=self.index, position=position, id=chosen[j], text=lm.token_text(chosen[j]),
                delta=delta, prob=math.exp(info["logprob"][j]), logprob=info["logprob"][j], rank=info["rank"][j],
                entropy=info["entropy"][j], sampled_prob=info["sampled"][j], alternatives=alts, seed=row.seed,
                stages=records[j] if records else None, finish_reason=reason, uniform=info["uniform"][j],
            )  # fmt: skip


def pick_together(runs: list[Samples], scores: list[Scores]) -> list[tuple[torch.Tensor, list[int], list[Step]]]:
    """``runs[i].pick(scores[i])`` for each run, with the runs of equal :attr:`Samples.batch_key` picked in one
    batch: one pass of the stages, the draw and the statistics over all their rows instead of one per run
    (each row still draws from its own generator, so its tokens are those it would pick alone)."""
    out: list = [None] * len(runs)
    groups: dict = {}
    for i, run in enumerate(runs):
        key = run.batch_key if scores[i].summary is None else None
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = runs[members[0]].pick(scores[members[0]])
            continue
        first, sizes = runs[members[0]], [scores[i].logits.shape[0] for i in members]
        logits = torch.cat([scores[i].logits for i in members])  # (B, V): every member's rows
        gens = None if first.generators is None else [g for i in members for g in runs[i].generators]
        top = max(runs[i].top for i in members)
        no_context = torch.empty(len(logits), 0, dtype=torch.long)  # (B, 0): no stage here reads it
        chosen, info, _ = _pick(Scores(logits), no_context, first.stages, gens, False, top)
        lo = 0
        for i, n in zip(members, sizes, strict=True):
            part = {k: v[lo : lo + n] for k, v in info.items()}
            out[i] = runs[i].advance(chosen[lo : lo + n], part, [])
            lo += n
    return out
