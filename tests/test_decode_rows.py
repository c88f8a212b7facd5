"""Rows of different prompts and lengths in one decoder, joining and leaving between steps: each row's logits
equal decoding its sequence alone, through both decoders (nexttok.decode's interface)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_cpu_decoder import tiny

from nexttok.cpu.decoder import CompiledDecoder
from nexttok.decode import Batched, Decoder, check_rows
from nexttok.errors import NexttokError
from nexttok.torchdecode import TorchDecoder
from nexttok.weights import WeightCache


def tiny_gpt2() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=512)).eval()


def decoders(kind: str) -> list[Decoder]:
    """The decoders that run model ``kind``: both for the Llama family, torch's alone for GPT-2."""
    model = tiny_gpt2() if kind == "gpt2" else tiny(kind)
    lm = SimpleNamespace(model=model, weights=WeightCache(model))
    if kind == "gpt2":
        return [TorchDecoder(lm)]
    return [CompiledDecoder(lm), TorchDecoder(lm)]


def alone(model, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([seq])).logits[0, -1]


def prompts(n: int, seed: int) -> list[list[int]]:
    """``n`` random prompts of lengths 1 to 200 (the first of length 1, one of 200)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 200, *torch.randint(2, 200, (max(0, n - 2),), generator=g).tolist()][:n]
    return [torch.randint(0, 97, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama-bias-llama3-rope", "gpt2"])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_rows_of_different_prompts_equal_each_prompt_alone(kind, n):
    """``n`` rows start; one more joins at step 5 and the first leaves at step 9 (with one row, it is the
    joiner that the first leaves to). At every step each row's logits equal its sequence's forward pass."""
    for decoder in decoders(kind):
        model = decoder._lm.model if isinstance(decoder, TorchDecoder) else decoder.arrays.model
        seqs: dict[int, list[int]] = {}
        *starting, joiner = prompts(n + 1, seed=n)
        for ids in starting:
            row, logits = decoder.add(ids)
            seqs[row] = list(ids)
            torch.testing.assert_close(logits, alone(model, ids), atol=1e-4, rtol=1e-4)
        g = torch.Generator().manual_seed(100 + n)
        for step in range(12):
            if step == 5:
                row, logits = decoder.add(joiner)
                seqs[row] = list(joiner)
                torch.testing.assert_close(logits, alone(model, joiner), atol=1e-4, rtol=1e-4)
            if step == 9:
                decoder.drop(min(seqs))
                del seqs[min(seqs)]
            rows = list(seqs)
            tokens = torch.randint(0, 97, (len(rows),), generator=g).tolist()
            for r, t in zip(rows, tokens, strict=True):
                seqs[r].append(t)
            logits = decoder.step(rows, tokens)
            assert logits.shape == (len(rows), 97)
            for r, row_logits in zip(rows, logits, strict=True):
                torch.testing.assert_close(row_logits, alone(model, seqs[r]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_row_that_skips_a_step_and_a_fork_keep_their_own_logits(kind):
    for decoder in decoders(kind):
        model = decoder._lm.model if isinstance(decoder, TorchDecoder) else decoder.arrays.model
        (a, _), (b, _) = decoder.add([5, 6, 7]), decoder.add([9])
        decoder.step([a, b], [1, 2])
        logits = decoder.step([b], [3])  # a waits a step
        torch.testing.assert_close(logits[0], alone(model, [9, 2, 3]), atol=1e-4, rtol=1e-4)
        (c,) = decoder.fork(a, 1)
        logits = decoder.step([c, a], [4, 8])
        torch.testing.assert_close(logits[0], alone(model, [5, 6, 7, 1, 4]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1], alone(model, [5, 6, 7, 1, 8]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_score_gives_the_logits_at_chosen_positions(kind):
    """Teacher forcing: the logits after each chosen position of a text, as its prefixes' forward passes."""
    ids = prompts(2, seed=4)[1][:40]
    for decoder in decoders(kind):
        model = decoder._lm.model if isinstance(decoder, TorchDecoder) else decoder.arrays.model
        positions = [0, 7, 39]
        scores = decoder.score(ids, positions)
        assert scores.shape == (3, 97)
        for p, row in zip(positions, scores, strict=True):
            torch.testing.assert_close(row, alone(model, ids[: p + 1]), atol=1e-4, rtol=1e-4)
        assert decoder.score(ids).shape == (40, 97)
        with pytest.raises(NexttokError, match="positions"):
            decoder.score(ids, [40])


def test_both_decoders_are_the_interface(tiny_lm):
    for decoder in decoders("llama"):
        assert isinstance(decoder, Decoder) and isinstance(decoder, Batched)


def test_rows_that_cannot_fit_are_refused_before_any_work(tiny_lm, monkeypatch):
    import nexttok.decode as decode
    from nexttok.generate import generate
    from nexttok.sampling import SamplingConfig

    monkeypatch.setattr(decode, "available_bytes", lambda: 10 * 2**20)  # 10 MiB left
    check_rows(tiny_lm, 1, 10)  # one short row fits
    with pytest.raises(NexttokError, match="samples of .* positions need about .* GiB"):
        generate(tiny_lm, "To be", SamplingConfig(max_new_tokens=4), num_samples=100_000)  # at the call


def test_more_rows_than_one_call_takes_are_split_and_each_is_its_own():
    """70 rows: the compiled decoder runs them as calls of STEP_ROWS (64) and 6 rows; each row's logits
    equal the model's forward over its sequence."""
    model = tiny("llama")
    decoder = CompiledDecoder(SimpleNamespace(model=model, weights=WeightCache(model)))
    first, _ = decoder.add([3, 1, 4])
    rows = [first, *decoder.fork(first, 69)]
    tokens = torch.arange(70) % 97
    logits = decoder.step(rows, tokens.tolist())
    with torch.inference_mode():
        reference = model(torch.cat([torch.tensor([[3, 1, 4]] * 70), tokens[:, None]], 1)).logits[:, -1]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_sample_70_of_a_batch_larger_than_a_group_equals_its_single_run(tiny_lm):
    """The loop works through 64 rows at a time (generate.GROUP): sample 69's draws still come from its own
    seed alone."""
    from nexttok.generate import generate
    from nexttok.sampling import SamplingConfig

    config = SamplingConfig(seed=5, max_new_tokens=6, top_k=20, temperature=1.2)
    batch = list(generate(tiny_lm, "To be", config, num_samples=70))
    last = [s.id for s in batch if s.sample == 69]
    single = SamplingConfig(seed=5 + 69, max_new_tokens=6, top_k=20, temperature=1.2)
    assert last == [s.id for s in generate(tiny_lm, "To be", single)]
    assert len({s.sample for s in batch}) == 70
