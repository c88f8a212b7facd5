"""Pretraining recipes: the model shape, the data, the tokenizer and the training settings, in YAML.

Every field can be overridden on the command line as ``section.field=value`` (``train.lr=1e-3``).
pydantic validates each section's dataclass (types coerced, unknown keys refused); the range checks are
the dataclasses' own. Any problem is a one-line error that names the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from nexttok.errors import NexttokError
from nexttok.train import FORBID_EXTRA, TrainConfig


def _check(section: str, checks: list[tuple[str, bool, str]], obj: Any) -> None:
    for name, ok, allowed in checks:
        if not ok:
            raise NexttokError(f"{section}.{name} must be {allowed} (got {getattr(obj, name)!r})", f"{section}.{name}")


@dataclass
class ModelConfig:
    """A Llama-architecture decoder built from scratch."""

    __pydantic_config__ = FORBID_EXTRA

    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None  # None: as many as heads (no grouped-query attention)
    hidden: int = 128
    intermediate: int | None = None  # None: 4 x hidden
    context: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    dropout: float = 0.0  # on the embeddings and each attention/MLP output in training (GPT-2's resid_pdrop)
    attention_dropout: float = 0.0  # Llama's own, on the attention weights; it takes SDPA off its fused path

    def __post_init__(self) -> None:
        kv = self.kv_heads or self.heads
        _check(
            "model",
            [
                ("layers", 1 <= self.layers <= 256, "in [1, 256]"),
                ("heads", self.heads >= 1 and self.hidden % self.heads == 0, f"a divisor of hidden={self.hidden}"),
                ("kv_heads", kv >= 1 and self.heads % kv == 0, f"a divisor of heads={self.heads}"),
                ("hidden", self.hidden >= 8 and self.hidden % 2 == 0, "an even number >= 8"),
                ("intermediate", self.intermediate is None or self.intermediate >= 1, ">= 1, or null for 4 x hidden"),
                ("context", 8 <= self.context <= 1 << 20, "in [8, 1048576]"),
                ("rope_theta", self.rope_theta > 0, "> 0"),
                ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("attention_dropout", 0 <= self.attention_dropout < 1, "in [0, 1)"),
            ],
            self,
        )
        if (self.hidden // self.heads) % 2:
            raise NexttokError(
                f"model.hidden / model.heads must be even for RoPE (got {self.hidden}/{self.heads})", "model.heads"
            )

    def llama_config(self, tokenizer):
        """The ``transformers.LlamaConfig`` for this shape and ``tokenizer``'s vocabulary."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate or 4 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_dropout=self.attention_dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass
class DataConfig:
    """Where the text comes from and how the held-out part is chosen."""

    __pydantic_config__ = FORBID_EXTRA

    paths: list[str] = field(default_factory=lambda: ["shakespeare"])
    text_field: str = "text"
    holdout: str = "documents"  # documents (whole documents, drawn by seed) or tail (end of the text)
    holdout_fraction: float = 0.1
    seed: int = 0
    eos_between_documents: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        _check(
            "data",
            [
                ("paths", bool(self.paths), "a non-empty list of files, folders or packaged corpus names"),
                ("holdout", self.holdout in ("documents", "tail"), "one of documents, tail"),
                ("holdout_fraction", 0 < self.holdout_fraction < 1, "in (0, 1)"),
            ],
            self,
        )


@dataclass
class TokenizerConfig:
    """``train`` a byte-level BPE on the training split, ``gpt2``, or an HF tokenizer folder."""

    __pydantic_config__ = FORBID_EXTRA

    source: str = "train"
    vocab_size: int = 4096

    def __post_init__(self) -> None:
        from nexttok.tokenizer_train import MIN_VOCAB

        _check("tokenizer", [("vocab_size", MIN_VOCAB <= self.vocab_size <= 1 << 20, f">= {MIN_VOCAB}")], self)


@dataclass
class Recipe:
    """A whole pretraining run."""

    train: TrainConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    threads: int | None = None
    device: str | None = None  # auto (the CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps
    final_eval: bool = True  # evaluate on the whole held-out split at the end


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "train": TrainConfig,
}
TOP_LEVEL = {"threads", "device", "final_eval"}


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``section.field=value`` (value parsed as YAML) into the raw recipe dict."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise NexttokError(f"override '{item}' is not KEY=VALUE, e.g. train.lr=1e-3", "overrides")
    node, parts = raw, key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise NexttokError(f"override '{item}': '{p}' is not a section", "overrides")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(section: str, cls: type, values: Any) -> Any:
    """``values`` validated and coerced by pydantic into ``cls`` (YAML reads ``3e-3`` as a string: it becomes
    a float), then checked by ``cls.__post_init__``; any problem is one line naming the field."""
    if not isinstance(values, dict):
        raise NexttokError(f"'{section}' must be a mapping of fields", section)
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as e:
        raise _one_line(section, cls, e.errors()) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _one_line(section: str, cls: type, errors: list[dict]) -> NexttokError:
    def fields(kind: str) -> list[str]:
        return [f"{section}.{e['loc'][0]}" for e in errors if e["type"] == kind]

    if unknown := fields("unexpected_keyword_argument"):
        names = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        return NexttokError(f"unknown field '{unknown[0]}'; {section} fields are: {names}", unknown[0])
    if missing := fields("missing"):
        return NexttokError(
            f"the recipe lacks {', '.join(missing)}; give them in the YAML (see recipes/shakespeare.yaml) "
            f"or as {section}.FIELD=VALUE",
            section,
        )
    e = errors[0]
    if e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), NexttokError):
        return e["ctx"]["error"]  # a range check of __post_init__, already one line
    name = f"{section}.{e['loc'][0]}" if e["loc"] else section
    return NexttokError(f"{name} {_what(e)}", name)


def _what(error: dict) -> str:
    kind, value = error["type"], error.get("input")
    if value is None:
        return "cannot be null; give a value"
    if kind.startswith("bool"):
        return f"must be true or false (got {value!r})"
    if kind == "int_from_float":
        return f"must be a whole number (got {value!r})"
    if kind.startswith(("int", "float")):
        return f"must be a number (got {value!r})"
    return f"is not valid: {error['msg']} (got {value!r})"


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start empty) and apply ``section.field=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NexttokError(f"recipe '{path}' does not exist; see recipes/ for examples", "config")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise NexttokError(f"recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}", "config") from None
    for item in overrides or []:
        apply_override(raw, item)
    for key in raw:
        if key not in SECTIONS and key not in TOP_LEVEL:
            allowed = ", ".join([*SECTIONS, *sorted(TOP_LEVEL)])
            raise NexttokError(f"unknown field '{key}'; a recipe has: {allowed}", key)
    parts = {name: _build(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    return Recipe(**parts, **{k: raw[k] for k in TOP_LEVEL if k in raw})
