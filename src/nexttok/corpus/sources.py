"""Corpus sources -> documents to index: text sources as pretraining reads them (with the recipe's
held-out split), or fine-tuning records rendered through the chat template as they are trained."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nexttok.corpus.index import CorpusIndex, Document, build, line_tables, tokenizer_hash
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM

SPLITS = ("all", "train", "heldout")


def index_corpus(
    lm: LM,
    sources: list[str],
    out: str | Path,
    split: str = "all",
    records: bool = False,
    text_field: str = "text",
    holdout_fraction: float = 0.1,
    show: bool = True,
) -> CorpusIndex:
    """Tokenize ``sources`` with ``lm``'s tokenizer and build the index in ``out``."""
    if split not in SPLITS:
        raise NexttokError(f"--split must be one of {', '.join(SPLITS)} (got '{split}')", param="split")
    if records:
        docs, files = record_documents(lm, sources)
    else:
        docs, files = text_documents(lm, sources, split, text_field, holdout_fraction, show)
    from nexttok.evaluation.pipeline import model_name

    meta = {"model": model_name(lm), "tokenizer_hash": tokenizer_hash(lm.tokenizer), "vocab_size": lm.vocab_size}
    meta |= {"sources": sources, "split": split, "records": records}
    return build([d for d in docs if len(d.ids)], files, Path(out), meta, line_tables(lm.tokenizer))


def text_documents(
    lm: LM, sources: list[str], split: str, text_field: str, fraction: float, show: bool
) -> tuple[list[Document], list[str]]:
    from nexttok.data.blocks import tokenize_documents
    from nexttok.data.sources import load_corpus

    corpus = load_corpus(sources, text_field)
    texts, origins = corpus.documents, corpus.origins
    if split != "all":
        texts, origins = _tail_split(texts, origins, split, fraction)
    ids = tokenize_documents(texts, lm.tokenizer, "corpus", show)
    docs = [Document(a, f, line) for a, (f, line) in zip(ids, origins, strict=True)]
    return docs, [str(f) for f in corpus.files]


def _tail_split(
    texts: list[str], origins: list[tuple[int, int]], split: str, fraction: float
) -> tuple[list[str], list[tuple[int, int]]]:
    # The pretraining recipe's split (data.blocks.split_documents, tail): the last `fraction` of the
    # concatenated text is held out. Documents keep their files; the one cut in two, its lines.
    cut = int(sum(len(t) for t in texts) * (1 - fraction))
    out_t, out_o, pos = [], [], 0
    for t, (f, line) in zip(texts, origins, strict=True):
        a, b = pos, pos + len(t)
        pos = b
        lo, hi = (a, min(b, cut)) if split == "train" else (max(a, cut), b)
        if lo < hi:
            out_t.append(t[lo - a : hi - a])
            out_o.append((f, line + t[: lo - a].count("\n")))
    return out_t, out_o


def record_documents(lm: LM, sources: list[str]) -> tuple[list[Document], list[str]]:
    """Each fine-tuning record as one document: the ids the chat template renders, as training sees them."""
    import numpy as np

    from nexttok.data.chat import Renderer
    from nexttok.data.formats import read_dataset
    from nexttok.data.sources import expand

    if not getattr(lm.tokenizer, "chat_template", None):
        raise NexttokError(
            "this model's tokenizer has no chat template, so records cannot be rendered as they are trained; "
            "index with --model the fine-tuned model (its folder has the template)",
            param="model",
        )
    renderer, files, docs = Renderer(lm.tokenizer, "all"), [], []
    for f in expand(sources):
        for record in read_dataset(f).records:
            ex = renderer.render(record)
            tail = record.where.rsplit(":", 1)[-1]  # "file:line"
            line = int(tail) if tail.isdigit() else 1
            docs.append(Document(np.asarray(ex.input_ids, dtype=np.uint32), len(files), line))
        files.append(str(f))
    return docs, files
