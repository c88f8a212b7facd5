"""The compiled CPU decoder's switches, read in one place (listed in docs/generate.md). Each is on unless
set to ``0``; they are read when used, so a test or a long-lived process may change them."""

from __future__ import annotations

import os

SWITCHES = {
    "NEXTTOK_NUMBA": "the compiled CPU decoder itself (0: the torch decoder runs every model)",
    "NEXTTOK_PACKED": "the packed copy of the weights made after weights.RELAYOUT_AFTER steps",
    "NEXTTOK_HUGEPAGES": "moving a model nexttok loaded onto 2 MiB pages after weights.RELAYOUT_AFTER steps",
}


def on(name: str) -> bool:
    """Whether switch ``name`` (one of :data:`SWITCHES`) is on."""
    if name not in SWITCHES:
        raise KeyError(name)
    return os.environ.get(name, "1") != "0"
