"""A copy of a Llama-family model's large weights in the layout the compiled decode step streams fastest.

Why: a decode step's matrix-vector products read each weight once per token. Row by row (nn.Linear's
(out, in) layout), each 8 weights need 8 values of the input loaded too, and those loads hold the core's
load queue while the weights are on their way from memory. Stored in tiles of ``TILE`` output rows, column
by column (tile b holds ``W[b*TILE:(b+1)*TILE, :].T``, contiguous), one input value, broadcast, meets
``TILE`` weights in registers (``intrinsics.tile_dot``), and the matrix streams at the memory's rate
(docs/internals/cpu-decoder.md).

The copy costs the model's size again in memory, so it is made only where a run is long enough to gain
from it (the compiled decoder makes it with the move onto huge pages, ``weights.RELAYOUT_AFTER``) and where the
memory has room (half of what is available; else the kernel keeps reading the model's own rows). It is
owned by the LM's weight cache (``nexttok.weights.WeightCache``), never stored on the model, in one arena
on huge pages, in the order a step reads it: per layer the q/k/v rows as one matrix, o, gate and up
tiles in pairs, down; then the output layer. Updating the weights in place (training) makes the copy
stale: the cache then drops it, and it is never read.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from nexttok.cpu.hugepages import HUGE, huge_tensor
from nexttok.memory import available_bytes

TILE = 32  # output rows per tile: 4 AVX2 vectors (or 2 AVX-512 ones) of accumulators
QKV, O_PROJ, GATE_UP, DOWN = range(4)  # columns of Packed.layers


class Packed(NamedTuple):
    """Where a model's packed weights are (int64 addresses into ``arena``, which keeps them alive)."""

    arena: torch.Tensor
    layers: np.ndarray  # (layers, 4): the q/k/v, o, gate/up and down tiles of each layer
    head: int  # the output layer's tiles
    version: tuple  # of the weights they were copied from (weights.weights_version)


@torch.no_grad()  # the weights' values only
def pack(model: torch.nn.Module, version: tuple) -> Packed | None:
    """A packed copy of ``model``'s weights, tagged with their ``version``; None when the memory has no
    room for it (it would take more than half of what is available)."""
    matrices = _matrices(model)
    every = [w for qkv, o, gate_up, down in matrices for w in (qkv, o, *gate_up, down)] + [model.lm_head.weight]
    size = sum(_tiles_bytes(w) for w in every)
    free = available_bytes()
    if free is None or 2 * size > free:
        return None
    arena = huge_tensor(torch.empty(size // 4, device="meta"), -(-size // HUGE) * HUGE)
    flat, at = arena.view(-1), 0
    table = np.zeros((len(matrices), 4), np.int64)
    for i, (qkv, o, gate_up, down) in enumerate(matrices):
        for column, group in ((QKV, [qkv]), (O_PROJ, [o]), (GATE_UP, gate_up), (DOWN, [down])):
            table[i, column] = flat[at:].data_ptr()
            at = _write_tiles(flat, at, group)
    head = flat[at:].data_ptr()
    _write_tiles(flat, at, [model.lm_head.weight])
    return Packed(arena, table, head, version)


def _matrices(model: torch.nn.Module) -> list[tuple]:
    """Per layer: q/k/v as one (out, in) matrix, o, (gate, up), down."""
    out = []
    for layer in model.model.layers:
        a, f = layer.self_attn, layer.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        out.append((qkv, a.o_proj.weight, (f.gate_proj.weight, f.up_proj.weight), f.down_proj.weight))
    return out


def _tiles_bytes(w: torch.Tensor) -> int:
    return -(-w.shape[0] // TILE) * TILE * w.shape[1] * 4


def _write_tiles(flat: torch.Tensor, at: int, group: list[torch.Tensor]) -> int:
    """Write the tiles of ``group``'s (out, in) matrices from flat[at] on, tile by tile in turns (gate's tile
    b, then up's tile b: the step reads them in that order); return where they end. Tile b of a matrix is
    its rows b*TILE.. transposed to (in, TILE); rows past its end are zeros."""
    out, cols = group[0].shape
    blocks = -(-out // TILE)
    n = blocks * len(group) * cols * TILE
    dest = flat[at : at + n].view(blocks, len(group), cols, TILE)
    full = out // TILE
    for j, w in enumerate(group):
        dest[:full, j].copy_(w[: full * TILE].view(full, TILE, cols).transpose(1, 2))
        if full < blocks:  # the last, partial tile
            dest[full, j].zero_()
            dest[full, j, :, : out - full * TILE].copy_(w[full * TILE :].t())
    return at + n
