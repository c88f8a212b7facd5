"""The Llama block walk, once, for every call the compiled decoder makes.

A call feeds a batch of rows, each row some new positions: one row of one position (a decode step of one
sample), N rows of one position each (N samples, or N different prompts, each at its own position), or
one row of up to ``buffers.BLOCK`` positions (a prompt's block). Every thread walks every layer; each
stage (q/k/v, attention, o, gate/up, down, the output layer) is split into chunks that threads claim
(``schedule.chunks``). One position in all streams each weight row once (matrix-vector products, from the
packed tiles when they exist, the next stage's weights asked for ahead); more positions share each weight
row among them (``primitives.gemm``). Row r attends over its own key/value slot, positions
< ``start[r]``, and over its own new positions: rows never see each other.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from nexttok.cpu.intrinsics import matrix
from nexttok.cpu.packed import TILE
from nexttok.cpu.primitives import (
    MATH,
    OUT_ROWS,
    ROWS,
    ask_far,
    dot,
    exp_shifted,
    gated_rows,
    gemm,
    matvec,
    qkv_block,
    qkv_rows,
    rmsnorm,
    rope,
    silu_mul,
    tile_rows,
    tiled_block,
    tiled_rows,
)
from nexttok.cpu.schedule import AHEAD_LINES, STAGES, chunks, first_chunk, share_address

# Only the prange loop is wanted parallel; parallel=True also looks for more to parallelize in what it calls
# (array expressions, reductions...), which only lengthens the first compile.
PRANGE_ONLY = {"prange": True, "numpy": False, "setitem": False, "reduction": False, "comprehension": False,
               "stencil": False, "fusion": False, "inplace_binop": False}  # fmt: skip


# Up to this many positions a GEMM takes one weight row at a time against them (weights from memory);
# more positions go through the arithmetic-bound tiles (primitives.gemm).
STREAM_ROWS = 8


class Dims(NamedTuple):
    """A model's sizes (ints)."""

    hidden: int
    nq: int  # query heads x head size
    nk: int  # key/value heads x head size
    inter: int
    hd: int
    nkv: int


class Layers(NamedTuple):
    """Where each layer's arrays are: (layers,) int64 addresses per field. The one adapter numba needs: the
    layers' matrices differ in shape and numba has no list of them, so the walk makes each one a view
    again (``intrinsics.matrix``) from its address, rows and columns; the host keeps the arrays alive."""

    norm1: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    bqkv: np.ndarray  # q, k and v's biases, concatenated (zeros where the model has none)
    wo: np.ndarray
    bo: np.ndarray
    norm2: np.ndarray
    wg: np.ndarray
    wu: np.ndarray
    wd: np.ndarray


class Tiles(NamedTuple):
    """Where each layer's packed tiles are (``packed.py``): (layers,) int64 addresses, 0 where not packed."""

    qkv: np.ndarray
    o: np.ndarray
    gate_up: np.ndarray
    down: np.ndarray


class Weights(NamedTuple):
    layers: Layers
    tiles: Tiles
    head_tiles: int  # the output layer's packed tiles, or 0
    norm: np.ndarray  # (hidden,) the final norm's weight
    head: np.ndarray  # (V, hidden) the output layer


class Scratch(NamedTuple):
    """Per thread (threads, P, hidden): the residual stream and its normed input, each thread its own copy.
    Per layer (layers, P, size), none reused within a call (a thread running ahead never overwrites what a
    slower one has yet to read): q/k/v, attention, o, gate*up, down."""

    x: np.ndarray
    h: np.ndarray
    qkv: np.ndarray
    att: np.ndarray
    o: np.ndarray
    act: np.ndarray
    d: np.ndarray


class Batch(NamedTuple):
    """The call's rows: row r's new positions are tokens first[r] .. first[r] + count[r] - 1 of the call
    (in Scratch's P), at positions start[r] .. of key/value slot slot[r]. (R,) int64 each."""

    tokens: int
    first: np.ndarray
    count: np.ndarray
    start: np.ndarray
    slot: np.ndarray


class Cache(NamedTuple):
    k: np.ndarray  # (slots, layers, nkv, T, hd)
    v: np.ndarray
    cos: np.ndarray  # (T, hd) RoPE's tables
    sin: np.ndarray


