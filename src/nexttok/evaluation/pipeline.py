"""``nexttok.evaluate``: a text (or a corpus, or its held-out split) -> windows -> scored positions ->
:class:`EvalResult`; with two models, what separates them (:mod:`nexttok.evaluation.pair`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nexttok import distributed
from nexttok.data.blocks import split_documents, text_tables, tokenize
from nexttok.data.sources import PACKAGED, load_corpus
from nexttok.errors import NexttokError
from nexttok.evaluation import windows as win
from nexttok.evaluation.metrics import Metrics, ece, fit_temperature, summarize
from nexttok.evaluation.scoring import Positions, gather, mine, position_stats, score_batch, scored
from nexttok.memory import available_bytes

if TYPE_CHECKING:
    from nexttok.lm import LM

SPLITS = ("all", "heldout", "train")
FIT_ROWS = 512  # positions of the fitting part whose logits the temperature fit keeps (bounded memory)
SCHEMA = "nexttok.eval/1"


@dataclass
class Job:
    """One window of one document."""

    doc: int
    window: win.Window


@dataclass
class Text:
    """The documents to score, as token ids, and what they hold."""

    ids: list[np.ndarray]
    documents: list[str]
    source: str

    @property
    def words(self) -> int:
        return sum(len(re.split(r"\s+", d)) for d in self.documents)


@dataclass
class TemperatureFit:
    """The temperature fitted on the first half of the windows, and the second half scored at T=1 and T."""

    temperature: float
    fitted_on: int  # positions whose logits the fit used
    reported_on: int  # positions of the second half
    loss_before: float
    loss_after: float
    ece_before: float
    ece_after: float


@dataclass
class EvalResult:
    """What :func:`evaluate` found. ``positions`` (per scored token) is not part of ``to_dict``."""

    model: str
    source: str
    windows: dict[str, Any]
    metrics: Metrics
    temperature: TemperatureFit | None = None
    positions: Positions | None = field(default=None, repr=False)
    jobs: list[Job] = field(default_factory=list, repr=False)
    text: Text | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {"schema": SCHEMA, "model": self.model, "source": self.source, "windows": self.windows}
        out["metrics"] = self.metrics.to_dict()
        out["temperature_fit"] = None if self.temperature is None else vars(self.temperature)
        return out


def read_text(
    lm: LM,
    data,
    split: str = "all",
    holdout_fraction: float = 0.1,
    text_field: str = "text",
    limit: int | None = None,
    show: bool = False,
) -> Text:
    """The documents of ``data`` (a text, a path, a packaged corpus name, or a list of paths/names),
    ``split`` as the pretraining recipe splits them (heldout: the last ``holdout_fraction`` of the
    concatenated text), tokenized without special tokens; ``limit`` keeps the first tokens."""
    if split not in SPLITS:
        raise NexttokError(f"--split must be one of {', '.join(SPLITS)} (got '{split}')", param="split")
    docs, source = _documents(data, text_field)
    if split != "all":
        train, held = split_documents(docs, holdout_fraction, "tail", 0)
        docs = held if split == "heldout" else train
    docs = [d for d in docs if d]
    if not docs:
        raise NexttokError("the text is empty: give a file or text with something in it", param="data")
    ids = [np.asarray(tokenize([d], lm.tokenizer, eos=False, label=source, show=show)) for d in docs]
    if limit is not None:
        ids, docs = _first_tokens(lm, ids, docs, limit)
    return Text(ids, docs, source + ("" if split == "all" else f" ({split} split)"))


def _documents(data, text_field: str) -> tuple[list[str], str]:
    if isinstance(data, str) and not (data in PACKAGED or _is_path(data)):
        return [data], "text"
    paths = [str(p) for p in data] if isinstance(data, (list, tuple)) else [str(data)]
    return load_corpus(paths, text_field).documents, ", ".join(paths)


def _is_path(s: str) -> bool:
    return bool(s.strip()) and "\n" not in s and len(s) < 4096 and Path(s).expanduser().exists()


def _first_tokens(lm: LM, ids: list[np.ndarray], docs: list[str], limit: int) -> tuple[list[np.ndarray], list[str]]:
    out_ids, out_docs, left = [], [], limit
    for a, d in zip(ids, docs, strict=True):
        if left <= 0:
            break
        keep = a[:left]
        out_ids.append(keep)
        out_docs.append(d if len(keep) == len(a) else lm.tokenizer.decode(keep.tolist()))
        left -= len(keep)
    return out_ids, out_docs


def model_name(lm: LM) -> str:
    return "default" if lm.source.kind == "default" else lm.source.location


def model_context(lm: LM) -> int:
    return int(lm.context_length or 2048)


def default_context(lm: LM, batch_size: int = 1) -> int:
    """The model's context, capped by memory: a window's logits and activations within a quarter of what
    is available (halving until they fit)."""
    n, free = model_context(lm), available_bytes()
    cfg = lm.model.config
    while free is not None and n > 256:
        per_window = 4 * (n * lm.vocab_size * 2 + n * cfg.hidden_size * 16 + n * n * cfg.num_attention_heads)
        if batch_size * per_window <= free / 4:
            break
        n //= 2
    return n


def plan_jobs(text: Text, context: int, stride: int | None, mode: str, bos: bool) -> list[Job]:
    stride = context // 2 if stride is None else stride
    total = sum(len(a) for a in text.ids)
    win.check(total, context, stride, mode, bos)
    return [
        Job(d, w)
        for d, a in enumerate(text.ids)
        if len(a)
        for w in win.plan(len(a), context, stride, mode, bos)
        if w.scored
    ]


def batches(lm: LM, text: Text, jobs: Sequence[Job], size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, batch) of ``size`` windows each, this rank's share only (every world-th)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i, group in mine(jobs[lo : lo + size] for lo in range(0, len(jobs), size)):
        parts = [win.batch(text.ids[j.doc], [j.window], tok.bos_token_id, pad) for j in group]
        yield i, _stack(parts, pad)


def _stack(parts: list[dict[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    T = max(p["input_ids"].shape[1] for p in parts)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(p[key], (0, T - p[key].shape[1]), value=value) for p in parts])

    return {
        "input_ids": padded("input_ids", pad),
        "labels": padded("labels", -100),
        "context": torch.cat([p["context"] for p in parts]),
    }


def scored_counts(lm: LM, text: Text, jobs: Sequence[Job]) -> tuple[int, int]:
    """UTF-8 bytes and characters of the scored tokens."""
    n_bytes, n_chars = text_tables(lm.tokenizer)
    ids = np.concatenate([text.ids[j.doc][j.window.scored_from : j.window.stop] for j in jobs]).astype(np.int64)
    return int(n_bytes[ids].sum()), int(n_chars[ids].sum())


def evaluate_source(model: torch.nn.Module, source, batch_size: int, limit: int) -> dict[str, float]:
    """fit()'s periodic evaluation and pretrain's final one: the headline metrics of at most ``limit``
    batches of ``source.eval_batches``; with several processes each rank scores every world-th batch."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.inference_mode():
        for i, batch in mine(source.eval_batches(batch_size, limit)):
            counts = (int(batch.get("n_bytes", 0)), int(batch.get("n_chars", 0)))
            parts.append((i, (score_batch(model, batch), counts)))
    model.train(was_training)
    items = gather(parts)
    if not items:
        return {}
    n_bytes, n_chars = (sum(c[k] for _, c in items) for k in (0, 1))
    return summarize(Positions.cat(p for p, _ in items), n_bytes, n_chars).headline()


