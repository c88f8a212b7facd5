"""What the walk reads of a Hugging Face Llama-family model: its sizes and where its arrays are (views of the
model's own tensors, not copies), and which models it covers at all."""

from __future__ import annotations

import numpy as np
import torch

from nexttok.cpu.packed import DOWN, GATE_UP, O_PROJ, QKV, Packed
from nexttok.cpu.walk import Dims, Layers, Tiles, Weights

_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unsupported(model: torch.nn.Module) -> str | None:
    """Why the compiled decoder cannot run ``model`` (None when it can)."""
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


def array(t: torch.Tensor | None, size: int = 0) -> np.ndarray:
    """A float32 view of a contiguous weight (the usual case; else a copy), or zeros of ``size`` for None."""
    if t is None:
        return np.zeros(size, dtype=np.float32)
    return np.ascontiguousarray(t.detach().numpy())


def dims(model: torch.nn.Module) -> Dims:
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    nkv = model.config.num_key_value_heads
    hidden, nq = attn.q_proj.weight.shape[1], attn.q_proj.weight.shape[0]
    return Dims(hidden, nq, nkv * attn.head_dim, mlp.gate_proj.weight.shape[0], attn.head_dim, nkv)


class ModelArrays:
    """The model's arrays for the walk (:attr:`weights`), kept alive here; :meth:`bind` reads them again
    after their storage moved (huge pages) or a packed copy appeared."""

    def __init__(self, model: torch.nn.Module, packed: Packed | None = None):
        self.model = model
        self.dims = dims(model)
        self.bind(packed)

    def bind(self, packed: Packed | None) -> None:
        m = self.model.model
        self._arrays = [self._layer(layer) for layer in m.layers]  # keeps every view alive
        table = np.array([[a.ctypes.data for a in arrays] for arrays in self._arrays], dtype=np.int64)  # (L, 11)
        layers = Layers(*(np.ascontiguousarray(table[:, i]) for i in range(len(Layers._fields))))
        self.packed = packed  # keeps its arena alive
        tiles = np.zeros((len(m.layers), 4), np.int64) if packed is None else packed.layers
        tiles = Tiles(*(np.ascontiguousarray(tiles[:, i]) for i in (QKV, O_PROJ, GATE_UP, DOWN)))
        self.embed = array(m.embed_tokens.weight)
        head_tiles = 0 if packed is None else packed.head
        self.weights = Weights(layers, tiles, head_tiles, array(m.norm.weight), array(self.model.lm_head.weight))

    @staticmethod
    def _layer(layer) -> tuple:
        """The layer's arrays in the order of :class:`~nexttok.cpu.walk.Layers`' fields."""
        a, f = layer.self_attn, layer.mlp
        qkv_bias = np.concatenate([array(p.bias, p.weight.shape[0]) for p in (a.q_proj, a.k_proj, a.v_proj)])
        o_bias = array(a.o_proj.bias, a.o_proj.weight.shape[0])
        before = (layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj)
        after = (layer.post_attention_layernorm, f.gate_proj, f.up_proj, f.down_proj)
        return (
            *(array(m.weight) for m in before), qkv_bias, array(a.o_proj.weight), o_bias,
            *(array(m.weight) for m in after),
        )  # fmt: skip