class Out(NamedTuple):
    """The logits of each row's last position, (R rounded up to 4, or 1, V); with one row, the statistics
    of each output chunk too (``out_chunk``), from which ``summarize`` gives the step's Summary."""

    logits: np.ndarray
    stats: np.ndarray  # (chunks, 3) float64
    argmax: np.ndarray  # (chunks,) int64


@njit(parallel=PRANGE_ONLY, cache=True)
def run(nt, b, w, dims, s, cache, scale, eps, counters, out):
    """One compiled call: the walk on ``nt`` threads, then the new keys and values into their slots."""
    counters[:] = 0
    # The adapter: numba's parallel loop passes arrays and numbers into its body, not tuples, so the
    # structures are taken apart here and put together again in each thread (no copy: views, numbers).
    tokens, first, count, start, slot = b
    norm1, wq, wk, wv, bqkv, wo, bo, norm2, wg, wu, wd = w.layers
    t_qkv, t_o, t_gate_up, t_down = w.tiles
    head_tiles, norm, head = w.head_tiles, w.norm, w.head
    hidden, nq, nk, inter, hd, nkv = dims
    x, h, qkv, att, o, act, d = s
    k, v, cos, sin = cache
    logits, stats, argmax = out
    for t in prange(nt):  # one iteration per thread; schedule.chunks says why any number of threads works
        layers = Layers(norm1, wq, wk, wv, bqkv, wo, bo, norm2, wg, wu, wd)
        weights = Weights(layers, Tiles(t_qkv, t_o, t_gate_up, t_down), head_tiles, norm, head)
        _walk(t, nt, Batch(tokens, first, count, start, slot), weights, Dims(hidden, nq, nk, inter, hd, nkv),
              Scratch(x, h, qkv, att, o, act, d), Cache(k, v, cos, sin), scale, eps, counters,
              Out(logits, stats, argmax))  # fmt: skip
    store(b, s.qkv, cache)


