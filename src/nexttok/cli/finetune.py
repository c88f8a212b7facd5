"""``nexttok finetune``, ``nexttok mask-preview`` and ``nexttok compare``: training on curated data,
seeing which tokens are trained, and seeing what training moved in the next-token distribution."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, DtypeOpt, ThreadsOpt, console, load_lm, read_prompt
from nexttok.distribution import show_token
from nexttok.errors import NexttokError

DataOpt = Annotated[str, typer.Option("--data", "-d", help="JSONL, JSON, CSV, parquet or .txt file of records.")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format", help="Force the record shape: prompt, alpaca, messages, sharegpt or text.", show_default=False
    ),
]
TrainOnOpt = Annotated[
    str | None,
    typer.Option(
        "--train-on",
        help="completion|assistant (every assistant turn, the default), last (final turn only) or all.",
        show_default=False,
    ),
]
MaxLenOpt = Annotated[int, typer.Option("--max-length", help="Longest record in tokens; longer ones are dropped.")]
TruncateOpt = Annotated[bool, typer.Option("--truncate", help="Cut records longer than --max-length instead.")]
OneModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="'default', a model folder, a .gguf file, or a hub id.", show_default=False),
]
TRAINED_STYLE, MASKED_STYLE = "bold black on green", "dim"


@app.command()
def finetune(
    data: DataOpt,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder (checkpoint, metrics, model).")],
    model: OneModelOpt = None,
    fmt: FormatOpt = None,
    train_on: TrainOnOpt = None,
    max_length: MaxLenOpt = 1024,
    truncate: TruncateOpt = False,
    layout: Annotated[str, typer.Option("--layout", help="pack (several records per row) or pad.")] = "pack",
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the training records.")] = 1.0,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate [default: 2e-5, LoRA 2e-4].")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Records held out for eval.")] = 0.05,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Evaluate every N steps.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters (peft) instead of every weight.")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha (scale = alpha / r).")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="Dropout on the LoRA input.")] = 0.05,
    lora_targets: Annotated[
        str, typer.Option("--lora-targets", help="Comma-separated module names, or all-linear.")
    ] = "all-linear",
    merge: Annotated[bool, typer.Option("--merge", help="Also write OUT/merged: a plain HF folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the checkpoint in --out exactly.")] = False,
    max_seconds: Annotated[float | None, typer.Option("--max-seconds", help="Stop after this much training.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Shuffling, eval split and init seed.")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast.")] = False,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Fine-tune a model on instruction, chat or text records with the same loop as pretrain."""
    from nexttok.finetune import DataOptions, LoraOptions
    from nexttok.finetune import finetune as run_finetune

    data_opts = DataOptions(data, fmt, train_on, max_length, truncate, layout, eval_fraction, seed)
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    lora_opts = LoraOptions(lora_r, lora_alpha, lora_dropout, targets) if lora else None
    train = {"batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "bf16": bf16, "max_seconds": max_seconds}
    train |= {k: v for k, v in {"lr": lr, "eval_every": eval_every}.items() if v is not None}
    if lr is not None:
        train["min_lr"] = lr / 10
    result = run_finetune(
        model, data_opts, out, lora_opts, merge, epochs, steps, resume, dtype, threads, console.print,
        device=device, **train,
    )  # fmt: skip
    from nexttok import distributed

    if distributed.rank() != 0:
        return distributed.cleanup()
    ev = result.fit.eval
    held = f" · held-out loss {ev['loss']:.4f}" if ev.get("loss") is not None else ""
    console.print(f"done: {result.fit.step} steps · train loss {result.fit.train_loss:.4f}{held} · saved to {out}")
    if result.merged:
        console.print(f"merged model: {result.merged}")
    distributed.cleanup()


@app.command("mask-preview")
def mask_preview(
    data: DataOpt,
    n: Annotated[int, typer.Option("-n", help="How many records to show.")] = 3,
    fmt: FormatOpt = None,
    train_on: TrainOnOpt = None,
    max_length: MaxLenOpt = 2048,
    html_out: Annotated[str | None, typer.Option("--html", help="Also write the preview as an HTML file.")] = None,
    model: OneModelOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """Show records as the model will train on them: trained tokens highlighted, masked ones dim."""
    from nexttok.data.chat import Renderer, ensure_chat_template
    from nexttok.data.formats import read_dataset

    if n < 1:
        raise NexttokError(f"-n must be at least 1 (got {n})", param="n")
    dataset = read_dataset(data, fmt)
    lm = load_lm(model, dtype, threads, "cpu")  # only its tokenizer is used
    ensure_chat_template(lm.tokenizer)
    renderer = Renderer(lm.tokenizer, train_on, max_length)
    examples = [renderer.render(r) for r in dataset.records]
    console.print(dataset.summary())
    for ex in examples[:n]:
        _print_example(lm, ex)
    _print_totals(examples, max_length)
    if html_out:
        Path(html_out).write_text(_html(lm, examples[:n]), encoding="utf-8")
        console.print(f"[dim]wrote {html_out}[/dim]")


def _pieces(lm, ex) -> list[tuple[str, bool]]:
    """(token text, trained?) pairs; a label at t trains the token at t."""
    return [(lm.token_text(t), lab != -100) for t, lab in zip(ex.input_ids, ex.labels, strict=True)]


def _print_example(lm, ex) -> None:
    text = Text()
    for piece, trained in _pieces(lm, ex):
        shown = piece.replace("\n", "↵\n")
        text.append(shown, style=TRAINED_STYLE if trained else MASKED_STYLE)
    masked = len(ex) - ex.n_trained
    console.rule(f"{ex.where} · {len(ex)} tokens: {ex.n_trained} trained, {masked} masked", align="left")
    console.print(text)
    if ex.n_trained == 0:
        console.print("[yellow]warning: this record trains on zero tokens; it will be dropped[/yellow]")


def _print_totals(examples, max_length: int) -> None:
    trained = sum(e.n_trained for e in examples)
    total = sum(len(e) for e in examples)
    console.rule()
    console.print(
        f"{len(examples):,} records · {total:,} tokens: {trained:,} trained ({trained / max(1, total):.0%}), "
        f"{total - trained:,} masked"
    )
    zero = [e.where for e in examples if e.n_trained == 0]
    if zero:
        console.print(f"[yellow]warning: {len(zero):,} records train on zero tokens (first: {zero[0]})[/yellow]")
    long = sum(len(e) > max_length for e in examples)
    if long:
        console.print(f"[yellow]{long:,} records are longer than --max-length {max_length} and would be dropped[/]")


def _html(lm, examples) -> str:
    body = []
    for ex in examples:
        spans = "".join(
            f'<span class="{"t" if trained else "m"}">{html.escape(piece)}</span>' for piece, trained in _pieces(lm, ex)
        )
        head = f"{html.escape(ex.where)} · {len(ex)} tokens: {ex.n_trained} trained, {len(ex) - ex.n_trained} masked"
        body.append(f"<h3>{head}</h3><pre>{spans}</pre>")
    style = ".t{background:#b6f0b6}.m{color:#999}pre{white-space:pre-wrap;font-size:14px}"
    return f"<!doctype html><meta charset=utf-8><title>mask preview</title><style>{style}</style>{''.join(body)}"


@app.command()
def compare(
    prompt: Annotated[str, typer.Argument(help="The text so far ('-' reads stdin).")],
    models: Annotated[
        list[str], typer.Option("--model", "-m", help="Give twice: model A (e.g. the base), then model B.")
    ],
    top: Annotated[int, typer.Option("--top", "-k", help="Top candidates of each model to show.")] = 10,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message (chat template).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plot: Annotated[str | None, typer.Option("--plot", help="Write paired bars of the candidates to a PNG.")] = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Two models' next-token distributions side by side: gains, losses, KL(A‖B), JS divergence."""
    from nexttok.compare import compare as run_compare

    if len(models) != 2:
        raise NexttokError(f"give --model exactly twice, A then B (got {len(models)})", param="model")
    if top < 1:
        raise NexttokError(f"--top must be at least 1 (got {top})", param="top")
    text = read_prompt(prompt)
    lm_a, lm_b = load_lm(models[0], dtype, threads, device), load_lm(models[1], dtype, threads, device)
    result = run_compare(lm_a, lm_b, text, chat=chat, top=top)
    if as_json:
        report = {"model_a": models[0], "model_b": models[1], **result.to_dict()}
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_compare(result, models, lm_a)
    if plot:
        from nexttok.plots import plot_compare

        plot_compare(result, (models[0], models[1]), plot)
        console.print(f"[dim]wrote {plot}[/dim]") if not as_json else None


def _print_compare(result, models: list[str], lm) -> None:
    tail = lm.tokenizer.decode(result.context_ids)[-60:]
    console.print(f"next token after: {tail!r}  ({len(result.context_ids)} tokens)")
    console.print(f"A = {models[0]}   B = {models[1]}")
    table = Table()
    for col, just in [("token", "left"), ("id", "right"), ("P(A)", "right"), ("rank A", "right")]:
        table.add_column(col, justify=just)
    for col in ["P(B)", "rank B", "B − A"]:
        table.add_column(col, justify="right")
    for c in result.rows:
        colour = "green" if c.delta > 0 else "red"
        table.add_row(c.shown, str(c.id), f"{c.prob_a:.4f}", f"{c.rank_a:,}", f"{c.prob_b:.4f}", f"{c.rank_b:,}",
                      f"[{colour}]{c.delta:+.4f}[/{colour}]")  # fmt: skip
    console.print(table)
    console.print("largest gains:  " + ", ".join(f"{c.shown} {c.delta:+.3f}" for c in result.gains))
    console.print("largest losses: " + ", ".join(f"{c.shown} {c.delta:+.3f}" for c in result.losses))
    top_b = result.rows[0] if result.rows else None
    console.print(
        f"KL(A‖B) {result.kl_ab:.4f} nats ({result.kl_ab_bits:.4f} bits) · JS {result.js_bits:.4f} bits · "
        f"B's top token {show_token(top_b.text) if top_b else ''} is rank {result.b_top_rank_under_a:,} under A · "
        f"entropy A {result.entropy_a_bits:.3f} bits, B {result.entropy_b_bits:.3f}"
    )
