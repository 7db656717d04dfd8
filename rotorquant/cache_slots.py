"""Writing new vectors into a compressed cache in place, at flat slot indices (``quantize_into``).

A cache is a `Compressed` of leading shape ``L`` (1 to 4 dims, e.g. ``(B, Hkv, N)`` or a paged
``(num_blocks, Hkv, page)``; its fields may be views in any layout). Vector ``i`` of ``x (..., d)`` goes
to the cache entry whose row-major flat index over ``L`` is ``slots[i]`` (``slots`` has ``x``'s leading
shape), so for ``L = (L0, L1, L2)``

    slots[i] = (i0 * L1 + i1) * L2 + i2    writes entry (i0, i1, i2)
    slots[i] = -1                           writes nothing (a padding token, as vLLM's slot mapping)

and every written field is bit for bit what ``quantize(x, params)`` would have returned for that vector.
The cache's fields must have the spec's dtypes, keep each packed row's bytes contiguous and lie apart
from one another in memory (an expanded view or two fields sharing memory are refused).
With ``validate=True`` every slot must be in ``-1..size(L) - 1`` and the non-negative ones distinct (host
synchronizations), checked before anything is written. Unchecked (``validate=False``), a slot out of
range writes nothing, and for repeated slots which vector lands (field by field) is unspecified.

The functions here index, compare and reshape only, so they take NumPy arrays and torch tensors alike.
"""

from __future__ import annotations

import collections
import math
from typing import Any

from . import checks
from .compressed import PAYLOAD_FIELDS, Compressed
from .params import QuantParams

MAX_CACHE_DIMS = 4
"""Leading dims a cache may have (the Triton kernel unravels a slot over at most four)."""


def check_cache_shape(shape: tuple[int, ...]) -> None:
    """A cache has 1 to `MAX_CACHE_DIMS` leading dims."""
    if not 1 <= len(shape) <= MAX_CACHE_DIMS:
        raise ValueError(f"cache: expected 1 to {MAX_CACHE_DIMS} leading dims, got leading shape {tuple(shape)}")


def check_cache(cache: object, params: QuantParams, array_type: type, type_name: str, describe) -> list[tuple[str, Any]]:
    """``cache`` is a `Compressed` for ``params`` (`checks.check_code`) with 1 to `MAX_CACHE_DIMS` leading dims
    whose payload fields are ``array_type`` arrays passing `check_cache_field`, in memory apart from one
    another (``describe(a)`` gives an array's dtype name, strides and `byte_span`); returns the
    ``(field, array)`` pairs present, for the tier's own checks."""
    checks.check_code("cache", cache, params)
    check_cache_shape(cache.shape)
    fields = [(f, getattr(cache, f)) for f in PAYLOAD_FIELDS if getattr(cache, f) is not None]
    spans = []
    for field, a in fields:
        if not isinstance(a, array_type):
            raise TypeError(f"cache.{field}: expected a {type_name}, got {type(a).__name__}")
        dtype, strides, span = describe(a)
        expected = "uint8" if field in ("codes", "qjl_signs") else params.spec.norm_dtype.value
        check_cache_field(field, dtype, expected, tuple(a.shape), tuple(strides))
        spans.append((*span, field))
    spans = sorted(span for span in spans if span[1] > span[0])
    for (_, end, first), (start, _, second) in zip(spans[:-1], spans[1:]):
        if start < end:
            raise ValueError(f"cache.{second}: expected memory apart from cache.{first}'s, got the two overlapping")
    return fields


def byte_span(address: int, shape: tuple[int, ...], byte_strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """``(first, end)``: the range of addresses an array's elements occupy (empty for no elements)."""
    if math.prod(shape) == 0:
        return address, address
    first = address + sum(min(0, (n - 1) * st) for n, st in zip(shape, byte_strides))
    return first, address + sum(max(0, (n - 1) * st) for n, st in zip(shape, byte_strides)) + itemsize


def check_cache_field(field: str, dtype: str, expected: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """A cache field has the spec's dtype (a write never casts) and, unless empty, one element per entry (no
    expanded, stride-0 dim of size > 1, whose entries would share memory; other self-overlapping views are
    not detected) and, for the packed uint8 fields, each entry's bytes contiguous (``strides`` in elements
    or, for NumPy, bytes: the same for uint8)."""
    if dtype != expected:
        raise TypeError(f"cache.{field}: expected dtype {expected}, got {dtype}")
    if math.prod(shape) == 0:
        return
    if any(size > 1 and stride == 0 for size, stride in zip(shape, strides)):
        raise ValueError(
            f"cache.{field}: expected one element per cache entry, got an expanded view (shape {tuple(shape)}, "
            f"strides {tuple(strides)})"
        )
    if field in ("codes", "qjl_signs") and shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(
            f"cache.{field}: expected each entry's bytes contiguous (last stride 1), got strides {tuple(strides)}"
        )


def check_x_dtype(dtype: str, cache_dtype: str) -> None:
    """New vectors have the dtype the cache records (what `dequantize` returns)."""
    if dtype != cache_dtype:
        raise TypeError(f"x: expected dtype {cache_dtype} (the cache's dtype), got {dtype}")


def check_slots_shape(slots_shape: tuple[int, ...], lead: tuple[int, ...]) -> None:
    """One slot per vector."""
    if tuple(slots_shape) != tuple(lead):
        raise ValueError(f"slots: expected shape {tuple(lead)} (x's leading shape), got {tuple(slots_shape)}")


def check_slots_integer(is_integer: bool, dtype: str) -> None:
    """Slots are integers."""
    if not is_integer:
        raise TypeError(f"slots: expected integers, got dtype {dtype}")


def check_slot_values(slots, size: int) -> None:
    """Every slot (flat, NumPy or torch) is -1 or in ``0..size - 1``, and no entry is written twice
    (reads the values)."""
    if slots.shape[0] == 0:
        return
    lo, hi = int(slots.min()), int(slots.max())
    if lo < -1 or hi >= size:
        raise ValueError(f"slots: expected values in -1..{size - 1} (-1: skip), got values in {lo}..{hi}")
    counts = collections.Counter(slots[slots >= 0].tolist())
    repeated = sorted(slot for slot, times in counts.items() if times > 1)
    if repeated:
        raise ValueError(f"slots: expected each cache entry written at most once, got slots repeated: {repeated[:8]}")


def unravel(flat, shape: tuple[int, ...]) -> tuple:
    """The row-major indices ``(i0, ..., i_{k-1})`` over ``shape`` of the flat indices ``flat``."""
    index = []
    for size in reversed(shape[1:]):
        index.append(flat % size)
        flat = flat // size
    return (flat, *reversed(index))


def size(shape: tuple[int, ...]) -> int:
    """Entries in a cache of leading ``shape``."""
    return math.prod(shape)


def write(cache: Compressed, code: Compressed, slots) -> None:
    """Copy each vector of ``code`` (leading shape as ``slots``) into ``cache`` at its slot; slots outside
    ``0..size - 1`` are skipped."""
    flat = slots.reshape(-1)
    keep = (flat >= 0) & (flat < size(cache.shape))
    index = unravel(flat[keep], cache.shape)
    for field in PAYLOAD_FIELDS:
        value = getattr(code, field)
        if value is not None:
            rows = value.reshape(flat.shape[0], *value.shape[len(code.shape) :])
            getattr(cache, field)[index] = rows[keep]
