"""Which decoder runs a model: the one place it is decided, by capability, with the reason for the user."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nexttok import gc_pause
from nexttok.cpu import settings
from nexttok.decode import Decoder

if TYPE_CHECKING:
    from nexttok.lm import LM


def decoder_choice(lm: LM, fast: bool = True) -> tuple[bool, str]:
    """Whether the compiled CPU decoder runs ``lm``'s model, and why (or why not): the one place it is decided."""
    model = lm.model
    if not fast:
        return False, "torch decoder: the plain model was asked for"
    if model.device.type != "cpu":
        return False, f"torch decoder: the model is on {model.device} (the compiled decoder is CPU-only)"
    if not settings.on("NEXTTOK_NUMBA"):
        return False, "torch decoder: NEXTTOK_NUMBA=0 turns the compiled decoder off"
    try:
        with gc_pause.paused(freeze=gc_pause.freeze_after_load):  # numba, llvmlite: long-lived objects
            from nexttok.cpu import model as cpu_model
    except ImportError as e:  # numba missing or broken on this platform
        return False, f"torch decoder: numba does not import here ({e})"
    why_not = cpu_model.unsupported(model)
    if why_not:
        return False, f"torch decoder: the compiled decoder does not cover this model ({why_not})"
    return True, f"compiled CPU decoder: a {type(model).__name__} in float32 on the CPU"


def make_decoder(lm: LM, fast: bool = True, exact_prefill: bool = False) -> Decoder:
    """The decoder for ``lm``: the compiled CPU decoder where :func:`decoder_choice` says so, else torch's.
    ``fast=False``: the torch decoder on the plain model (no inference copy). ``exact_prefill``: every prompt
    is read by the model's forward pass, so each row's first logits are exactly :meth:`LM.distribution`'s
    (the compiled walk's prefill agrees to ~2e-5 in logprob and is faster on short prompts)."""
    compiled, reason = decoder_choice(lm, fast)
    if compiled:
        from nexttok.cpu.decoder import CompiledDecoder

        return CompiledDecoder(lm, reason, prefill_max=0 if exact_prefill else None)
    from nexttok.torchdecode import TorchDecoder

    return TorchDecoder(lm, fast=fast, reason=reason)
