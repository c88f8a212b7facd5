"""Whether bfloat16 is fast where a computation runs: the one place every bf16 choice asks.

Many CPUs have no native bf16 (AMD before Zen 4, Intel client parts without AVX-512 BF16 or AMX);
there a bf16 matmul is emulated and runs 40-60x slower than fp32. CPU flags are not enough to tell:
torch reports AVX-512 BF16 even when oneDNN is capped below it (``ONEDNN_MAX_CPU_ISA``), and one
Intel VM advertised AMX but faulted on it. So on a CPU the answer is measured: one small matmul in
each dtype, once per process. ``NEXTTOK_BF16=fast|slow`` overrides the measurement.
"""

from __future__ import annotations

import os
import time
import warnings
from functools import lru_cache

import torch

from nexttok.errors import NexttokError, NexttokNotice

ENV = "NEXTTOK_BF16"
SETTINGS = ("auto", "fast", "slow")
SLOW_RATIO = 2.0  # bf16 slower than 2x fp32 is emulation (native is 0.3-1x, emulated 40-60x: measured)


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """True when bf16 matmuls on ``device`` are at least about as fast as fp32 ones."""
    setting = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if setting not in SETTINGS:
        raise NexttokError(f"{ENV} must be auto, fast or slow (got '{setting}')", param=ENV)
    if setting != "auto":
        return setting == "fast"
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_bf16_ratio() <= SLOW_RATIO
    return True  # mps: bf16 is native on the Apple GPUs that have it, and torch refuses it where not


@lru_cache(maxsize=1)  # once per process
def cpu_bf16_ratio(n: int = 256) -> float:
    """Seconds of an (n, n) @ (n, n) matmul in bf16 over the same in fp32, at torch's thread count."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))  # not the global stream: training draws on it
    b = a.bfloat16()
    return _best(lambda: b @ b) / _best(lambda: a @ a)


def _best(fn, repeats: int = 3) -> float:
    fn()  # the first call picks and may compile the kernel
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def use_bf16(requested: bool, device: torch.device | str, what: str) -> bool:
    """``requested``, unless bf16 is slow on ``device``: then False, with a one-line notice naming
    what was asked (``what``) and what runs instead."""
    if not requested:
        return False
    if bf16_is_fast(device):
        return True
    warnings.warn(f"{what}: {_why_slow(device)}, so this runs in float32 instead", NexttokNotice, stacklevel=2)
    return False


def _why_slow(device: torch.device | str) -> str:
    if os.environ.get(ENV, "").strip().lower() == "slow":
        return f"{ENV}=slow says bf16 is slow here"
    if torch.device(device).type == "cuda":
        return "this GPU has no bf16 support"
    return (
        f"bf16 matmuls are emulated on this CPU (no native bf16: {cpu_bf16_ratio():.0f}x slower than fp32 "
        f"here; {ENV}=fast keeps bf16)"
    )
