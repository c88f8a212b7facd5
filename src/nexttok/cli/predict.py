"""``nexttok predict`` and ``nexttok tokenize``: the distribution over the vocabulary, and the tokens."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, console, load_lm, read_prompt
from nexttok.cli.generate import (
    BiasOpt,
    FreqOpt,
    MinPOpt,
    PresenceOpt,
    RepOpt,
    TopKOpt,
    TopPOpt,
    TypicalOpt,
    show_stages,
    stage_config,
)
from nexttok.distribution import Distribution, show_token
from nexttok.errors import NexttokError
from nexttok.lens import Lens, lens_report, logit_lens, print_lens
from nexttok.report import predict_report

BAR = 30
LENS_TOP = 20  # heatmap columns (and JSON numbers per layer) at most, whatever --top asks


def _temperatures(temperature: float, temperatures: str | None) -> list[float]:
    if temperatures is None:
        values = [temperature]
    else:
        try:
            values = [float(t) for t in temperatures.split(",") if t.strip()]
        except ValueError:
            raise NexttokError(
                f"--temperatures must be numbers separated by commas, e.g. 0.5,1,2 (got '{temperatures}')",
                param="temperatures",
            ) from None
    for t in values:
        if not t > 0:
            raise NexttokError(
                f"--temperature must be > 0 for predict (got {t}); greedy decoding is temperature 0 "
                "in `nexttok generate`",
                param="temperature",
            )
    return values or [1.0]


@app.command()
def predict(
    prompt: Annotated[str, typer.Argument(help="The text so far ('-' reads stdin).")],
    top: Annotated[int, typer.Option("--top", "-k", help="How many candidates to show.")] = 10,
    token: Annotated[
        list[str] | None, typer.Option("--token", "-t", help="Also show this token's probability and rank.")
    ] = None,
    token_id: Annotated[list[int] | None, typer.Option("--token-id", help="The same, by token id.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Divide the scores by T.")] = 1.0,
    temperatures: Annotated[
        str | None, typer.Option("--temperatures", help="Several temperatures side by side: 0.5,1,2.")
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message (chat template).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema: docs/predict.md).")] = False,
    plot: Annotated[
        str | None,
        typer.Option("--plot", help="Write a bar chart PNG of the candidates (with --layers: the lens heatmap)."),
    ] = None,
    layers: Annotated[
        bool,
        typer.Option(
            "--layers",
            help="Logit lens: the top token at every layer for the last position (T=1), and each layer's "
            f"probabilities of the last layer's top --top tokens (at most {LENS_TOP}).",
        ),
    ] = False,
    corpus: Annotated[
        str | None,
        typer.Option(
            "--corpus",
            help="A corpus index (`nexttok corpus index`): show the infinity-gram distribution beside the model's.",
            show_default=False,
        ),
    ] = None,
    stages: Annotated[
        bool, typer.Option("--stages", help="Show what each sampling stage keeps (with -T and the options below).")
    ] = False,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    typical_p: TypicalOpt = 1.0,
    repetition_penalty: RepOpt = 1.0,
    presence_penalty: PresenceOpt = 0.0,
    frequency_penalty: FreqOpt = 0.0,
    logit_bias: BiasOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """The next-token distribution for PROMPT: the top candidates, entropy, and any token you name."""
    temps = _temperatures(temperature, temperatures)
    if top < 1:
        raise NexttokError(f"--top must be at least 1 (got {top})", param="top")
    sampling = (top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias)
    config = stage_config(temperature, *sampling) if stages else None
    text = read_prompt(prompt)
    if config is not None and layers:
        raise NexttokError("--layers and --stages show different things; run them one at a time", param="layers")
    lm = load_lm(model, dtype, threads, device)
    if config is not None:  # the sampling stages, in their fixed order (nexttok.processors)
        return show_stages(lm, text, chat, config, as_json)
    base = lm.distribution(text, chat=chat)
    dists = [base.with_temperature(t) for t in temps]
    queries: list[str | int] = [*(token or []), *(token_id or [])]
    report = predict_report(lm, text, chat, dists, top, queries)
    lens = logit_lens(lm, text, chat=chat, top=min(top, LENS_TOP)) if layers else None
    if lens is not None:
        report["layers"] = lens_report(lens)
    if corpus is not None:
        report["corpus"] = corpus_report(lm, corpus, base, top)
    _show(report, dists, lens, as_json)
    if plot:
        _write_plot(report, plot, as_json)


def _show(report: dict, dists: list[Distribution], lens: Lens | None, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    if len(dists) == 1:
        _print_single(report, dists[0])
    else:
        _print_multi(report)
    if lens is not None:
        print_lens(lens, console)
    if "corpus" in report:
        _print_corpus(report)


def _write_plot(report: dict, path: str, as_json: bool) -> None:
    """The lens heatmap when the report has the lens (--layers), else the candidates' bar chart."""
    from nexttok.plots import plot_candidates, plot_lens

    plot_lens(report, path) if "layers" in report else plot_candidates(report, path)
    console.print(f"[dim]wrote {path}[/dim]") if not as_json else None


