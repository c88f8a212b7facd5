"""The copies of a model's weights that inference makes for speed, owned apart from the model.

An :class:`~nexttok.lm.LM` holds one :class:`WeightCache`. Nothing here is stored on the model: a model
the user passed in keeps its attributes, and its parameters stay where they were. Only a model nexttok
loaded itself (``owns_model``) may have its parameters moved onto huge pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from nexttok.cpu import hugepages, settings
from nexttok.cpu import packed as packing

if TYPE_CHECKING:
    from nexttok.cpu.packed import Packed

# The compiled decoder moves the model's weights onto huge pages in reading order (hugepages.py) and makes
# their packed copy (packed.py) once this cache's model has decoded this many tokens: the move costs ~1 s
# on the VM measured and the copy 1.3-1.6 s and the model's size in memory, so a one-shot `nexttok
# generate` of a few hundred tokens never pays it, and a chat, a server or a benchmark soon does.
RELAYOUT_AFTER = 512


def weights_version(model: nn.Module) -> tuple[int, ...]:
    """A value that changes when any of ``model``'s parameters is updated in place or replaced (copies of
    the weights made for speed compare it to know they are stale)."""
    # In-place updates (optimizer steps, load_state_dict) bump a tensor's version: the copy is then stale.
    # Tensors made under inference_mode have no version counter: -1 (they cannot be updated in place later).
    return tuple(p._version if not p.is_inference() else -1 for p in model.parameters()) + tuple(
        id(p) for p in model.parameters()
    )


class WeightCache:
    """One model's speed copies: the inference copy (:func:`nexttok.torchdecode.inference_copy`), the packed
    tiles of the compiled decoder (:mod:`nexttok.cpu.packed`), and the count of decoded tokens that decides
    when to make them. Each copy is rebuilt when the model's weights change (after training)."""

    def __init__(self, model: nn.Module, owns_model: bool = False):
        self.model = model
        self.owns_model = owns_model  # nexttok loaded it: its parameters may be moved (huge pages)
        self._inference: tuple[tuple, nn.Module] | None = None
        self._packed: Packed | None = None
        self.kernel_steps = 0
        self.moved = False

    def inference_model(self) -> nn.Module:
        """The model's inference copy: the same parameters, linear layers that pick a kernel per call shape."""
        from nexttok.torchdecode import inference_copy

        version = weights_version(self.model)
        if self._inference is None or self._inference[0] != version:
            self._inference = None  # the stale copy's modules go before the new ones are made
            self._inference = (version, inference_copy(self.model))
        return self._inference[1]

    def packed(self) -> Packed | None:
        """The packed copy if it was made and the weights have not changed since; a stale one is dropped."""
        if self._packed is not None and self._packed.version != weights_version(self.model):
            self._packed = None
        return self._packed

    def pack(self) -> Packed | None:
        """Make (once) and return the packed copy; None when memory has no room (``NEXTTOK_PACKED=0``: never)."""
        if self.packed() is None and settings.on("NEXTTOK_PACKED"):
            self._packed = packing.pack(self.model, weights_version(self.model))
        return self._packed

    def count_steps(self, steps: int) -> bool:
        """Count ``steps`` compiled decode steps; True when they include the RELAYOUT_AFTER-th."""
        before, self.kernel_steps = self.kernel_steps, self.kernel_steps + steps
        return before < RELAYOUT_AFTER <= self.kernel_steps

    def relayout(self) -> bool:
        """Move an owned model's weights onto huge pages (once) and make the packed copy; True when the
        weights a decoder reads now live elsewhere."""
        moved = 0
        if self.owns_model and not self.moved:
            self.moved = True
            moved = hugepages.move_to_hugepages(self.model)
        return self.pack() is not None or moved > 0