def run(jobs_batches, fn: Callable[[dict], Any], total_tokens: int, show: bool) -> list[Any]:
    """``fn`` on each of this rank's batches under a progress bar (tokens/s, ETA); every rank's results in
    batch order."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    show = show and distributed.rank() == 0
    columns = (TextColumn("scoring"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"))
    columns += (TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn())
    out = []
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not show) as bar:
        task = bar.add_task("score", total=total_tokens, rate="-")
        for i, batch in jobs_batches:
            out.append((i, fn(batch)))
            n = int((batch["labels"] != -100).sum()) * distributed.world()
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f}" if speed else "-")
    return gather(out)


@torch.inference_mode()
def evaluate(
    lm: LM,
    data,
    *,
    context: int | None = None,
    stride: int | None = None,
    windows: str = "strided",
    bos: bool | None = None,
    split: str = "all",
    holdout_fraction: float = 0.1,
    text_field: str = "text",
    limit_tokens: int | None = None,
    batch_size: int | None = None,
    fit_temperature: bool = False,
    top: int = 0,
    progress: bool = False,
) -> EvalResult:
    """How well ``lm`` predicts the next token of ``data`` (a text, a path, a packaged corpus name, or a
    list of paths; a string that names no file or corpus is the text itself).

    ``context`` defaults to the model's (capped by memory), ``stride`` to half of it; ``windows`` is
    ``strided`` or ``disjoint`` (see :mod:`nexttok.evaluation.windows`); ``bos`` defaults to whether the
    tokenizer has one. ``fit_temperature`` fits a temperature on the first half of the windows and reports
    the second half before and after; ``top`` keeps each position's top alternatives (for records)."""
    text, setup, jobs, size = prepare([lm], data, context, stride, windows, bos, split, holdout_fraction,
                                      text_field, limit_tokens, batch_size, progress)  # fmt: skip
    total = sum(j.window.scored for j in jobs)
    if fit_temperature:
        positions, fit = _with_temperature(lm, text, jobs, size, top, progress)
    else:
        parts = run(batches(lm, text, jobs, size), lambda b: score_batch(lm.model, b, top), total, progress)
        positions, fit = Positions.cat(parts), None
    n_bytes, n_chars = scored_counts(lm, text, jobs)
    metrics = summarize(positions, n_bytes, n_chars, text.words)
    setup |= {"windows": len(jobs), "batch_size": size}
    return EvalResult(model_name(lm), text.source, setup, metrics, fit, positions, jobs, text)


