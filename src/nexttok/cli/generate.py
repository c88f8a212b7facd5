"""``nexttok generate`` and ``nexttok chat``: the loop, streamed, traced, sampled N times; and the
sampling options with the stage table that ``nexttok predict --stages`` shares."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, check_min_span, console, load_lm, read_prompt
from nexttok.decoders import decoder_choice
from nexttok.distribution import show_token
from nexttok.errors import NexttokError
from nexttok.generate import Step, generate, stage_records
from nexttok.processors import StageRecord
from nexttok.sampling import SamplingConfig

err = Console(stderr=True, highlight=False, soft_wrap=True)
STAGES_HELP = (
    "Stages run in this fixed order: repetition/presence/frequency penalties, logit bias, temperature, "
    "top-k, top-p, min-p, typical-p. Defaults sample from the model's own distribution (every filter off)."
)

# --- sampling options, shared by generate, chat and predict --stages ---------------------------------
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-T", help="Divide scores by T; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k best tokens (0: off).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Keep the best tokens until their mass reaches p (1: off).")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Keep tokens with p >= min_p * p(best) (0: off).")]
TypicalOpt = Annotated[float, typer.Option("--typical-p", help="Locally typical sampling mass (1: off).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="Divide seen tokens' scores (1: off).")]
PresenceOpt = Annotated[float, typer.Option("--presence-penalty", help="Subtract from seen tokens (0: off).")]
FreqOpt = Annotated[float, typer.Option("--frequency-penalty", help="Subtract per occurrence (0: off).")]
BiasOpt = Annotated[
    list[str] | None, typer.Option("--logit-bias", help="TOKEN=BIAS added to a token's score (text or id).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Reproduce a run exactly.", show_default=False)]


def parse_bias(items: list[str] | None) -> dict[str | int, float]:
    """``TOKEN=BIAS`` pairs; the last '=' splits, so a token may itself contain '='."""
    out: dict[str | int, float] = {}
    for item in items or []:
        token, sep, value = item.rpartition("=")
        try:
            bias = float(value)
        except ValueError:
            bias = None
        if not sep or not token or bias is None:
            raise NexttokError(f"--logit-bias wants TOKEN=BIAS, e.g. ' Paris=-5' (got {item!r})", param="logit_bias")
        out[int(token) if token.isdigit() else token] = bias
    return out


def stage_config(
    temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float, repetition_penalty: float,
    presence_penalty: float, frequency_penalty: float, logit_bias: list[str] | None, **rest,
) -> SamplingConfig:  # fmt: skip
    """The sampling-stage options of ``predict --stages`` and ``generate`` as a validated config (before
    any model loads); ``rest`` sets the other :class:`SamplingConfig` fields (length, stops, seed)."""
    return SamplingConfig(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logit_bias=parse_bias(logit_bias), **rest,
    )  # fmt: skip


def show_stages(lm, text: str, chat: bool, config: SamplingConfig, as_json: bool = False) -> None:
    """``predict --stages``: what each stage does to the next-token distribution after ``text``."""
    records = stage_records(lm, text, config, chat=chat)
    if as_json:
        rows = [
            {**asdict(r), "top": [{"id": i, "text": lm.token_text(i), "prob": p} for i, p in r.top]} for r in records
        ]
        typer.echo(json.dumps({"stages": rows}, ensure_ascii=False, indent=2))
        return
    console.print(f"next token after: {text[-60:]!r}")
    print_stages(lm, records)


def print_stages(lm, records: list[StageRecord], top: int = 5) -> None:
    """The stage table: after each stage, how many tokens survive, the mass it removed, the top candidates."""
    table = Table(title="sampling stages, in order")
    for col, just in [("stage", "left"), ("survivors", "right"), ("mass removed", "right")]:
        table.add_column(col, justify=just)
    table.add_column(f"top {top} after the stage (probability)")
    for r in records:
        cands = "  ".join(f"{show_token(lm.token_text(i))} {p:.3f}" for i, p in r.top[:top])
        removed = "" if r.name == "model" else f"{r.mass_removed:.1%}"
        table.add_row(r.name, f"{r.survivors:,}", removed, cands)
    console.print(table)


# --- generate ------------------------------------------------------------------------------------


def step_json(lm, step: Step) -> dict:
    """One trace record as plain JSON types (stage candidates get their text)."""
    d = asdict(step)
    if step.stages is not None:
        d["stages"] = [
            {**asdict(r), "top": [{"id": i, "text": lm.token_text(i), "prob": p} for i, p in r.top]}
            for r in step.stages
        ]
    return d


def _trace_table(lm, prompt_ids: list[int], steps: list[Step], title: str = "") -> Table:
    """The seed's step table: the context so far (its tail), the predicted token, its probability, the top 3."""
    table = Table(title=f"{title}the loop, one token per step")
    for col, just in [("step", "right"), ("context so far (tail)", "right"), ("token", "left")]:
        table.add_column(col, justify=just, overflow="fold")
    for col in ("p", "top 3 alternatives"):
        table.add_column(col, justify="right" if col == "p" else "left")
    text = lm.tokenizer.decode(prompt_ids)
    for s in steps:
        alts = "  ".join(f"{show_token(a.text)} {a.prob:.2f}" for a in s.alternatives)
        table.add_row(str(s.index + 1), show_token(text[-32:]), show_token(s.text), f"{s.prob:.3f}", alts)
        text += s.text
    return table


