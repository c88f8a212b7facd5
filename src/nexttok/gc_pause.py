"""Python's cyclic garbage collector around start-up and exit.

Importing torch and transformers and building a model allocate some 400,000 long-lived objects, and
the collector walks them again and again while they arrive, then again on every full collection
after (measured: ``nexttok predict`` 4.0 -> 3.6 s with the collector paused during imports and
loading, 3.2 s with those objects frozen as well), and once more at exit (~1 s). Reference counting
frees almost everything these phases discard; the collector only matters for reference cycles.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator
from functools import lru_cache

# Set by the console script, whose process holds no objects but ours: freeze after loading a model too.
freeze_after_load = False


@contextlib.contextmanager
def paused(freeze: bool = False) -> Iterator[None]:
    """No automatic collections inside the block; the caller's setting after it.

    At the end, the objects that arrived (imported modules, a loaded model) would make the next young
    collections walk all of them. With ``freeze`` (the console script's process, which holds nothing but
    ours) they move to the permanent generation, which later collections skip. Without it they move to
    the oldest generation, where surviving two collections would have put them anyway, minus those walks
    (``gc.freeze`` then ``gc.unfreeze``); only when nothing was frozen before, so the caller's frozen
    count stays as it was. Reference counting still frees them either way."""
    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        elif not frozen:
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


@lru_cache(maxsize=1)  # once per process
def freeze_at_exit() -> None:
    """At exit, freeze the collector's view of every object before Python's final collections.

    Frozen objects are skipped, which saves the ~1 s walk. Nothing changes while the process runs;
    objects still alive at exit are then freed by reference counting as before, and only reference
    cycles among them go unfinalized, which Python never promised at exit anyway."""
    atexit.register(gc.freeze)
