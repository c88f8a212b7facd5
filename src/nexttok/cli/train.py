"""``nexttok tokenizer train`` and ``nexttok pretrain``: a tokenizer and a model, from raw text."""

from __future__ import annotations

from typing import Annotated

import typer

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, ThreadsOpt, console

tokenizer_app = typer.Typer(help="Train a byte-level BPE tokenizer on your text.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Text files, folders, .jsonl/.parquet, or 'shakespeare'.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the HF tokenizer to.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, specials included.")] = 4096,
    text_field: Annotated[str, typer.Option("--text-field", help="Field holding the text in JSONL/parquet.")] = "text",
) -> None:
    """Train a byte-level BPE (special tokens for BOS/EOS, padding and the ChatML markers) and save it."""
    from nexttok.data.sources import load_corpus
    from nexttok.tokenizer_train import MIN_VOCAB, SPECIALS, train_bpe

    if vocab_size < MIN_VOCAB:  # fail before reading the corpus
        train_bpe([], vocab_size)
    corpus = load_corpus(data, text_field)
    with console.status(f"training a {vocab_size:,}-token BPE on {corpus.chars:,} characters…"):
        tok = train_bpe(corpus.documents, vocab_size, out)
    sample = corpus.documents[0][:2000]
    n = len(tok.encode(sample, add_special_tokens=False))
    console.print(
        f"wrote {out}: {len(tok):,} tokens (special: {' '.join(SPECIALS)}); "
        f"{len(sample) / max(1, n):.2f} characters per token on the first document"
    )


@app.command()
def pretrain(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="A YAML recipe, e.g. recipes/shakespeare.yaml.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides of any recipe field: train.lr=1e-3 model.layers=2 …")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder (train.out_dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the checkpoint in the output folder.")] = False,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="'train' (BPE on the corpus), 'gpt2', or an HF tokenizer folder.")
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train a Llama-architecture model from scratch on raw text, with the one training loop.

    Under ``torchrun --nproc_per_node N`` the same command trains with DDP."""
    from nexttok import distributed, pretrain
    from nexttok.config import load_recipe

    items = list(overrides or [])
    items += [f"train.out_dir={out}"] if out else []
    items += [f"threads={threads}"] if threads else []
    items += [f"device={device}"] if device else []
    items += [f"tokenizer.source={tokenizer}"] if tokenizer else []
    recipe = load_recipe(config, items)
    say = console.print if distributed.rank() == 0 else (lambda *a, **k: None)
    result, final = pretrain.run(recipe, resume=resume, say=say)
    if final:
        bits = f"{final['bits_per_char']:.3f} bits/char, " if "bits_per_char" in final else ""
        say(
            f"held-out (all {int(final['tokens']):,} tokens): loss {final['loss']:.4f}, perplexity "
            f"{final['perplexity']:.1f}, {bits}{final.get('bits_per_byte', float('nan')):.3f} bits/byte"
        )
    stop = " (stopped at train.max_seconds)" if result.stopped_early else ""
    say(f"step {result.step}{stop}; model in {result.out_dir} — try: nexttok predict --model {result.out_dir} 'ROMEO:'")
    distributed.cleanup()
