"""Tokenizers for pretraining: train a byte-level BPE on a corpus, or use GPT-2's real BPE.

Byte-level BPE starts from the 256 byte values, so every text has an encoding (no unknown token),
and merges the most frequent adjacent pairs until the vocabulary is full. The special tokens are
the ones the rest of nexttok uses: a BOS/EOS document separator, padding, and the ChatML markers
that fine-tuning renders conversations with.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from nexttok import assets
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = [EOS, PAD, "<|im_start|>", "<|im_end|>"]
MIN_VOCAB = 256 + len(SPECIALS) + 1  # the byte alphabet, the specials, and at least one merge
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts``, as a transformers tokenizer
    (saved to ``out`` when given) with BOS/EOS ``<|endoftext|>``, PAD and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise NexttokError(
            f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIALS)} special tokens + 1 merge); "
            f"got {vocab_size}",
            param="vocab_size",
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHATML
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def gpt2_folder() -> Path:
    """GPT-2's 50,257-token BPE as an HF tokenizer folder, built once in the cache from the packaged
    ``vocab.json``/``merges.txt`` (DESIGN.md, Assets)."""
    folder = assets.cache_dir() / "tokenizers" / "gpt2"
    if not (folder / "tokenizer.json").is_file():
        from transformers import GPT2TokenizerFast

        vocab, merges = assets.gpt2_bpe_files()
        tmp = folder.with_name(f".gpt2.tmp-{id(folder)}")
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copy(vocab, tmp / "vocab.json")
        shutil.copy(merges, tmp / "merges.txt")
        # transformers 5.x: from_pretrained on the folder; the bare constructor builds a broken tokenizer.
        tok = GPT2TokenizerFast.from_pretrained(str(tmp))
        tok.pad_token = tok.eos_token
        tok.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """``gpt2`` (the packaged GPT-2 BPE) or an HF tokenizer/model folder."""
    from transformers import AutoTokenizer

    if spec == "gpt2":
        return AutoTokenizer.from_pretrained(str(gpt2_folder()))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise NexttokError(
            f"tokenizer '{spec}' is not a folder; give 'gpt2', 'train' (train one on the corpus), "
            "or a folder written by `nexttok tokenizer train`",
            param="tokenizer",
        )
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise NexttokError(f"could not load a tokenizer from '{spec}': {str(e).splitlines()[0]}") from e