def prepare(lms: Sequence[LM], data, context, stride, windows, bos, split, holdout_fraction, text_field,
            limit_tokens, batch_size, progress) -> tuple[Text, dict[str, Any], list[Job], int]:  # fmt: skip
    """The text, the windows' setup, the jobs and the batch size that every model in ``lms`` can score."""
    text = read_text(lms[0], data, split, holdout_fraction, text_field, limit_tokens, progress)
    context = context or min(default_context(m) for m in lms)
    setup = [window_setup(m, context, stride, windows, bos) for m in lms][0]  # each model's limits checked
    jobs = plan_jobs(text, setup["context"], setup["stride"], windows, setup["bos"])
    return text, setup, jobs, batch_size or max(1, 4096 // setup["context"])


def window_setup(lm: LM, context: int, stride: int | None, mode: str, bos: bool | None) -> dict[str, Any]:
    limit = model_context(lm)
    if context > limit:
        raise NexttokError(
            f"--context {context} is above the model's {limit} positions; give at most {limit}", "context"
        )
    has_bos = lm.tokenizer.bos_token_id is not None
    if bos and not has_bos:
        raise NexttokError("this tokenizer has no BOS token; drop --bos", param="bos")
    bos = has_bos if bos is None else bos
    return {
        "mode": mode,
        "context": context,
        "stride": None if mode == "disjoint" else (context // 2 if stride is None else stride),
        "bos": bos,
    }


def _with_temperature(lm: LM, text: Text, jobs: list[Job], size: int, top: int, progress: bool):
    """Fit T on a bounded sample of the first half's logits; score the second half at T=1 and at T."""
    if len(jobs) < 2:
        raise NexttokError(
            "--fit-temperature fits on one half of the windows and reports on the other: the text fits in one "
            "window; give a longer text or a smaller --context",
            param="fit_temperature",
        )
    half = len(jobs) // 2
    first, second = jobs[:half], jobs[half:]
    every = max(1, math.ceil(sum(j.window.scored for j in first) / FIT_ROWS))

    def keep(batch):
        logits, targets, pos = scored(lm.model, batch, top)
        return pos, logits[::every].float().cpu(), targets[::every].cpu()

    parts = run(batches(lm, text, first, size), keep, sum(j.window.scored for j in first), progress)
    t = fit_temperature(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))

    def both(batch):
        logits, targets, pos = scored(lm.model, batch, top)
        return pos, position_stats(logits, targets, t)

    later = run(batches(lm, text, second, size), both, sum(j.window.scored for j in second), progress)
    before, after = Positions.cat(p[0] for p in later), Positions.cat(p[1] for p in later)
    fit = _fit_report(t, sum(len(p[2]) for p in parts), before, after)
    return Positions.cat([p[0] for p in parts] + [before]), fit


def _fit_report(t: float, fitted_on: int, before: Positions, after: Positions) -> TemperatureFit:
    return TemperatureFit(
        temperature=t,
        fitted_on=fitted_on,
        reported_on=len(before),
        loss_before=float(-before.logprob.mean()),
        loss_after=float(-after.logprob.mean()),
        ece_before=ece(before.confidence, before.correct),
        ece_after=ece(after.confidence, after.correct),
    )
