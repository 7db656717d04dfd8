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

from .calibration import Calibration
from .format import Compressed
from .params import QuantParams, build_params
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
    """``Quantizer(spec, tier="auto", calibration=None)``: the tier functions without passing params around.

    With a `rotorquant.Calibration` (fitted for ``spec``), `quantize` passes it to the tier (vectors are
    preconditioned, and the codes carry it); every tier decodes a calibrated code with the calibration it
    carries, so `dequantize` and `scores` need nothing more (scores use ``(A^-1 q) . x' + q . mu``).
    ``params`` replaces ``build_params(spec)`` (e.g. parameters with another codebook, for experiments).
    """

    def __init__(
        self,
        spec: QuantizerSpec,
        tier: Tier | str = Tier.AUTO,
        calibration: Calibration | None = None,
        *,
        params: QuantParams | None = None,
    ) -> None:
        try:
            self.tier = Tier(tier)
        except ValueError:
            raise ValueError(f"tier: expected one of {[t.value for t in Tier]}, got {tier!r}") from None
        if calibration is not None:
            if not isinstance(calibration, Calibration):
                raise TypeError(f"calibration: expected a rotorquant.Calibration, got {type(calibration).__name__}")
            if calibration.spec != spec:
                raise ValueError(f"calibration: expected one fitted for {spec}, got one fitted for {calibration.spec}")
        if params is not None and (not isinstance(params, QuantParams) or params.spec != spec):
            raise ValueError(f"params: expected QuantParams built for {spec}, got {params!r}")
        self.spec = spec
        self.params = build_params(spec) if params is None else params
        self.calibration = calibration

    def _module(self, array: object) -> ModuleType:
        return tier_module(_auto_tier(array) if self.tier is Tier.AUTO else self.tier)

    def quantize(self, x):
        """``x (..., dim)`` -> `Compressed` (through the calibration, which the code then carries)."""
        return self._module(x).quantize(x, self.params, calibration=self.calibration)

    def dequantize(self, code: Compressed):
        """`Compressed` -> ``(..., dim)`` (a calibrated code is restored with the calibration it carries)."""
        return self._module(getattr(code, "codes", None)).dequantize(code, self.params)

    def scores(self, q, code: Compressed):
        """``q (..., M, dim)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``."""
        return self._module(q).scores(q, code, self.params)

    def __repr__(self) -> str:
        cal = "" if self.calibration is None else ", calibration=..."
        return f"Quantizer({self.spec!r}, tier={self.tier.value!r}{cal})"