def _stream(lm, prompt_ids, config, trace_json, stages: bool) -> list[Step]:
    """Print the text as it is produced; write the JSON trace as it goes."""
    steps: list[Step] = []
    out = open(trace_json, "w", encoding="utf-8") if trace_json else None  # noqa: SIM115
    try:
        for step in generate(lm, prompt_ids, config, trace=stages):
            steps.append(step)
            sys.stdout.write(step.delta)
            sys.stdout.flush()
            if out:
                out.write(json.dumps(step_json(lm, step), ensure_ascii=False) + "\n")
    finally:
        if out:
            out.close()
    sys.stdout.write("\n")
    return steps


def _samples_table(lm, steps: list[Step], n: int) -> None:
    """N samples side by side, with each one's total logprob, its seed and how it ended."""
    table = Table(title=f"{n} samples of one prompt (one shared prefill)")
    for col in ("#", "seed", "tokens", "total logprob", "finish", "completion"):
        table.add_column(col, justify="left" if col in ("completion", "finish") else "right", overflow="fold")
    texts = []
    for i in range(n):
        mine = _sample(steps, i)
        text = "".join(s.delta for s in mine)
        texts.append(text)
        table.add_row(
            str(i + 1), str(mine[0].seed), str(len(mine)), f"{sum(s.logprob for s in mine):.2f}",
            mine[-1].finish_reason or "", text,
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(set(texts))} distinct completions out of {n}")


