"""Torch tensors in the torch and Triton tiers: dtypes, and the `rotorquant.arrays` adapter for tensors.

The messages come from `rotorquant.checks`, so every tier words its errors the same way.
"""

from __future__ import annotations

import torch

from .. import checks
from ..arrays import byte_span
from ..format import Compressed
from ..spec import NormDtype

NORM_DTYPES = {NormDtype.FLOAT32: torch.float32, NormDtype.FLOAT16: torch.float16}
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the form `Compressed.dtype` stores)."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(code: Compressed) -> torch.dtype:
    """The torch dtype named by ``code.dtype`` (the input's dtype), in which dequantized values return."""
    dtype = getattr(torch, str(code.dtype), None)
    if dtype not in FLOATING:
        raise ValueError(f"code.dtype: expected one of {[dtype_name(t) for t in FLOATING]}, got {code.dtype!r}")
    return dtype


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


class TensorArrays:
    """The `rotorquant.arrays` adapter for torch tensors (the torch tier: any device)."""

    kind = "torch.Tensor"
    tier = "torch"

    @staticmethod
    def is_array(a: object) -> bool:
        return isinstance(a, torch.Tensor)

    @staticmethod
    def dtype_name(a: torch.Tensor) -> str:
        return dtype_name(a.dtype)

    def vectors(self, name: str, x: object, dim: int) -> torch.Tensor:
        checks.check_array(name, x, self)
        checks.check_floating(name, dtype_name(x.dtype), x.dtype in FLOATING)
        checks.check_last_dim(name, tuple(x.shape), dim)
        self.check_runs_on(name, x.device)
        return x

    def check_runs_on(self, name: str, device: torch.device) -> None:
        """The tier can compute on ``device`` (the torch tier: any)."""

    @staticmethod
    def all_finite(x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def integers(self, name: str, value: object, like: torch.Tensor) -> torch.Tensor:
        try:
            t = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
        except (TypeError, ValueError, RuntimeError) as error:
            checks.refuse_integers(name, value, error)
        checks.check_integer(name, _is_integer(t.dtype), dtype_name(t.dtype))
        if t.dtype not in (torch.int32, torch.int64):  # unsigned dtypes past uint8 also lack comparisons in torch
            wide = t.to(torch.int64)
            if t.dtype == torch.uint64:  # values past int64 wrapped negative: keep them out of range (never -1)
                wide = torch.where(wide < 0, torch.iinfo(torch.int64).max, wide)
            t = wide
        return t.to(like.device)

    @staticmethod
    def arange(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, device=like.device)

    @staticmethod
    def full(n: int, value: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.int64, device=like.device)

    @staticmethod
    def nan_where(mask: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a.masked_fill(mask, float("nan"))

    @staticmethod
    def span(t: torch.Tensor) -> tuple[str, tuple[int, ...], tuple[int, int]]:
        size = t.element_size()
        span = byte_span(t.data_ptr(), tuple(t.shape), tuple(st * size for st in t.stride()), size)
        return dtype_name(t.dtype), tuple(t.stride()), span

    @staticmethod
    def check_field(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
        return None

    def check_device(self, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
        if t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (as {like_name}), got {t.device}")
        self.check_runs_on(name, t.device)


TENSORS = TensorArrays()

