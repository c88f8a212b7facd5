"""The arithmetic the block walk is composed of: dot products (row by row, packed tiles, GEMM tiles), RMS
norm, RoPE, a vectorized exp, SiLU-gated products. Model-agnostic: arrays in, arrays out."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm
from numba import njit

from nexttok.cpu.intrinsics import prefetch, prefetch_far, tile_dot, tile_rows4, tile_rows8
from nexttok.cpu.packed import TILE

# Reassociation lets LLVM vectorize the dot products; no-NaN/no-inf assumptions are left out.
MATH = {"reassoc", "contract", "nsz", "arcp"}

ROWS = 32  # rows per chunk: 74-197 KB of weights for this model's matrices (16 and 64 measured slower)

OUT_ROWS = 128  # rows per chunk of the output layer (its statistics are per chunk: walk.out_chunk)

SPAN = 64  # floats per block of dot_paced: each block's sum is reduced to a scalar before the next starts


def wide_vectors() -> bool:
    """Whether numba compiles for AVX-512 here (numba's NUMBA_CPU_FEATURES if set, else this CPU's)."""
    features = numba.config.CPU_FEATURES
    if features is not None:
        return "+avx512f" in features.split(",")
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


WIDE = wide_vectors()  # picks dot and tile


@njit(fastmath=MATH, inline="always")
def dot_paced(w, i, x):
    """w[i] . x, in blocks of SPAN floats, each vectorized (4 AVX-512 FMAs) and reduced in turn.

    Why blocks (on AVX-512 CPUs, :data:`dot`): it computes slower than the plain loop but streams from
    memory faster on the AVX-512 VM measured (docs/internals/cpu-decoder.md); blocks of 32 or 96 floats
    compiled to gathers, so 64 it is."""
    n = w.shape[1]
    top = n - n % SPAN
    acc = np.float32(0.0)
    for b in range(0, top, SPAN):
        for j in range(b, b + SPAN):
            acc += w[i, j] * x[j]
    for j in range(top, n):
        acc += w[i, j] * x[j]
    return acc


@njit(fastmath=MATH, inline="always")
def dot_plain(w, i, x):
    """w[i] . x in one vectorized loop (LLVM keeps several vector accumulators over the whole row)."""
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += w[i, j] * x[j]
    return acc


# The dot product every stage streams its weight rows through: the paced loop on AVX-512 CPUs only (with
# AVX2's 16 vector registers its per-block reductions make it compute-bound; docs/internals/cpu-decoder.md).
# numba caches compiled code per CPU name and features, so a cache never crosses this choice.
dot = dot_paced if WIDE else dot_plain


@njit(fastmath=MATH, inline="always")
def rmsnorm(x, weight, eps, out):
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    r = np.float32(1.0) / np.sqrt(ss / x.shape[0] + eps)
    for j in range(x.shape[0]):
        out[j] = weight[j] * (x[j] * r)


@njit(fastmath=MATH, inline="always")
def rope(v, start, cos, sin, pos, out):
    # HF's rotate_half convention: the two halves of a head are the pair (x1, x2).
    half = cos.shape[1] // 2
    for d in range(half):
        a, b = v[start + d], v[start + d + half]
        out[d] = a * cos[pos, d] - b * sin[pos, d]
        out[d + half] = b * cos[pos, d + half] + a * sin[pos, d + half]


@njit(fastmath=MATH, inline="always")
def row_dots(c, rows, w, x, out):
    """out[i] = w[i] . x for chunk c's rows (``rows`` per chunk)."""
    for i in range(c * rows, min((c + 1) * rows, w.shape[0])):
        out[i] = dot(w, i, x)