def corpus_report(lm, folder: str, dist: Distribution, top: int) -> dict:
    """The infinity-gram distribution after the prompt, and whether its top-1 is the model's."""
    from nexttok.corpus import CorpusIndex, infgram
    from nexttok.corpus.report import infgram_report

    g = infgram(CorpusIndex.open(folder, lm), dist.context_ids)
    model_top1 = dist.top(1)[0].id
    out = {"index": folder, **infgram_report(lm, g, top), "model_top1": model_top1, "corpus_top1": g.top1}
    return out | {"top1_agrees": g.top1 == model_top1}


def _print_corpus(report: dict) -> None:
    from nexttok.cli.corpus import print_infgram

    c = report["corpus"]
    print_infgram(c)
    model = show_token(report["distributions"][0]["top"][0]["text"])  # the rank-1 row is model_top1
    corpus = show_token(c["next"][0]["text"]) if c["next"] else "nothing"
    verdict = "the same" if c["top1_agrees"] else "different"
    console.print(f"top-1: model {model}, corpus {corpus}: {verdict}")


def _context_line(report: dict) -> str:
    tail = "".join(t["text"] for t in report["prompt_tokens"])[-60:]
    return f"next token after: {tail!r}  ({len(report['prompt_tokens'])} tokens)"


def _print_single(report: dict, dist: Distribution) -> None:
    d = report["distributions"][0]
    console.print(_context_line(report))
    table = Table()
    for col, just in [("#", "right"), ("token", "left"), ("id", "right"), ("probability", "right")]:
        table.add_column(col, justify=just)
    table.add_column("", min_width=BAR)
    top_p = d["top"][0]["prob"]
    for row in d["top"]:
        bar = "█" * max(1, round(BAR * row["prob"] / top_p)) if row["prob"] > 0 else ""
        table.add_row(str(row["rank"]), row["shown"], str(row["id"]), f"{row['prob']:.4f}", f"[cyan]{bar}[/cyan]")
    console.print(table)
    console.print(_summary(d, report["vocab_size"]))
    for q in d["tokens"]:
        console.print(_token_line(q, report["vocab_size"]))


def _summary(d: dict, vocab: int) -> str:
    temp = f"T={d['temperature']:g}  " if d["temperature"] != 1 else ""
    return (
        f"{temp}entropy {d['entropy_nats']:.3f} nats ({d['entropy_bits']:.3f} bits) · "
        f"{d['tokens_for_90pct']:,} tokens cover 90% · vocabulary {vocab:,}"
    )


def _token_line(q: dict, vocab: int) -> str:
    name = show_token(q["query"])
    if len(q["ids"]) == 1:
        return f"{name!s}: p={q['prob']:.3g}, rank {q['rank']:,} of {vocab:,} (id {q['ids'][0]})"
    pieces = " + ".join(show_token(p) for p in q["pieces"])
    return (
        f"{name}: {len(q['ids'])} tokens ({pieces}); first token p={q['prob']:.3g}, rank {q['rank']:,} "
        f"of {vocab:,}; whole word p={q['word_prob']:.3g} (chain rule)"
    )


def _print_multi(report: dict) -> None:
    console.print(_context_line(report))
    table = Table()
    for col, just in [("#", "right"), ("token", "left"), ("id", "right")]:
        table.add_column(col, justify=just)
    dists = report["distributions"]
    for d in dists:
        table.add_column(f"T={d['temperature']:g}", justify="right")
    for i, row in enumerate(dists[0]["top"]):
        table.add_row(str(row["rank"]), row["shown"], str(row["id"]), *(f"{d['top'][i]['prob']:.4f}" for d in dists))
    table.add_section()
    table.add_row("", "entropy (bits)", "", *(f"{d['entropy_bits']:.3f}" for d in dists))
    table.add_row("", "tokens for 90%", "", *(f"{d['tokens_for_90pct']:,}" for d in dists))
    console.print(table)
    for d in dists:
        for q in d["tokens"]:
            console.print(f"T={d['temperature']:g}  " + _token_line(q, report["vocab_size"]))


@app.command()
def tokenize(
    text: Annotated[str, typer.Argument(help="Text to split into tokens ('-' reads stdin).")],
    chat: Annotated[bool, typer.Option("--chat", help="Render as a user message first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """The tokens of TEXT with their ids, as the model sees them."""
    text = read_prompt(text)
    lm = load_lm(model, dtype, threads, "cpu")  # only its tokenizer is used
    ids = lm.encode(text, chat=chat)
    rows = [{"index": i, "id": t, "text": lm.token_text(t)} for i, t in enumerate(ids)]
    if as_json:
        typer.echo(json.dumps({"tokens": rows, "count": len(rows)}, ensure_ascii=False, indent=2))
        return
    console.print(f"{len(rows)} tokens · vocabulary {lm.vocab_size:,}")
    table = Table()
    for col, just in [("#", "right"), ("token", "left"), ("id", "right")]:
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(str(r["index"]), show_token(r["text"]), str(r["id"]))
    console.print(table)
