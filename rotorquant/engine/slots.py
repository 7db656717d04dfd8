"""Writing new vectors into a compressed cache in place, at flat slot indices (``quantize_into``).

A cache is a `rotorquant.Compressed` of leading shape ``L`` (1 to 4 dims, e.g. ``(B, Hkv, N)`` or a paged
``(num_blocks, Hkv, page)``; its fields may be views in any layout). Vector ``i`` of ``x (..., d)`` goes
to the cache entry whose row-major flat index over ``L`` is ``slots[i]`` (``slots`` has ``x``'s leading
shape), so for ``L = (L0, L1, L2)``

    slots[i] = (i0 * L1 + i1) * L2 + i2    writes entry (i0, i1, i2)
    slots[i] = -1                           writes nothing (a padding token, as vLLM's slot mapping)

and every written field is bit for bit what the tier's ``quantize(x, params)`` returns for that vector.
The cache's fields must have the spec's dtypes, keep each packed row's bytes contiguous and share no
byte with one another: apart in memory, or interleaved with each entry's fields side by side in one slot
(as an inference engine's uint8 pages hold them). An expanded view or two fields sharing memory are refused.
With ``validate=True`` every slot must be in ``-1..size(L) - 1`` and the non-negative ones distinct (host
synchronizations), checked before anything is written. Unchecked (``validate=False``), a slot out of
range writes nothing, and for repeated slots which vector lands (field by field) is unspecified.

`quantize_into` is written once for every tier: it checks, calls the tier's ``quantize`` and copies. The
Triton tier replaces the last two steps of an unchecked call by one fused kernel.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from .. import checks
from ..format import PACKED_FIELDS, PAYLOAD_FIELDS, Compressed
from ..params import QuantParams

MAX_CACHE_DIMS = 4
"""Leading dims a cache may have (the Triton kernel unravels a slot over at most four)."""


def quantize_into(arrays, quantize, x, params: QuantParams, cache: Compressed, slots, *, validate: bool = True) -> None:
    """Compress ``x (..., d)`` with the tier's ``quantize`` and write vector ``i`` into ``cache`` at flat index
    ``slots[i]`` (see the module docstring); ``arrays``: the tier's `rotorquant.arrays` adapter."""
    x, index, validate = prepare(arrays, x, params, cache, slots, validate)
    write(cache, quantize(x, params, validate=validate), index)


def prepare(arrays, x, params: QuantParams, cache: Compressed, slots, validate: bool):
    """The checks of `quantize_into`, all before anything is written: ``(x, flat slots, validate)``.

    ``x`` as ``quantize`` takes it, slots as a flat integer array on ``x``'s device (int32 or int64 kept);
    with ``validate`` also ``x`` finite and every slot in range and written at most once."""
    checks.check_params(params)
    validate = checks.check_bool("validate", validate)
    arrays.vectors("x", x, params.spec.dim)
    check_cache(arrays, cache, params, x)
    if arrays.dtype_name(x) != cache.dtype:
        raise TypeError(f"x: expected dtype {cache.dtype} (the cache's dtype), got {arrays.dtype_name(x)}")
    index = arrays.integers("slots", slots, x)
    if tuple(index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"slots: expected shape {tuple(x.shape[:-1])} (x's leading shape), got {tuple(index.shape)}")
    index = index.reshape(-1)
    if validate:
        check_slot_values(index, size(cache.shape))
        checks.check_finite("x", arrays.all_finite(x))
    return x, index, validate