@njit(inline="always")
def tiled_rows(c, rows, tiles, n, x, out, tmp):
    """out[i] = W[i] . x for chunk c's rows (``rows`` per chunk, a multiple of TILE) of a packed matrix W
    (n rows, x.shape[0] columns) whose tiles begin at address ``tiles``."""
    cols = x.shape[0]
    for b in range(c * rows // TILE, min(-(-n // TILE), (c + 1) * rows // TILE)):
        tile_dot(tiles + b * cols * TILE * 4, x.ctypes.data, cols, tmp.ctypes.data)
        for k in range(min(TILE, n - b * TILE)):
            out[b * TILE + k] = tmp[k]


@njit(fastmath=MATH, inline="always")
def matvec(c, rows, w, tiles, x, out, tmp):
    """out[i] = w[i] . x for chunk c's rows (``rows`` per chunk): from w's packed tiles at address ``tiles``
    if nonzero, else from its rows."""
    if tiles:
        tiled_rows(c, rows, tiles, w.shape[0], x, out, tmp)
    else:
        row_dots(c, rows, w, x, out)


@njit(fastmath=MATH, inline="always")
def qkv_rows(c, wq, wk, wv, bias, h, out):
    nq, nk = wq.shape[0], wk.shape[0]
    for i in range(c * ROWS, min((c + 1) * ROWS, out.shape[0])):
        if i < nq:
            out[i] = dot(wq, i, h) + bias[i]
        elif i < nq + nk:
            out[i] = dot(wk, i - nq, h) + bias[i]
        else:
            out[i] = dot(wv, i - nq - nk, h) + bias[i]


ELEMENTWISE = {"contract", "nsz", "arcp"}  # no reassociation: keeps exp's two-part reduction exact


@njit(inline="always")
def exp_parts(x):
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


@njit(fastmath=ELEMENTWISE)  # not inlined, so that these flags (no reassociation) are the ones that apply
def silu_mul(n, g, u, e, bits, out, lo):
    """out[lo + i] = silu(g[i]) u[i] for i < n, with :func:`exp_parts` (tests/test_cpu_decoder.py): it
    vectorizes, where numba calls expf once per row."""
    for i in range(n):
        e[i], bits[i] = exp_parts(-g[i])
    scale = bits.view(np.float32)
    for i in range(n):
        out[lo + i] = g[i] / (np.float32(1.0) + e[i] * scale[i]) * u[i]


@njit(fastmath=ELEMENTWISE)
def exp_shifted(n, v, top, e, bits):
    """v[i] = exp(v[i] - top) for i < n (:func:`exp_parts`; ``e``, ``bits`` scratch of n or more)."""
    for i in range(n):
        e[i], bits[i] = exp_parts(v[i] - top)
    scale = bits.view(np.float32)
    for i in range(n):
        v[i] = e[i] * scale[i]


@njit(fastmath=MATH, inline="always")
def gated_rows(c, wg, wu, tiles, h, out, buf, bits):
    """Chunk c of silu(gate) * up, from the packed tiles at ``tiles`` (gate's and up's tile c in turn) if
    nonzero, else from the rows of wg and wu (the gate rows, then the up rows: one stream at a time, see dot)."""
    lo, hi = c * ROWS, min((c + 1) * ROWS, wg.shape[0])
    if tiles:  # ROWS == TILE: one tile of each
        for part in range(2):
            tile_dot(tiles + (2 * c + part) * h.shape[0] * TILE * 4, h.ctypes.data, h.shape[0], buf[part].ctypes.data)
    else:
        for i in range(lo, hi):
            buf[0, i - lo] = dot(wg, i, h)
        for i in range(lo, hi):
            buf[1, i - lo] = dot(wu, i, h)
    silu_mul(hi - lo, buf[0], buf[1], buf[2], bits, out, lo)


@njit(inline="always")
def ask_far(ahead, end):
    """Ask for the cache line at ``ahead`` into the outer caches unless it is ``end``; the next line's address."""
    if ahead < end:
        prefetch_far(ahead)
        return ahead + 64
    return ahead


@njit(fastmath=MATH, inline="always")
def tile4(w, i, x, s, y, col):
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


@njit(fastmath=MATH, inline="always")
def tile2(w, i, x, s, y, col):
    """y[s:s+4, col+i:col+i+2] = x[s:s+4] . w[i:i+2]: 8 dot products, whose sums and the two rows' vectors
    fit AVX2's 16 vector registers (tile4's 16 sums do not: they spill)."""
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
TILE_ROWS, tile = (4, tile4) if WIDE else (2, tile2)

# Weight rows ahead whose cache lines a GEMM tile asks for (llvm.prefetch), spread over the tile's passes: its
# arithmetic otherwise leaves the memory idle between one tile's rows and the next's. Measured on AVX2's 2 x 4
# tiles only (docs/internals/cpu-decoder.md); off with AVX-512's 4 x 4.
TILE_AHEAD = 0 if WIDE else 4


@njit(fastmath=MATH, inline="always")
def row8(w, i, x, s, y, col):
    """y[s:s+8, col+i] = x[s:s+8] . w[i]: one weight row against 8 rows of x (one stream of weights: gemm)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for k in range(w.shape[1]):
        v = w[i, k]
        # fmt: off
        a0 += x[s, k] * v; a1 += x[s + 1, k] * v; a2 += x[s + 2, k] * v; a3 += x[s + 3, k] * v  # noqa: E702
        a4 += x[s + 4, k] * v; a5 += x[s + 5, k] * v; a6 += x[s + 6, k] * v; a7 += x[s + 7, k] * v  # noqa: E702
        # fmt: on
    y[s, col + i], y[s + 1, col + i], y[s + 2, col + i], y[s + 3, col + i] = a0, a1, a2, a3
    y[s + 4, col + i], y[s + 5, col + i], y[s + 6, col + i], y[s + 7, col + i] = a4, a5, a6, a7


@njit(fastmath=MATH, inline="always")
def row4(w, i, x, s, y, col):
    """y[s:s+4, col+i] = x[s:s+4] . w[i]."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(w.shape[1]):
        v = w[i, k]
        a0 += x[s, k] * v
        a1 += x[s + 1, k] * v
        a2 += x[s + 2, k] * v
        a3 += x[s + 3, k] * v
    y[s, col + i], y[s + 1, col + i], y[s + 2, col + i], y[s + 3, col + i] = a0, a1, a2, a3


@njit(fastmath=MATH)  # not inlined: compiled once for its callers (inlined, the prefill compiled 2.5x longer)
def gemm(p, lo, hi, w, x, y, col, stream):
    """y[:p, col+lo:col+hi] = x[:p] @ w[lo:hi].T, for x (P, in) and p <= P a multiple of 4.

    With ``stream`` (up to 8 rows: weights from memory), one weight row at a time meets 8 (or 4) rows of x,
    which streams the weights faster than two interleaved rows (docs/internals/cpu-decoder.md). Else (a
    prompt's block: bound by arithmetic) :data:`tile`, which computes faster on data in cache."""
    if stream:
        for i in range(lo, hi):
            for s in range(0, p - 4, 8):
                row8(w, i, x, s, y, col)
            if p % 8:
                row4(w, i, x, p - 4, y, col)
        return
    top = lo + (hi - lo) // TILE_ROWS * TILE_ROWS
    lines = TILE_ROWS * w.shape[1] // 16  # cache lines of a tile's weight rows
    per = -(-lines // (p // 4))  # of the rows TILE_AHEAD ahead, asked for before each group of 4 positions
    for i in range(lo, top, TILE_ROWS):  # the tile's weight rows stay in L1 while every 4 positions of x pass by
        ahead = w.ctypes.data + (i + TILE_AHEAD) * w.shape[1] * 4
        for s in range(0, p, 4):
            if TILE_AHEAD:
                first = s // 4 * per
                for line in range(first, min(first + per, lines)):
                    prefetch(ahead + 64 * line)
            tile(w, i, x, s, y, col)
    for i in range(top, hi):
        for s in range(p):
            y[s, col + i] = dot(w, i, x[s])


@njit(fastmath=MATH, inline="always")
def qkv_block(p, c, wq, wk, wv, bias, h, out, stream):
    """Chunk c of the q, then k, then v rows (chunks do not straddle them), for the first p positions of h."""
    nq, nk = wq.shape[0], wk.shape[0]
    cq, ck = -(-nq // ROWS), -(-nk // ROWS)
    w, col, c = (wq, 0, c) if c < cq else (wk, nq, c - cq) if c < cq + ck else (wv, nq + nk, c - cq - ck)
    lo, hi = c * ROWS, min((c + 1) * ROWS, w.shape[0])
    gemm(p, lo, hi, w, h, out, col, stream)
    for s in range(p):
        for i in range(col + lo, col + hi):
            out[s, i] += bias[i]


@njit(inline="always")
def tile_rows(p, tile, x, out):
    """out[s, k] = sum over j of tile[j, k] x[s, j] for s < p (4 or 8), k < TILE: a packed tile at address
    ``tile`` against the first p rows of x (p, cols), into out (p or more, TILE), both C-contiguous."""
    cols = x.shape[1]
    if p == 8:
        tile_rows8(tile, x.ctypes.data, cols, cols, out.ctypes.data)
    else:
        tile_rows4(tile, x.ctypes.data, cols, cols, out.ctypes.data)


@njit(inline="always")
def tiled_block(c, rows, p, tiles, n, x, out, col, tmp):
    """out[s, col + i] = W[i] . x[s] for s < p (4 or 8) and chunk c's rows (``rows`` per chunk, whole tiles) of
    a packed matrix W (n rows, x.shape[1] columns) whose tiles begin at ``tiles``; ``tmp`` (8, TILE) scratch."""
    cols = x.shape[1]
    for b in range(c * rows // TILE, min(-(-n // TILE), (c + 1) * rows // TILE)):
        tile_rows(p, tiles + b * cols * TILE * 4, x, tmp)
        for s in range(p):
            for k in range(min(TILE, n - b * TILE)):
                out[s, col + b * TILE + k] = tmp[s, k]
