"""GPT-2's byte-level alphabet (transformers' ``bytes_to_unicode``), read backwards: which byte each
character of a byte-level BPE token stands for."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Character -> byte, for the 256 characters byte-level BPEs (GPT-2, SmolLM, Llama 3) spell bytes with."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}
