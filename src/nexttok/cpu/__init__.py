"""The compiled CPU decoder: Llama-family models in float32, decoded by numba-compiled code that reads the
Hugging Face model's own weights (its logits are pinned to the model's forward pass by tests).

The parts, as in ggml's split of ops, threading, re-layout and graph:

- ``intrinsics``: LLVM instructions numba lacks (atomics, spin-wait, prefetch, the packed tile's dot);
- ``primitives``: dot products, GEMM tiles, RMS norm, RoPE, exp, SiLU: arrays in, arrays out;
- ``schedule``: one parallel region per call, stages split into chunks claimed by atomic counters;
- ``walk``: the Llama block walk, once, for every call (one row, N rows, a prompt's block);
- ``buffers``: host buffers, key/value slots and their growth;
- ``packed``, ``hugepages``: the weight layout the walk streams fastest;
- ``settings``: the switches (``NEXTTOK_NUMBA``, ``NEXTTOK_PACKED``, ``NEXTTOK_HUGEPAGES``);
- ``decoder``: :class:`~nexttok.cpu.decoder.CompiledDecoder`, the ``nexttok.decode.Decoder`` it implements.

Importing this package imports no numba; ``decoder`` does. Measurements: docs/internals/cpu-decoder.md.
numba's on-disk cache of ``walk.run`` is keyed on walk.py alone, though it inlines the other modules: after
editing one of them, touch walk.py (or delete its ``__pycache__``) so the next call compiles afresh.
"""
