"""What the checks and the engine glue need to know about an array library, and the NumPy adapter.

A tier's arrays are NumPy arrays (the reference tier) or torch tensors (the torch and Triton tiers).
Everything written once for every tier (`rotorquant.checks`, `rotorquant.engine`) reaches the array
library only through an adapter with these members:

=====================  ======================================================================
member                 meaning
=====================  ======================================================================
``kind``               what the tier takes, for errors: ``"numpy.ndarray"`` or ``"torch.Tensor"``
``tier``               the tier's name, for errors: ``"numpy"``, ``"torch"`` or ``"triton"``
``is_array(a)``        ``a`` is an array of this library
``dtype_name(a)``      ``"float32"``, ``"uint8"``, ... (the form `rotorquant.Compressed.dtype` stores)
``vectors(name, x,     ``x`` checked as real floating vectors ``(..., dim)`` on a device the tier runs on;
  dim)``               returned as the tier computes with it (NumPy: float64)
``all_finite(x)``      no NaN or Inf in ``x`` (reads the values: a host synchronization on a GPU)
``integers(name, v,    ``v`` (array, list or scalar) as an integer array on ``like``'s device: int32 and
  like)``              int64 kept, other integer dtypes as int64 (uint64 values past int64 stay out of
                       range, never wrap to -1); refused unless integer
``arange(n, like)``    ``0..n - 1`` as int64 on ``like``'s device
``full(n, value,       ``n`` copies of the integer ``value`` as int64 on ``like``'s device
  like)``
``nan_where(mask,     ``a`` with NaN where ``mask`` (broadcast) is True, without a host synchronization
  a)``
``span(a)``            ``(dtype name, strides in elements, (first, end) byte addresses)`` of a cache field
``check_field(name,    a cache field can be written in place where ``like`` lives
  a, like)``
``check_device(name,   ``a`` lies where ``like`` (named ``like_name``) does, and the tier runs there
  a, like, like_name)`` (NumPy: always)
=====================  ======================================================================
"""

from __future__ import annotations

import math

import numpy as np


class NumpyArrays:
    """The adapter for NumPy arrays (the reference tier computes in float64)."""

    kind = "numpy.ndarray"
    tier = "numpy"

    @staticmethod
    def is_array(a: object) -> bool:
        return isinstance(a, np.ndarray)

    @staticmethod
    def dtype_name(a: np.ndarray) -> str:
        return a.dtype.name

    def vectors(self, name: str, x: object, dim: int) -> np.ndarray:
        from . import checks

        checks.check_array(name, x, self)
        checks.check_floating(name, x.dtype, np.issubdtype(x.dtype, np.floating))
        checks.check_last_dim(name, x.shape, dim)
        return x.astype(np.float64)

    @staticmethod
    def all_finite(x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    def integers(self, name: str, value: object, like: np.ndarray) -> np.ndarray:
        from . import checks

        try:
            a = np.asarray(value)
        except (TypeError, ValueError) as error:
            checks.refuse_integers(name, value, error)
        checks.check_integer(name, a.dtype.kind in "iu", a.dtype.name)
        if a.dtype == np.uint64:  # past int64 the cast would wrap negative: keep such values out of range
            a = np.minimum(a, np.uint64(np.iinfo(np.int64).max))
        return a.astype(np.int64)

    @staticmethod
    def arange(n: int, like: np.ndarray) -> np.ndarray:
        return np.arange(n)

    @staticmethod
    def full(n: int, value: int, like: np.ndarray) -> np.ndarray:
        return np.full(n, value, dtype=np.int64)

    @staticmethod
    def nan_where(mask: np.ndarray, a: np.ndarray) -> np.ndarray:
        return np.where(mask, np.nan, a)

    @staticmethod
    def span(a: np.ndarray) -> tuple[str, tuple[int, ...], tuple[int, int]]:
        strides = tuple(st // a.itemsize for st in a.strides)
        return a.dtype.name, strides, byte_span(a.__array_interface__["data"][0], a.shape, a.strides, a.itemsize)

    @staticmethod
    def check_field(name: str, a: np.ndarray, like: np.ndarray) -> None:
        if not a.flags.writeable:
            raise ValueError(f"{name}: expected a writable array, got a read-only one")

    @staticmethod
    def check_device(name: str, a: np.ndarray, like: np.ndarray, like_name: str) -> None:
        return None


NUMPY = NumpyArrays()


def byte_span(address: int, shape: tuple[int, ...], byte_strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """``(first, end)``: the range of addresses an array's elements occupy (empty for no elements)."""
    if math.prod(shape) == 0:
        return address, address
    first = address + sum(min(0, (n - 1) * st) for n, st in zip(shape, byte_strides))
    return first, address + sum(max(0, (n - 1) * st) for n, st in zip(shape, byte_strides)) + itemsize
