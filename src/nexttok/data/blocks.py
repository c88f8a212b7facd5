"""Pretraining batches: documents -> one long token file -> fixed-length blocks.

Documents are tokenized (in parallel, with a progress bar), separated by EOS, and written to a
memory-mapped file (uint16 when the vocabulary fits, else uint32) in a cache keyed by the content
hash of the text, the tokenizer and the split, so a second run skips tokenization. The held-out
split is whole documents chosen by a seed, or the tail of the concatenated text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nexttok import assets
from nexttok.bytelevel import byte_decoder
from nexttok.errors import NexttokError
from nexttok.evaluation.windows import Window, batch, plan

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HOLDOUT_MODES = ("documents", "tail")
CHUNK_CHARS = 1 << 16
CACHE_VERSION = 1


def split_documents(docs: list[str], fraction: float, mode: str, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents. ``tail``: the last ``fraction`` of the concatenated text;
    ``documents``: whole documents drawn by ``seed`` until they hold ``fraction`` of the characters
    (a single document is split by its tail)."""
    if fraction == 0:
        return docs, []
    if mode == "tail" or len(docs) == 1:
        text = "".join(docs)
        cut = int(len(text) * (1 - fraction))
        return [text[:cut]], [text[cut:]]
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    want, held = fraction * sum(len(d) for d in docs), set()
    for i in order[:-1]:  # always leave at least one training document
        if sum(len(docs[j]) for j in held) >= want:
            break
        held.add(i)
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _chunks(text: str) -> list[str]:
    """Pieces of about CHUNK_CHARS, cut after a newline that precedes a non-space character: byte-level
    BPE never merges across such a point, so the pieces tokenize exactly like the whole."""
    out, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        cut = start + CHUNK_CHARS
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def tokenize(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, eos: bool = True, label: str = "", show: bool = True
) -> np.ndarray:
    """All documents' ids in one array, each document followed by EOS when ``eos``; a progress bar (``show``)."""
    dtype = id_dtype(tokenizer)
    eos_id = np.array([tokenizer.eos_token_id], dtype=dtype) if eos and tokenizer.eos_token_id is not None else None
    parts: list[np.ndarray] = []
    for ids in tokenize_documents(docs, tokenizer, label, show):
        parts += [ids] if eos_id is None else [ids, eos_id]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def id_dtype(tokenizer: PreTrainedTokenizerBase) -> type:
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_documents(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, label: str = "", show: bool = True
) -> list[np.ndarray]:
    """Each document's ids (no special tokens), encoded in batches of pieces on all cores."""
    from rich.progress import Progress

    dtype, backend = id_dtype(tokenizer), tokenizer.backend_tokenizer
    pieces = [(d, piece) for d, doc in enumerate(docs) for piece in _chunks(doc)]
    parts: list[list[np.ndarray]] = [[] for _ in docs]
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task(f"tokenizing {label}".strip(), total=sum(len(d) for d in docs))
        for i in range(0, len(pieces), 64):
            batch = pieces[i : i + 64]
            encoded = backend.encode_batch([p for _, p in batch], add_special_tokens=False)
            for (d, _), enc in zip(batch, encoded, strict=True):
                parts[d].append(np.asarray(enc.ids, dtype=dtype))
            bar.advance(task, sum(len(p) for _, p in batch))
    return [np.concatenate(p) if p else np.zeros(0, dtype=dtype) for p in parts]


@dataclass
class TokenData:
    """The train and held-out token arrays (memory-mapped) and what they hold."""

    train: np.ndarray
    heldout: np.ndarray
    meta: dict
    folder: Path
    cached: bool = False


def _cache_key(docs: list[str], tokenizer, fraction: float, mode: str, seed: int, eos: bool) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} {fraction} {mode} {seed} {eos}".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", errors="surrogatepass")).digest())
    return h.hexdigest()[:24]


def prepare(
    docs: list[str], tokenizer, fraction: float = 0.1, mode: str = "documents", seed: int = 0, eos: bool = True
) -> TokenData:
    """Split, tokenize and cache; a second call with the same text, tokenizer and split reads the cache."""
    if mode not in HOLDOUT_MODES:
        raise NexttokError(f"data.holdout must be one of {', '.join(HOLDOUT_MODES)} (got '{mode}')", "data.holdout")
    folder = assets.cache_dir() / "tokens" / _cache_key(docs, tokenizer, fraction, mode, seed, eos)
    if not (folder / "meta.json").is_file():
        train_docs, held_docs = split_documents(docs, fraction, mode, seed)
        meta = {"train_chars": sum(map(len, train_docs)), "heldout_chars": sum(map(len, held_docs))}
        meta |= {"train_documents": len(train_docs), "heldout_documents": len(held_docs)}
        arrays = {
            "train": tokenize(train_docs, tokenizer, eos, "train"),
            "heldout": tokenize(held_docs, tokenizer, eos, "held-out"),
        }
        _write_cache(folder, arrays, meta)
        cached = False
    else:
        cached = True
    return _read_cache(folder, cached)


