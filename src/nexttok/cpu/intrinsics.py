"""LLVM instructions numba does not expose: atomics, the spin-wait hint, cache prefetch, a pointer from an
address, and the packed tile's dot product (one vector of TILE sums held in registers)."""

from __future__ import annotations

import platform

import numba
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from nexttok.cpu.packed import TILE

_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _element(context, builder, sig, args):
    """LLVM pointer to ``args[0][args[1]]`` (a 1-D array and an index)."""
    array = context.make_array(sig.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]])


@intrinsic
def fetch_add(typingctx, counters, index, value):
    """``counters[index] += value`` as one atomic instruction; returns the value before."""

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _element(context, builder, sig, args), args[2], "seq_cst")

    return types.int64(counters, index, types.int64), codegen


@intrinsic
def load_acquire(typingctx, counters, index):
    """``counters[index]``, read so that every write made before a release of it is visible after."""

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_element(context, builder, sig, args), "acquire", 8)

    return types.int64(counters, index), codegen


@intrinsic
def pause(typingctx):
    """x86's ``pause`` (a spin-wait hint: frees the core's resources while waiting); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if _X86:
            signature = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, signature, "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return types.none(), codegen


def _prefetcher(locality: int):
    """An intrinsic hinting to bring the cache line at an int64 address into the caches (it never faults):
    ``locality`` 3 into every level (x86 prefetcht0), 1 into the outer ones (prefetcht2)."""

    @intrinsic
    def prefetch(typingctx, address):
        def codegen(context, builder, sig, args):
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            signature = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            hint = cgutils.get_or_insert_function(builder.module, signature, "llvm.prefetch.p0")
            builder.call(hint, [builder.inttoptr(args[0], i8p), i32(0), i32(locality), i32(1)])  # read, data
            return context.get_dummy_value()

        return types.none(types.int64), codegen

    return prefetch


prefetch, prefetch_far = _prefetcher(3), _prefetcher(1)


@intrinsic
def f32_pointer(typingctx, address):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(types.float32)(types.int64), codegen


@intrinsic
def tile_dot(typingctx, tile, x, n, out):
    """out[k] = sum over j < n of tile[j, k] x[j], for k < TILE: a packed tile (n, TILE) float32 at address
    ``tile`` (nexttok.cpu.packed), x (n,) and out (TILE,) at addresses. The TILE sums are one vector held in
    registers, and each x[j] is broadcast against a row of the tile: one load per TILE/8 vectors of weights
    beside theirs, where a row-by-row dot product loads as many values of x as of weights (packed.py)."""

    def codegen(context, builder, sig, args):
        tile, x, n, out = args
        f32, vec, i64 = ir.FloatType(), ir.VectorType(ir.FloatType(), TILE), ir.IntType(64)
        name = f"llvm.fmuladd.v{TILE}f32"
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)
        acc = cgutils.alloca_once(builder, vec)  # promoted to registers by LLVM
        builder.store(ir.Constant(vec, [0.0] * TILE), acc)
        rows, xs = builder.inttoptr(tile, vec.as_pointer()), builder.inttoptr(x, f32.as_pointer())
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), TILE), [0] * TILE)
        with cgutils.for_range(builder, n) as loop:
            value = builder.load(builder.gep(xs, [loop.index]))
            one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, i64(0))
            broadcast = builder.shuffle_vector(one, one, lanes)  # x[j] in every lane
            weights = builder.load(builder.gep(rows, [loop.index]), align=4)  # tile row j
            builder.store(builder.call(fmuladd, [weights, broadcast, builder.load(acc)]), acc)
        builder.store(builder.load(acc), builder.inttoptr(out, vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


def _tile_rows(count: int):
    """An intrinsic: tile_dot for ``count`` rows of x at once, sharing each load of the tile's row."""

    @intrinsic
    def tile_rows(typingctx, tile, x, x_stride, n, out):
        """out[r, k] = sum over j < n of tile[j, k] x[r, j], for r < count and k < TILE: a packed tile at
        address ``tile``; x (count, x_stride) and out (count, TILE) float32 at addresses. Each tile row is
        loaded once for the ``count`` rows (their sums: count vectors held in registers)."""

        def codegen(context, builder, sig, args):
            tile, x, x_stride, n, out = args
            f32, vec, i64 = ir.FloatType(), ir.VectorType(ir.FloatType(), TILE), ir.IntType(64)
            name = f"llvm.fmuladd.v{TILE}f32"
            fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)
            accs = [cgutils.alloca_once(builder, vec) for _ in range(count)]  # promoted to registers by LLVM
            for acc in accs:
                builder.store(ir.Constant(vec, [0.0] * TILE), acc)
            rows, xs = builder.inttoptr(tile, vec.as_pointer()), builder.inttoptr(x, f32.as_pointer())
            lanes = ir.Constant(ir.VectorType(ir.IntType(32), TILE), [0] * TILE)
            with cgutils.for_range(builder, n) as loop:
                weights = builder.load(builder.gep(rows, [loop.index]), align=4)  # tile row j
                for r, acc in enumerate(accs):
                    at = builder.add(builder.mul(x_stride, i64(r)), loop.index)
                    value = builder.load(builder.gep(xs, [at]))
                    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, i64(0))
                    broadcast = builder.shuffle_vector(one, one, lanes)  # x[r, j] in every lane
                    builder.store(builder.call(fmuladd, [weights, broadcast, builder.load(acc)]), acc)
            outs = builder.inttoptr(out, vec.as_pointer())
            for r, acc in enumerate(accs):
                builder.store(builder.load(acc), builder.gep(outs, [i64(r)]), align=4)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64, types.int64, types.int64, types.int64), codegen

    return tile_rows


tile_rows4, tile_rows8 = _tile_rows(4), _tile_rows(8)


@njit(inline="always")
def matrix(address, rows, cols):
    """The float32 C-ordered (rows, cols) array at ``address`` (a weight the kernel holds a view of)."""
    return numba.carray(f32_pointer(address), (rows, cols))