def check_cache(arrays, cache: object, params: QuantParams, like) -> None:
    """``cache`` is a code for ``params`` (`rotorquant.checks.check_code`) with 1 to `MAX_CACHE_DIMS` leading
    dims whose fields can be written in place where ``like`` lives: one element per entry (no expanded,
    stride-0 dim; other self-overlapping views are not detected), each packed row's bytes contiguous, and
    no two fields sharing a byte: apart in memory, or interleaved, each entry's fields side by side in one
    slot of bytes (as an engine's uint8 page holds them; see `_Footprint`)."""
    checks.check_code("cache", cache, params, arrays)
    if not 1 <= len(cache.shape) <= MAX_CACHE_DIMS:
        raise ValueError(f"cache: expected 1 to {MAX_CACHE_DIMS} leading dims, got leading shape {cache.shape}")
    footprints = []
    for field in PAYLOAD_FIELDS:
        a = getattr(cache, field)
        if a is None:
            continue
        arrays.check_device(f"cache.{field}", a, like, "x")
        dtype, strides, span = arrays.span(a)
        shape = tuple(a.shape)
        if math.prod(shape) and any(n > 1 and st == 0 for n, st in zip(shape, strides)):
            raise ValueError(
                f"cache.{field}: expected one element per cache entry, got an expanded view (shape {shape}, "
                f"strides {strides})"
            )
        if math.prod(shape) and field in PACKED_FIELDS and shape[-1] > 1 and strides[-1] != 1:
            raise ValueError(f"cache.{field}: expected each entry's bytes contiguous (last stride 1), got strides {strides}")
        arrays.check_field(f"cache.{field}", a, like)
        if span[1] > span[0]:
            itemsize = np.dtype(dtype).itemsize
            width = shape[-1] if field in PACKED_FIELDS else itemsize
            lead = zip(shape[: len(cache.shape)], strides)
            footprints.append(_Footprint(field, span, width, tuple(abs(st) * itemsize for n, st in lead if n > 1)))
    footprints.sort(key=lambda f: f.span)
    for i, first in enumerate(footprints):
        for second in footprints[i + 1 :]:
            if second.span[0] < first.span[1] and not first.interleaves(second):
                raise ValueError(
                    f"cache.{second.field}: expected memory apart from cache.{first.field}'s, got the two overlapping"
                )


class _Footprint:
    """The bytes one cache field occupies: ``span`` (first and end address) and each entry's ``width`` bytes,
    the entries ``byte_strides`` apart (over the leading dims longer than 1)."""

    def __init__(self, field: str, span: tuple[int, int], width: int, byte_strides: tuple[int, ...]):
        self.field, self.span, self.width, self.byte_strides = field, span, width, byte_strides

    def interleaves(self, other: "_Footprint") -> bool:
        """Whether two fields whose spans overlap share no byte because they are interleaved: equal byte
        strides, each a multiple of the smallest (a cell of ``cell`` bytes per entry), and, with
        ``delta = (other's first byte - this one's) mod cell``, this field's entries in bytes ``[0, width)`` of
        each cell and the other's in ``[delta, delta + width')`` with ``width <= delta <= cell - width'``."""
        cell = min(self.byte_strides, default=0)
        if not cell or self.byte_strides != other.byte_strides or any(st % cell for st in self.byte_strides):
            return False
        delta = (other.span[0] - self.span[0]) % cell
        return self.width <= delta <= cell - other.width


def check_slot_values(slots, entries: int) -> None:
    """Every slot (flat, NumPy or torch) is -1 or in ``0..entries - 1``, and no entry is written twice
    (reads the values)."""
    if slots.shape[0] == 0:
        return
    lo, hi = int(slots.min()), int(slots.max())
    if lo < -1 or hi >= entries:
        raise ValueError(f"slots: expected values in -1..{entries - 1} (-1: skip), got values in {lo}..{hi}")
    counts = collections.Counter(slots[slots >= 0].tolist())
    repeated = sorted(slot for slot, times in counts.items() if times > 1)
    if repeated:
        raise ValueError(f"slots: expected each cache entry written at most once, got slots repeated: {repeated[:8]}")


def unravel(flat, shape: tuple[int, ...]) -> tuple:
    """The row-major indices ``(i0, ..., i_{k-1})`` over ``shape`` of the flat indices ``flat``."""
    index = []
    for n in reversed(shape[1:]):
        index.append(flat % n)
        flat = flat // n
    return (flat, *reversed(index))


def size(shape: tuple[int, ...]) -> int:
    """Entries in a cache of leading ``shape``."""
    return math.prod(shape)


def write(cache: Compressed, code: Compressed, slots) -> None:
    """Copy each vector of ``code`` (as many as ``slots``, flat) into ``cache`` at its slot; slots outside
    ``0..size - 1`` are skipped."""
    keep = (slots >= 0) & (slots < size(cache.shape))
    index = unravel(slots[keep], cache.shape)
    for field in PAYLOAD_FIELDS:
        value = getattr(code, field)
        if value is not None:
            rows = value.reshape(slots.shape[0], *value.shape[len(code.shape) :])
            getattr(cache, field)[index] = rows[keep]
