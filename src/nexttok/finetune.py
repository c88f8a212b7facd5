"""Fine-tuning is training again: records -> rendered examples -> batches -> the same ``fit()``.

This module only wires things together: load the base model, give its tokenizer a chat template if
it has none, read and render the data (labels -100 on what is not trained), split off an eval set,
optionally wrap the model with LoRA (peft), call :func:`nexttok.train.fit`, and optionally merge the
adapter into a plain Hugging Face folder.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nexttok.data.batches import FinetuneBatches
from nexttok.data.chat import Example, Renderer, ensure_chat_template
from nexttok.data.formats import read_dataset
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from nexttok.train import FitResult

MERGED = "merged"


@dataclass
class LoraOptions:
    """LoRA settings (peft). ``targets``: module names such as ``q_proj``, or ``all-linear``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class DataOptions:
    """How records become examples and batches."""

    path: str
    fmt: str | None = None
    train_on: str | None = None
    max_length: int = 1024
    truncate: bool = False
    layout: str = "pack"
    eval_fraction: float = 0.05
    seed: int = 0


@dataclass
class PreparedData:
    train: FinetuneBatches
    eval: FinetuneBatches | None
    notes: list[str]  # what was read, skipped, dropped: for the user


def check_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer whose ids the model's embedding table cannot hold."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise NexttokError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model's embeddings have {rows:,} rows: they do "
            "not belong together; use the tokenizer saved with the model (the same folder)",
            param="model",
        )


def prepare_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Check the pair, and give a template-less tokenizer the default ChatML one (growing the
    embeddings for the two special tokens it may add)."""
    check_tokenizer(model, tokenizer)
    added = ensure_chat_template(tokenizer)
    if added and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is never trained: any id will do


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one when fraction > 0), chosen by ``seed``."""
    if not 0 <= fraction < 1:
        raise NexttokError(f"--eval-fraction must be in [0, 1) (got {fraction})", param="eval_fraction")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if fraction == 0 else max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise NexttokError(
            f"only {len(examples)} usable records: too few to hold out an eval set; add data or use --eval-fraction 0",
            param="eval_fraction",
        )
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def prepare_data(tokenizer: PreTrainedTokenizerBase, opts: DataOptions) -> PreparedData:
    """Read, render, split and batch the data."""
    dataset = read_dataset(opts.path, opts.fmt)
    rendered = Renderer(tokenizer, opts.train_on, opts.max_length, opts.truncate).render_all(dataset.records)
    train, held = split(rendered.examples, opts.eval_fraction, opts.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batches(exs: list[Example]) -> FinetuneBatches:
        return FinetuneBatches(exs, pad, opts.layout, opts.max_length, opts.seed)

    notes = [dataset.summary(), rendered.summary(), f"{len(train):,} train / {len(held):,} eval examples"]
    return PreparedData(batches(train), batches(held) if held else None, notes)


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct names of the model's Linear layers (the valid LoRA targets), output layer excluded."""
    out = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out}
    return sorted(names)


