"""Dtypes and input checks for torch tensors, shared by the torch and Triton tiers.

The messages come from `rotorquant.checks`, so every tier words its errors the same way.
"""

from __future__ import annotations

import torch

from . import cache_slots, checks
from .compressed import Compressed
from .params import QuantParams
from .spec import NormDtype

NORM_DTYPES = {NormDtype.FLOAT32: torch.float32, NormDtype.FLOAT16: torch.float16}
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the form `Compressed.dtype` stores)."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_lengths_dtype(lengths: torch.Tensor) -> None:
    """Per-sequence lengths must be an integer tensor (not floating, complex or bool)."""
    checks.check_lengths_integer(_is_integer(lengths.dtype), dtype_name(lengths.dtype))


def check_block_table_dtype(table: torch.Tensor) -> None:
    """Block ids must be an integer tensor (not floating, complex or bool)."""
    checks.check_block_table_integer(_is_integer(table.dtype), dtype_name(table.dtype))


def check_vectors(name: str, x: object, dim: int) -> torch.Tensor:
    """``x`` must be a real floating tensor ``(..., dim)`` (finiteness is checked by the caller)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    checks.check_floating(name, dtype_name(x.dtype), x.dtype in FLOATING)
    checks.check_last_dim(name, tuple(x.shape), dim)
    return x


def output_dtype(code: Compressed) -> torch.dtype:
    """The torch dtype named by ``code.dtype`` (the input's dtype), in which dequantized values return."""
    dtype = getattr(torch, str(code.dtype), None)
    if dtype not in FLOATING:
        raise ValueError(f"code.dtype: expected one of {[dtype_name(t) for t in FLOATING]}, got {code.dtype!r}")
    return dtype


def as_slots(slots: object, lead: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``slots`` as an integer tensor of shape ``lead`` on ``device``: int32 and int64 as given (no copy when
    already there), other integer dtypes as int64."""
    t = torch.as_tensor(slots, device=device)
    cache_slots.check_slots_integer(_is_integer(t.dtype), dtype_name(t.dtype))
    cache_slots.check_slots_shape(tuple(t.shape), lead)
    if t.dtype in (torch.int32, torch.int64):
        return t
    wide = t.to(torch.int64)
    if t.dtype == torch.uint64:  # values past int64 wrapped negative: make them out of range instead (never -1)
        wide = torch.where(wide < 0, torch.iinfo(torch.int64).max, wide)
    return wide


def check_cache(cache: object, params: QuantParams, device: torch.device) -> None:
    """``cache`` passes `rotorquant.cache_slots.check_cache` with torch tensors on ``device``."""
    for field, t in cache_slots.check_cache(cache, params, torch.Tensor, "torch.Tensor", _dtype_and_strides):
        if t.device != device:
            raise ValueError(f"cache.{field}: expected device {device} (as x), got {t.device}")


def _dtype_and_strides(t: torch.Tensor) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    size = t.element_size()
    span = cache_slots.byte_span(t.data_ptr(), tuple(t.shape), tuple(st * size for st in t.stride()), size)
    return dtype_name(t.dtype), t.stride(), span