@app.command("generate", epilog=STAGES_HELP)
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="The text to continue ('-' reads stdin).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many tokens.")] = 64,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    typical_p: TypicalOpt = 1.0,
    repetition_penalty: RepOpt = 1.0,
    presence_penalty: PresenceOpt = 0.0,
    frequency_penalty: FreqOpt = 0.0,
    logit_bias: BiasOpt = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-text token.")] = False,
    seed: SeedOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-N", help="Samples of the prompt, one batch.")] = 1,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send PROMPT as a user message; stop at the turn's end.")
    ] = False,
    trace: Annotated[bool, typer.Option("--trace", help="Print the step table (context, token, p, top 3).")] = False,
    trace_json: Annotated[str | None, typer.Option("--trace-json", help="Write one JSON object per step.")] = None,
    stages: Annotated[bool, typer.Option("--stages", help="Record each stage's survivors in the trace.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Say which decoder runs the model and why (also with --trace).")
    ] = False,
    corpus: Annotated[
        str | None,
        typer.Option(
            "--corpus",
            help="A corpus index: highlight the output's verbatim spans and say where they come from.",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    min_span: Annotated[int, typer.Option("--min-span", help="Shortest verbatim span shown, in tokens.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end instead.")] = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Continue PROMPT one token at a time, streaming the text as it is produced."""
    config = stage_config(
        temperature, top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty,
        logit_bias, max_new_tokens=max_new_tokens, stop=tuple(stop or ()), ignore_eos=ignore_eos, seed=seed,
    )  # fmt: skip
    if num_samples < 1:
        raise NexttokError(f"--num-samples must be at least 1 (got {num_samples})", param="num_samples")
    check_min_span(min_span)
    text = read_prompt(prompt)
    lm = load_lm(model, dtype, threads, device)
    if corpus:
        from nexttok.corpus import CorpusIndex  # numba and the index only when asked for

        index = CorpusIndex.open(corpus, lm)
    else:
        index = None
    ids = lm.encode(text, chat=chat)
    if verbose or trace:
        err.print(f"[dim]decoder: {decoder_choice(lm)[1]}[/dim]")
    start = time.perf_counter()
    if as_json:
        steps = list(generate(lm, ids, config, num_samples=num_samples, trace=stages))
        _write_json(lm, steps, trace_json)
        typer.echo(json.dumps(generation_json(lm, text, steps, num_samples, index, min_span), ensure_ascii=False))
        return
    if num_samples > 1:
        steps = list(generate(lm, ids, config, num_samples=num_samples, trace=stages))
        _write_json(lm, steps, trace_json)
        for i in range(num_samples) if trace else ():
            console.print(_trace_table(lm, ids, _sample(steps, i), f"sample {i + 1}: "))
        _samples_table(lm, steps, num_samples)
    else:
        steps = _stream(lm, ids, config, trace_json, stages)
        if trace:
            console.print(_trace_table(lm, ids, steps))
    for i in range(num_samples) if index is not None else ():
        _print_spans(lm, _sample(steps, i), index, min_span, f"sample {i + 1}: " if num_samples > 1 else "")
    _summary(steps, time.perf_counter() - start)


def _sample(steps: list[Step], i: int) -> list[Step]:
    return [s for s in steps if s.sample == i]


def generation_json(lm, prompt: str, steps: list[Step], n: int, index, min_span: int) -> dict:
    """``generate --json``: each sample's text, tokens and finish; with a corpus, its verbatim spans."""
    from nexttok.corpus.report import spans_report

    samples = []
    for i in range(n):
        mine = _sample(steps, i)
        out = {"seed": mine[0].seed if mine else None, "text": "".join(s.delta for s in mine)}
        out["tokens"] = [{"id": s.id, "text": s.text, "logprob": s.logprob} for s in mine]
        out["finish_reason"] = mine[-1].finish_reason if mine else None
        if index is not None:
            out["corpus"] = spans_report(lm, index, [s.id for s in mine], min_span)
        samples.append(out)
    return {"schema": "nexttok.generate/1", "prompt": prompt, "samples": samples}


def _print_spans(lm, steps: list[Step], index, min_span: int, title: str) -> None:
    """The output with its verbatim spans highlighted, then each span and where it comes from."""
    from rich.text import Text

    from nexttok.corpus.report import spans_report

    rep = spans_report(lm, index, [s.id for s in steps], min_span)
    covered = {p for sp in rep["spans"] for p in range(sp["start"], sp["stop"])}
    shown = Text()
    for p, s in enumerate(steps):
        shown.append(s.text, style="bold magenta underline" if p in covered else "")
    console.rule(f"{title}verbatim spans of >= {min_span} tokens (highlighted)")
    console.print(shown)
    table = Table()
    for col in ("tokens", "span", "occurrences", "found in"):
        table.add_column(col, justify="right" if col in ("tokens", "occurrences") else "left", overflow="fold")
    for sp in rep["spans"]:
        where = ", ".join(w["name"] for w in sp["where"])
        table.add_row(str(sp["stop"] - sp["start"]), show_token(sp["text"]), f"{sp['occurrences']:,}", where)
    if rep["spans"]:
        console.print(table)
    console.print(f"{rep['coverage']:.0%} of the {rep['tokens']} output tokens are in verbatim spans of >= {min_span}")


def _write_json(lm, steps: list[Step], path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(step_json(lm, s), ensure_ascii=False) + "\n" for s in steps)


def _summary(steps: list[Step], seconds: float) -> None:
    if not steps:
        return
    finish = {s.finish_reason for s in steps if s.finish_reason}
    seed = steps[0].seed
    tail = f" · seed {seed} (--seed {seed} replays it)" if seed is not None else " · greedy"
    err.print(
        f"[dim]{len(steps)} tokens in {seconds:.1f}s ({len(steps) / seconds:.1f} tokens/s) · "
        f"finish: {', '.join(sorted(finish))}{tail}[/dim]"
    )


# --- chat ----------------------------------------------------------------------------------------

CHAT_HELP = (
    "commands: /temperature T, /top-p P, /top-k K, /min-p P, /seed S, /settings, /reset (forget the "
    "conversation), /quit"
)
SETTABLE = {"/temperature": ("temperature", float), "/top-p": ("top_p", float), "/top-k": ("top_k", int)}
SETTABLE |= {"/min-p": ("min_p", float), "/seed": ("seed", int)}


def _command(line: str, config: SamplingConfig, messages: list[dict]) -> SamplingConfig | None:
    """Apply a /command; returns the new config, or None to quit."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return None
    if name == "/reset":
        messages.clear()
        err.print("[dim]conversation cleared[/dim]")
    elif name in SETTABLE:
        field, kind = SETTABLE[name]
        try:
            config = SamplingConfig(**{**asdict(config), field: kind(arg)})
        except ValueError as e:  # NexttokError included: a bad value keeps the old settings
            err.print(f"error: {e if isinstance(e, NexttokError) else f'{name} wants a number'}")
    elif name != "/settings":
        err.print(CHAT_HELP)
    err.print(f"[dim]T={config.temperature:g} top_k={config.top_k} top_p={config.top_p:g} min_p={config.min_p:g}[/dim]")
    return config


def _reply(lm, messages: list[dict], config: SamplingConfig) -> str:
    """Stream one assistant turn; it ends at the end-of-turn token."""
    ids = lm.encode_chat(messages)
    parts = []
    for step in generate(lm, ids, config):
        parts.append(step.delta)
        sys.stdout.write(step.delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


@app.command(epilog=STAGES_HELP)
def chat(
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Longest reply, in tokens.")] = 256,
    temperature: TemperatureOpt = 0.7,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 0.9,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepOpt = 1.0,
    seed: SeedOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.", show_default=False)] = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Talk with the model: each line you type is a user turn; the whole conversation is its context."""
    config = SamplingConfig(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens, seed=seed,
    )  # fmt: skip
    lm = load_lm(model, dtype, threads, device)
    lm.encode_chat([{"role": "user", "content": "hi"}])  # no chat template: fail now, not after the first line
    base = [{"role": "system", "content": system}] if system else []
    messages: list[dict] = list(base)
    err.print(f"[dim]chatting with {Path(lm.source.location).name} · {CHAT_HELP}[/dim]")
    for line in _lines():
        line = line.strip()
        if line.startswith("/"):
            config = _command(line, config, messages)
            if config is None:
                return
            messages[:] = messages or list(base)
            continue
        if line:
            _turn(lm, messages, config, line)


def _lines():
    """User lines: piped stdin as it is, or a prompt at a terminal; end of input (Ctrl-D) ends the chat."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield console.input("[bold]> [/bold]")
        except EOFError:
            return


def _turn(lm, messages: list[dict], config: SamplingConfig, line: str) -> None:
    messages.append({"role": "user", "content": line})
    try:
        messages.append({"role": "assistant", "content": _reply(lm, messages, config)})
    except NexttokError as e:  # the conversation outgrew the context: say so, keep the session
        messages.pop()
        err.print(f"error: {e}; type /reset to start over")