def _write_cache(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        arr.tofile(tmp / f"{name}.bin")
        meta[f"{name}_tokens"] = int(arr.size)
    meta["dtype"] = str(next(iter(arrays.values())).dtype)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(folder)
    except OSError:  # another process (a DDP rank) finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path, cached: bool) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {}
    for name in ("train", "heldout"):
        n = meta[f"{name}_tokens"]
        arrays[name] = np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r") if n else np.zeros(0)
    return TokenData(arrays["train"], arrays["heldout"], meta, folder, cached)


def token_raw(tokenizer) -> list[bytes]:
    """For each token id, the UTF-8 bytes of text it stands for (special tokens: none)."""
    dec, specials = byte_decoder(), set(tokenizer.all_special_ids)
    out = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in specials or piece is None:
            out.append(b"")
        elif all(c in dec for c in piece):  # byte-level BPE: one character per byte
            out.append(bytes(dec[c] for c in piece))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def text_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """For each token id: how many UTF-8 bytes of text it stands for, and how many characters start
    in it (bytes that are not continuation bytes). Special tokens stand for no text."""
    raw = token_raw(tokenizer)
    n_bytes = np.array([len(r) for r in raw], dtype=np.int64)
    n_chars = np.array([sum(1 for b in r if b & 0xC0 != 0x80) for r in raw], dtype=np.int64)
    return n_bytes, n_chars


class BlockSource:
    """The pretraining :class:`~nexttok.train.BatchSource`: rows of ``block_size`` consecutive tokens.

    Training rows are non-overlapping blocks in a random order that is fixed by (seed, epoch), with a
    random start shift per epoch; row ``r`` of the whole run is a pure function of ``r``. Held-out
    windows are ``nexttok eval``'s (:mod:`nexttok.evaluation.windows`): every held-out token is scored
    once, with at least T/2 tokens of context where the text allows.
    """

    def __init__(self, train: np.ndarray, heldout: np.ndarray | None, block_size: int, tokenizer, seed: int = 0):
        if len(train) < block_size + 1:
            raise NexttokError(
                f"the training text is {len(train)} tokens, shorter than one block of {block_size} + 1; "
                "give more text or lower model.context",
                param="model.context",
            )
        self.train, self.heldout, self.T, self.seed = train, heldout, block_size, seed
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos = tokenizer.bos_token_id
        self.n_bytes, self.n_chars = text_tables(tokenizer)
        self.n_blocks = (len(train) - block_size) // block_size or 1
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            shift = int(torch.randint(0, self.T, (1,), generator=g))
            starts = torch.randperm(self.n_blocks, generator=g) * self.T + shift
            self._perm = (epoch, starts.clamp_(max=len(self.train) - self.T))
        return self._perm[1]

    def batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        rows = []
        for r in range(index * batch_size, (index + 1) * batch_size):
            start = int(self._epoch(r // self.n_blocks)[r % self.n_blocks])
            rows.append(self.train[start : start + self.T])
        x = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T)
        return {"input_ids": x, "labels": x.clone()}

    def windows(self) -> list[Window]:
        """The held-out windows: ``nexttok eval``'s default over the held-out tokens (stride T/2, a BOS at
        the start of each when the tokenizer has one), so the two report the same figures."""
        n = len(self.heldout) if self.heldout is not None else 0
        return plan(n, self.T, bos=self.bos is not None) if n >= 2 else []

    def eval_batches(self, batch_size: int, limit: int) -> Iterator[dict[str, torch.Tensor]]:
        """``limit`` batches of windows spread evenly over the held-out text (all of it when it has fewer)."""
        windows = self.windows()
        want = limit * batch_size
        if want < len(windows):
            windows = [windows[int(i * len(windows) / want)] for i in range(want)]
        for i in range(0, len(windows), batch_size):
            yield self._window_batch(windows[i : i + batch_size])

    def _window_batch(self, windows: list[Window]) -> dict[str, torch.Tensor]:
        out = batch(self.heldout, windows, self.bos, self.pad)
        predicted = np.concatenate([self.heldout[w.scored_from : w.stop] for w in windows]).astype(np.int64)
        out["n_bytes"] = torch.tensor(int(self.n_bytes[predicted].sum()))
        out["n_chars"] = torch.tensor(int(self.n_chars[predicted].sum()))
        return out
