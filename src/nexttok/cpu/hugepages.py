"""A CPU model's weights in one arena on 2 MiB pages (Linux transparent huge pages), in reading order.

A decode step of one sample reads every weight once per token. With 4 KiB pages that is ~130,000
pages of the default model, each one a page-table walk when the TLB misses, and a hardware prefetcher
that stops at every page's end; with 2 MiB pages, ~270. And with the weights back to back in the order
a step reads them, the step is close to one long stream instead of 210 separate matrices. Measured on
the compiled decode step (docs/generate.md). The compiled decoder moves a model's weights once it has
decoded ``weights.RELAYOUT_AFTER`` tokens (the move takes ~1 s here), and only a model nexttok loaded
itself (``weights.WeightCache.owns_model``): a model the user passed in stays where it is.

The arena is one anonymous mapping, advised for huge pages and aligned to 2 MiB; each parameter becomes
a view of its part (``p.data = ...``), so modules, tied weights and optimizers see the same Parameter
objects. Parameters then share one storage: HF's ``save_pretrained`` and peft copy such tensors apart
before writing safetensors, and ``torch.save`` of the state dict writes the arena once (both tested).
Where the kernel gives no huge pages (THP off, or no free 2 MiB blocks) the mapping gets ordinary pages
and the order still holds; on systems without ``MADV_HUGEPAGE`` this does nothing.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from nexttok.cpu import settings

HUGE = 2 << 20  # bytes in a huge page (x86-64, arm64 with 4 KiB base pages)
_ALIGN = 64  # each parameter starts on a cache line


def huge_tensor(like: torch.Tensor, size: int) -> torch.Tensor:
    """An uninitialised tensor shaped as ``like``, at the start of a 2 MiB-aligned mapping of ``size`` bytes
    advised for huge pages (an ordinary tensor on systems without ``MADV_HUGEPAGE``)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(like.shape, dtype=like.dtype)
    area = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP applies
    offset = -np.frombuffer(area, np.uint8).ctypes.data % HUGE  # to the first 2 MiB boundary
    area.madvise(mmap.MADV_HUGEPAGE, offset, size)  # before the first touch, which allocates the pages
    # The tensor keeps ``area`` alive (its storage refers to the buffer).
    return torch.frombuffer(area, dtype=like.dtype, count=like.numel(), offset=offset).view(like.shape)


def move_to_hugepages(model: torch.nn.Module) -> int:
    """Move ``model``'s contiguous CPU parameters into one huge-page arena, in place (same Parameter objects,
    so tied weights stay tied); return the bytes moved (0 when unsupported, or turned off with
    ``NEXTTOK_HUGEPAGES=0``). The caller moves a model once (``weights.WeightCache.relayout``).

    The arena holds them back to back in ``model.parameters()`` order, which for HF decoders is the order a
    decode step reads them (layer by layer: q, k, v, o, gate, up, down), so a step is close to one stream."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not settings.on("NEXTTOK_HUGEPAGES"):
        return 0
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.is_contiguous() and p.numel()]
    if not params:
        return 0
    sizes = [p.numel() * p.element_size() for p in params]
    offsets = [0]
    for size in sizes:  # each shared (tied) parameter once
        offsets.append(offsets[-1] + -(-size // _ALIGN) * _ALIGN)
    # A meta tensor only describes the arena's shape (no memory of its own).
    arena = huge_tensor(torch.empty(offsets[-1], dtype=torch.uint8, device="meta"), -(-offsets[-1] // HUGE) * HUGE)
    # Ordinary tensors even when called under inference mode (as a server's generate may be): the model can
    # still be trained afterwards.
    with torch.inference_mode(False), torch.no_grad():
        for p, offset, size in zip(params, offsets, sizes, strict=False):  # offsets has one more: the end
            data = arena[offset : offset + size].view(p.dtype).view(p.shape)
            data.copy_(p.data)
            p.data = data
    return sum(sizes)
