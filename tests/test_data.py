"""Pretraining data: sources -> documents, the split, the token cache, and BlockSource batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_corpus

from nexttok.data.blocks import BlockSource, _chunks, prepare, split_documents, text_tables, tokenize
from nexttok.data.sources import load_corpus
from nexttok.errors import NexttokError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTTOK_CACHE", str(tmp_path / "cache"))


def test_sources_text_folder_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first document")
    (d / "sub" / "b.md").write_text("second\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "third"}) + "\n" + json.dumps({"body": "fourth"}) + "\n")
    pq.write_table(pa.table({"body": ["fifth", "sixth"]}), tmp_path / "e.parquet")
    corpus = load_corpus([str(d), str(tmp_path / "c.jsonl"), str(tmp_path / "e.parquet")], text_field="body")
    assert corpus.documents == ["first document\n", "second\n", "third", "fourth", "fifth", "sixth"]


def test_source_errors_are_one_line_and_name_the_fix(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(NexttokError, match="corpus is empty"):
        load_corpus([str(tmp_path / "empty.txt")])
    with pytest.raises(NexttokError, match="does not exist"):
        load_corpus([str(tmp_path / "missing.txt")])
    (tmp_path / "x.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(NexttokError, match=r"no 'text' field \(fields: content\); pass --text-field"):
        load_corpus([str(tmp_path / "x.jsonl")])


def test_undecodable_bytes_are_replaced_counted_and_warned_once(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 and \xff\xfe more")
    (tmp_path / "b.txt").write_bytes(b"fine \xe9")
    with pytest.warns(UserWarning, match="4 undecodable") as record:
        corpus = load_corpus([str(tmp_path)])
    assert len(record) == 1
    assert corpus.replaced_bytes == 4 and corpus.documents[0].startswith("caf\ufffd and")


def test_split_tail_is_exactly_the_last_fraction():
    docs = ["a" * 600, "b" * 400]
    train, held = split_documents(docs, 0.1, "tail", 0)
    assert train == ["a" * 600 + "b" * 300] and held == ["b" * 100]


def test_split_by_documents_is_seeded_and_keeps_documents_whole():
    docs = [f"doc{i} " * (10 + i) for i in range(20)]
    t1, h1 = split_documents(docs, 0.2, "documents", seed=1)
    t2, h2 = split_documents(docs, 0.2, "documents", seed=1)
    _, h3 = split_documents(docs, 0.2, "documents", seed=2)
    assert (t1, h1) == (t2, h2) and h1 != h3
    assert sorted(t1 + h1) == sorted(docs)
    assert 0.2 <= sum(map(len, h1)) / sum(map(len, docs)) < 0.35


def test_chunked_tokenization_equals_whole_text(tok, monkeypatch):
    import nexttok.data.blocks as blocks

    monkeypatch.setattr(blocks, "CHUNK_CHARS", 300)
    text = tiny_corpus(8000)
    assert len(_chunks(text)) > 10 and "".join(_chunks(text)) == text
    ids = tokenize([text, text], tok, eos=True)
    one = tok.encode(text, add_special_tokens=False)
    assert ids.dtype == np.uint16
    assert ids.tolist() == one + [tok.eos_token_id] + one + [tok.eos_token_id]


def test_prepare_caches_by_content(tok):
    docs = [tiny_corpus(3000), tiny_corpus(5000)[3000:]]
    first = prepare(docs, tok, 0.1, "tail", 0)
    second = prepare(docs, tok, 0.1, "tail", 0)
    assert not first.cached and second.cached and first.folder == second.folder
    assert np.array_equal(first.train, second.train) and len(second.heldout) > 0
    changed = prepare([docs[0], docs[1] + "!"], tok, 0.1, "tail", 0)
    assert not changed.cached and changed.folder != first.folder


def test_block_source_is_a_pure_function_of_the_index(tok):
    ids = np.asarray(tok.encode(tiny_corpus(8000)), dtype=np.uint16)
    a, b = BlockSource(ids, None, 32, tok, seed=0), BlockSource(ids, None, 32, tok, seed=0)
    x = a.batch(5, 4)
    for i in range(5):  # different history, same batch
        b.batch(i + 50, 4)
    assert torch.equal(b.batch(5, 4)["input_ids"], x["input_ids"]) and x["input_ids"].shape == (4, 32)
    # One epoch visits every block once: its starts tile the text, T apart, in a shuffled order.
    starts = a._epoch(0).tolist()
    assert np.all(np.diff(sorted(starts)) == 32) and starts != sorted(starts)
    assert a._epoch(1).tolist() != starts


def test_eval_windows_predict_every_heldout_token_once_and_count_characters(tok):
    text = tiny_corpus(3000)
    held = np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.uint16)
    src = BlockSource(held, held, 32, tok)
    batches = list(src.eval_batches(batch_size=4, limit=10_000))
    predicted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert predicted == len(held)  # every token, the first from the BOS (nexttok eval's windows)
    assert all(int(b["input_ids"][j, 0]) == tok.bos_token_id for b in batches for j in range(len(b["input_ids"])))
    assert sum(int(b["n_chars"]) for b in batches) == len(text)
    assert sum(int(b["n_bytes"]) for b in batches) == len(text.encode())


def test_text_tables_count_bytes_and_characters(tok):
    n_bytes, n_chars = text_tables(tok)
    ids = tok.encode("é☃x", add_special_tokens=False)
    assert n_bytes[ids].sum() == len("é☃x".encode()) and n_chars[ids].sum() == 3
    assert n_bytes[tok.eos_token_id] == 0


def test_corpus_shorter_than_one_block_is_a_clear_error(tok):
    ids = np.asarray(tok.encode("To be or not"), dtype=np.uint16)
    with pytest.raises(NexttokError, match=r"shorter than one block of 64.*lower model.context"):
        BlockSource(ids, None, 64, tok)
