"""`Quantizer`: one spec, its parameters, and the tier that runs them.

    >>> import numpy as np, rotorquant as rq
    >>> quantizer = rq.Quantizer(rq.QuantizerSpec(dim=64, bits=4))
    >>> code = quantizer.quantize(np.ones((2, 64)))
    >>> quantizer.dequantize(code).shape
    (2, 64)
"""

from __future__ import annotations

import dataclasses
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


def _dtype_name(x: object) -> str:
    """``float32`` for a float32 NumPy array or torch tensor (the form `Compressed.dtype` stores)."""
    return str(x.dtype).removeprefix("torch.")


def _like_code(x, code: Compressed):
    """Torch ``x`` cast to the dtype the code was made from (NumPy stays float64, as the reference returns)."""
    if isinstance(x, np.ndarray):
        return x
    from .tiers.tensors import output_dtype

    return x.to(output_dtype(code))


class Quantizer:
    """``Quantizer(spec, tier="auto", calibration=None)``: the tier functions without passing params around.

    With a `rotorquant.Calibration` (fitted for ``spec``), vectors are preconditioned before the tier
    quantizes them and restored after it dequantizes; scores use ``(A^-1 q) . x' + q . mu``. Its codes
    carry the calibration and only a quantizer holding the same statistics decodes them (compared by content,
    `Calibration.same_as`, so a pickled or saved code still decodes).
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

    def _inner(self, name: str, code: object) -> Compressed:
        """The uncalibrated code the tier decodes (``code`` itself without a calibration)."""
        cal = getattr(code, "calibration", None)
        if self.calibration is None or not isinstance(code, Compressed):
            return code  # the tier reports a wrong type or a calibrated code
        if not self.calibration.same_as(cal):
            got = "one without" if cal is None else "one made with another"
            raise ValueError(f"{name}: expected a code made with this quantizer's calibration, got {got}")
        compute = "float64" if code.dtype == "float64" else "float32"
        return dataclasses.replace(code, calibration=None, dtype=compute)

    def quantize(self, x):
        """``x (..., dim)`` -> `Compressed`."""
        if self.calibration is None:
            return self._module(x).quantize(x, self.params)
        code = self._module(x).quantize(self.calibration.precondition(x), self.params)
        return dataclasses.replace(code, dtype=_dtype_name(x), calibration=self.calibration)

    def dequantize(self, code: Compressed):
        """`Compressed` -> ``(..., dim)``."""
        inner = self._inner("code", code)
        x = self._module(code.codes).dequantize(inner, self.params)
        if self.calibration is None:
            return x
        return _like_code(self.calibration.restore(x), code)

    def scores(self, q, code: Compressed):
        """``q (..., M, dim)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``."""
        inner = self._inner("code", code)
        if self.calibration is None:
            return self._module(q).scores(q, inner, self.params)
        shape = self.calibration.scale.shape
        if len(shape) >= 2 and shape[-2] != 1:
            raise ValueError(
                f"calibration: scores need statistics that are the same for every vector of a row, shape "
                f"(..., 1, {self.spec.dim}), got {shape} (they would be applied along the query axis)"
            )
        s = self._module(q).scores(self.calibration.queries(q), inner, self.params)
        s = s + self.calibration.offsets(q)[..., None]
        return s if isinstance(s, np.ndarray) else s.to(q.dtype)

    def __repr__(self) -> str:
        cal = "" if self.calibration is None else ", calibration=..."
        return f"Quantizer({self.spec!r}, tier={self.tier.value!r}{cal})"
