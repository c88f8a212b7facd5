"""The decode steps (one sample's, or N samples' of one prompt) and the prefill of Llama-family models on
the CPU, compiled by numba.

Why it exists: a decode step of one sample is a chain of matrix-vector products, bound by reading
the weights from memory once per token. On the CPUs measured (docs/generate.md), torch's kernels
(MKL, oneDNN) read the weights at 8-22 GB/s where the memory gives 30-50; a loop over weight rows,
compiled with reassociation allowed (so it vectorizes), streams them at the memory's rate: one
stream per thread (on AVX-512 CPUs each row's dot product paced in blocks: :data:`_dot`).

A whole step is one compiled call and one parallel region. Each thread runs every layer; a stage
(q/k/v, attention, o, gate/up, down, the output layer) is split into chunks of rows, each thread
taking chunks from its own share first and then from the others' (so a thread that the memory or
the VM serves slower does not hold the rest up), and a stage ends when all its chunks are done
(:func:`_chunks`). Starting and joining an OpenMP region per stage instead (151 per step) measured
~9% slower, and handing out all chunks from one shared counter slower still (cache-line traffic).
The small vectors (the residual stream, norms) are recomputed by each thread rather than waited for.
Once the engine has made the model's packed copy (nexttok.packed: each matrix in tiles of 32 rows stored
column by column), the step reads that instead of the rows (:func:`_tile_dot`), which streams faster.

A short prompt's prefill runs the same stages over blocks of up to 32 positions (:func:`_prefill`):
there each weight row meets every position, so it is bound by arithmetic, done in tiles of dot
products (:data:`_tile`: 4 weight rows x 4 positions with AVX-512, 2 x 4 with AVX2), 63-79 ms for a
32-token prompt of the default model on the AMD Zen 4 VM measured where the HF forward pass took 88-120
(Zen 3: 72-91 ms with the weight rows asked for ahead, :data:`_TILE_AHEAD`, against 83-98 without,
96 with 4 x 4 tiles and 112-144 for the HF forward pass). Past DecodeKernel.PREFILL_MAX tokens the
HF model's prefill is faster (:meth:`load_cache`).

N samples of one prompt (:class:`SamplesKernel`) step through the same stages over their N rows, one
compiled call per step, each sample attending over its own copy of the keys and values; up to 8
samples their GEMM takes one weight row at a time against 8 rows (:func:`_gemm`'s ``stream``),
which streams the weights from memory faster than the prefill's tiles.

This is not a second model: the weights are the Hugging Face model's own tensors, read in place;
loading, saving and training stay the HF model's. Tests check the logits
against the model's own forward pass and greedy output token for token. Models it does not cover
(other architectures, bfloat16, adapters, sliding windows, length-dependent RoPE) use the torch path.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Container
from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from nexttok.packed import DOWN as _P_DOWN
from nexttok.packed import GATE_UP as _P_GATE_UP
from nexttok.packed import O_PROJ as _P_O
from nexttok.packed import QKV as _P_QKV
from nexttok.packed import TILE

if TYPE_CHECKING:
    from nexttok.weights import WeightCache

# Reassociation lets LLVM vectorize the dot products; no-NaN/no-inf assumptions are left out.
_MATH = {"reassoc", "contract", "nsz", "arcp"}
_MLP = ("gate_proj", "up_proj", "down_proj")
_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# Columns of the per-layer address table (DecodeKernel.addresses).
_NORM1, _WQ, _WK, _WV, _BQKV, _WO, _BO, _NORM2, _WG, _WU, _WD = range(11)
_ROWS = 32  # rows per chunk: 74-197 KB of weights for this model's matrices (16 and 64 measured slower)
_PAD = 16  # int64s between counters: each on its own 128-byte pair of cache lines
_AHEAD = 256  # cache lines (16 KB) of the next stage's weights to ask for when a stage's chunks run out (_chunks)
_OUT_ROWS = 128  # rows per chunk of the output layer (its statistics are per chunk: _out_chunk)
assert _ROWS == TILE and _OUT_ROWS % TILE == 0  # a chunk is whole tiles of the packed copy (_tiled_rows)
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Only the prange loops are wanted parallel; parallel=True also looks for more to parallelize in what
# they call (array expressions, reductions...): first compile 28 -> 23 s for the prefill, 17.5 -> 14.6 s
# for the step (one measurement each, on the 2-core machine).
_PRANGE_ONLY = {"prange": True, "numpy": False, "setitem": False, "reduction": False, "comprehension": False,
                "stencil": False, "fusion": False, "inplace_binop": False}  # fmt: skip
_STAGES = 5  # per layer: q/k/v, attention, o, gate/up, down (and one for the output layer)


def _start_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count (``--threads``).

    numba's OpenMP layer sets the OpenMP thread count when its pool starts, and torch's wheel uses the
    same libgomp (same soname, one copy per process): without this, a process at 1 thread went to 2."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)


_start_threads()


def _element(context, builder, sig, args):
    """LLVM pointer to ``args[0][args[1]]`` (a 1-D array and an index)."""
    array = context.make_array(sig.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]])


@intrinsic
def _fetch_add(typingctx, counters, index, value):
    """``counters[index] += value`` as one atomic instruction; returns the value before."""

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _element(context, builder, sig, args), args[2], "seq_cst")

    return types.int64(counters, index, types.int64), codegen


@intrinsic
def _load_acquire(typingctx, counters, index):
    """``counters[index]``, read so that every write made before a release of it is visible after."""

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_element(context, builder, sig, args), "acquire", 8)

    return types.int64(counters, index), codegen


@intrinsic
def _pause(typingctx):
    """x86's ``pause`` (a spin-wait hint: frees the core's resources while waiting); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if _X86:
            signature = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, signature, "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return types.none(), codegen


def _prefetcher(locality: int):
    """An intrinsic hinting to bring the cache line at an int64 address into the caches (it never faults):
    ``locality`` 3 into every level (x86 prefetcht0), 1 into the outer ones (prefetcht2)."""

    @intrinsic
    def prefetch(typingctx, address):
        def codegen(context, builder, sig, args):
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            signature = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            hint = cgutils.get_or_insert_function(builder.module, signature, "llvm.prefetch.p0")
            builder.call(hint, [builder.inttoptr(args[0], i8p), i32(0), i32(locality), i32(1)])  # read, data
            return context.get_dummy_value()

        return types.none(types.int64), codegen

    return prefetch


_prefetch, _prefetch_far = _prefetcher(3), _prefetcher(1)


@intrinsic
def _f32_pointer(typingctx, address):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(types.float32)(types.int64), codegen


