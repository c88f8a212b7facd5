"""``/v1/completions`` and ``/v1/chat/completions``: a request becomes scheduler jobs, their Steps become
OpenAI's response (or its stream of chunks), with nexttok's per-token extensions alongside."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nexttok.errors import NexttokError
from nexttok.server import translate as tr
from nexttok.server.scheduler import Job, PromptToken, QueueFull
from nexttok.server.schemas import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    LegacyLogprobs,
    Usage,
)

if TYPE_CHECKING:
    from nexttok.lm import LM
    from nexttok.samples import Step
    from nexttok.server.scheduler import Scheduler


class TooBusy(Exception):
    """The queue is full: HTTP 429 with Retry-After."""


@dataclass
class Choice:
    """One sample's answer as it is built: its steps (the EOS step left out of the tokens), its text."""

    index: int
    seed: int | None = None
    text: str = ""
    steps: list[Step] = field(default_factory=list)
    reason: str | None = None
    prompt: list[PromptToken] | None = None


@dataclass
class Plan:
    """A validated request: one job per prompt (``n`` samples each) and the settings it runs with."""

    jobs: list[Job]
    n: int
    logprobs: bool  # the answer carries logprobs (``top`` alternatives per token)
    settings: dict[str, Any]
    echo: bool = False
    echoed: list[str] = field(default_factory=list)  # with echo: each prompt's text, decoded once

    def echo_text(self, choice: int) -> str:
        """The prompt text a choice's answer starts with ("" without echo)."""
        return self.echoed[choice // self.n] if self.echo else ""


class Flight:
    """A request's jobs in the scheduler: submits them, yields their events on the event loop, and cancels
    whatever is unfinished when the consumer stops (a client that went away frees its rows)."""

    def __init__(self, scheduler: Scheduler, plan: Plan):
        self.scheduler, self.plan = scheduler, plan
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        for i, job in enumerate(plan.jobs):
            job.emit = lambda event, i=i: self._put(i, event)

    def _put(self, job: int, event) -> None:  # on the scheduler's thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is waiting
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (job, event))

    def submit(self) -> None:
        for k, job in enumerate(self.plan.jobs):
            try:
                self.scheduler.submit(job)
            except QueueFull as e:
                for earlier in self.plan.jobs[:k]:
                    earlier.cancel()
                raise TooBusy(str(e)) from None

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        left = len(self.plan.jobs)
        try:
            while left:
                i, (kind, payload) = await self.queue.get()
                if kind in ("done", "error"):
                    left -= 1
                yield i, kind, payload
        finally:
            for job in self.plan.jobs:
                job.cancel()


# --- planning: request -> jobs ---------------------------------------------------------------------------


def plan_completion(lm: LM, req: CompletionRequest, limits: tr.Limits) -> Plan:
    ids_list = tr.prompts(lm, req.prompt)
    top = tr.check_logprobs(req.logprobs, lm, limits)
    # echo shows the prompt with its logprobs (scored by teacher forcing); the extension asks for them directly
    prompt_top = _prompt_top(lm, req.nexttok.prompt_logprobs, limits)
    if req.echo:
        prompt_top = max(top, prompt_top or 0)
    budgets = [tr.max_new(lm, req.max_tokens, len(ids), zero_ok=req.echo) for ids in ids_list]
    config, settings = tr.sampling_config(lm, req, budgets[0], limits)
    jobs = [
        Job(ids, None if budget == 0 else _with_budget(config, budget), n=req.n, trace=req.nexttok.trace,
            top=top, prompt_top=prompt_top)
        for ids, budget in zip(ids_list, budgets, strict=True)
    ]  # fmt: skip
    echoed = [lm.tokenizer.decode(ids) for ids in ids_list] if req.echo else []
    return Plan(jobs, req.n, req.logprobs is not None, settings, echo=req.echo, echoed=echoed)


