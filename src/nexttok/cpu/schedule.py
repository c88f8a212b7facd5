"""The thread scheduler of a compiled call: one parallel region, stages split into chunks that threads
claim with atomic counters (:func:`chunks`), and the count of threads a call runs on."""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit

from nexttok.cpu.intrinsics import fetch_add, load_acquire, pause, prefetch

PAD = 16  # int64s between counters: each on its own 128-byte pair of cache lines
STAGES = 5  # per layer: q/k/v, attention, o, gate/up, down (and one for the output layer)
AHEAD_LINES = 256  # cache lines (16 KB) of the next stage's weights asked for when a stage's chunks run out


def start_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count (``--threads``).

    numba's OpenMP layer sets the OpenMP thread count when its pool starts, and torch's wheel uses the
    same libgomp (same soname, one copy per process): without this, a process at 1 thread went to 2."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)


start_threads()


def threads() -> int:
    """Threads for the next call: torch's count (``--threads``), at most numba's pool."""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n


def counters(layers: int) -> np.ndarray:
    """The claim counters of a call's stages (:func:`chunks`), for a model of ``layers`` layers."""
    return np.zeros((STAGES * layers + 1) * (numba.config.NUMBA_NUM_THREADS + 1) * PAD, np.int64)


@njit(inline="always")
def first_chunk(share, nt, n):
    """The first of ``n`` chunks in thread ``share``'s share (of ``nt``); share nt gives n."""
    return share * n // nt


@njit
def chunks(counters, stage, t, nt, n, ahead, lines):
    """Chunk indices of a stage of ``n`` chunks for thread ``t`` of ``nt``; returns once all n are done.

    Chunks are claimed with an atomic counter per thread's share: thread t takes from its own share
    first, then from the others'. Any thread can thus finish the stage alone, so it never waits for a
    thread that has not started (or runs the iterations one after another). With no chunk left to
    claim, the thread asks for the first ``lines`` cache lines at ``ahead`` (where its share of the next
    stage's weights begins) before it waits: the next stage then starts on a stream already running
    (docs/internals/cpu-decoder.md)."""
    base = stage * (nt + 1) * PAD
    mine = 0
    for j in range(nt):
        share = (t + j) % nt
        lo, hi = first_chunk(share, nt, n), first_chunk(share + 1, nt, n)
        while True:
            c = lo + fetch_add(counters, base + share * PAD, 1)
            if c >= hi:
                break
            yield c
            mine += 1
    for line in range(lines):
        prefetch(ahead + 64 * line)
    done = base + nt * PAD
    fetch_add(counters, done, mine)  # publishes this thread's rows (sequentially consistent)
    while load_acquire(counters, done) < n:
        pause()


@njit(inline="always")
def share_address(address, t, nt, n, chunk_floats):
    """Address of thread t's share of a float32 matrix at ``address`` in ``n`` chunks of ``chunk_floats``."""
    return address + first_chunk(t, nt, n) * chunk_floats * 4