@intrinsic
def _tile_dot(typingctx, tile, x, n, out):
    """out[k] = sum over j < n of tile[j, k] x[j], for k < TILE: a packed tile (n, TILE) float32 at address
    ``tile`` (nexttok.packed), x (n,) and out (TILE,) at addresses. The TILE sums are one vector held in
    registers, and each x[j] is broadcast against a row of the tile: one load per TILE/8 vectors of weights
    beside theirs, where a row-by-row dot product loads as many values of x as of weights (packed.py)."""

    def codegen(context, builder, sig, args):
        tile, x, n, out = args
        f32, vec, i64 = ir.FloatType(), ir.VectorType(ir.FloatType(), TILE), ir.IntType(64)
        name = f"llvm.fmuladd.v{TILE}f32"
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)
        acc = cgutils.alloca_once(builder, vec)  # promoted to registers by LLVM
        builder.store(ir.Constant(vec, [0.0] * TILE), acc)
        rows, xs = builder.inttoptr(tile, vec.as_pointer()), builder.inttoptr(x, f32.as_pointer())
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), TILE), [0] * TILE)
        with cgutils.for_range(builder, n) as loop:
            value = builder.load(builder.gep(xs, [loop.index]))
            one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, i64(0))
            broadcast = builder.shuffle_vector(one, one, lanes)  # x[j] in every lane
            weights = builder.load(builder.gep(rows, [loop.index]), align=4)  # tile row j
            builder.store(builder.call(fmuladd, [weights, broadcast, builder.load(acc)]), acc)
        builder.store(builder.load(acc), builder.inttoptr(out, vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@njit(inline="always")
def _matrix(address, rows, cols):
    """The float32 C-ordered (rows, cols) array at ``address`` (a weight the kernel holds a view of)."""
    return numba.carray(_f32_pointer(address), (rows, cols))


@njit(inline="always")
def _first_chunk(share, nt, n):
    """The first of ``n`` chunks in thread ``share``'s share (of ``nt``); share nt gives n."""
    return share * n // nt


@njit
def _chunks(counters, stage, t, nt, n, ahead, lines):
    """Chunk indices of a stage of ``n`` chunks for thread ``t`` of ``nt``; returns once all n are done.

    Chunks are claimed with an atomic counter per thread's share: thread t takes from its own share
    first, then from the others'. Any thread can thus finish the stage alone, so it never waits for a
    thread that has not started (or runs the iterations one after another). With no chunk left to
    claim, the thread asks for the first ``lines`` cache lines at ``ahead`` (where its share of the next
    stage's weights begins) before it waits: the next stage then starts on a stream already running
    (interleaved 128-token runs against the bench's ceiling, at the memory's faster level: 0.697 ->
    0.729 with 256 lines, 0.723 with 64, and again 0.693 -> 0.732 with 256 over 50 rounds; at the
    slower level 0.902 -> 0.913 and 0.897 -> 0.908). Software prefetch within a stream measured slower."""
    base = stage * (nt + 1) * _PAD
    mine = 0
    for j in range(nt):
        share = (t + j) % nt
        lo, hi = _first_chunk(share, nt, n), _first_chunk(share + 1, nt, n)
        while True:
            c = lo + _fetch_add(counters, base + share * _PAD, 1)
            if c >= hi:
                break
            yield c
            mine += 1
    for line in range(lines):
        _prefetch(ahead + 64 * line)
    done = base + nt * _PAD
    _fetch_add(counters, done, mine)  # publishes this thread's rows (sequentially consistent)
    while _load_acquire(counters, done) < n:
        _pause()


_SPAN = 64  # floats per block of _dot_paced: each block's sum is reduced to a scalar before the next starts


def _wide_vectors() -> bool:
    """Whether numba compiles for AVX-512 here (numba's NUMBA_CPU_FEATURES if set, else this CPU's)."""
    features = numba.config.CPU_FEATURES
    if features is not None:
        return "+avx512f" in features.split(",")
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


_WIDE = _wide_vectors()  # picks _dot and _tile


@njit(fastmath=_MATH, inline="always")
def _dot_paced(w, i, x):
    """w[i] . x, in blocks of _SPAN floats, each vectorized (4 AVX-512 FMAs) and reduced in turn.

    Why blocks (on AVX-512 CPUs, :data:`_dot`): a plain loop (4 vector accumulators over the whole row)
    computes 1.6-2.3x faster but streams slower on the AMD Zen 4 VM measured; its loads run further
    ahead of the arithmetic, and that memory serves it worse than a paced stream (we did not find out
    why). Rows of 576 floats in 32-row chunks of a 2 GiB matrix, 2 threads, against torch's sum at
    the memory's faster level, in the two interleaved runs that measured both: 0.85 -> 0.96 and
    0.84 -> 0.88 (the plain loop alone, over seven runs: 0.70-0.85). A whole 128-token generate(),
    with the gate-then-up order of _gated_rows: 0.65-0.67 -> 0.67-0.73 of the ceiling at the faster
    level, 0.82-0.84 -> 0.90 at the slower. Blocks of 32 or 96 floats compiled to gathers, so 64 it is."""
    n = w.shape[1]
    top = n - n % _SPAN
    acc = np.float32(0.0)
    for b in range(0, top, _SPAN):
        for j in range(b, b + _SPAN):
            acc += w[i, j] * x[j]
    for j in range(top, n):
        acc += w[i, j] * x[j]
    return acc


@njit(fastmath=_MATH, inline="always")
def _dot_plain(w, i, x):
    """w[i] . x in one vectorized loop (LLVM keeps several vector accumulators over the whole row)."""
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += w[i, j] * x[j]
    return acc


# The dot product every stage streams its weight rows through. The paced loop is for AVX-512 CPUs only: on
# the AMD Zen 3 VM measured (AVX2, 16 vector registers), its per-block reductions make it compute-bound
# (48 against 104 GB/s in cache, 2 threads) and a whole 128-token generate() read 0.71 of the ceiling
# against 0.82 with the plain loop (42 interleaved runs, paired). numba caches compiled code per CPU
# name and features, so a cache never crosses this choice.
_dot = _dot_paced if _WIDE else _dot_plain


@njit(fastmath=_MATH, inline="always")
def _rmsnorm(x, weight, eps, out):
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    r = np.float32(1.0) / np.sqrt(ss / x.shape[0] + eps)
    for j in range(x.shape[0]):
        out[j] = weight[j] * (x[j] * r)


@njit(fastmath=_MATH, inline="always")
def _rope(v, start, cos, sin, pos, out):
    # HF's rotate_half convention: the two halves of a head are the pair (x1, x2).
    half = cos.shape[1] // 2
    for d in range(half):
        a, b = v[start + d], v[start + d + half]
        out[d] = a * cos[pos, d] - b * sin[pos, d]
        out[d + half] = b * cos[pos, d + half] + a * sin[pos, d + half]


@njit(fastmath=_MATH, inline="always")
def _rows(c, rows, w, x, out):
    """out[i] = w[i] . x for chunk c's rows (``rows`` per chunk)."""
    for i in range(c * rows, min((c + 1) * rows, w.shape[0])):
        out[i] = _dot(w, i, x)


@njit(inline="always")
def _tiled_rows(c, rows, tiles, n, x, out, tmp):
    """out[i] = W[i] . x for chunk c's rows (``rows`` per chunk, a multiple of TILE) of a packed matrix W
    (n rows, x.shape[0] columns) whose tiles begin at address ``tiles``."""
    cols = x.shape[0]
    for b in range(c * rows // TILE, min(-(-n // TILE), (c + 1) * rows // TILE)):
        _tile_dot(tiles + b * cols * TILE * 4, x.ctypes.data, cols, tmp.ctypes.data)
        for k in range(min(TILE, n - b * TILE)):
            out[b * TILE + k] = tmp[k]


@njit(fastmath=_MATH, inline="always")
def _qkv_rows(c, wq, wk, wv, bias, h, out):
    nq, nk = wq.shape[0], wk.shape[0]
    for i in range(c * _ROWS, min((c + 1) * _ROWS, out.shape[0])):
        if i < nq:
            out[i] = _dot(wq, i, h) + bias[i]
        elif i < nq + nk:
            out[i] = _dot(wk, i - nq, h) + bias[i]
        else:
            out[i] = _dot(wv, i - nq - nk, h) + bias[i]


_ELEMENTWISE = {"contract", "nsz", "arcp"}  # no reassociation: keeps exp's two-part reduction exact


@njit(inline="always")
def _exp_parts(x):
    """exp(x) as e^r 2^k (Cephes' expf, |r| <= ln2 / 2): returns e^r and the float32 bits of 2^k. Written
    out so that it vectorizes (numba calls expf once per element); as accurate as torch's float32 exp.
    Callers compile it without reassociation, which keeps the two-part reduction of x exact."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)  # x = k ln2 + r
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0), (np.int32(k) + np.int32(127)) << np.int32(23)


@njit(fastmath=_ELEMENTWISE)  # not inlined, so that these flags (no reassociation) are the ones that apply
def _silu_mul(n, g, u, e, bits, out, lo):
    """out[lo + i] = silu(g[i]) u[i] for i < n, with :func:`_exp_parts` (tests/test_kernels.py): it
    vectorizes, where numba calls expf once per row (interleaved 128-token runs at the memory's faster
    level: 0.766 -> 0.776 of the ceiling in the steps, within noise; none at the slower level)."""
    for i in range(n):
        e[i], bits[i] = _exp_parts(-g[i])
    scale = bits.view(np.float32)
    for i in range(n):
        out[lo + i] = g[i] / (np.float32(1.0) + e[i] * scale[i]) * u[i]


@njit(fastmath=_ELEMENTWISE)
def _exp_shifted(n, v, top, e, bits):
    """v[i] = exp(v[i] - top) for i < n (:func:`_exp_parts`; ``e``, ``bits`` scratch of n or more)."""
    for i in range(n):
        e[i], bits[i] = _exp_parts(v[i] - top)
    scale = bits.view(np.float32)
    for i in range(n):
        v[i] = e[i] * scale[i]


@njit(fastmath=_MATH, inline="always")
def _gated_rows(c, wg, wu, tiles, h, out, buf, bits):
    """Chunk c of silu(gate) * up, from the packed tiles at ``tiles`` (gate's and up's tile c in turn) if
    nonzero, else from the rows of wg and wu (the gate rows, then the up rows: one stream at a time, see _dot)."""
    lo, hi = c * _ROWS, min((c + 1) * _ROWS, wg.shape[0])
    if tiles:  # _ROWS == TILE: one tile of each
        for part in range(2):
            _tile_dot(tiles + (2 * c + part) * h.shape[0] * TILE * 4, h.ctypes.data, h.shape[0], buf[part].ctypes.data)
    else:
        for i in range(lo, hi):
            buf[0, i - lo] = _dot(wg, i, h)
        for i in range(lo, hi):
            buf[1, i - lo] = _dot(wu, i, h)
    _silu_mul(hi - lo, buf[0], buf[1], buf[2], bits, out, lo)


@njit(inline="always")
def _ask_far(ahead, end):
    """Ask for the cache line at ``ahead`` into the outer caches unless it is ``end``; the next line's address."""
    if ahead < end:
        _prefetch_far(ahead)
        return ahead + 64
    return ahead


@njit(fastmath=_MATH)
def _attention_head(head, qkv, kc, vc, cos, sin, pos, scale, out, ahead, end):
    """One query head's attention output (hd,) over positions < pos in kc, vc (nkv, T, hd), and pos.

    Position pos's key and value are taken from ``qkv`` (this step's projections); :func:`_store_block`
    writes them into the cache after the step, so no thread reads a cache row another is writing.
    Meanwhile it asks for the cache lines from ``ahead`` on, up to ``end``, one per position in each
    loop (the o stage's weights: the attention reads little memory); returns where it stopped."""
    nkv, hd = kc.shape[0], kc.shape[2]
    nq = qkv.shape[0] - 2 * nkv * hd
    g = head // ((nq // hd) // nkv)
    # per head: allocating these once per step instead measured slower in whole runs (docs/generate.md)
    q, k, scores = np.empty(hd, np.float32), np.empty(hd, np.float32), np.empty(pos + 1, np.float32)
    e, bits = np.empty(pos + 1, np.float32), np.empty(pos + 1, np.int32)
    _rope(qkv, head * hd, cos, sin, pos, q)
    _rope(qkv, nq + g * hd, cos, sin, pos, k)
    v = qkv[nq + nkv * hd + g * hd : nq + nkv * hd + (g + 1) * hd]
    for t in range(pos):
        scores[t] = _dot(kc[g], t, q) * scale
        ahead = _ask_far(ahead, end)
    scores[pos] = np.float32(0.0)
    for d in range(hd):
        scores[pos] += k[d] * q[d] * scale
    # The softmax's exponentials vectorized (_exp_shifted), where numba calls expf per position: they were
    # most of the attention's time. Whole 128-token runs on the Zen 3 VM, paired against np.exp:
    # +0.024 +- 0.004 of the ceiling over 106 interleaved rounds, +0.015 +- 0.007 over 60 in another run.
    _exp_shifted(pos + 1, scores, scores.max(), e, bits)
    total = scores.sum()
    for d in range(hd):
        out[d] = scores[pos] * v[d]
    for t in range(pos):
        for d in range(hd):
            out[d] += scores[t] * vc[g, t, d]
        ahead = _ask_far(ahead, end)
    for d in range(hd):
        out[d] /= total
    return ahead


@njit(fastmath=_MATH)
def _worker(t, nt, w, tiles, dims, scratch, kc, vc, cos, sin, pos, scale, eps, counters, norm, head, out):
    """Thread t's part of one step: all layers, then the output layer into ``out`` (see _out_chunk). Each
    layer's matrices are read from their packed tiles where ``tiles`` (layers + 1, 4) has their addresses
    (nexttok.packed; the last row: the output layer's, in column 0), else from the model's rows."""
    hidden, nq, nk, inter = dims
    hd = kc.shape[3]
    xs, hs, qkv, att, o, act, d = scratch
    x, h = xs[t], hs[t]  # this thread's copy of the residual stream and of its normed input (hidden,)
    buf, bits = np.empty((3, _ROWS), np.float32), np.empty(_ROWS, np.int32)  # a chunk's gate, up, exp (_silu_mul)
    tmp = np.empty(TILE, np.float32)  # a tile's outputs (_tiled_rows)
    # chunks per stage: q/k/v rows, hidden rows (o, down), intermediate rows (gate/up), output rows
    n_qkv, n_hidden, n_inter = -(-(nq + 2 * nk) // _ROWS), -(-hidden // _ROWS), -(-inter // _ROWS)
    n_head = -(-head.shape[0] // _OUT_ROWS)
    for layer in range(w.shape[0]):
        a, p, stage = w[layer], tiles[layer], layer * _STAGES
        _rmsnorm(x, _matrix(a[_NORM1], 1, hidden)[0], eps, h)
        wq, wk, wv = _matrix(a[_WQ], nq, hidden), _matrix(a[_WK], nk, hidden), _matrix(a[_WV], nk, hidden)
        bias = _matrix(a[_BQKV], 1, nq + 2 * nk)[0]
        # where this thread's share of the o weights begins and ends, and of gate, down and the next layer's begins
        wo = p[_P_O] or a[_WO]
        o_at, o_end = _share(wo, t, nt, n_hidden, _ROWS * nq), _share(wo, t + 1, nt, n_hidden, _ROWS * nq)
        g_at = _share(p[_P_GATE_UP], t, nt, n_inter, 2 * _ROWS * hidden) if p[_P_GATE_UP] else _share(
            a[_WG], t, nt, n_inter, _ROWS * hidden)  # fmt: skip
        d_at = _share(p[_P_DOWN] or a[_WD], t, nt, n_hidden, _ROWS * inter)
        if layer + 1 < w.shape[0]:
            following = tiles[layer + 1, _P_QKV]
            next_at = _share(following, t, nt, n_qkv, _ROWS * hidden) if following else _qkv_share(
                w[layer + 1], dims, t, nt, n_qkv)  # fmt: skip
        elif tiles[-1, 0]:
            next_at = _share(tiles[-1, 0], t, nt, n_head, _OUT_ROWS * hidden)
        else:
            next_at = _share(head.ctypes.data, t, nt, n_head, _OUT_ROWS * hidden)
        for c in _chunks(counters, stage, t, nt, n_qkv, o_at, _AHEAD):
            if p[_P_QKV]:
                _tiled_rows(c, _ROWS, p[_P_QKV], nq + 2 * nk, h, qkv[layer], tmp)
                for i in range(c * _ROWS, min((c + 1) * _ROWS, nq + 2 * nk)):
                    qkv[layer, i] += bias[i]
            else:
                _qkv_rows(c, wq, wk, wv, bias, h, qkv[layer])
        # The attention asks for the rest of this thread's share of the o weights, past what q/k/v's end did,
        # into the outer caches (locality 3 measured no gain). Whole 128-token runs on the Zen 3 VM, paired:
        # +0.022 +- 0.005 of the ceiling over 163 interleaved rounds (two shorter runs: +0.034, -0.024).
        ahead = o_at + 64 * _AHEAD
        for c in _chunks(counters, stage + 1, t, nt, nq // hd, ahead, _AHEAD):
            head_out = att[layer, c * hd : (c + 1) * hd]
            ahead = _attention_head(c, qkv[layer], kc[layer], vc[layer], cos, sin, pos, scale, head_out, ahead, o_end)
        for c in _chunks(counters, stage + 2, t, nt, n_hidden, g_at, _AHEAD):
            _matvec(c, _ROWS, _matrix(a[_WO], hidden, nq), p[_P_O], att[layer], o[layer], tmp)
        bo = _matrix(a[_BO], 1, hidden)[0]
        for i in range(hidden):
            x[i] += o[layer, i] + bo[i]
        _rmsnorm(x, _matrix(a[_NORM2], 1, hidden)[0], eps, h)
        wg, wu = _matrix(a[_WG], inter, hidden), _matrix(a[_WU], inter, hidden)
        for c in _chunks(counters, stage + 3, t, nt, n_inter, d_at, _AHEAD):
            _gated_rows(c, wg, wu, p[_P_GATE_UP], h, act[layer], buf, bits)
        for c in _chunks(counters, stage + 4, t, nt, n_hidden, next_at, _AHEAD):
            _matvec(c, _ROWS, _matrix(a[_WD], hidden, inter), p[_P_DOWN], act[layer], d[layer], tmp)
        for i in range(hidden):
            x[i] += d[layer, i]
    _rmsnorm(x, norm, eps, h)
    for c in _chunks(counters, w.shape[0] * _STAGES, t, nt, n_head, 0, 0):
        _out_chunk(c, head, tiles[-1, 0], h, out, tmp)


@njit(fastmath=_MATH, inline="always")
def _matvec(c, rows, w, tiles, x, out, tmp):
    """out[i] = w[i] . x for chunk c's rows (``rows`` per chunk): from w's packed tiles at address ``tiles``
    if nonzero, else from its rows."""
    if tiles:
        _tiled_rows(c, rows, tiles, w.shape[0], x, out, tmp)
    else:
        _rows(c, rows, w, x, out)


@njit(inline="always")
def _share(address, t, nt, n, chunk_floats):
    """Address of thread t's share of a float32 matrix at ``address`` in ``n`` chunks of ``chunk_floats``."""
    return address + _first_chunk(t, nt, n) * chunk_floats * 4


@njit(inline="always")
def _qkv_share(a, dims, t, nt, n):
    """Address of thread t's share of a layer's q/k/v stage of ``n`` chunks (its rows: q's, then k's, then v's)."""
    hidden, nq, nk, _ = dims
    row = _first_chunk(t, nt, n) * _ROWS
    if row < nq:
        return a[_WQ] + row * hidden * 4
    if row < nq + nk:
        return a[_WK] + (row - nq) * hidden * 4
    return a[_WV] + (row - nq - nk) * hidden * 4


@njit(fastmath=_MATH, inline="always")
def _out_chunk(c, head, tiles, h, out, tmp):
    """Logits of chunk c's rows (from the packed tiles at ``tiles`` if nonzero, else from head's rows), and
    the chunk's statistics while they are in cache: its maximum m, the first index holding it, sum exp(l - m)
    and sum exp(l - m) (l - m) (the softmax's parts, :func:`_summarize`)."""
    logits, stats, argmax = out
    lo, hi = c * _OUT_ROWS, min((c + 1) * _OUT_ROWS, head.shape[0])
    _matvec(c, _OUT_ROWS, head, tiles, h, logits, tmp)
    best = lo
    for i in range(lo + 1, hi):
        if logits[i] > logits[best]:
            best = i
    m, total, weighted = logits[best], 0.0, 0.0
    for i in range(lo, hi):
        z = logits[i] - m  # <= 0
        e = np.exp(z)  # in float32 (2-3% faster per step than float64), summed in float64
        total += e
        weighted += e * z
    stats[c, 0], stats[c, 1], stats[c, 2], argmax[c] = m, total, weighted, best


@njit(parallel=_PRANGE_ONLY, cache=True)
def _step(nt, w, tiles, dims, scratch, kc, vc, cos, sin, pos, scale, eps, counters, norm, head, out):
    counters[:] = 0
    for t in prange(nt):  # one iteration per thread; see _chunks for why any number of threads works
        _worker(t, nt, w, tiles, dims, scratch, kc, vc, cos, sin, pos, scale, eps, counters, norm, head, out)
    qkv = scratch[2]  # (layers, nq + 2 nk): as a block of one position
    _store_block(qkv.reshape((qkv.shape[0], 1, qkv.shape[1])), kc, vc, cos, sin, pos, 1)


@njit(cache=True)
def _summarize(logits, stats, argmax, top):
    """(argmax, logsumexp, entropy, top ids, top logits) of ``logits`` from its chunks' statistics.

    The top ``top`` logits all lie in chunks whose maximum is at least the top-th largest chunk
    maximum, so only those chunks are scanned."""
    n = stats.shape[0]
    first = 0
    for c in range(1, n):
        if stats[c, 0] > stats[first, 0]:
            first = c
    m = stats[first, 0]
    z, weighted = 0.0, 0.0
    for c in range(n):  # rescale each chunk's sums from its maximum to the global one
        w = np.exp(stats[c, 0] - m)
        z += w * stats[c, 1]
        weighted += w * (stats[c, 2] + (stats[c, 0] - m) * stats[c, 1])
    entropy = np.log(z) - weighted / z  # -sum p log p, with log p = l - m - log z
    k = min(top, logits.shape[0])
    threshold = np.sort(stats[:, 0])[n - min(k, n)]
    ids, values = np.full(k, -1, np.int64), np.full(k, -np.inf)
    for c in range(n):
        if stats[c, 0] < threshold:
            continue
        for i in range(c * _OUT_ROWS, min((c + 1) * _OUT_ROWS, logits.shape[0])):
            if logits[i] > values[k - 1]:  # insert, keeping values in descending order
                j = k - 1
                while j > 0 and logits[i] > values[j - 1]:
                    ids[j], values[j] = ids[j - 1], values[j - 1]
                    j -= 1
                ids[j], values[j] = i, logits[i]
    return argmax[first], m + np.log(z), entropy, ids, values


_BLOCK = 32  # prompt positions per prefill call (a multiple of 4): bounds its buffers (~16 MB for SmolLM2-135M)


@njit(fastmath=_MATH, inline="always")
def _tile4(w, i, x, s, y, col):
    """y[s:s+4, col+i:col+i+4] = x[s:s+4] . w[i:i+4]: 16 dot products sharing each load of w and of x."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for k in range(w.shape[1]):
        w0, w1, w2, w3 = w[i, k], w[i + 1, k], w[i + 2, k], w[i + 3, k]
        x0, x1, x2, x3 = x[s, k], x[s + 1, k], x[s + 2, k], x[s + 3, k]
        # fmt: off
        a00 += x0 * w0; a01 += x0 * w1; a02 += x0 * w2; a03 += x0 * w3  # noqa: E702
        a10 += x1 * w0; a11 += x1 * w1; a12 += x1 * w2; a13 += x1 * w3  # noqa: E702
        a20 += x2 * w0; a21 += x2 * w1; a22 += x2 * w2; a23 += x2 * w3  # noqa: E702
        a30 += x3 * w0; a31 += x3 * w1; a32 += x3 * w2; a33 += x3 * w3  # noqa: E702
        # fmt: on
    y[s, col + i], y[s, col + i + 1], y[s, col + i + 2], y[s, col + i + 3] = a00, a01, a02, a03
    y[s + 1, col + i], y[s + 1, col + i + 1], y[s + 1, col + i + 2], y[s + 1, col + i + 3] = a10, a11, a12, a13
    y[s + 2, col + i], y[s + 2, col + i + 1], y[s + 2, col + i + 2], y[s + 2, col + i + 3] = a20, a21, a22, a23
    y[s + 3, col + i], y[s + 3, col + i + 1], y[s + 3, col + i + 2], y[s + 3, col + i + 3] = a30, a31, a32, a33


@njit(fastmath=_MATH, inline="always")
def _tile2(w, i, x, s, y, col):
    """y[s:s+4, col+i:col+i+2] = x[s:s+4] . w[i:i+2]: 8 dot products, whose sums and the two rows' vectors
    fit AVX2's 16 vector registers (_tile4's 16 sums do not: they spill)."""
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0.0)
    for k in range(w.shape[1]):
        w0, w1 = w[i, k], w[i + 1, k]
        x0, x1, x2, x3 = x[s, k], x[s + 1, k], x[s + 2, k], x[s + 3, k]
        # fmt: off
        a00 += x0 * w0; a01 += x0 * w1; a10 += x1 * w0; a11 += x1 * w1  # noqa: E702
        a20 += x2 * w0; a21 += x2 * w1; a30 += x3 * w0; a31 += x3 * w1  # noqa: E702
        # fmt: on
    y[s, col + i], y[s, col + i + 1], y[s + 1, col + i], y[s + 1, col + i + 1] = a00, a01, a10, a11
    y[s + 2, col + i], y[s + 2, col + i + 1], y[s + 3, col + i], y[s + 3, col + i + 1] = a20, a21, a30, a31


# The prefill's tile of weight rows x 4 positions: 4 rows where AVX-512's 32 vector registers hold its 16 sums.
_TILE_ROWS, _tile = (4, _tile4) if _WIDE else (2, _tile2)
# Weight rows ahead whose cache lines the prefill asks for (llvm.prefetch), spread over a tile's passes:
# its arithmetic otherwise leaves the memory idle between one tile's rows and the next's (the hardware's
# prefetch follows the loads, and a tile's rows are loaded from memory only in its first pass). On the Zen
# 3 VM (2 x 4 tiles), a 32-token prefill, medians of 40 interleaved rounds, six runs: 83-98 -> 72-91 ms
# 4 rows ahead (7-17 ms less in each; 6 rows: 80, 8: 81 against 74; all lines at once before the tile:
# 91-93 against 82-93, slower). Not measured with AVX-512's 4 x 4 tiles: there it stays off.
_TILE_AHEAD = 0 if _WIDE else 4


@njit(fastmath=_MATH, inline="always")
def _row8(w, i, x, s, y, col):
    """y[s:s+8, col+i] = x[s:s+8] . w[i]: one weight row against 8 rows of x (one stream of weights: _gemm)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for k in range(w.shape[1]):
        v = w[i, k]
        # fmt: off
        a0 += x[s, k] * v; a1 += x[s + 1, k] * v; a2 += x[s + 2, k] * v; a3 += x[s + 3, k] * v  # noqa: E702
        a4 += x[s + 4, k] * v; a5 += x[s + 5, k] * v; a6 += x[s + 6, k] * v; a7 += x[s + 7, k] * v  # noqa: E702
        # fmt: on
    y[s, col + i], y[s + 1, col + i], y[s + 2, col + i], y[s + 3, col + i] = a0, a1, a2, a3
    y[s + 4, col + i], y[s + 5, col + i], y[s + 6, col + i], y[s + 7, col + i] = a4, a5, a6, a7


@njit(fastmath=_MATH, inline="always")
def _row4(w, i, x, s, y, col):
    """y[s:s+4, col+i] = x[s:s+4] . w[i]."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(w.shape[1]):
        v = w[i, k]
        a0 += x[s, k] * v
        a1 += x[s + 1, k] * v
        a2 += x[s + 2, k] * v
        a3 += x[s + 3, k] * v
    y[s, col + i], y[s + 1, col + i], y[s + 2, col + i], y[s + 3, col + i] = a0, a1, a2, a3


@njit(fastmath=_MATH)  # not inlined: compiled once for its callers (inlined, the prefill compiled 2.5x longer)
def _gemm(p, lo, hi, w, x, y, col, stream):
    """y[:p, col+lo:col+hi] = x[:p] @ w[lo:hi].T, for x (P, in) and p <= P a multiple of 4.

    With ``stream`` (the step of up to 8 samples: few rows, weights from memory), one weight row at a time meets
    8 (or 4) rows of x: on the Zen 3 VM, streaming a 1 GiB matrix against 8 rows with 2 threads, 19-20
    GB/s where _tile's 2 interleaved weight rows read 14-16 (software prefetch made both slower). Else
    (a prompt's block: bound by arithmetic) :data:`_tile`, which computes faster on data in cache."""
    if stream:
        for i in range(lo, hi):
            for s in range(0, p - 4, 8):
                _row8(w, i, x, s, y, col)
            if p % 8:
                _row4(w, i, x, p - 4, y, col)
        return
    top = lo + (hi - lo) // _TILE_ROWS * _TILE_ROWS
    lines = _TILE_ROWS * w.shape[1] // 16  # cache lines of a tile's weight rows
    per = -(-lines // (p // 4))  # of the rows _TILE_AHEAD ahead, asked for before each group of 4 positions
    for i in range(lo, top, _TILE_ROWS):  # the tile's weight rows stay in L1 while every 4 positions of x pass by
        ahead = w.ctypes.data + (i + _TILE_AHEAD) * w.shape[1] * 4
        for s in range(0, p, 4):
            if _TILE_AHEAD:
                first = s // 4 * per
                for line in range(first, min(first + per, lines)):
                    _prefetch(ahead + 64 * line)
            _tile(w, i, x, s, y, col)
    for i in range(top, hi):
        for s in range(p):
            y[s, col + i] = _dot(w, i, x[s])


@njit(fastmath=_MATH, inline="always")
def _qkv_block(p, c, wq, wk, wv, bias, h, out, stream):
    """Chunk c of the q, then k, then v rows (chunks do not straddle them), for the first p positions of h."""
    nq, nk = wq.shape[0], wk.shape[0]
    cq, ck = -(-nq // _ROWS), -(-nk // _ROWS)
    w, col, c = (wq, 0, c) if c < cq else (wk, nq, c - cq) if c < cq + ck else (wv, nq + nk, c - cq - ck)
    lo, hi = c * _ROWS, min((c + 1) * _ROWS, w.shape[0])
    _gemm(p, lo, hi, w, h, out, col, stream)
    for s in range(p):
        for i in range(col + lo, col + hi):
            out[s, i] += bias[i]


@njit(fastmath=_MATH)
def _attention_block(head, n, qkv, kc, vc, cos, sin, start, scale, out, kb, scores):
    """One query head's attention output out[s] (hd,) for the block's positions start + s, s < n: over the
    cache's positions < start in kc, vc (nkv, T, hd) and the block's own positions up to s (from ``qkv``
    (P, nq + 2 nk); :func:`_store_block` writes them into the cache after the block)."""
    nkv, hd = kc.shape[0], kc.shape[2]
    nq = qkv.shape[1] - 2 * nkv * hd
    g = head // ((nq // hd) // nkv)
    vo = nq + (nkv + g) * hd  # the group's value columns
    q, e, bits = np.empty(hd, np.float32), np.empty(scores.shape[0], np.float32), np.empty(scores.shape[0], np.int32)
    for j in range(n):
        _rope(qkv[j], nq + g * hd, cos, sin, start + j, kb[j])
    for s in range(n):
        _rope(qkv[s], head * hd, cos, sin, start + s, q)
        for t in range(start):
            scores[t] = _dot(kc[g], t, q) * scale
        for j in range(s + 1):
            scores[start + j] = _dot(kb, j, q) * scale
        m = start + s + 1
        _exp_shifted(m, scores, scores[:m].max(), e, bits)
        total = scores[:m].sum()
        o = out[s, head * hd : (head + 1) * hd]
        o[:] = 0.0
        for t in range(start):
            for d in range(hd):
                o[d] += scores[t] * vc[g, t, d]
        for j in range(s + 1):
            for d in range(hd):
                o[d] += scores[start + j] * qkv[j, vo + d]
        for d in range(hd):
            o[d] /= total


@njit(fastmath=_MATH)
def _block_qkv(t, nt, blk, layer, w, dims, x, h, qkv, eps, counters, stream):
    """A layer's first stage over a block of ``blk`` rows (a prompt's positions, or samples): the norm into h,
    then q/k/v into qkv (blk, nq + 2 nk)."""
    hidden, nq, nk, _ = dims
    a = w[layer]
    for s in range(blk):
        _rmsnorm(x[s], _matrix(a[_NORM1], 1, hidden)[0], eps, h[s])
    wq, wk, wv = _matrix(a[_WQ], nq, hidden), _matrix(a[_WK], nk, hidden), _matrix(a[_WV], nk, hidden)
    bias = _matrix(a[_BQKV], 1, nq + 2 * nk)[0]
    for c in _chunks(counters, layer * _STAGES, t, nt, -(-nq // _ROWS) + 2 * -(-nk // _ROWS), 0, 0):
        _qkv_block(blk, c, wq, wk, wv, bias, h, qkv, stream)


@njit(fastmath=_MATH)
def _block_mlp(t, nt, blk, layer, w, dims, x, h, att, o, act, d, eps, counters, stream):
    """A layer's stages after the attention over a block of ``blk`` rows: o and the residual, the norm,
    gate/up, down and the residual (x and h are this thread's (P, hidden), the rest this layer's buffers)."""
    hidden, nq, _, inter = dims
    a, stage = w[layer], layer * _STAGES
    gu, e, bits = np.empty((2, blk, _ROWS), np.float32), np.empty(_ROWS, np.float32), np.empty(_ROWS, np.int32)
    for c in _chunks(counters, stage + 2, t, nt, -(-hidden // _ROWS), 0, 0):
        _gemm(blk, c * _ROWS, min((c + 1) * _ROWS, hidden), _matrix(a[_WO], hidden, nq), att, o, 0, stream)
    bo = _matrix(a[_BO], 1, hidden)[0]
    for s in range(blk):
        for i in range(hidden):
            x[s, i] += o[s, i] + bo[i]
        _rmsnorm(x[s], _matrix(a[_NORM2], 1, hidden)[0], eps, h[s])
    wg, wu = _matrix(a[_WG], inter, hidden), _matrix(a[_WU], inter, hidden)
    for c in _chunks(counters, stage + 3, t, nt, -(-inter // _ROWS), 0, 0):
        lo, hi = c * _ROWS, min((c + 1) * _ROWS, inter)
        _gemm(blk, lo, hi, wg, h, gu[0], -lo, stream)
        _gemm(blk, lo, hi, wu, h, gu[1], -lo, stream)
        for s in range(blk):
            _silu_mul(hi - lo, gu[0, s], gu[1, s], e, bits, act[s], lo)
    for c in _chunks(counters, stage + 4, t, nt, -(-hidden // _ROWS), 0, 0):
        _gemm(blk, c * _ROWS, min((c + 1) * _ROWS, hidden), _matrix(a[_WD], hidden, inter), act, d, 0, stream)
    for s in range(blk):
        for i in range(hidden):
            x[s, i] += d[s, i]


@njit(fastmath=_MATH)
def _prefill_worker(t, nt, n, w, dims, scratch, kc, vc, cos, sin, start, scale, eps, counters, norm, head, out):
    """Thread t's part of a block of n prompt positions (the step's stages, each over all the block's
    positions, rounded up to a multiple of 4: _worker's comments apply), then the output layer for
    the last position."""
    hidden, nq = dims[0], dims[1]
    hd = kc.shape[3]
    xs, hs, qkv, att, o, act, d = scratch
    x, h = xs[t], hs[t]  # this thread's copy of the block's residual stream and its normed input (P, hidden)
    blk = (n + 3) // 4 * 4  # positions computed: whole tiles of 4 (those past n stay finite, unread)
    kb, scores = np.empty((blk, hd), np.float32), np.empty(start + blk, np.float32)
    for layer in range(w.shape[0]):
        _block_qkv(t, nt, blk, layer, w, dims, x, h, qkv[layer], eps, counters, False)
        for c in _chunks(counters, layer * _STAGES + 1, t, nt, nq // hd, 0, 0):
            _attention_block(c, n, qkv[layer], kc[layer], vc[layer], cos, sin, start, scale, att[layer], kb, scores)
        _block_mlp(t, nt, blk, layer, w, dims, x, h, att[layer], o[layer], act[layer], d[layer], eps, counters, False)
    last, tmp = np.empty(hidden, np.float32), np.empty(TILE, np.float32)
    _rmsnorm(x[n - 1], norm, eps, last)
    for c in _chunks(counters, w.shape[0] * _STAGES, t, nt, -(-head.shape[0] // _OUT_ROWS), 0, 0):
        _out_chunk(c, head, 0, last, out, tmp)  # the model's rows: the packed copy is the step's


@njit(fastmath=_MATH)
def _store_block(qkv, kc, vc, cos, sin, start, n):
    """The block's keys (rotated) and values at positions start..start+n-1 of every layer into kc, vc."""
    nkv, hd = kc.shape[1], kc.shape[3]
    nq = qkv.shape[2] - 2 * nkv * hd
    for layer in range(qkv.shape[0]):
        for g in range(nkv):
            for j in range(n):
                _rope(qkv[layer, j], nq + g * hd, cos, sin, start + j, kc[layer, g, start + j])
                vc[layer, g, start + j, :] = qkv[layer, j, nq + (nkv + g) * hd : nq + (nkv + g + 1) * hd]


@njit(parallel=_PRANGE_ONLY, cache=True)
def _prefill(nt, n, w, dims, scratch, kc, vc, cos, sin, start, scale, eps, counters, norm, head, out):
    counters[:] = 0
    for t in prange(nt):  # as _step
        _prefill_worker(t, nt, n, w, dims, scratch, kc, vc, cos, sin, start, scale, eps, counters, norm, head, out)
    _store_block(scratch[2], kc, vc, cos, sin, start, n)


@njit(fastmath=_MATH)
def _samples_worker(t, nt, n, w, dims, scratch, kc, vc, cos, sin, pos, scale, eps, counters, norm, head, logits):
    """Thread t's part of one step of n samples at position ``pos``: the prefill's stages over the n rows
    (rounded up to a multiple of 4), each row attending over its own keys and values kc[:, s], vc[:, s]
    (layers, n, nkv, T, hd), then the output layer for every row into ``logits`` (P, V)."""
    nq = dims[1]
    hd = kc.shape[4]
    heads = nq // hd
    xs, hs, qkv, att, o, act, d = scratch
    x, h = xs[t], hs[t]  # this thread's copy of the rows' residual stream and their normed input (P, hidden)
    blk = (n + 3) // 4 * 4
    # One weight row against the rows streams faster up to 8 rows; from 16 rows the tiles compute faster
    # (a 1 GiB matrix, 2 threads, Zen 3 VM: 8 rows 19-20 GB/s against 17-18, 16 rows 71 GFLOP/s against 103).
    stream = blk <= 8
    kb, scores = np.empty((1, hd), np.float32), np.empty(pos + 1, np.float32)
    for layer in range(w.shape[0]):
        _block_qkv(t, nt, blk, layer, w, dims, x, h, qkv[layer], eps, counters, stream)
        for c in _chunks(counters, layer * _STAGES + 1, t, nt, n * heads, 0, 0):
            s = c // heads  # each (sample, head) pair is one chunk: the sample's one position, over its own cache
            q, out = qkv[layer, s : s + 1], att[layer, s : s + 1]
            _attention_block(c % heads, 1, q, kc[layer, s], vc[layer, s], cos, sin, pos, scale, out, kb, scores)
        _block_mlp(t, nt, blk, layer, w, dims, x, h, att[layer], o[layer], act[layer], d[layer], eps, counters, stream)
    for s in range(blk):
        _rmsnorm(x[s], norm, eps, h[s])
    for c in _chunks(counters, w.shape[0] * _STAGES, t, nt, -(-head.shape[0] // _OUT_ROWS), 0, 0):
        _gemm(blk, c * _OUT_ROWS, min((c + 1) * _OUT_ROWS, head.shape[0]), head, h, logits, 0, stream)


@njit(parallel=_PRANGE_ONLY, cache=True)
def _samples(nt, n, w, dims, scratch, kc, vc, cos, sin, pos, scale, eps, counters, norm, head, logits):
    counters[:] = 0
    for t in prange(nt):  # as _step
        _samples_worker(t, nt, n, w, dims, scratch, kc, vc, cos, sin, pos, scale, eps, counters, norm, head, logits)
    for s in range(n):
        _store_block(scratch[2][:, s : s + 1], kc[:, s], vc[:, s], cos, sin, pos, 1)


def compiled_on_disk(samples: bool = False) -> bool:
    """Whether numba's on-disk cache holds the compiled step and prefill, and with ``samples`` the step of N
    samples (else their first calls compile them: ~50 s for one sample and ~20 s more for N samples on the
    2-core Zen 3 VM, once after install). A process that never runs N samples never compiles theirs."""
    functions = (_step, _prefill, _summarize) + ((_samples,) if samples else ())
    try:
        return all(os.path.exists(f._cache._cache_file._index_path) for f in functions)
    except AttributeError:  # numba's cache internals moved: say nothing rather than guess
        return True


class Summary(NamedTuple):
    """A step's logits in brief, computed by the kernel while they were in cache."""

    argmax: int  # the first index of the highest logit (as torch.argmax)
    logsumexp: float  # log of softmax's denominator: log p(i) = logits[i] - logsumexp
    entropy: float  # of softmax(logits), in nats
    top_ids: np.ndarray  # (top,) the highest logits' ids, highest first
    top_logits: np.ndarray  # (top,) their logits


def unsupported(model: torch.nn.Module) -> str | None:
    """Why :class:`DecodeKernel` cannot run ``model`` (None when it can)."""
    cfg = model.config
    if type(model).__name__ not in _ARCHITECTURES:
        return f"architecture {type(model).__name__}"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"{model.device.type} {model.dtype}"
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "mlp_bias", False):
        return "MLP other than SiLU-gated without bias"
    if getattr(model.model.rotary_emb, "rope_type", "default") in ("dynamic", "longrope"):
        return "RoPE that depends on the sequence length"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []) or (
        getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    ):
        return "sliding-window attention"
    projections = [
        getattr(module, name)
        for layer in model.model.layers
        for module, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, _MLP))
        for name in names
    ]
    if any(type(p) is not torch.nn.Linear for p in projections):
        return "projections other than plain nn.Linear (an adapter?)"
    return None


def _array(t: torch.Tensor | None, size: int = 0) -> np.ndarray:
    if t is None:
        return np.zeros(size, dtype=np.float32)
    return np.ascontiguousarray(t.detach().numpy())  # a view of a contiguous weight (the usual case), not a copy


def _rope_tables(model: torch.nn.Module, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE's cos and sin (T, hd) for ``capacity`` positions, from the model's own rotary module (so every
    RoPE scaling it supports)."""
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(capacity)[None])  # (1, T, hd)
    return cos[0].numpy().copy(), sin[0].numpy().copy()


def _grown(cache: np.ndarray, length: int, capacity: int) -> np.ndarray:
    """A copy of keys or values ``cache`` (..., T, hd) with room for ``capacity`` positions, keeping the first
    ``length`` (the rest zeros)."""
    grown = np.zeros((*cache.shape[:-2], capacity, cache.shape[-1]), np.float32)
    grown[..., :length, :] = cache[..., :length, :]
    return grown


class DecodeKernel:
    """Runs one sample's decode steps of a Llama-family HF ``model`` (see :func:`unsupported`).

    :meth:`prefill` reads a prompt (or :meth:`load_cache` takes an HF prefill's keys and values), then
    :meth:`step` feeds one token at a time (or :meth:`greedy` several), or :meth:`samples` continues
    as N samples; the keys and values of ``capacity`` positions are preallocated, doubled when full.
    """

    # Longest prompt the engine prefills here. Longer ones are faster through the HF model (its GEMMs
    # gain from more rows, and it reads the weights once; the kernel once per block). Default model,
    # 2 threads, kernel against HF, on the Zen 4 VM (AVX-512): 8 tokens 41 against 81 ms, 32: 79 against
    # 120, 48: 118 against 128, 64: 165 against 155, 96: 239 against 207. On the Zen 3 VM (AVX2, with
    # _TILE_AHEAD), medians of 8: 32: 88 against 144, 48: 125 / 177, 64: 162 / 199, 80: 213 / 226,
    # 96: 247 / 265, 128: 337 / 314.
    PREFILL_MAX = 48 if _WIDE else 96

    def __init__(self, model: torch.nn.Module, capacity: int = 256, weights: WeightCache | None = None):
        m = model.model
        self.model, self.length, self.weights = model, 0, weights
        self.eps = np.float32(model.config.rms_norm_eps)
        self.rebind()
        attn = m.layers[0].self_attn
        self.hd, self.nkv = attn.head_dim, model.config.num_key_value_heads
        self.scale = np.float32(attn.scaling)
        hidden, nq, inter = self.embed.shape[1], attn.q_proj.weight.shape[0], m.layers[0].mlp.gate_proj.weight.shape[0]
        nk, n = self.nkv * self.hd, len(self.layers)
        self.dims = (hidden, nq, nk, inter)
        threads = numba.config.NUMBA_NUM_THREADS
        # Per thread: residual stream, normed input. Per layer (no buffer is reused within a step, so a
        # thread running ahead never overwrites what a slower one has yet to read): q/k/v, attention,
        # o, gate*up, down.
        self.scratch = (np.empty((threads, hidden), np.float32), np.empty((threads, hidden), np.float32))
        self.scratch += tuple(np.empty((n, size), np.float32) for size in (nq + 2 * nk, nq, hidden, inter, hidden))
        chunks = -(-self.head.shape[0] // _OUT_ROWS)
        self._out = (None, np.empty((chunks, 3), np.float64), np.empty(chunks, np.int64))  # logits, _out_chunk's
        self.counters = np.zeros((_STAGES * n + 1) * (threads + 1) * _PAD, np.int64)
        self._allocate(capacity)
        self._blocks = None  # the prefill's buffers (like scratch, for _BLOCK positions), made on its first call

    def rebind(self) -> None:
        """Read the model's weight arrays (again: after their storage moved, e.g. onto huge pages)."""
        m = self.model.model
        self.layers = [self._layer_arrays(layer) for layer in m.layers]  # also keeps the arrays alive
        # (layers, 11) addresses of each layer's arrays, in the order of the _NORM1.._WD columns
        self.addresses = np.array([[a.ctypes.data for a in arrays] for arrays in self.layers], dtype=np.int64)
        self.norm, self.head = _array(m.norm.weight), _array(self.model.lm_head.weight)
        self.embed = _array(m.embed_tokens.weight)
        # The packed copy's addresses (layers + 1, 4), if the weight cache has a current one (else zeros: the rows).
        self.packed = self.weights.packed() if self.weights is not None else None  # also keeps its arena alive
        self.tiles = np.zeros((len(self.layers) + 1, 4), np.int64)
        if self.packed is not None:
            self.tiles[:-1], self.tiles[-1, 0] = self.packed.layers, self.packed.head

    @staticmethod
    def _layer_arrays(layer) -> tuple:
        """The layer's arrays in the order of the address table's columns (_NORM1 .. _WD)."""
        a, f = layer.self_attn, layer.mlp
        qkv_bias = np.concatenate([_array(p.bias, p.weight.shape[0]) for p in (a.q_proj, a.k_proj, a.v_proj)])
        o_bias = _array(a.o_proj.bias, a.o_proj.weight.shape[0])
        before = (layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj)
        after = (layer.post_attention_layernorm, f.gate_proj, f.up_proj, f.down_proj)
        return (
            *(_array(m.weight) for m in before), qkv_bias, _array(a.o_proj.weight), o_bias,
            *(_array(m.weight) for m in after),
        )  # fmt: skip

    def _reserve(self, positions: int) -> None:
        """Room for ``positions`` keys and values: the capacity doubles (at least) when they do not fit."""
        if positions > self.kc.shape[2]:
            self._allocate(max(positions, 2 * self.kc.shape[2]))

    def _allocate(self, capacity: int) -> None:
        """Key/value arrays (layers, nkv, capacity, hd) and RoPE tables for ``capacity`` positions."""
        if hasattr(self, "kc"):  # growing: keep the positions written so far
            self.kc, self.vc = _grown(self.kc, self.length, capacity), _grown(self.vc, self.length, capacity)
        else:
            shape = (len(self.layers), self.nkv, capacity, self.hd)
            self.kc, self.vc = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.cos, self.sin = _rope_tables(self.model, capacity)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed the prompt ``ids`` at the next positions, _BLOCK at a time (each block reads the weights
        once, for all its positions); the next-token logits after the last, shape (1, V)."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        for lo in range(0, len(ids), _BLOCK):
            logits = self._run_block(ids[lo : lo + _BLOCK])
        return torch.from_numpy(logits)[None]

    def load_cache(self, cache, length: int) -> None:
        """Continue after a prefill the HF model ran: the first ``length`` keys and values of its
        ``cache`` (one row) become this kernel's, and the next step is at position ``length``."""
        self._reserve(length)
        for i, layer in enumerate(cache.layers):  # (1, nkv, T, hd) each
            self.kc[i, :, :length] = layer.keys[0, :, :length].numpy()
            self.vc[i, :, :length] = layer.values[0, :, :length].numpy()
        self.length = length

    def _run_block(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        self._reserve(self.length + n)
        if self._blocks is None:
            self._blocks = self._block_buffers(_BLOCK)
        self._blocks[0][:, :n] = self.embed[ids]  # each thread's copy of the residual stream
        self._blocks[0][:, n:] = 0.0
        logits = np.empty(self.head.shape[0], np.float32)
        self._out = (logits, *self._out[1:])
        _prefill(self._threads(), n, self.addresses, self.dims, self._blocks, self.kc, self.vc, self.cos, self.sin,
                 self.length, self.scale, self.eps, self.counters, self.norm, self.head, self._out)  # fmt: skip
        self.length += n
        return logits

    def _block_buffers(self, rows: int) -> tuple:
        """Buffers for a block of ``rows`` rows (the prefill's positions, or samples): per thread, the rows'
        residual stream and normed input (threads, rows, hidden); per layer (as ``scratch``), q/k/v,
        attention, o, gate*up, down (layers, rows, size), zeros: rows past those fed stay finite."""
        hidden, nq, nk, inter = self.dims
        per_thread = (numba.config.NUMBA_NUM_THREADS, rows, hidden)
        per_layer = (nq + 2 * nk, nq, hidden, inter, hidden)
        buffers = (np.empty(per_thread, np.float32), np.empty(per_thread, np.float32))
        return buffers + tuple(np.zeros((len(self.layers), rows, size), np.float32) for size in per_layer)

    def samples(self, n: int) -> SamplesKernel:
        """Continue as ``n`` samples of what was read so far (:class:`SamplesKernel`)."""
        return SamplesKernel(self, n)

    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the next position; the next-token logits, shape (1, V)."""
        return torch.from_numpy(self._run(token))[None]

    def greedy(self, token: int, n: int, top: int, stop: Container[int] = ()) -> list[Summary]:
        """Up to ``n`` greedy steps in a row: feed ``token``, then each step's argmax, ending after a step
        whose argmax is in ``stop``; each step's :class:`Summary` (with the ``top`` highest logits).

        Why: a step streams the weights through every cache, so the Python that runs between two steps
        (building a token's record) finds its own code and data evicted and takes ~0.5 ms instead of
        ~0.07; here only this short loop runs between steps, and the records are built after, warm."""
        summaries, threads = [], self._threads()
        logits = np.empty(self.head.shape[0], np.float32)  # one buffer for all n: no step's logits are kept
        for _ in range(n):
            self._run(token, threads, logits)
            summaries.append(self.summary(top))
            token = summaries[-1].argmax
            if token in stop:
                break
        return summaries

    @staticmethod
    def _threads() -> int:
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(threads)
        return threads

    def _run(self, token: int, threads: int = 0, logits: np.ndarray | None = None) -> np.ndarray:
        """One step into ``logits`` (by default a fresh array: callers may keep it). Right after a step the
        caches hold weights, not this code's data: a fresh 196 KB array and numba.set_num_threads cost
        ~30-70 us each then, so greedy's run-ahead passes both in."""
        self._reserve(self.length + 1)
        threads = threads or self._threads()
        self.scratch[0][:] = self.embed[token]  # each thread's copy of the residual stream
        logits = np.empty(self.head.shape[0], np.float32) if logits is None else logits
        self._out = (logits, *self._out[1:])
        _step(threads, self.addresses, self.tiles, self.dims, self.scratch, self.kc, self.vc, self.cos, self.sin,
              self.length, self.scale, self.eps, self.counters, self.norm, self.head, self._out)  # fmt: skip
        self.length += 1
        return logits

    def summary(self, top: int) -> Summary | None:
        """The last step's :class:`Summary`, with the ``top`` highest logits; None before the first step."""
        return None if self._out[0] is None else Summary(*_summarize(*self._out, top))


class SamplesKernel:
    """The decode steps of N samples of one prompt, after a :class:`DecodeKernel` read the prompt.

    Each :meth:`step` feeds one token per sample, all N in one compiled call: the prefill's stages over
    the N rows, each weight row read once per step for all of them (:func:`_gemm`'s ``stream``), and
    each sample attending over its own copy of the prompt's keys and values and its own tokens' since.
    """

    def __init__(self, kernel: DecodeKernel, n: int):
        self.kernel, self.n, self.length = kernel, n, kernel.length
        self.scratch = kernel._block_buffers(-(-n // 4) * 4)  # rows computed: whole tiles of 4
        # (layers, n, nkv, T, hd): every sample's copy of the prompt's keys and values
        self.kc = np.repeat(kernel.kc[:, None], n, axis=1)
        self.vc = np.repeat(kernel.vc[:, None], n, axis=1)
        self.cos, self.sin = kernel.cos, kernel.sin

    def _reserve(self, positions: int) -> None:
        """As DecodeKernel._reserve, for every sample's keys and values."""
        if positions > self.kc.shape[3]:
            capacity = max(positions, 2 * self.kc.shape[3])
            self.kc, self.vc = _grown(self.kc, self.length, capacity), _grown(self.vc, self.length, capacity)
            self.cos, self.sin = _rope_tables(self.kernel.model, capacity)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to sample i at the next position; the next-token logits, shape (N, V)."""
        if len(tokens) != self.n:
            raise ValueError(f"{len(tokens)} tokens for {self.n} samples")
        k = self.kernel
        self._reserve(self.length + 1)
        self.scratch[0][:, : self.n] = k.embed[tokens]  # each thread's copy of the rows' residual stream
        self.scratch[0][:, self.n :] = 0.0  # the padding rows: from zero each step, so they stay small
        logits = np.empty((self.scratch[0].shape[1], k.head.shape[0]), np.float32)  # (P, V), fresh: callers keep it
        _samples(k._threads(), self.n, k.addresses, k.dims, self.scratch, self.kc, self.vc, self.cos, self.sin,
                 self.length, k.scale, k.eps, k.counters, k.norm, k.head, logits)  # fmt: skip
        self.length += 1
        return torch.from_numpy(logits[: self.n])
