"""The optimizers ``fit()`` builds: AdamW, or Muon for the hidden matrices with AdamW for the rest."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from nexttok.errors import NexttokError
from nexttok.loss import token_loss_sum
from nexttok.precision import bf16_is_fast

if TYPE_CHECKING:
    from nexttok.train import TrainConfig

OPTIMIZERS = ("adamw", "muon")
# Keller Jordan's quintic Newton–Schulz coefficients and step count, as torch.optim.Muon uses them.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_lr_scale: float = 1.0) -> list[dict]:
    """Decay only matrices: norms, biases and embeddings (incl. a tied output layer) are not decayed.
    Embeddings get their own group: each row is updated only when its token occurs, so a larger
    learning rate (``embedding_lr_scale``) can pay off early in training."""
    embeddings = _embedding_ids(model)
    decay, no_decay, embed = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (embed if id(p) in embeddings else no_decay if p.ndim < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": embed, "weight_decay": 0.0, "lr_scale": embedding_lr_scale},
    ]


def _embedding_ids(model: torch.nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def make_optimizer(model: torch.nn.Module, config: TrainConfig):
    """The optimizer ``config.optimizer`` names, over ``model``'s trainable parameters."""
    groups = [g for g in param_groups(model, config.weight_decay, config.embedding_lr_scale) if g["params"]]
    if not groups:
        raise NexttokError("the model has no trainable parameters; unfreeze some (or check the LoRA targets)")
    if config.optimizer == "muon":
        return _muon(model, groups, config)
    return _adamw(groups, config)


def _adamw(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel is faster where it exists (torch>=2.4 on CPU); foreach is the portable fallback.
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _muon(model: torch.nn.Module, groups: list[dict], config: TrainConfig):
    """Muon takes the 2-D weight matrices except the embeddings and the output layer (it
    orthogonalises whole matrices, which suits hidden layers, not a lookup table or a classifier over
    the vocabulary); AdamW the rest."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = _embedding_ids(model) | ({id(head.weight)} if head is not None else set())
    hidden = [p for g in groups for p in g["params"] if p.ndim == 2 and id(p) not in skip]
    if not hidden:  # nothing for Muon to take
        return _adamw(groups, config)
    taken = {id(p) for p in hidden}
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in taken]
    groups = [g for g in groups if g["params"]]
    # "match_rms_adamw" scales each update to AdamW's size, so Muon reuses AdamW's lr and weight decay.
    muon = Muon([{"params": hidden, "lr_scale": 1.0}], lr=config.lr, weight_decay=config.weight_decay)
    return ChainedOptimizer([muon] + ([_adamw(groups, config)] if groups else []))


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalised by a Newton–Schulz iteration), the update of ``torch.optim.Muon``
    with ``adjust_lr_fn="match_rms_adamw"`` and the same state, so either's checkpoint loads in the other.

    Two things differ. The iteration runs in bf16 only where bf16 matmuls are fast
    (:func:`nexttok.precision.bf16_is_fast`) and in fp32 elsewhere: torch always uses bf16, which CPUs
    without native bf16 emulate ~40x slower. And matrices of one shape are orthogonalised together, one
    batched matmul per term instead of one per matrix. ``ns_dtype`` fixes the dtype instead."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, eps: float = 1e-7, ns_dtype: torch.dtype | None = None):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=NS_COEFFICIENTS, eps=eps, ns_steps=NS_STEPS,
                        adjust_lr_fn="match_rms_adamw")  # fmt: skip
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        if any(p.ndim != 2 for g in self.param_groups for p in g["params"]):
            raise ValueError("Muon takes 2-D parameters only; give the others to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self._momentum(p, group) for p in params]
            for p, o in zip(params, self._orthogonalize(updates, group), strict=True):
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                p.add_(o, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))  # AdamW's update RMS
        return loss

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        return p.grad.lerp(buf, mu) if group["nesterov"] else buf

    def _orthogonalize(self, updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Each update orthogonalised; updates of one shape together, as one (N, m, n) stack, m <= n."""
        out: list[torch.Tensor] = list(updates)
        stacks: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            stacks.setdefault((tuple(_wide(u).shape), u.device), []).append(i)
        for (_, device), idx in stacks.items():
            dtype = self.ns_dtype or (torch.bfloat16 if bf16_is_fast(device) else torch.float32)
            wide = torch.stack([_wide(updates[i]) for i in idx]).to(dtype)  # (N, m, n)
            ortho = newton_schulz(wide, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for o, i in zip(ortho, idx, strict=True):
                out[i] = _wide(o, like=updates[i]).to(updates[i].dtype)
        return out


def _wide(u: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``u`` with its short side first (the Gram matrix is then the small one); with ``like``, back to
    ``like``'s orientation."""
    ref = u if like is None else like
    return u.T if ref.shape[0] > ref.shape[1] else u


def newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton–Schulz iteration towards the nearest semi-orthogonal matrix, batched.
    ``x`` is (N, m, n) with m <= n; the result has singular values near 1 (0.5-1.5 by design)."""
    a, b, c = coefficients
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (N, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*G + c*G^2, (N, m, m)
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (bG + cG^2) X, (N, m, n)
    return x


def step_times(model: torch.nn.Module, optimizer, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Median seconds of a training step's forward+backward and of its ``optimizer.step()``, over the
    batches after the first (which allocates the optimizer's state): what an optimizer adds to a step."""
    model.train()
    fwd_bwd, step = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss, n = token_loss_sum(model, batch)
        (loss / max(1, n)).backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            fwd_bwd.append(t1 - t0)
            step.append(time.perf_counter() - t1)
    return statistics.median(fwd_bwd), statistics.median(step)


class ChainedOptimizer:
    """Several optimizers stepped, zeroed, saved and restored as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chained": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Another optimizer's state raises KeyError or ValueError here, as in torch's own optimizers;
        # checkpoint.load turns either into its one-line error.
        for o, s in zip(self.optimizers, state["chained"], strict=True):
            o.load_state_dict(s)