def plan_chat(lm: LM, req: ChatRequest, limits: tr.Limits) -> Plan:
    ids = tr.chat_ids(lm, req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise NexttokError("top_logprobs needs logprobs: true", param="top_logprobs")
    top = tr.check_logprobs(req.top_logprobs or 0, lm, limits, "top_logprobs")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = tr.max_new(lm, asked, len(ids), zero_ok=False)
    config, settings = tr.sampling_config(lm, req, budget, limits)
    prompt_top = _prompt_top(lm, req.nexttok.prompt_logprobs, limits)
    job = Job(ids, config, n=req.n, trace=req.nexttok.trace, top=top, prompt_top=prompt_top)
    return Plan([job], req.n, req.logprobs, settings)


def _prompt_top(lm: LM, asked: int | None, limits: tr.Limits) -> int | None:
    return None if asked is None else tr.check_logprobs(asked, lm, limits, "nexttok.prompt_logprobs")


def _with_budget(config, budget: int):
    return config if config.max_new_tokens == budget else replace(config, max_new_tokens=budget)


# --- collecting: events -> choices -----------------------------------------------------------------------


def _absorb(choices: list[Choice], plan: Plan, job: int, kind: str, payload: Any) -> list[tuple[Choice, Step]]:
    """Fold one event into the choices; the (choice, step) pairs it added."""
    base = job * plan.n
    if kind == "prompt":
        for s in range(plan.n):
            choices[base + s].prompt = payload
        return []
    if kind == "error":
        raise payload
    if kind != "steps":
        return []
    added = []
    for step in payload:
        choice = choices[base + step.sample]
        choice.seed = step.seed
        choice.text += step.delta
        if step.finish_reason != "eos":
            choice.steps.append(step)
        choice.reason = step.finish_reason or choice.reason
        added.append((choice, step))
    return added


def _usage(plan: Plan, choices: list[Choice]) -> Usage:
    prompt = sum(len(j.ids) for j in plan.jobs)
    done = sum(len(c.steps) + (c.reason == "eos") for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


Spans = Callable[[list[int]], dict] | None


def with_spans(body: dict, choices: list[Choice], spans: Spans) -> dict:
    """``body`` with each choice's verbatim spans in ``nexttok.choices[i].corpus`` (``serve --corpus``)."""
    if spans is not None:
        for row, c in zip(body["nexttok"]["choices"], choices, strict=True):
            row["corpus"] = spans([s.id for s in c.steps])
    return body


def _extension(lm: LM, plan: Plan, choices: list[Choice], decoder: str) -> dict[str, Any]:
    rows = []
    for c in choices:
        row: dict[str, Any] = {"index": c.index, "seed": c.seed, "finish": c.reason}
        row["tokens"] = [tr.token_extension(s) for s in c.steps]
        if c.prompt is not None:
            row["prompt_logprobs"] = tr.prompt_entries(lm, c.prompt)
        rows.append(row)
    return {**plan.settings, "decoder": decoder, "choices": rows}


def _legacy(lm: LM, plan: Plan, c: Choice) -> LegacyLogprobs:
    out = LegacyLogprobs()
    if plan.echo and c.prompt is not None:
        out.tokens += [lm.token_text(t.id) for t in c.prompt]
        out.token_logprobs += [t.logprob for t in c.prompt]
        out.top_logprobs += [None] + [{lm.token_text(i): lp for i, lp in t.top} for t in c.prompt[1:]]
        out.text_offset += tr.offsets(lm, [t.id for t in c.prompt])
    out.tokens += [s.text for s in c.steps]
    out.token_logprobs += [s.logprob for s in c.steps]
    out.top_logprobs += [tr.legacy_top(s.alternatives) for s in c.steps]
    out.text_offset += tr.offsets(lm, [s.id for s in c.steps], len(plan.echo_text(c.index)))
    return out


def completion_body(lm: LM, plan: Plan, choices: list[Choice], model: str, decoder: str) -> Completion:
    out = []
    for c in choices:
        text = plan.echo_text(c.index) + c.text
        logprobs = _legacy(lm, plan, c) if plan.logprobs else None
        out.append(CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=tr.finish(c.reason)))
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=out,
        usage=_usage(plan, choices), nexttok=_extension(lm, plan, choices, decoder),
    )  # fmt: skip


def chat_body(lm: LM, plan: Plan, choices: list[Choice], model: str, decoder: str, logprobs: bool) -> ChatCompletion:
    out = []
    for c in choices:
        lp = None
        if logprobs:
            lp = ChatLogprobs(content=[tr.chat_logprob(lm, s.id, s.text, s.logprob, s.alternatives) for s in c.steps])
        message = ChatMessage(content=c.text)
        out.append(ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=tr.finish(c.reason)))
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=out,
        usage=_usage(plan, choices), nexttok=_extension(lm, plan, choices, decoder),
    )  # fmt: skip


