"""Pretraining from scratch, end to end: corpus -> tokenizer -> token file -> Llama model -> fit().

The training itself is :func:`nexttok.train.fit`, the same loop fine-tuning uses; what is
particular to pretraining is only where the batches come from (:class:`~nexttok.data.blocks.BlockSource`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nexttok import assets, checkpoint, distributed
from nexttok.config import Recipe
from nexttok.data.blocks import BlockSource, prepare, split_documents
from nexttok.data.sources import load_corpus
from nexttok.evaluation import evaluate_source
from nexttok.models import resolve_device, set_threads
from nexttok.tokenizer_train import load_tokenizer, train_bpe
from nexttok.train import FitResult, fit

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EVAL_ALL = 1 << 40  # "every batch" for the final held-out evaluation


@dataclass
class ModelStats:
    parameters: int
    non_embedding: int
    flops_per_token: float  # training (forward + backward), PaLM-style count incl. attention


def model_stats(model: PreTrainedModel, context: int) -> ModelStats:
    """Parameter counts and training FLOPs per token: 6 x (matmul parameters) + 12 x layers x context x hidden."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    non_embedding = total - embed - (0 if cfg.tie_word_embeddings else model.get_output_embeddings().weight.numel())
    matmul = non_embedding + cfg.vocab_size * cfg.hidden_size  # the output layer is a matmul, tied or not
    flops = 6 * matmul + 12 * cfg.num_hidden_layers * context * cfg.hidden_size
    return ModelStats(total, non_embedding, float(flops))


def get_tokenizer(recipe: Recipe, train_docs: list[str], resume: bool):
    """The checkpoint's tokenizer when resuming; else ``gpt2``, a folder, or a BPE trained on the
    training split (cached by content, so reruns skip it)."""
    src = recipe.tokenizer.source
    ckpt = checkpoint.latest(Path(recipe.train.out_dir))
    if resume and ckpt is not None:
        return load_tokenizer(str(ckpt))
    if src != "train":
        return load_tokenizer(src)
    h = hashlib.sha256(f"bpe {recipe.tokenizer.vocab_size}".encode())
    for d in train_docs:
        h.update(hashlib.sha256(d.encode("utf-8", errors="surrogatepass")).digest())
    folder = assets.cache_dir() / "tokenizers" / f"bpe-{h.hexdigest()[:20]}"
    if distributed.rank() == 0 and not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        train_bpe(train_docs, recipe.tokenizer.vocab_size, tmp)
        tmp.replace(folder) if not folder.exists() else None
    distributed.barrier()
    return load_tokenizer(str(folder))


def build_model(recipe: Recipe, tokenizer) -> PreTrainedModel:
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = recipe.model.llama_config(tokenizer)
    torch.manual_seed(recipe.train.seed)  # the same init on every rank
    model = LlamaForCausalLM(cfg)
    add_residual_dropout(model, recipe.model.dropout)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    return model


def add_residual_dropout(model: PreTrainedModel, p: float) -> list:
    """Dropout on the token embeddings and on each attention and MLP output before it joins the
    residual stream (GPT-2's ``embd_pdrop``/``resid_pdrop``), as forward hooks.

    Llama has no residual dropout of its own, only ``attention_dropout``. It is a regulariser for a
    model that sees its corpus several times; the Shakespeare recipe does not use it (on a 2-core CPU
    it costs 7% of the step and did not pay, docs/pretrain.md). The hooks act only in training mode
    and are not saved: the written folder is a plain Llama.
    Returns the hook handles.
    """
    if p <= 0:
        return []

    def drop(module, args, out):
        if not module.training:
            return None
        if isinstance(out, tuple):  # attention: (output (B, T, H), weights)
            return (torch.nn.functional.dropout(out[0], p, True),) + out[1:]
        return torch.nn.functional.dropout(out, p, True)  # (B, T, H)

    inner = model.get_decoder()
    modules = [inner.embed_tokens] + [m for layer in inner.layers for m in (layer.self_attn, layer.mlp)]
    return [m.register_forward_hook(drop) for m in modules]


def run(recipe: Recipe, resume: bool = False, say=print) -> tuple[FitResult, dict[str, float]]:
    """Run a recipe; returns fit's result and the final held-out metrics (the whole split)."""
    t0 = time.perf_counter()
    distributed.setup()
    set_threads(recipe.threads)
    device = resolve_device(recipe.device)  # a wrong device fails before any work
    main = distributed.rank() == 0
    d = recipe.data
    corpus = load_corpus(d.paths, d.text_field)
    train_docs, _ = split_documents(corpus.documents, d.holdout_fraction, d.holdout, d.seed)
    tok = get_tokenizer(recipe, train_docs, resume)
    if not main:  # rank 0 tokenizes and writes the cache; the others then read it
        distributed.barrier()
    data = prepare(corpus.documents, tok, d.holdout_fraction, d.holdout, d.seed, d.eos_between_documents)
    if main:
        distributed.barrier()
    source = BlockSource(data.train, data.heldout, recipe.model.context, tok, seed=recipe.train.seed)
    model = build_model(recipe, tok).to(device)
    stats = model_stats(model, recipe.model.context)
    if main:
        _describe(say, corpus, data, tok, stats, time.perf_counter() - t0)
    result = fit(model, tok, source, source, recipe.train, resume=resume)
    final = _final_eval(recipe, model, source, result) if recipe.final_eval else {}
    if main:
        (Path(recipe.train.out_dir) / "final_eval.json").write_text(json.dumps(final | {"step": result.step}, indent=2))
    return result, final


def _describe(say, corpus, data, tok, stats: ModelStats, seconds: float) -> None:
    m = data.meta
    say(
        f"corpus: {len(corpus.files)} file(s), {corpus.chars:,} characters; train {m['train_chars']:,} chars "
        f"= {m['train_tokens']:,} tokens ({m['train_chars'] / max(1, m['train_tokens']):.2f} chars/token), "
        f"held-out {m['heldout_chars']:,} chars = {m['heldout_tokens']:,} tokens"
        + (" (token cache)" if data.cached else "")
    )
    say(
        f"model: Llama, {stats.parameters:,} parameters ({stats.non_embedding:,} non-embedding), vocabulary "
        f"{len(tok):,}, {stats.flops_per_token / 1e6:.1f} MFLOPs per trained token; ready in {seconds:.1f}s"
    )


def _final_eval(recipe: Recipe, model, source: BlockSource, result: FitResult) -> dict[str, float]:
    with torch.inference_mode():
        metrics = evaluate_source(model, source, max(8, recipe.train.batch_size), EVAL_ALL)
    return metrics
