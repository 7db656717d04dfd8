"""`Quantizer`: one spec, its parameters, and the tier that runs them.

    >>> import numpy as np, rotorquant as rq
    >>> quantizer = rq.Quantizer(rq.QuantizerSpec(dim=64, bits=4))
    >>> code = quantizer.quantize(np.ones((2, 64)))
    >>> quantizer.dequantize(code).shape
    (2, 64)
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from .compressed import Compressed
from .params import build_params
from .spec import QuantizerSpec, _StrEnum


class Tier(_StrEnum):
    """Which implementation runs the functions.

    - ``"auto"``: NumPy arrays -> ``numpy``; torch tensors on CUDA -> ``triton`` when Triton imports,
      other torch tensors -> ``torch``.
    - ``"numpy"``: the reference (float64, needs ``rotorquant[ref]``).
    - ``"torch"``: vectorized torch, any device and dtype.
    - ``"triton"``: fused kernels (CUDA, or ``TRITON_INTERPRET=1`` on CPU tensors).
    """

    AUTO = "auto"
    NUMPY = "numpy"
    TORCH = "torch"
    TRITON = "triton"


def tier_module(tier: Tier | str) -> ModuleType:
    """The module ``rotorquant.tiers.<tier>`` for a concrete (non-auto) tier."""
    tier = Tier(tier)
    if tier is Tier.AUTO:
        raise ValueError("tier_module: expected a concrete tier (numpy, torch or triton), got 'auto'")
    return importlib.import_module(f"rotorquant.tiers.{tier.value}")


def _auto_tier(array: object) -> Tier:
    if isinstance(array, np.ndarray):
        return Tier.NUMPY
    if getattr(array, "is_cuda", False):
        try:
            tier_module(Tier.TRITON)
            return Tier.TRITON
        except ImportError:
            return Tier.TORCH
    return Tier.TORCH


class Quantizer:
    """``Quantizer(spec, tier="auto")``: `quantize`, `dequantize` and `scores` without passing params around."""

    def __init__(self, spec: QuantizerSpec, tier: Tier | str = Tier.AUTO) -> None:
        try:
            self.tier = Tier(tier)
        except ValueError:
            raise ValueError(f"tier: expected one of {[t.value for t in Tier]}, got {tier!r}") from None
        self.spec = spec
        self.params = build_params(spec)

    def _module(self, array: object) -> ModuleType:
        return tier_module(_auto_tier(array) if self.tier is Tier.AUTO else self.tier)

    def quantize(self, x):
        """``x (..., dim)`` -> `Compressed`."""
        return self._module(x).quantize(x, self.params)

    def dequantize(self, code: Compressed):
        """`Compressed` -> ``(..., dim)``."""
        return self._module(code.codes).dequantize(code, self.params)

    def scores(self, q, code: Compressed):
        """``q (..., M, dim)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``."""
        return self._module(q).scores(q, code, self.params)

    def __repr__(self) -> str:
        return f"Quantizer({self.spec!r}, tier={self.tier.value!r})"
