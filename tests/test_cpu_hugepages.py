"""The weights move into one huge-page arena in place, back to back in reading order: same values, same
Parameter objects, tied weights stay tied, the model still saves, loads and trains, and the mapping is
eligible for transparent huge pages."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from nexttok.cpu.hugepages import HUGE, move_to_hugepages
from nexttok.weights import WeightCache

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")


def model_with_a_large_embedding() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=3840, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()  # embedding 3840 x 128 x 4 B = 1.875 MiB


def vma_field(address: int, field: str) -> int:
    """``field`` of the /proc/self/smaps entry whose range holds ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= address < hi:
                for entry in lines[i + 1 :]:
                    if entry.startswith(field + ":"):
                        return int(entry.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_weights_move_in_place_in_reading_order_and_logits_stay(tmp_path):
    model = model_with_a_large_embedding()
    embed = model.model.embed_tokens.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        logits = model(ids).logits

    moved = move_to_hugepages(model)

    params = list(model.parameters())  # each tied parameter once: the embedding is also the output layer
    assert moved == sum(p.numel() * 4 for p in params)
    assert embed.data_ptr() % HUGE == 0  # the arena's start
    for p, after in zip(params[:-1], params[1:], strict=True):  # back to back, each from a cache line's start
        assert after.data_ptr() == p.data_ptr() + -(-p.numel() * 4 // 64) * 64
    assert model.lm_head.weight is embed  # still tied: the same Parameter object
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)
    if "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert vma_field(embed.data_ptr(), "THPeligible") == 1

    model.save_pretrained(tmp_path)  # parameters sharing one storage: HF copies them apart for safetensors
    import transformers as tf

    again = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for n, p in again.named_parameters():
        assert torch.equal(p, before[n])
    torch.save(model.state_dict(), tmp_path / "state.pt")  # and pickles (a training checkpoint's way)
    assert torch.equal(
        torch.load(tmp_path / "state.pt")["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    )


def test_the_cache_moves_a_model_it_owns_once_and_one_passed_in_never(monkeypatch):
    monkeypatch.setenv("NEXTTOK_PACKED", "0")  # the move alone
    model = model_with_a_large_embedding()
    embed = model.model.embed_tokens.weight
    start = embed.data_ptr()
    assert not WeightCache(model).relayout() and embed.data_ptr() == start  # the user's model: never moved
    cache = WeightCache(model, owns_model=True)
    assert cache.relayout() and embed.data_ptr() % HUGE == 0
    moved = embed.data_ptr()
    assert not cache.relayout() and embed.data_ptr() == moved  # once


def test_training_updates_moved_weights_in_place():
    """Even when the move ran under inference mode (a generate() inside it), the model trains after."""
    model = model_with_a_large_embedding()
    with torch.inference_mode():
        assert move_to_hugepages(model) > 0
    embed = model.model.embed_tokens.weight
    ptr, old = embed.data_ptr(), embed.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    assert embed.data_ptr() == ptr and not torch.equal(embed, old)


@pytest.mark.parametrize("batch", [1, 2])  # one sample's kernel, and N samples'
@pytest.mark.parametrize("setting", ["1", "0"])
def test_decoding_moves_the_weights_after_enough_kernel_steps(setting, batch, monkeypatch):
    """At the RELAYOUT_AFTER-th kernel step of a model (unless turned off), mid-generation: the kernel
    reads the moved weights from then on (an in-place update after the move shows in its logits), and its
    logits still equal the model's own forward pass."""
    from types import SimpleNamespace

    from nexttok import weights
    from nexttok.cpu.decoder import CompiledDecoder

    monkeypatch.setenv("NEXTTOK_HUGEPAGES", setting)
    monkeypatch.setenv("NEXTTOK_PACKED", "0")  # the packed copy would not see the in-place update (test_packed.py)
    monkeypatch.setattr(weights, "RELAYOUT_AFTER", 3)
    model = model_with_a_large_embedding()
    cache = WeightCache(model, owns_model=True)  # as nexttok.load() makes it: the model may move
    ours, seq = CompiledDecoder(SimpleNamespace(model=model, weights=cache)), [4, 8]
    first, _ = ours.add(seq)
    rows = [first, *ours.fork(first, batch - 1)]
    for i, token in enumerate([5, 17, 300, 2, 9]):
        on_huge = model.model.embed_tokens.weight.data_ptr() % HUGE == 0
        assert on_huge == (setting == "1" and i >= 3)  # moved during the third step
        if i == 4:  # an in-place update of the (moved) weights: the kernel must read their new home
            with torch.no_grad():  # rows of ids not fed so far: the cached keys and values stay valid
                model.lm_head.weight[1000:].mul_(2.0)
        seq.append(token)
        with torch.no_grad():
            reference = model(torch.tensor([seq])).logits[:, -1]
        logits = ours.step(rows, [token] * batch)  # (batch, V)
        torch.testing.assert_close(logits, reference.expand(batch, -1), atol=1e-4, rtol=1e-4)
