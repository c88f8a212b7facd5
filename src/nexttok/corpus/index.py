"""A corpus as the model sees it: token ids with a suffix array, and where every position came from.

Folder layout (all ``.npy``, loaded memory-mapped): ``tokens`` (uint32, each document followed by
``SEP``), ``sa`` (the suffix array, int32 below 2**31 tokens), ``doc_starts`` and ``doc_files``
(each document's first position and its file), ``line_pos``/``line_no`` (the positions where a line
number changes, and the line from there), and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nexttok.corpus.search import SEP
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM

SCHEMA = "nexttok.corpus/1"
ARRAYS = ("tokens", "sa", "doc_starts", "doc_files", "line_pos", "line_no")


@dataclass
class Document:
    """One document to index: its ids, the file it came from (an index into the files) and its first line."""

    ids: np.ndarray
    file: int
    line: int


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def line_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: the newlines it holds, and those before its first other character (a token such as
    "\\nThe" starts the next line; one that is only newlines ends its own)."""
    from nexttok.data.blocks import token_raw

    raw = token_raw(tokenizer)
    total = np.array([r.count(b"\n") for r in raw], dtype=np.int64)
    lead = np.array([len(r) - len(r.lstrip(b"\n")) if r.strip(b"\n") else 0 for r in raw], dtype=np.int64)
    return total, lead


def _lines(doc: Document, start: int, total: np.ndarray, lead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # (positions, line numbers) where the line changes within one document, its first position included.
    a = doc.ids.astype(np.int64)
    before = np.concatenate([[0], np.cumsum(total[a])[:-1]]) if len(a) else np.zeros(0, dtype=np.int64)
    line = doc.line + before + lead[a]  # (n,)
    change = np.flatnonzero(np.diff(line, prepend=-1))
    return start + change, line[change]


def build(
    documents: list[Document],
    files: list[str],
    out: Path,
    manifest: dict,
    newlines: tuple[np.ndarray, np.ndarray] | None = None,
) -> CorpusIndex:
    """Write the index of ``documents`` to ``out`` atomically. ``newlines``: :func:`line_tables` of the
    tokenizer (without them every position is on its document's first line)."""
    import pydivsufsort

    if not sum(len(d.ids) for d in documents):
        raise NexttokError("the corpus is empty: no tokens to index; give files with text", param="source")
    t0 = time.perf_counter()
    parts, starts, line_pos, line_no, pos = [], [], [], [], 0
    for d in documents:
        p, n = _lines(d, pos, *(newlines or _no_newlines(d.ids)))
        starts.append(pos)
        line_pos.append(p)
        line_no.append(n)
        parts += [d.ids.astype(np.uint32), np.array([SEP], dtype=np.uint32)]
        pos += len(d.ids) + 1
    tokens = np.concatenate(parts)  # (N,)
    arrays = {
        "tokens": tokens,
        "sa": pydivsufsort.divsufsort(tokens),
        "doc_starts": np.array(starts, dtype=np.int64),
        "doc_files": np.array([d.file for d in documents], dtype=np.int32),
        "line_pos": np.concatenate(line_pos),
        "line_no": np.concatenate(line_no).astype(np.int64),
    }
    manifest = {"schema": SCHEMA, **manifest, "tokens": int(len(tokens) - len(documents))}
    manifest |= {"documents": len(documents), "files": files, "build_seconds": round(time.perf_counter() - t0, 3)}
    _write(out, arrays, manifest)
    return CorpusIndex(out)


def _no_newlines(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = int(ids.max()) + 1 if len(ids) else 1
    return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)


def _write(out: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    manifest["bytes_on_disk"] = sum(f.stat().st_size for f in tmp.iterdir())
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        if not (out / "manifest.json").is_file():
            shutil.rmtree(tmp)
            raise NexttokError(f"'{out}' exists and is not a corpus index; choose another --out", param="out")
        shutil.rmtree(out)
    os.replace(tmp, out)


@dataclass(frozen=True)
class Location:
    """Where a corpus position came from."""

    file: str
    line: int
    document: int
    position: int

    @property
    def name(self) -> str:
        return f"{Path(self.file).name}:{self.line}"


class CorpusIndex:
    """A built index, memory-mapped. Query it with :mod:`nexttok.corpus.query`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise NexttokError(
                f"'{folder}' is not a corpus index (no manifest.json); build one with `nexttok corpus index`",
                param="corpus",
            )
        self.manifest = json.loads(path.read_text())
        a = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self.tokens, self.sa = a["tokens"], a["sa"]
        self.doc_starts, self.doc_files = a["doc_starts"], a["doc_files"]
        self.line_pos, self.line_no = a["line_pos"], a["line_no"]

    @property
    def files(self) -> list[str]:
        return self.manifest["files"]

    def check_tokenizer(self, lm: LM) -> None:
        """Raise unless ``lm`` tokenizes as the index was built."""
        if self.manifest.get("tokenizer_hash") != tokenizer_hash(lm.tokenizer):
            raise NexttokError(
                f"the corpus index '{self.folder}' was built with another tokenizer "
                f"({self.manifest.get('model', '?')}); rebuild it with `nexttok corpus index ... --model` this model",
                param="corpus",
            )

    @classmethod
    def open(cls, folder: str | Path, lm: LM) -> CorpusIndex:
        """The index in ``folder``, refused unless it was built with ``lm``'s tokenizer."""
        index = cls(folder)
        index.check_tokenizer(lm)
        return index

    def where(self, position: int) -> Location:
        doc = int(np.searchsorted(self.doc_starts, position, side="right")) - 1
        line = int(self.line_no[int(np.searchsorted(self.line_pos, position, side="right")) - 1])
        return Location(self.files[int(self.doc_files[doc])], line, doc, int(position - self.doc_starts[doc]))