async def collect(flight: Flight) -> list[Choice]:
    plan = flight.plan
    choices = [Choice(i) for i in range(len(plan.jobs) * plan.n)]
    async for job, kind, payload in flight.events():
        _absorb(choices, plan, job, kind, payload)
    return choices


# --- streaming: events -> server-sent events ---------------------------------------------------------------


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream(
    lm: LM, flight: Flight, model: str, include_usage: bool, chat_logprobs: bool | None = None, spans: Spans = None
):
    """The request's chunks as server-sent events, ``data: [DONE]`` last. ``chat_logprobs`` None: completions.
    ``spans`` (``serve --corpus``): a choice's last chunk carries its verbatim spans in ``nexttok.corpus``."""
    plan, chat = flight.plan, chat_logprobs is not None
    choices = [Choice(i) for i in range(len(plan.jobs) * plan.n)]
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": model}
    if chat:
        for c in choices:
            first = ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))
            yield _sse(ChatChunk(**head, choices=[first], nexttok=plan.settings).model_dump(exclude_none=True))
    try:
        async for job, kind, payload in flight.events():
            if kind == "prompt" and chat:  # nexttok.prompt_logprobs, ahead of the answer's tokens
                ext = {"prompt_logprobs": tr.prompt_entries(lm, payload)}
                yield _sse(ChatChunk(**head, choices=[], nexttok=ext).model_dump(exclude_none=True))
            elif kind == "prompt":
                yield from_prompt(lm, plan, job, payload, head)
            for choice, step in _absorb(choices, plan, job, kind, payload):
                chunk = _chunk(lm, plan, choice, step, head, chat, chat_logprobs)
                if spans is not None and step.finish_reason:
                    chunk["nexttok"]["corpus"] = spans([s.id for s in choice.steps])
                yield _sse(chunk)
    except NexttokError as e:
        yield _sse({"error": error_body(str(e), e.param)["error"]})
    if include_usage:
        usage = _usage(plan, choices).model_dump()
        yield _sse(
            {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [], "usage": usage}
        )
    yield "data: [DONE]\n\n"


def from_prompt(lm: LM, plan: Plan, job: int, scored: list[PromptToken], head: dict) -> str:
    """The echoed prompt of a streamed completion, as its first chunk per choice."""
    rows = []
    for s in range(plan.n):
        c = Choice(job * plan.n + s, prompt=scored)
        lp = _legacy(lm, plan, c) if plan.logprobs and plan.echo else None
        text = plan.echo_text(c.index)
        rows.append(
            {"index": c.index, "text": text, "logprobs": lp.model_dump() if lp else None, "finish_reason": None}
        )
    ext = {"prompt_logprobs": tr.prompt_entries(lm, scored)}
    return _sse({**head, "object": "text_completion", "choices": rows, "nexttok": ext})


def _chunk(lm: LM, plan: Plan, c: Choice, step: Step, head: dict, chat: bool, logprobs: bool | None) -> dict:
    eos = step.finish_reason == "eos"
    ext = {"index": c.index, "seed": step.seed, "finish": step.finish_reason, "token": tr.token_extension(step)}
    reason = tr.finish(step.finish_reason)
    if chat:
        content = None if eos and not step.delta else step.delta
        lp = None
        if logprobs and not eos:
            lp = ChatLogprobs(content=[tr.chat_logprob(lm, step.id, step.text, step.logprob, step.alternatives)])
        row = ChatChunkChoice(index=c.index, delta=ChatDelta(content=content), logprobs=lp, finish_reason=reason)
        return ChatChunk(**head, choices=[row], nexttok=ext).model_dump(exclude_none=True)
    lp = None
    if plan.logprobs and not eos:
        start = len(plan.echo_text(c.index)) + len(c.text) - len(step.delta)
        top = [tr.legacy_top(step.alternatives)]
        lp = LegacyLogprobs(tokens=[step.text], token_logprobs=[step.logprob], top_logprobs=top, text_offset=[start])
        lp = lp.model_dump()
    row = {"index": c.index, "text": step.delta, "logprobs": lp, "finish_reason": reason}
    return {**head, "object": "text_completion", "choices": [row], "nexttok": ext}


def error_body(message: str, param: str | None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