def apply_lora(model: PreTrainedModel, opts: LoraOptions) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    valid = linear_names(model)
    targets = opts.targets
    unknown = [t for t in targets if t not in valid and t != "all-linear"]
    if unknown or not targets:
        raise NexttokError(
            f"LoRA target modules {unknown or targets} do not exist in this model; valid: {', '.join(valid)} "
            "(or all-linear)",
            param="lora_targets",
        )
    if opts.r < 1 or opts.alpha <= 0 or not 0 <= opts.dropout < 1:
        raise NexttokError("--lora-r must be >= 1, --lora-alpha > 0 and --lora-dropout in [0, 1)", param="lora")
    target = "all-linear" if "all-linear" in targets else targets
    config = LoraConfig(
        r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=target, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated for v6
        return get_peft_model(model, config)


def use_block_mask_attention(model: PreTrainedModel) -> None:
    """Packed batches carry a boolean 4D block-diagonal mask, which sdpa attention takes as given."""
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")


def steps_for(data: PreparedData, epochs: float, batch_size: int, grad_accum: int, world: int = 1) -> int:
    """Optimizer steps that make ``epochs`` passes over the training batches."""
    per_epoch = data.train.batches_per_epoch(batch_size)
    return max(1, math.ceil(epochs * per_epoch / (grad_accum * world)))


def merge(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Fold the LoRA adapters into the base weights and write a plain HF folder at ``out``."""
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_fit(model, tokenizer, data: PreparedData, config, resume: bool) -> FitResult:
    """Call the one training loop."""
    from nexttok.train import fit

    return fit(model, tokenizer, data.train, data.eval, config, resume=resume)


@dataclass
class FinetuneResult:
    fit: FitResult
    out_dir: Path
    merged: Path | None
    notes: list[str]
    trainable: int
    total: int


def default_train_settings(steps: int, lora: bool, has_eval: bool) -> dict:
    """Learning rate and schedule defaults for fine-tuning (LoRA takes a 10x larger step)."""
    lr = 2e-4 if lora else 2e-5
    return {
        "lr": lr,
        "min_lr": lr / 10,
        "warmup_steps": min(100, steps // 10),
        "eval_every": max(1, steps // 5) if has_eval else 0,
        "eval_batches": 8,
        "save_every": 0,
        "log_every": 1,
        "weight_decay": 0.0,
    }


def load_base(model: str | None, dtype: str, threads: int | None, data: DataOptions, device: str | None = None):
    """The base model and its tokenizer, ready for chat records; ``data`` with ``max_length`` capped
    at the model's context (a record may not be longer than that)."""
    from nexttok.models import load_model_and_tokenizer, quiet_transformers

    with quiet_transformers():
        base, tokenizer, _ = load_model_and_tokenizer(model, dtype=dtype, threads=threads, device=device)
    prepare_tokenizer(base, tokenizer)
    context = getattr(base.config, "max_position_embeddings", None)
    if context and data.max_length > context:
        data = replace(data, max_length=context)
    if data.layout == "pack":
        use_block_mask_attention(base)
    return base, tokenizer, data


def finetune(
    model: str | None,
    data: DataOptions,
    out_dir: str,
    lora: LoraOptions | None = None,
    merge_lora: bool = False,
    epochs: float = 1.0,
    steps: int | None = None,
    resume: bool = False,
    dtype: str = "float32",
    threads: int | None = None,
    notify=print,
    device: str | None = None,
    **train,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with the same ``fit()`` as pretraining; ``train`` overrides any
    :class:`nexttok.train.TrainConfig` field (``batch_size``, ``lr``, ``max_seconds``, ...); ``device`` is
    where it trains (:func:`nexttok.models.resolve_device`: by default the CUDA GPU if any, else the CPU)."""
    from nexttok import distributed
    from nexttok.train import TrainConfig

    if merge_lora and lora is None:
        raise NexttokError("--merge folds LoRA adapters into the model; it needs --lora", param="merge")
    base, tokenizer, data = load_base(model, dtype, threads, data, device)
    prepared = prepare_data(tokenizer, data)
    if lora:
        torch.manual_seed(train.get("seed", data.seed))  # the adapters' random init follows --seed, in any process
        net = apply_lora(base, lora)
    else:
        net = base
    batch_size, grad_accum = train.pop("batch_size", 8), train.get("grad_accum", 1)
    max_steps = steps or steps_for(prepared, epochs, batch_size, grad_accum, distributed.world())
    settings = default_train_settings(max_steps, lora is not None, prepared.eval is not None)
    config = TrainConfig(out_dir=out_dir, max_steps=max_steps, batch_size=batch_size, **(settings | train))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    notes = [*prepared.notes, f"{max_steps:,} steps · {trainable:,} of {total:,} parameters trained"]
    for line in notes if distributed.rank() == 0 else []:  # under torchrun, say it once
        notify(line)
    result = run_fit(net, tokenizer, prepared, config, resume)
    merged = merge(net, tokenizer, Path(out_dir) / MERGED) if merge_lora and distributed.rank() == 0 else None
    return FinetuneResult(result, Path(out_dir), merged, notes, trainable, total)