@njit(fastmath=MATH)
def _walk(t, nt, b, w, dims, s, cache, scale, eps, counters, out):
    """Thread t's part of a call: every layer's stages over the call's positions, then the output layer."""
    one = b.tokens == 1  # one position: matrix-vector products, weights asked for ahead
    p = 1 if one else (b.tokens + 3) // 4 * 4  # positions computed: whole tiles of 4 (those past tokens unread)
    stream = p <= STREAM_ROWS
    x, h = s.x[t], s.h[t]
    heads, rows = dims.nq // dims.hd, b.first.shape[0]
    span, most = 1, 1
    for r in range(rows):
        span, most = max(span, b.start[r] + b.count[r]), max(most, b.count[r])
    kb, scores = np.empty((most, dims.hd), np.float32), np.empty(span, np.float32)
    buf, bits = np.empty((3, ROWS), np.float32), np.empty(ROWS, np.int32)  # a chunk's gate, up, exp
    gu, tmp = np.empty((2, p, ROWS), np.float32), np.empty(ROWS, np.float32)
    rows8 = np.empty((8, ROWS), np.float32)  # a tile's outputs for up to 8 positions (primitives.tiled_block)
    lines = AHEAD_LINES if one else 0
    for layer in range(w.layers.wq.shape[0]):
        o_at, o_end, g_at, d_at, next_at = _plan(t, nt, layer, w, dims) if one else (0, 0, 0, 0, 0)
        stage, a = layer * STAGES, w.layers
        for j in range(p):
            rmsnorm(x[j], matrix(a.norm1[layer], 1, dims.hidden)[0], eps, h[j])
        for c in chunks(counters, stage, t, nt, _qkv_chunks(dims, one), o_at, lines):
            _qkv(c, p, stream, layer, w, dims, h, s.qkv[layer], tmp)
        at = o_at + 64 * lines  # the attention asks for the rest of this thread's o weights into the outer caches
        for c in chunks(counters, stage + 1, t, nt, rows * heads, at, lines):
            r, lo = c // heads, b.first[c // heads]
            k, v = cache.k[b.slot[r], layer], cache.v[b.slot[r], layer]
            q, o = s.qkv[layer, lo : lo + b.count[r]], s.att[layer, lo : lo + b.count[r]]
            at = attention(c % heads, b.count[r], q, k, v, cache.cos, cache.sin, b.start[r], scale, o, kb, scores,
                           at, o_end)  # fmt: skip
        wo = matrix(a.wo[layer], dims.hidden, dims.nq)
        for c in chunks(counters, stage + 2, t, nt, -(-dims.hidden // ROWS), g_at, lines):
            _linear(c, p, stream, wo, w.tiles.o[layer], s.att[layer], s.o[layer], tmp, rows8)
        bo = matrix(a.bo[layer], 1, dims.hidden)[0]
        for j in range(p):
            for i in range(dims.hidden):
                x[j, i] += s.o[layer, j, i] + bo[i]
            rmsnorm(x[j], matrix(a.norm2[layer], 1, dims.hidden)[0], eps, h[j])
        for c in chunks(counters, stage + 3, t, nt, -(-dims.inter // ROWS), d_at, lines):
            _gate_up(c, p, stream, layer, w, dims, h, s.act[layer], buf, gu, bits)
        wd = matrix(a.wd[layer], dims.hidden, dims.inter)
        for c in chunks(counters, stage + 4, t, nt, -(-dims.hidden // ROWS), next_at, lines):
            _linear(c, p, stream, wd, w.tiles.down[layer], s.act[layer], s.d[layer], tmp, rows8)
        for j in range(p):
            for i in range(dims.hidden):
                x[j, i] += s.d[layer, j, i]
    _output(t, nt, b, w, x, h, eps, counters, out, tmp, rows8)


@njit(inline="always")
def _qkv_chunks(dims, one):
    """Chunks of the q/k/v stage: one position reads them as one matrix (the packed copy's layout); more
    positions take q's, k's and v's rows in chunks of their own."""
    if one:
        return -(-(dims.nq + 2 * dims.nk) // ROWS)
    return -(-dims.nq // ROWS) + 2 * -(-dims.nk // ROWS)


@njit(fastmath=MATH, inline="always")
def _qkv(c, p, stream, layer, w, dims, h, out, tmp):
    a, packed = w.layers, w.tiles.qkv[layer]
    wq = matrix(a.wq[layer], dims.nq, dims.hidden)
    wk, wv = matrix(a.wk[layer], dims.nk, dims.hidden), matrix(a.wv[layer], dims.nk, dims.hidden)
    bias = matrix(a.bqkv[layer], 1, dims.nq + 2 * dims.nk)[0]
    if p > 1:
        qkv_block(p, c, wq, wk, wv, bias, h, out, stream)
    elif packed:
        tiled_rows(c, ROWS, packed, dims.nq + 2 * dims.nk, h[0], out[0], tmp)
        for i in range(c * ROWS, min((c + 1) * ROWS, dims.nq + 2 * dims.nk)):
            out[0, i] += bias[i]
    else:
        qkv_rows(c, wq, wk, wv, bias, h[0], out[0])


@njit(fastmath=MATH, inline="always")
def _linear(c, p, stream, wmat, packed, x, out, tmp, rows8):
    """Chunk c of out = x @ wmat.T over p positions (from the packed tiles if any, up to STREAM_ROWS)."""
    if p == 1:
        matvec(c, ROWS, wmat, packed, x[0], out[0], tmp)
    elif packed and stream:
        tiled_block(c, ROWS, p, packed, wmat.shape[0], x, out, 0, rows8)
    else:
        gemm(p, c * ROWS, min((c + 1) * ROWS, wmat.shape[0]), wmat, x, out, 0, stream)


@njit(fastmath=MATH, inline="always")
def _gate_up(c, p, stream, layer, w, dims, h, out, buf, gu, bits):
    """Chunk c of silu(gate) * up over p positions."""
    wg = matrix(w.layers.wg[layer], dims.inter, dims.hidden)
    wu = matrix(w.layers.wu[layer], dims.inter, dims.hidden)
    if p == 1:
        gated_rows(c, wg, wu, w.tiles.gate_up[layer], h[0], out[0], buf, bits)
        return
    lo, hi = c * ROWS, min((c + 1) * ROWS, dims.inter)
    packed = w.tiles.gate_up[layer]
    if packed and stream:  # ROWS == TILE: gate's tile c, then up's (packed.py's order)
        for part in range(2):
            tile_rows(p, packed + (2 * c + part) * dims.hidden * TILE * 4, h, gu[part])
    else:
        gemm(p, lo, hi, wg, h, gu[0], -lo, stream)
        gemm(p, lo, hi, wu, h, gu[1], -lo, stream)
    for j in range(p):
        silu_mul(hi - lo, gu[0, j], gu[1, j], buf[2], bits, out[j], lo)


@njit(inline="always")
def _plan(t, nt, layer, w, dims):
    """For one position: where thread t's share of this layer's o weights begins and ends, and where its
    shares of gate/up, down and the next stage's weights (the next layer's q/k/v, or the output layer)
    begin: each stage asks for the next one's first lines when its own chunks run out."""
    a, tl, hidden, inter = w.layers, w.tiles, dims.hidden, dims.inter
    n_hidden, n_inter, n_qkv = -(-hidden // ROWS), -(-inter // ROWS), _qkv_chunks(dims, True)
    wo = tl.o[layer] or a.wo[layer]
    o_at = share_address(wo, t, nt, n_hidden, ROWS * dims.nq)
    o_end = share_address(wo, t + 1, nt, n_hidden, ROWS * dims.nq)
    if tl.gate_up[layer]:
        g_at = share_address(tl.gate_up[layer], t, nt, n_inter, 2 * ROWS * hidden)
    else:
        g_at = share_address(a.wg[layer], t, nt, n_inter, ROWS * hidden)
    d_at = share_address(tl.down[layer] or a.wd[layer], t, nt, n_hidden, ROWS * inter)
    n_head = -(-w.head.shape[0] // OUT_ROWS)
    if layer + 1 < a.wq.shape[0]:
        following = tl.qkv[layer + 1]
        if following:
            next_at = share_address(following, t, nt, n_qkv, ROWS * hidden)
        else:
            next_at = qkv_share(a, layer + 1, dims, t, nt, n_qkv)
    else:
        next_at = share_address(w.head_tiles or w.head.ctypes.data, t, nt, n_head, OUT_ROWS * hidden)
    return o_at, o_end, g_at, d_at, next_at


@njit(inline="always")
def qkv_share(a, layer, dims, t, nt, n):
    """Address of thread t's share of a layer's q/k/v stage of ``n`` chunks (its rows: q's, then k's, then v's)."""
    row = first_chunk(t, nt, n) * ROWS
    if row < dims.nq:
        return a.wq[layer] + row * dims.hidden * 4
    if row < dims.nq + dims.nk:
        return a.wk[layer] + (row - dims.nq) * dims.hidden * 4
    return a.wv[layer] + (row - dims.nq - dims.nk) * dims.hidden * 4


@njit(fastmath=MATH)
def attention(head, n, qkv, kc, vc, cos, sin, start, scale, out, kb, scores, ahead, end):
    """One query head's attention output out[s] (hd,) for a row's new positions start + s, s < n: over its
    slot's positions < start in kc, vc (nkv, T, hd) and its new positions up to s (their keys and values from
    ``qkv`` (n, nq + 2 nk); :func:`store` writes them into the slot after the call). Meanwhile it asks for
    the cache lines from ``ahead`` on, up to ``end``, one per position (the o stage's weights: the attention
    reads little memory); returns where it stopped."""
    nkv, hd = kc.shape[0], kc.shape[2]
    nq = qkv.shape[1] - 2 * nkv * hd
    g = head // ((nq // hd) // nkv)
    vo = nq + (nkv + g) * hd  # the group's value columns
    # per head: allocating these once per call instead measured slower (docs/internals/cpu-decoder.md)
    q, e, bits = np.empty(hd, np.float32), np.empty(start + n, np.float32), np.empty(start + n, np.int32)
    for j in range(n):
        rope(qkv[j], nq + g * hd, cos, sin, start + j, kb[j])
    for s in range(n):
        rope(qkv[s], head * hd, cos, sin, start + s, q)
        for t in range(start):
            scores[t] = dot(kc[g], t, q) * scale
            ahead = ask_far(ahead, end)
        for j in range(s + 1):
            scores[start + j] = dot(kb, j, q) * scale
        m = start + s + 1
        exp_shifted(m, scores, scores[:m].max(), e, bits)
        total = scores[:m].sum()
        o = out[s, head * hd : (head + 1) * hd]
        o[:] = 0.0
        for t in range(start):
            for d in range(hd):
                o[d] += scores[t] * vc[g, t, d]
            ahead = ask_far(ahead, end)
        for j in range(s + 1):
            for d in range(hd):
                o[d] += scores[start + j] * qkv[j, vo + d]
        for d in range(hd):
            o[d] /= total
    return ahead


@njit(fastmath=MATH, inline="always")
def _output(t, nt, b, w, x, h, eps, counters, out, tmp, rows8):
    """The final norm of each row's last position into h[r], then the output layer: for one row chunk by
    chunk with its statistics (``out_chunk``), for several a GEMM over them."""
    rows = b.first.shape[0]
    for r in range(rows):
        rmsnorm(x[b.first[r] + b.count[r] - 1], w.norm, eps, h[r])
    vocab = w.head.shape[0]
    rp = out.logits.shape[0]
    for c in chunks(counters, w.layers.wq.shape[0] * STAGES, t, nt, -(-vocab // OUT_ROWS), 0, 0):
        if rows == 1:
            out_chunk(c, w.head, w.head_tiles, h[0], out.logits[0], out.stats, out.argmax, tmp)
        elif w.head_tiles and rp <= STREAM_ROWS:
            tiled_block(c, OUT_ROWS, rp, w.head_tiles, vocab, h, out.logits, 0, rows8)
        else:
            gemm(rp, c * OUT_ROWS, min((c + 1) * OUT_ROWS, vocab), w.head, h, out.logits, 0, rp <= STREAM_ROWS)


@njit(fastmath=MATH, inline="always")
def out_chunk(c, head, packed, h, logits, stats, argmax, tmp):
    """Logits of chunk c's rows (from the packed tiles at ``packed`` if nonzero, else from head's rows), and
    the chunk's statistics while they are in cache: its maximum m, the first index holding it, sum exp(l - m)
    and sum exp(l - m) (l - m) (the softmax's parts, :func:`summarize`)."""
    lo, hi = c * OUT_ROWS, min((c + 1) * OUT_ROWS, head.shape[0])
    matvec(c, OUT_ROWS, head, packed, h, logits, tmp)
    best = lo
    for i in range(lo + 1, hi):
        if logits[i] > logits[best]:
            best = i
    m, total, weighted = logits[best], 0.0, 0.0
    for i in range(lo, hi):
        z = logits[i] - m  # <= 0
        e = np.exp(z)  # in float32, summed in float64
        total += e
        weighted += e * z
    stats[c, 0], stats[c, 1], stats[c, 2], argmax[c] = m, total, weighted, best


@njit(fastmath=MATH)
def store(b, qkv, cache):
    """Each row's new keys (rotated) and values into its slot, at its positions start[r] ..."""
    nkv, hd = cache.k.shape[2], cache.k.shape[4]
    nq = qkv.shape[2] - 2 * nkv * hd
    for r in range(b.first.shape[0]):
        slot, lo, start = b.slot[r], b.first[r], b.start[r]
        for layer in range(qkv.shape[0]):
            for g in range(nkv):
                for j in range(b.count[r]):
                    row = qkv[layer, lo + j]
                    rope(row, nq + g * hd, cache.cos, cache.sin, start + j, cache.k[slot, layer, g, start + j])
                    cache.v[slot, layer, g, start + j, :] = row[nq + (nkv + g) * hd : nq + (nkv + g + 1) * hd]


@njit(cache=True)
def summarize(logits, stats, argmax, top):
    """(argmax, logsumexp, entropy, top ids, top logits) of one row's ``logits`` from its chunks' statistics.

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
        for i in range(c * OUT_ROWS, min((c + 1) * OUT_ROWS, logits.shape[0])):
            if logits[i] > values[k - 1]:  # insert, keeping values in descending order
                j = k - 1
                while j > 0 and logits[i] > values[j - 1]:
                    ids[j], values[j] = ids[j - 1], values[j - 1]
                    j -= 1
                ids[j], values[j] = i, logits[i]
    return argmax[first], m + np.log(z), entropy, ids, values


def compiled_on_disk() -> bool:
    """Whether numba's on-disk cache holds the compiled call (else the first call compiles it: about a
    minute on 2 cores, once after install)."""
    try:
        return all(os.path.exists(f._cache._cache_file._index_path) for f in (run, summarize))
    except AttributeError:  # numba's cache internals moved: say nothing rather than guess
        return True
