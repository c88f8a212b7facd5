"""Fine-tuning data formats -> records: detect the file type and the record shape, read, validate.

File types: JSONL, JSON (a list of objects), CSV, parquet, and plain text (paragraphs).
Record shapes (detected from the first record's keys, or forced with ``fmt``):

- ``prompt``: ``{prompt, completion}``
- ``alpaca``: ``{instruction, input?, output}``
- ``messages``: ``{messages: [{role, content}, ...]}`` (OpenAI chat: multi-turn, system messages)
- ``sharegpt``: ``{conversations: [{from, value}, ...]}``
- ``text``: ``{text}`` (domain text for continued pretraining: every token is trained)

A malformed record raises :class:`NexttokError` naming the file and line; records that are
well-formed but unusable (an empty completion, an empty text) are skipped and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexttok.errors import NexttokError

FORMATS = ("prompt", "alpaca", "messages", "sharegpt", "text")
FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_TYPES |= {".txt": "txt", ".md": "txt"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES |= {"system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One training example: a conversation (``messages``) or plain ``text``; ``where`` is file:line."""

    where: str
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.text is None


@dataclass
class Dataset:
    """The records read from one file, with how many were skipped and why."""

    path: str
    fmt: str
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        kept = f"{len(self.records):,} records kept ({self.fmt} format)"
        return f"{kept}; {sum(self.skipped.values()):,} skipped: {why}" if self.skipped else kept


class Skip(Exception):
    """A well-formed record that cannot be trained on; the message is the reason counted."""


def read_dataset(path: str | Path, fmt: str | None = None) -> Dataset:
    """Read ``path`` into records. ``fmt`` forces the record shape (one of :data:`FORMATS`)."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise NexttokError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')", param="format")
    if not path.is_file():
        raise NexttokError(f"data file '{path}' does not exist; give a .jsonl, .json, .csv or .parquet file")
    rows = list(_rows(path))
    if not rows:
        raise NexttokError(f"{path} holds no records; give a file with at least one record", param="data")
    fmt = fmt or detect_format(rows[0][1], f"{path}:{rows[0][0]}")
    data = Dataset(str(path), fmt, [])
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            data.records.append(to_record(row, fmt, where))
        except Skip as reason:
            data.skipped[str(reason)] += 1
    if not data.records:
        raise NexttokError(f"{path}: every record was skipped ({data.summary()}); fix the data", param="data")
    return data


def file_type(path: Path) -> str:
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise NexttokError(
            f"cannot tell the file type of '{path}' from its extension; use .jsonl, .json, .csv, .parquet or .txt",
            param="data",
        )
    return kind


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, raw record) pairs; numbers are what a user sees in an editor."""
    kind = file_type(path)
    if kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "json":
        yield from _json_rows(path)
    elif kind == "txt":
        yield from _text_rows(path)
    else:
        yield from _table_rows(path, kind)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NexttokError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); convert it first") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise NexttokError(
                f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
            ) from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise NexttokError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} is a common wrapper
    if not isinstance(data, list):
        raise NexttokError(f"{path}: a .json data file must hold a list of records; use JSONL for one per line")
    yield from ((f"record {i}", row) for i, row in enumerate(data, start=1))


def _text_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Paragraphs (separated by blank lines) of a plain text file, each a ``text`` record."""
    line, para, start = 0, [], 1
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if text.strip():
            start = line if not para else start
            para.append(text)
        elif para:
            yield start, {"text": "\n".join(para)}
            para = []
    if para:
        yield start, {"text": "\n".join(para)}


def _table_rows(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """CSV and parquet through ``datasets``; CSV row n is line n + 1 (line 1 is the header)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets/pyarrow raise many types for unreadable files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NexttokError(f"{path}: cannot read as {kind}: {first}") from None
    offset = 2 if kind == "csv" else 1
    for i, row in enumerate(table):
        yield i + offset, {k: _maybe_json(v) for k, v in row.items()}


def _maybe_json(value: Any) -> Any:
    # A CSV cell cannot hold a list: chat columns arrive as JSON text.
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def detect_format(row: Any, where: str) -> str:
    """The record shape from a record's keys."""
    keys = set(row) if isinstance(row, dict) else set()
    for fmt, needed in [
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt", {"prompt", "completion"}),
        ("text", {"text"}),
    ]:
        if needed <= keys:
            return fmt
    raise NexttokError(
        f"{where}: cannot detect the format from the keys {sorted(keys)}; records need prompt+completion, "
        "instruction+output, messages, conversations or text (or force one with --format)",
        param="format",
    )


def to_record(row: Any, fmt: str, where: str) -> Record:
    """One raw row -> :class:`Record`; raises NexttokError (malformed) or :class:`Skip` (unusable)."""
    if not isinstance(row, dict):
        raise NexttokError(f"{where}: a record must be an object with named fields (got {type(row).__name__})")
    if fmt == "text":
        return Record(where, text=_nonempty(_field(row, "text", where), "empty text"))
    if fmt == "prompt":
        prompt, completion = _field(row, "prompt", where), _field(row, "completion", where)
        return Record(where, _turns([("user", prompt), ("assistant", _nonempty(completion, "empty completion"))]))
    if fmt == "alpaca":
        return _alpaca(row, where)
    if fmt == "messages":
        return Record(where, _messages(row, "messages", "role", "content", where))
    return Record(where, _messages(row, "conversations", "from", "value", where, SHAREGPT_ROLES))


def _field(row: dict, name: str, where: str, optional: bool = False) -> str:
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "it is missing" if name not in row else f"got {type(value).__name__}"
        raise NexttokError(f"{where}: field '{name}' must be a string ({got}); fix the record")
    return value


def _nonempty(text: str, reason: str) -> str:
    if not text.strip():
        raise Skip(reason)
    return text


def _turns(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], ...]:
    return tuple({"role": role, "content": content} for role, content in pairs)


def _alpaca(row: dict, where: str) -> Record:
    instruction, extra = _field(row, "instruction", where), _field(row, "input", where, optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _nonempty(_field(row, "output", where), "empty completion")
    return Record(where, _turns([("user", prompt), ("assistant", output)]))


def _messages(
    row: dict, key: str, role_key: str, text_key: str, where: str, roles: dict[str, str] | None = None
) -> tuple[dict[str, str], ...]:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise NexttokError(f"{where}: '{key}' must be a non-empty list of {{{role_key}, {text_key}}} objects")
    pairs = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise NexttokError(f"{where}: {key}[{i}] must be an object with '{role_key}' and '{text_key}'")
        role = _field(turn, role_key, f"{where}: {key}[{i}]")
        role = roles.get(role, role) if roles else role
        if role not in ROLES:
            raise NexttokError(f"{where}: {key}[{i}] has role '{role}'; use one of {', '.join(ROLES)}")
        pairs.append((role, _field(turn, text_key, f"{where}: {key}[{i}]")))
    if not any(role == "assistant" and text.strip() for role, text in pairs):
        raise Skip("no assistant reply")
    return _turns(pairs)
