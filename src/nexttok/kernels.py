"""One sample's decode step for Llama-family models on the CPU, compiled by numba.

Why it exists: a decode step of one sample is a chain of matrix-vector products, bound by reading
the weights from memory once per token. On the CPUs measured (docs/generate.md), torch's kernels
(MKL, oneDNN) read the weights at 8-22 GB/s where the memory gives 30-50; a plain loop over weight
rows, compiled with reassociation allowed (so it vectorizes) and split over the threads, streams
them at the memory's rate. One compiled call runs a whole attention block (norm, q/k/v, RoPE,
attention over the cache, o) and one an MLP block (norm, gate/up, down), so a step costs 61 calls
instead of ~400 module and operator dispatches.

This is not a second model: the weights are the Hugging Face model's own tensors, read in place;
the prompt's prefill, loading, saving and training stay the HF model's. Tests check the logits
against the model's own forward pass and greedy output token for token. Models it does not cover
(other architectures, bfloat16, adapters, sliding windows, length-dependent RoPE) use the torch path.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

# Reassociation lets LLVM vectorize the dot products; no-NaN/no-inf assumptions are left out.
_MATH = {"reassoc", "contract", "nsz", "arcp"}
_MLP = ("gate_proj", "up_proj", "down_proj")
_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def _start_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count (``--threads``).

    numba's OpenMP layer sets the OpenMP thread count when its pool starts, and torch's wheel uses the
    same libgomp (same soname, one copy per process): without this, a process at 1 thread went to 2."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)


_start_threads()


@njit(fastmath=_MATH, inline="always")
def _dot(w, i, x):
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += w[i, j] * x[j]
    return acc


@njit(fastmath=_MATH, inline="always")
def _rmsnorm(x, weight, eps, out):
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    r = np.float32(1.0) / np.sqrt(ss / x.shape[0] + eps)
    for j in range(x.shape[0]):
        out[j] = weight[j] * (x[j] * r)


@njit(fastmath=_MATH, inline="always")
def _rope(v, start, cos, sin, pos, out, out_start):
    # HF's rotate_half convention: the two halves of a head are the pair (x1, x2).
    half = cos.shape[1] // 2
    for d in range(half):
        a, b = v[start + d], v[start + d + half]
        out[out_start + d] = a * cos[pos, d] - b * sin[pos, d]
        out[out_start + d + half] = b * cos[pos, d + half] + a * sin[pos, d + half]


@njit(fastmath=_MATH, inline="always")
def _head_attention(q, kc, vc, pos, scale, out):
    # q (hd,) already rotated; kc, vc (T, hd) of one kv head; out (hd,)
    scores = np.empty(pos + 1, dtype=np.float32)
    for t in range(pos + 1):
        scores[t] = _dot(kc, t, q) * scale
    top = scores.max()
    total = np.float32(0.0)
    for t in range(pos + 1):
        scores[t] = np.exp(scores[t] - top)
        total += scores[t]
    out[:] = 0.0
    for t in range(pos + 1):
        p = scores[t] / total
        for d in range(out.shape[0]):
            out[d] += p * vc[t, d]


@njit(parallel=True, fastmath=_MATH, cache=True)
def _attention_block(x, h, qkv, att, norm, wq, wk, wv, bqkv, wo, bo, kc, vc, cos, sin, pos, scale, eps):
    """x += o_proj(attention(norm(x))), writing position ``pos``'s key and value into kc, vc (nkv, T, hd)."""
    nq, nk = wq.shape[0], wk.shape[0]
    nkv, hd = kc.shape[0], kc.shape[2]
    group = (nq // hd) // nkv
    _rmsnorm(x, norm, eps, h)
    for i in prange(nq + 2 * nk):  # q, k, v rows in one parallel loop
        if i < nq:
            qkv[i] = _dot(wq, i, h) + bqkv[i]
        elif i < nq + nk:
            qkv[i] = _dot(wk, i - nq, h) + bqkv[i]
        else:
            qkv[i] = _dot(wv, i - nq - nk, h) + bqkv[i]
    for g in range(nkv):
        _rope(qkv, nq + g * hd, cos, sin, pos, kc[g, pos], 0)
        vc[g, pos, :] = qkv[nq + nk + g * hd : nq + nk + (g + 1) * hd]
    for head in prange(nq // hd):
        q = np.empty(hd, dtype=np.float32)
        _rope(qkv, head * hd, cos, sin, pos, q, 0)
        _head_attention(q, kc[head // group], vc[head // group], pos, scale, att[head * hd : (head + 1) * hd])
    for i in prange(wo.shape[0]):
        x[i] += _dot(wo, i, att) + bo[i]


@njit(parallel=True, fastmath=_MATH, cache=True)
def _mlp_block(x, h, act, norm, wg, wu, wd, eps):
    """x += down(silu(gate(norm(x))) * up(norm(x)))."""
    _rmsnorm(x, norm, eps, h)
    for i in prange(wg.shape[0]):
        g = _dot(wg, i, h)
        act[i] = g / (np.float32(1.0) + np.exp(-g)) * _dot(wu, i, h)
    for i in prange(wd.shape[0]):
        x[i] += _dot(wd, i, act)


@njit(parallel=True, fastmath=_MATH, cache=True)
def _output(x, h, norm, w, eps, out):
    _rmsnorm(x, norm, eps, h)
    for i in prange(w.shape[0]):
        out[i] = _dot(w, i, h)


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


class DecodeKernel:
    """Runs one sample's decode steps of a Llama-family HF ``model`` (see :func:`unsupported`).

    Built after the HF prefill: it takes the prompt's ``length`` keys and values from the HF ``cache``
    (one row) and continues from there, one token per :meth:`step`.
    """

    def __init__(self, model: torch.nn.Module, cache, length: int, capacity: int | None = None):
        m = model.model
        self.model, self.length = model, length
        self.eps = np.float32(model.config.rms_norm_eps)
        self.layers = [self._layer_arrays(layer) for layer in m.layers]
        self.norm, self.head = _array(m.norm.weight), _array(model.lm_head.weight)
        self.embed = _array(m.embed_tokens.weight)
        attn = m.layers[0].self_attn
        self.hd, self.nkv = attn.head_dim, model.config.num_key_value_heads
        self.scale = np.float32(attn.scaling)
        hidden, nq = self.embed.shape[1], attn.q_proj.weight.shape[0]
        self.h = np.empty(hidden, np.float32)
        self.qkv = np.empty(nq + 2 * self.nkv * self.hd, np.float32)
        self.att = np.empty(nq, np.float32)
        self.act = np.empty(m.layers[0].mlp.gate_proj.weight.shape[0], np.float32)
        self._allocate(capacity or max(2 * length, length + 256))  # grows by doubling when full
        for i, layer in enumerate(cache.layers):  # the prompt's keys/values, (1, nkv, T, hd) each
            self.kc[i, :, :length] = layer.keys[0].numpy()
            self.vc[i, :, :length] = layer.values[0].numpy()

    @staticmethod
    def _layer_arrays(layer) -> tuple:
        a, f = layer.self_attn, layer.mlp
        biases = [_array(p.bias, p.weight.shape[0]) for p in (a.q_proj, a.k_proj, a.v_proj)]
        attention = (_array(layer.input_layernorm.weight), _array(a.q_proj.weight), _array(a.k_proj.weight))
        attention += (_array(a.v_proj.weight), np.concatenate(biases), _array(a.o_proj.weight))
        attention += (_array(a.o_proj.bias, a.o_proj.weight.shape[0]),)
        mlp = (_array(layer.post_attention_layernorm.weight), _array(f.gate_proj.weight))
        return attention, mlp + (_array(f.up_proj.weight), _array(f.down_proj.weight))

    def _allocate(self, capacity: int) -> None:
        """Key/value arrays (layers, nkv, capacity, hd) and RoPE tables for ``capacity`` positions."""
        shape = (len(self.layers), self.nkv, capacity, self.hd)
        kc, vc = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        if hasattr(self, "kc"):  # growing: keep the positions written so far
            kc[:, :, : self.length] = self.kc[:, :, : self.length]
            vc[:, :, : self.length] = self.vc[:, :, : self.length]
        self.kc, self.vc = kc, vc
        with torch.inference_mode():  # the model's own rotary module: every RoPE scaling it supports
            cos, sin = self.model.model.rotary_emb(torch.zeros(1), torch.arange(capacity)[None])  # (1, T, hd)
        self.cos, self.sin = cos[0].numpy().copy(), sin[0].numpy().copy()
        # Each layer's arguments but x and the position, bound once: a step is then 61 plain calls.
        self.calls = [
            ((self.h, self.qkv, self.att, *attention, kc[i], vc[i], self.cos, self.sin), (self.h, self.act, *mlp))
            for i, (attention, mlp) in enumerate(self.layers)
        ]  # kc[i], vc[i]: (nkv, T, hd)

    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the next position; the next-token logits, shape (1, V)."""
        if self.length == self.kc.shape[2]:
            self._allocate(2 * self.length)
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        x, pos = self.embed[token].copy(), self.length  # (H,)
        for attention, mlp in self.calls:
            _attention_block(x, *attention, pos, self.scale, self.eps)
            _mlp_block(x, *mlp, self.eps)
        logits = np.empty(self.head.shape[0], np.float32)  # fresh each step: callers may keep it
        _output(x, self.h, self.norm, self.head, self.eps, logits)
        self.length += 1
        return torch.from_numpy(logits)[None]
