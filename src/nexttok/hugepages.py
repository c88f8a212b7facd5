"""A CPU model's large weights on 2 MiB pages (Linux transparent huge pages).

A decode step of one sample reads every weight once per token. With 4 KiB pages that is ~130,000
pages of the default model, each one a page-table walk when the TLB misses; with 2 MiB pages, ~270.
Measured on the compiled decode step (docs/generate.md): 5-9% less time per token. The engine moves a
model's weights once its kernel has decoded ``engine.HUGEPAGES_AFTER`` tokens (the move takes ~1 s here).

Each parameter moves to its own anonymous mapping, advised for huge pages and aligned to 2 MiB, so
parameters never share storage (saving and ``load_state_dict`` see ordinary tensors). Only those whose
size rounds up to whole 2 MiB pages with at most 25% more are moved: a huge page is allocated whole.
Where the kernel gives no huge pages (THP off, or no free 2 MiB blocks) the mapping gets ordinary pages
and nothing else changes; on systems without ``MADV_HUGEPAGE`` this does nothing.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

HUGE = 2 << 20  # bytes in a huge page (x86-64, arm64 with 4 KiB base pages)


def huge_tensor(like: torch.Tensor, size: int) -> torch.Tensor:
    """An uninitialised tensor shaped as ``like``, at the start of a 2 MiB-aligned mapping of ``size`` bytes
    advised for huge pages."""
    area = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP applies
    offset = -np.frombuffer(area, np.uint8).ctypes.data % HUGE  # to the first 2 MiB boundary
    area.madvise(mmap.MADV_HUGEPAGE, offset, size)  # before the first touch, which allocates the pages
    # The tensor keeps ``area`` alive (its storage refers to the buffer).
    return torch.frombuffer(area, dtype=like.dtype, count=like.numel(), offset=offset).view(like.shape)


def move_to_hugepages(model: torch.nn.Module) -> int:
    """Move ``model``'s large contiguous CPU parameters onto huge pages, in place (same Parameter objects,
    so tied weights stay tied), once per model; return the bytes moved (0 when already done or unsupported)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or getattr(model, "_nexttok_hugepages", False):
        return 0
    model._nexttok_hugepages = True  # a plain attribute: not a parameter, not in the state dict
    moved = 0
    # Ordinary tensors even when called under inference mode (as a server's generate may be): the model can
    # still be trained afterwards.
    with torch.inference_mode(False), torch.no_grad():
        for p in model.parameters():  # each shared (tied) parameter once
            n = p.numel() * p.element_size()
            size = -(-n // HUGE) * HUGE
            if p.device.type != "cpu" or not p.is_contiguous() or n == 0 or size - n > size // 4:
                continue
            data = huge_tensor(p.data, size)
            data.copy_(p.data)
            p.data = data
            moved += n
    return moved
