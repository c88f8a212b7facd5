"""The host side of the compiled calls: key/value slots (one per row) and their growth, and the walk's
scratch buffers, sized by the largest call so far."""

from __future__ import annotations

import numba
import numpy as np
import torch

from nexttok.cpu.walk import Cache, Dims, Scratch

BLOCK = 32  # prompt positions per call (a multiple of 4): bounds the scratch (~16 MB for SmolLM2-135M)


def rope_tables(model: torch.nn.Module, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE's cos and sin (T, hd) for ``capacity`` positions, from the model's own rotary module (so every
    RoPE scaling it supports)."""
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(capacity)[None])  # (1, T, hd)
    return cos[0].numpy().copy(), sin[0].numpy().copy()


class Slots:
    """Key/value arrays (slots, layers, nkv, T, hd): one slot per row, taken and given back as rows come and
    go. Both dimensions grow when needed (slots: at least double; positions: to what is asked, at least
    double), so a row costs its own positions, not a fixed reserve."""

    def __init__(self, model: torch.nn.Module, layers: int, nkv: int, hd: int):
        self.model, self.shape = model, (layers, nkv, hd)
        self.k = self.v = np.zeros((0, layers, nkv, 0, hd), np.float32)
        self.cos = self.sin = np.zeros((0, hd), np.float32)
        self.length: list[int] = []  # positions written, per slot
        self.free: list[int] = []

    @property
    def cache(self) -> Cache:
        return Cache(self.k, self.v, self.cos, self.sin)

    def take(self, n: int = 1) -> list[int]:
        """``n`` free slots (emptied), growing the arrays when there are too few."""
        if len(self.free) < n:
            have = self.k.shape[0]
            self._resize(max(have + n - len(self.free), 2 * have), self.k.shape[3])
        taken, self.free = self.free[:n], self.free[n:]
        for s in taken:
            self.length[s] = 0
        return taken

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` positions in every slot."""
        if positions > self.k.shape[3]:
            self._resize(self.k.shape[0], max(positions, 2 * self.k.shape[3]))

    def copy(self, source: int, targets: list[int]) -> None:
        """Slot ``source``'s positions into each of ``targets``."""
        n = self.length[source]
        for t in targets:
            self.k[t, :, :, :n], self.v[t, :, :, :n] = self.k[source, :, :, :n], self.v[source, :, :, :n]
            self.length[t] = n

    def _resize(self, slots: int, capacity: int) -> None:
        layers, nkv, hd = self.shape
        old_slots, old_capacity = self.k.shape[0], self.k.shape[3]
        k, v = (np.zeros((slots, layers, nkv, capacity, hd), np.float32) for _ in range(2))
        if old_slots and old_capacity:
            k[:old_slots, :, :, :old_capacity], v[:old_slots, :, :, :old_capacity] = self.k, self.v
        self.k, self.v = k, v
        self.length += [0] * (slots - old_slots)
        self.free += list(range(old_slots, slots))
        if capacity != old_capacity:
            self.cos, self.sin = rope_tables(self.model, capacity)


class Buffers:
    """The walk's scratch for calls of up to :attr:`positions` positions (grown on demand), and the
    per-chunk statistics of the output layer."""

    def __init__(self, dims: Dims, layers: int, out_chunks: int):
        self.dims, self.layers, self.positions = dims, layers, 0
        self.scratch: Scratch | None = None
        self.stats, self.argmax = np.zeros((out_chunks, 3)), np.zeros(out_chunks, np.int64)

    def ready(self, positions: int) -> Scratch:
        """The scratch, with room for ``positions`` positions (rounded up to 4 past one)."""
        need = 1 if positions == 1 else -(-positions // 4) * 4
        if need > self.positions:
            d = self.dims
            per_thread = (numba.config.NUMBA_NUM_THREADS, need, d.hidden)
            x, h = np.zeros(per_thread, np.float32), np.zeros(per_thread, np.float32)
            sizes = (d.nq + 2 * d.nk, d.nq, d.hidden, d.inter, d.hidden)  # q/k/v, attention, o, gate*up, down
            self.scratch = Scratch(x, h, *(np.zeros((self.layers, need, n), np.float32) for n in sizes))
            self.positions = need
        return self.scratch
