"""The decode's packed copy of the weights (nexttok.cpu.packed): tiles that hold each matrix's rows transposed, a
kernel that reads them with the same logits as the model's forward pass, made mid-run by the decoder, and
never read once the weights have changed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cpu_decoder import run_kernel, tiny

from nexttok import weights
from nexttok.cpu import intrinsics, packed
from nexttok.cpu.decoder import CompiledDecoder
from nexttok.cpu.packed import TILE
from nexttok.weights import WeightCache


def odd_sizes() -> torch.nn.Module:
    """No size a multiple of TILE: q/k/v 48 + 2 x 16 rows, intermediate 80, vocabulary 97 (partial tiles)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=3, num_key_value_heads=1)  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def read_tiles(copy: packed.Packed, address: int, rows: int, cols: int, group: int = 1) -> torch.Tensor:
    """The (blocks, group, cols, TILE) tiles at ``address`` in the copy's arena."""
    blocks = -(-rows // TILE)
    at = (address - copy.arena.data_ptr()) // 4
    return copy.arena.view(-1)[at : at + blocks * group * cols * TILE].view(blocks, group, cols, TILE)


def test_tiles_hold_each_matrix_transposed_in_reading_order():
    model = odd_sizes()
    cache = WeightCache(model)
    copy = cache.pack()
    assert copy is not None and cache.packed() is copy and cache.pack() is copy  # made once, then found
    layer = model.model.layers[1]
    a, f = layer.self_attn, layer.mlp
    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()  # (80, 48)
    matrices = [(packed.QKV, [qkv]), (packed.O_PROJ, [a.o_proj.weight]), (packed.DOWN, [f.down_proj.weight]),
                (packed.GATE_UP, [f.gate_proj.weight, f.up_proj.weight])]  # fmt: skip
    for column, group in matrices:
        rows, cols = group[0].shape
        tiles = read_tiles(copy, int(copy.layers[1, column]), rows, cols, len(group))
        for j, w in enumerate(group):
            for b in range(tiles.shape[0]):
                part = w[b * TILE : (b + 1) * TILE].detach()
                assert torch.equal(tiles[b, j, :, : part.shape[0]], part.T)
                assert not tiles[b, j, :, part.shape[0] :].any()  # the rows past the end: zeros
    head = read_tiles(copy, copy.head, 97, 48)
    assert torch.equal(head[3, 0, :, :1], model.lm_head.weight[96:].detach().T)


@pytest.mark.parametrize("kind", ["odd", "llama", "qwen2", "llama-bias-llama3-rope"])
def test_the_kernel_reads_the_packed_copy_with_the_model_forward_logits(kind):
    model = odd_sizes() if kind == "odd" else tiny(kind)
    ids = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    rows = run_kernel(model, ids, 10)
    cache = WeightCache(model)
    assert cache.pack() is not None
    tiles = CompiledDecoder(SimpleNamespace(model=model, weights=cache)).arrays.weights.tiles
    assert all(column.all() for column in tiles)  # every layer's four, packed
    for (logits, seq), (by_rows, _) in zip(run_kernel(model, ids, 10, weights=cache), rows, strict=True):
        with torch.inference_mode():
            reference = model(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, by_rows, atol=1e-5, rtol=1e-5)


def test_a_copy_of_weights_that_changed_is_dropped_and_never_read():
    model = odd_sizes()
    cache = WeightCache(model)
    assert cache.pack() is not None
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # in place, as an optimizer step
    tiles = CompiledDecoder(SimpleNamespace(model=model, weights=cache)).arrays.weights.tiles
    assert not any(column.any() for column in tiles) and cache._packed is None  # its memory is freed
    (logits, seq), *_ = run_kernel(model, [3, 1, 4], 0, weights=cache)
    with torch.inference_mode():
        torch.testing.assert_close(logits, model(torch.tensor([seq])).logits[0, -1], atol=1e-4, rtol=1e-4)
    assert cache.pack() is not None  # a new copy can be made from the new weights


def test_no_copy_without_the_memory_for_it_or_when_turned_off(monkeypatch):
    model = odd_sizes()
    size = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(packed, "available_bytes", lambda: size)  # room for one copy, not for twice that
    assert WeightCache(model).pack() is None
    monkeypatch.setattr(packed, "available_bytes", lambda: None)  # unknown: no copy either
    assert WeightCache(model).pack() is None
    monkeypatch.undo()
    monkeypatch.setenv("NEXTTOK_PACKED", "0")
    assert WeightCache(model).pack() is None


def test_without_huge_pages_the_copy_is_made_on_ordinary_ones(monkeypatch):
    import mmap

    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)  # as on macOS
    model = odd_sizes()
    cache = WeightCache(model)
    assert cache.pack() is not None
    (logits, seq), *_ = run_kernel(model, [3, 1, 4], 0, weights=cache)
    with torch.inference_mode():
        torch.testing.assert_close(logits, model(torch.tensor([seq])).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 3, 32, 100])
def test_a_tile_dot_sums_every_row_of_its_tile(n):
    from numba import njit

    @njit
    def call(tile, x, out):
        intrinsics.tile_dot(tile.ctypes.data, x.ctypes.data, x.shape[0], out.ctypes.data)

    rng = np.random.default_rng(n)
    tile, x = rng.standard_normal((n, TILE), np.float32), rng.standard_normal(n, np.float32)
    out = np.zeros(TILE, np.float32)
    call(tile, x, out)
    np.testing.assert_allclose(out, x.astype(np.float64) @ tile.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_the_decoder_packs_the_weights_mid_run_and_reads_them(monkeypatch):
    """At the RELAYOUT_AFTER-th kernel step the decoder makes the packed copy and reads
    it from the next step on; the logits still equal the model's forward pass."""
    monkeypatch.setattr(weights, "RELAYOUT_AFTER", 3)
    model = odd_sizes()
    cache = WeightCache(model)
    ours, seq = CompiledDecoder(SimpleNamespace(model=model, weights=cache)), [4, 8]
    row, _ = ours.add(seq)
    for i, token in enumerate([5, 17, 30, 2, 9]):
        assert bool(ours.arrays.weights.tiles.qkv.any()) == (i >= 3)  # packed during the third step
        seq.append(token)
        with torch.no_grad():
            reference = model(torch.tensor([seq])).logits[:, -1]
        torch.testing.assert_close(ours.step([row], [token]), reference, atol=1e-4, rtol=1e-4)
    assert cache.packed() is not None


@pytest.mark.parametrize("kind", ["odd", "llama", "qwen2"])
@pytest.mark.parametrize("n", [3, 8])
def test_rows_read_the_packed_copy_with_the_model_forward_logits(kind, n):
    """Up to walk.STREAM_ROWS rows in one call read o, gate/up, down and the output layer from the packed
    tiles, all rows against each tile row (intrinsics.tile_rows4/8): each row's logits are its own forward's."""
    model = odd_sizes() if kind == "odd" else tiny(kind)
    cache = WeightCache(model)
    assert cache.pack() is not None
    decoder = CompiledDecoder(SimpleNamespace(model=model, weights=cache))
    first, _ = decoder.add([3, 1, 4, 1, 5])
    rows = [first, *decoder.fork(first, n - 1)]
    sequences = torch.tensor([[3, 1, 4, 1, 5]] * n)
    for step in torch.randint(0, 97, (3, n), generator=torch.Generator().manual_seed(n)):
        logits = decoder.step(rows, step.tolist())
        sequences = torch.cat([sequences, step[:, None]], dim=1)
        with torch.inference_mode():
            torch.testing.assert_close(logits, model(sequences).logits[:, -1], atol=1e-4, rtol=1e-4)
