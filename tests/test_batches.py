"""Batch builders: padding with buckets, packing without cross-contamination, determinism."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from nexttok.data.batches import FinetuneBatches, first_fit, pack_batch, pad_batch
from nexttok.data.chat import IGNORE, Example, Renderer
from nexttok.data.formats import Record
from nexttok.errors import NexttokError


def examples(tok, n: int = 6, spread: int = 5) -> list[Example]:
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    rng = random.Random(0)
    recs = [
        Record(f"r:{i}", ({"role": "user", "content": " ".join(rng.choices(words, k=3 + 2 * (i % spread)))},
                          {"role": "assistant", "content": " ".join(rng.choices(words, k=1 + i % 4))}))
        for i in range(n)
    ]  # fmt: skip
    return Renderer(tok).render_all(recs).examples


def per_token_loss(model, batch) -> torch.Tensor:
    """Unreduced shifted cross-entropy, (B, T-1), zero where the label is -100."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T-1)
    return loss * (labels != IGNORE)


def alone_loss(model, ex: Example) -> float:
    batch = {"input_ids": torch.tensor([ex.input_ids]), "labels": torch.tensor([ex.labels])}
    return float(per_token_loss(model, batch).sum())


def test_packed_batch_gives_each_record_its_loss_alone(tiny_lm):
    model, exs = tiny_lm.model.eval(), examples(tiny_lm.tokenizer)
    rows = [exs[:3], exs[3:]]
    batch = pack_batch(rows, tiny_lm.tokenizer.pad_token_id)
    losses = per_token_loss(model, batch)  # (B, T-1)
    for b, row in enumerate(rows):
        start = 0
        for ex in row:
            # token t's loss sits at t-1 after the shift; the record's first label is -100
            packed = float(losses[b, start : start + len(ex) - 1].sum())
            assert packed == pytest.approx(alone_loss(model, ex), rel=1e-5, abs=1e-5)
            start += len(ex)
    assert float(losses.sum()) == pytest.approx(sum(alone_loss(model, e) for e in exs), rel=1e-5)


def test_packed_record_does_not_see_its_neighbours(tiny_lm):
    model, exs = tiny_lm.model.eval(), examples(tiny_lm.tokenizer)
    pad = tiny_lm.tokenizer.pad_token_id
    a = pack_batch([[exs[0], exs[1]]], pad)
    changed = Example([5] * len(exs[0]), [IGNORE] * len(exs[0]), 0, "x")
    b = pack_batch([[changed, exs[1]]], pad)
    n = len(exs[0])
    with torch.no_grad():
        la = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"], position_ids=a["position_ids"]).logits
        lb = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    torch.testing.assert_close(la[0, n:], lb[0, n:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[0, :n], lb[0, :n])


def test_pack_batch_positions_restart_and_labels_stop_at_boundaries(tiny_lm):
    exs = examples(tiny_lm.tokenizer)[:2]
    batch = pack_batch([exs], pad_id=1)
    n0, n1 = len(exs[0]), len(exs[1])
    assert batch["position_ids"][0, : n0 + n1].tolist() == list(range(n0)) + list(range(n1))
    assert batch["labels"][0, n0] == IGNORE  # the next record's first token is never a target of this one
    assert batch["attention_mask"].shape == (1, 1, n0 + n1, n0 + n1)
    assert not batch["attention_mask"][0, 0, n0, :n0].any()  # record 2 cannot look back into record 1
    assert int(batch["n_bytes"]) == exs[0].n_bytes + exs[1].n_bytes


def test_padded_batch_gives_each_record_its_loss_alone(tiny_lm):
    model, exs = tiny_lm.model.eval(), examples(tiny_lm.tokenizer)
    batch = pad_batch(exs, tiny_lm.tokenizer.pad_token_id)
    losses = per_token_loss(model, batch)  # (B, T-1)
    assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in exs]
    for b, ex in enumerate(exs):
        assert float(losses[b].sum()) == pytest.approx(alone_loss(model, ex), rel=1e-5, abs=1e-5)


def test_first_fit_respects_capacity_and_keeps_every_record():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    rows = first_fit(lengths, range(len(lengths)), capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 5+3+2, 9+1, 7, 8


@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_epochs_cover_every_example_once_and_are_deterministic(tiny_lm, layout):
    exs = examples(tiny_lm.tokenizer, n=10)
    src = FinetuneBatches(exs, pad_id=1, layout=layout, max_length=64, seed=3)
    again = FinetuneBatches(exs, pad_id=1, layout=layout, max_length=64, seed=3)
    n = src.batches_per_epoch(2)
    seen = [i for batch in src.epoch(0, 2) for row in batch for i in row]
    assert sorted(seen) == list(range(10))
    trained = sum(int((src.batch(i, 2)["labels"] != IGNORE).sum()) for i in range(n))
    assert trained == sum(e.n_trained for e in exs)
    for i in [0, n - 1, n, 3 * n + 1]:  # into later epochs too
        a, b = src.batch(i, 2), again.batch(i, 2)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert src.epoch(0, 2) != src.epoch(1, 2)  # each epoch reshuffles


def test_bucketing_pads_less_than_random_batches(tiny_lm):
    exs = examples(tiny_lm.tokenizer, n=16, spread=16) * 4
    src = FinetuneBatches(exs, pad_id=1, layout="pad", max_length=256, bucket_chunk=8)
    n = src.batches_per_epoch(4)
    bucketed = sum(src.batch(i, 4)["input_ids"].numel() for i in range(n))
    order = list(range(len(exs)))
    random.Random(0).shuffle(order)
    unbucketed = sum(4 * max(len(exs[j]) for j in order[i : i + 4]) for i in range(0, len(order), 4))
    real = sum(len(e) for e in exs)
    assert bucketed - real < 0.5 * (unbucketed - real)  # at most half the padding


def test_packing_fills_rows(tiny_lm):
    exs = examples(tiny_lm.tokenizer, n=16)
    src = FinetuneBatches(exs, pad_id=1, layout="pack", max_length=128)
    real = sum(len(e) for e in exs)
    total = sum(src.batch(i, 2)["input_ids"].numel() for i in range(src.batches_per_epoch(2)))
    assert real / total > 0.85
    assert src.batches_per_epoch(2) * 2 < len(exs)  # fewer rows than records


def test_bad_layout_and_oversized_examples(tiny_lm):
    exs = examples(tiny_lm.tokenizer)
    with pytest.raises(NexttokError, match="--layout must be one of pack, pad"):
        FinetuneBatches(exs, pad_id=1, layout="zip")
    with pytest.raises(NexttokError, match="more than --max-length 4"):
        FinetuneBatches(exs, pad_id=1, layout="pack", max_length=4)
