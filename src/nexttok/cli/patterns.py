"""``nexttok patterns`` and ``nexttok memorization``: how much of a model's prediction its training corpus
explains, and which training windows it reproduces verbatim."""

from __future__ import annotations

import json
import warnings
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, console, load_lm
from nexttok.errors import NexttokNotice

CorpusOpt = Annotated[str, typer.Option("--corpus", help="A corpus index from `nexttok corpus index`.")]
SplitOpt = Annotated[str, typer.Option(help="all, heldout (the pretraining recipe's last 10%) or train.")]
PlotOpt = Annotated[str | None, typer.Option("--plot", help="Write the figure as a PNG.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DataOpt = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", help="Text/JSONL/parquet files or folders, or a packaged corpus.", show_default=False),
]


@app.command()
def patterns(
    corpus: CorpusOpt,
    data: Annotated[
        list[str],
        typer.Option("--data", "-d", help="The held-out text (files, folders, a packaged corpus).", show_default=False),
    ],
    split: SplitOpt = "heldout",
    context: Annotated[int | None, typer.Option(help="Model window in tokens.", show_default=False)] = None,
    limit_tokens: Annotated[int, typer.Option(help="Score the first N tokens.")] = 20000,
    plot: PlotOpt = None,
    as_json: JsonOpt = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """The model's top-1 beside its corpus's infinity-gram top-1 over a held-out text, by matched suffix length."""
    from nexttok.corpus import CorpusIndex
    from nexttok.corpus.patterns import patterns as run

    lm = load_lm(model, dtype, threads, device)
    index = CorpusIndex.open(corpus, lm)
    result = run(lm, index, data, progress=console.is_terminal and not as_json,
                 split=split, context=context, limit_tokens=limit_tokens)  # fmt: skip
    if result.positions and np.median(result.suffix_length) > 32:
        warnings.warn("the median matched suffix is over 32 tokens: this text looks like part of the corpus "
                      "index; index the training split only (`nexttok corpus index ... --split train`)",
                      NexttokNotice, stacklevel=1)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_patterns(result)
    if plot:
        from nexttok.plots import plot_patterns

        plot_patterns(result, plot)
        console.print(f"[dim]wrote {plot}[/dim]") if not as_json else None


def _print_patterns(r) -> None:
    console.print(f"{r.model} on {r.source}: {r.positions:,} positions, against the corpus index {r.corpus}")
    table = Table()
    for col in ("matched suffix (tokens)", "positions", "share", "top-1 agreement", "model right", "corpus right"):
        table.add_column(col, justify="right")
    for b in r.buckets:
        pct = lambda v: "—" if v != v else f"{v:.1%}"  # noqa: E731
        table.add_row(b.label, f"{b.positions:,}", f"{b.share:.1%}", pct(b.agreement), pct(b.model_accuracy),
                      pct(b.corpus_accuracy))  # fmt: skip
    table.add_section()
    table.add_row("all", f"{r.positions:,}", "100%", f"{r.agreement:.1%}", "", "")
    console.print(table)
    console.print(
        f"not explained by the corpus: at {r.unexplained:.1%} of positions the model's top-1 is not the corpus's "
        f"(and at {r.unexplained_correct:.1%} of positions the model is right there)"
    )


@app.command()
def memorization(
    corpus: CorpusOpt,
    prefix: Annotated[int, typer.Option("--prefix", "-k", help="Prefix tokens given.")] = 32,
    suffix: Annotated[int, typer.Option("--suffix", "-s", help="Suffix tokens greedy must reproduce.")] = 32,
    windows: Annotated[int, typer.Option("--windows", "-n", help="Windows sampled from each text.")] = 1000,
    data: DataOpt = None,
    split: SplitOpt = "heldout",
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Another model on the same windows: 'init' (this model's untrained initialisation), or "
            "a model (e.g. the base before fine-tuning).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    seed: Annotated[int, typer.Option(help="Which windows are drawn.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 32,
    plot: PlotOpt = None,
    as_json: JsonOpt = False,
    model: ModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Which windows greedy decoding reproduces: training windows (from the index) against held-out ones
    (--data), by how often each occurs in the corpus; with --baseline, another model beside."""
    from nexttok.corpus import memorization as mem

    mem.check_lengths(prefix, suffix)
    from nexttok.corpus import CorpusIndex

    lm = load_lm(model, dtype, threads, device)
    index = CorpusIndex.open(corpus, lm)
    sets = {"train": mem.sample_windows(index.tokens, prefix + suffix, windows, seed)}
    if data:
        sets["heldout"] = mem.heldout_windows(lm, data, split, prefix + suffix, windows, seed)
    models = [(model or "default", lm)]
    if baseline:
        models.append(
            ("untrained init" if baseline == "init" else baseline, mem.baseline_lm(lm, baseline, dtype, device))
        )
    sides = mem.measure(models, sets, index, prefix, batch_size, show=console.is_terminal and not as_json)
    report = mem.report(sides, prefix, suffix, str(index.folder))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_memorization(report)
    if plot:
        from nexttok.plots import plot_memorization

        plot_memorization(sides, plot)
        console.print(f"[dim]wrote {plot}[/dim]") if not as_json else None


def _print_memorization(r: dict) -> None:
    console.print(f"k = {r['prefix']} prefix tokens, m = {r['suffix']} suffix tokens; corpus {r['corpus']}")
    table = Table()
    for col in ("model", "windows", "n", "extractable", "mean log p(suffix)", "by occurrences in corpus"):
        table.add_column(col, justify="left" if col in ("model", "windows", "by occurrences in corpus") else "right")
    for s in r["sides"]:
        dups = "  ".join(f"{d['occurrences']}: {d['extractable']:.1%} of {d['windows']}" for d in s["by_duplicates"])
        table.add_row(s["model"], s["windows"], f"{s['n']:,}", f"{s['extractable']:.1%}",
                      f"{s['mean_logprob']:.2f}", dups)  # fmt: skip
    console.print(table)
