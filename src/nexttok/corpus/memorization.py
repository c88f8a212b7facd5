"""k-extractable memorization (Carlini et al. 2023), by one teacher-forced pass: greedy decoding from a
k-token prefix reproduces the next m tokens exactly when the argmax at every suffix position is the true
token, so no generation loop is needed. Also each suffix's probability, and how often the whole window
occurs in the corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from nexttok.corpus import search
from nexttok.corpus.index import CorpusIndex
from nexttok.corpus.query import count
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM

DUP_BUCKETS = ((0, 0, "0"), (1, 1, "1"), (2, 2, "2"), (3, 4, "3-4"), (5, 8, "5-8"), (9, 1 << 62, ">8"))


def check_lengths(k: int, m: int) -> None:
    for name, v in (("--prefix", k), ("--suffix", m)):
        if v < 1:
            raise NexttokError(f"{name} must be at least 1 token (got {v})", param=name.strip("-"))


def sample_windows(ids: np.ndarray, length: int, n: int, seed: int) -> np.ndarray:
    """(n', length) windows drawn without replacement from ``ids`` (uint32; SEP between documents),
    none crossing a document's end; fewer when the text has fewer."""
    ids = np.asarray(ids)
    bad = np.append(np.flatnonzero(ids == search.SEP), len(ids))
    starts = np.arange(max(len(ids) - length + 1, 0))
    starts = starts[bad[np.searchsorted(bad, starts)] >= starts + length]  # no SEP in [start, start + length)
    if not len(starts):
        raise NexttokError(f"the text has no window of {length} tokens; lower --prefix/--suffix", param="prefix")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(starts, size=min(n, len(starts)), replace=False))
    return np.stack([ids[s : s + length] for s in pick]).astype(np.int64)


@torch.no_grad()
def suffix_scores(lm: LM, windows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window of one batch: whether the argmax reproduces the m suffix tokens exactly, and
    log p(suffix | prefix)."""
    x = torch.as_tensor(windows, device=next(lm.model.parameters()).device)  # (B, k+m)
    m = x.shape[1] - k
    # Only the positions that predict the suffix go through the output layer: the last m+1, less the last.
    logits = lm.model(input_ids=x, logits_to_keep=m + 1).logits[:, :-1].float()  # (B, m, V)
    target = x[:, k:]  # (B, m)
    exact = (logits.argmax(-1) == target).all(-1).cpu().numpy()
    lp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]  # (B, m)
    return exact, lp.sum(-1).double().cpu().numpy()


def occurrences(index: CorpusIndex, windows: np.ndarray) -> np.ndarray:
    """How many times each whole window occurs in the corpus."""
    return np.array([count(index, w) for w in windows], dtype=np.int64)


@dataclass
class Side:
    """One model on one set of windows."""

    model: str
    windows: str  # "train" or "heldout"
    n: int
    extractable: float
    mean_logprob: float  # log p(suffix | prefix), nats, averaged over windows
    by_duplicates: list[dict] = field(default_factory=list)


def side(model: str, name: str, exact: np.ndarray, logp: np.ndarray, dups: np.ndarray) -> Side:
    rows = []
    for lo, hi, label in DUP_BUCKETS:
        sel = (dups >= lo) & (dups <= hi)
        if sel.any():
            rows.append({"occurrences": label, "windows": int(sel.sum()), "extractable": float(exact[sel].mean())})
    return Side(model, name, len(exact), float(exact.mean()), float(logp.mean()), rows)


def heldout_windows(lm: LM, data, split: str, length: int, n: int, seed: int) -> np.ndarray:
    """Windows of a text the model did not train on (``--data``, with the recipe's ``split``)."""
    from nexttok.evaluation.pipeline import read_text

    text = read_text(lm, data, split)
    sep = np.array([search.SEP], dtype=np.uint32)
    return sample_windows(np.concatenate([p for a in text.ids for p in (a.astype(np.uint32), sep)]), length, n, seed)


def baseline_lm(lm: LM, spec: str, dtype: str, device: str | None) -> LM:
    """``init``: ``lm``'s architecture at its untrained initialisation (seed 0); else another model, which
    must tokenize as ``lm`` does."""
    from nexttok.corpus.index import tokenizer_hash
    from nexttok.lm import LM as LMClass
    from nexttok.lm import load

    if spec == "init":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(lm.model.config).to(next(lm.model.parameters()).device).eval()
        return LMClass(model, lm.tokenizer)
    other = load(spec, dtype=dtype, device=device)
    if tokenizer_hash(other.tokenizer) != tokenizer_hash(lm.tokenizer):
        raise NexttokError(f"--baseline {spec} has another tokenizer; give a model with the same one", "baseline")
    return other


def measure(models: list[tuple[str, LM]], sets: dict[str, np.ndarray], index: CorpusIndex, k: int,
            batch_size: int = 32, show: bool = False) -> list[Side]:  # fmt: skip
    """Each model on each set of windows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    dups = {name: occurrences(index, w) for name, w in sets.items()}
    out = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not show) as bar:
        for label, lm in models:
            for name, w in sets.items():
                task = bar.add_task(f"{label}: {name} windows", total=len(w))
                parts = []
                for lo in range(0, len(w), batch_size):
                    parts.append(suffix_scores(lm, w[lo : lo + batch_size], k))
                    bar.advance(task, len(w[lo : lo + batch_size]))
                exact, logp = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
                out.append(side(label, name, exact, logp, dups[name]))
    return out


def report(sides: list[Side], k: int, m: int, corpus: str) -> dict:
    return {"schema": "nexttok.memorization/1", "prefix": k, "suffix": m, "corpus": corpus,
            "sides": [vars(s) for s in sides]}  # fmt: skip
