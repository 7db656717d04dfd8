"""`Calibration`: per-channel statistics fitted on sample vectors, applied around any tier.

The codebook assumes every rotated coordinate of a unit vector has variance ``1/d``. On isotropic
data that holds for any rotation; on real keys and values it does not, and a 3-dim rotor mixes too
few channels to even them out. A calibration measures the channels once and preconditions the vectors
so the assumption holds again. With ``Rot`` the spec's rotation (``y = Rot x``, a ``(d, d)`` matrix
``M``), fitted on samples ``x`` of one group (e.g. one attention head):

    mu   = sum(x) / (n + n0)                              center=True, else 0
    s_j  = sqrt((d * sum((Rot(x - mu) / ||x - mu||)_j^2) + n0) / (n + n0))
                                                          channel RMS of the rotated unit samples:
                                                          1 for isotropic data, floored at MIN_SCALE
    A    = Rot^T diag(1 / s) Rot                          symmetric; A^-1 = Rot^T diag(s) Rot

    precondition:  x' = A (x - mu)             quantize x' with any tier
    restore:       x  = A^-1 x' + mu           applied to the tier's reconstruction of x'
    scores:        q . x = (A^-1 q) . x' + q . mu

so the tiers run unchanged on ``x'``: every tier's ``quantize(x, params, calibration=cal)`` preconditions
and returns a code that carries ``cal``, and its ``dequantize`` and ``scores`` restore such a code
(`quantize_with`, `dequantize_with`, `scores_with`, written once here). ``n`` counts the samples and ``n0 = prior`` adds that many
pseudo-samples of isotropic, zero-mean data, which keeps a fit on a handful of vectors (a short prompt)
close to the identity. For softmax attention ``q . mu`` is the same for every key of a
query and cancels, which makes centering keys free of error; centering values is not (it measured
worse, see ``docs/benchmarks/fidelity.md``), so `rotorquant.bench.fidelity` centers keys only.

Statistics keep the sample axes with size 1, so they broadcast against the vectors they were fitted
on: keys ``(batch, heads, tokens, d)`` fitted with ``axis=(0, 2)`` give per-head ``(1, heads, 1, d)``.
They are stored as float32 (``nbytes`` counts them); arithmetic runs in float64 for NumPy and float64
torch inputs and in float32 for other torch inputs, and the results stay in that dtype.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .params import QuantParams

MIN_SCALE = 0.1


@dataclass(frozen=True, eq=False)
class Calibration:
    """Fitted per-channel statistics (see the module docstring); build with `calibrate`.

    Attributes:
        params: the `QuantParams` whose rotation defines the channels; codes of other specs are refused.
        scale: float32 ``(..., d)`` channel scales ``s`` (sample axes kept with size 1).
        center: float32 ``(..., d)`` mean ``mu``, or None when fitted with ``center=False``.
    """

    params: QuantParams
    scale: np.ndarray
    center: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.params, QuantParams):
            raise TypeError(f"params: expected QuantParams, got {type(self.params).__name__}")
        d = self.spec.dim
        for name in ("scale", "center"):
            a = getattr(self, name)
            if a is None and name == "center":
                continue
            a = _real_array(name, a)
            if a.ndim == 0 or a.shape[-1] != d or (name == "center" and a.shape != self.scale.shape):
                want = f"(..., {d})" if name == "scale" else f"{self.scale.shape} (as scale)"
                raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
            if not np.isfinite(a).all() or (name == "scale" and not (a > 0).all()):
                raise ValueError(f"{name}: expected finite values" + (" > 0" if name == "scale" else ""))
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    def __getstate__(self) -> dict:
        return {"params": self.params, "scale": self.scale, "center": self.center}  # not the device copies

    def __setstate__(self, state: dict) -> None:
        for name, value in {**state, "_cache": {}}.items():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)  # read-only again, as when fitted
            object.__setattr__(self, name, value)

    def same_as(self, other: object) -> bool:
        """Whether ``other`` holds the same statistics: the same object, or equal parameters (`QuantParams.same_as`),
        ``scale`` and ``center`` (e.g. after a pickle round trip or `rotorquant.load`)."""
        if self is other:
            return True
        if not isinstance(other, Calibration) or not self.params.same_as(other.params):
            return False
        if (self.center is None) != (other.center is None):
            return False
        pairs = [(self.scale, other.scale)] + ([] if self.center is None else [(self.center, other.center)])
        return all(a.shape == b.shape and np.array_equal(a, b) for a, b in pairs)

    @property
    def spec(self):
        return self.params.spec

    @property
    def nbytes(self) -> int:
        """Bytes of the statistics: ``scale`` and ``center`` as stored (float32)."""
        return int(self.scale.nbytes + (0 if self.center is None else self.center.nbytes))

    def _consts(self, like):
        """``(M, s, mu)`` in the array library, device and compute dtype of ``like``."""
        if isinstance(like, np.ndarray):
            mu = None if self.center is None else self.center.astype(np.float64)
            return self.params.rotation_matrix(), self.scale.astype(np.float64), mu
        import torch

        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (like.device, dtype)
        if key not in self._cache:
            arrays = (self.params.rotation_matrix(), self.scale, self.center)
            with torch.inference_mode(False):  # plain tensors, usable with autograd later
                self._cache[key] = tuple(
                    None if a is None else torch.tensor(np.array(a), dtype=dtype, device=like.device) for a in arrays
                )
        return self._cache[key]

    def _check(self, name: str, x, finite: bool = True) -> None:
        if not isinstance(x, np.ndarray) and type(x).__module__.split(".")[0] != "torch":
            raise TypeError(f"{name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
        floating = np.issubdtype(x.dtype, np.floating) if isinstance(x, np.ndarray) else x.is_floating_point()
        if not floating:
            raise TypeError(f"{name}: expected a real floating-point dtype, got {x.dtype}")
        if finite and isinstance(x, np.ndarray) and not np.isfinite(x).all():  # torch tiers check on their own pass
            raise ValueError(f"{name}: expected finite values, got NaN or Inf")
        dim = self.spec.dim
        if x.ndim == 0 or x.shape[-1] != dim:
            raise ValueError(f"{name}: expected shape (..., {dim}), got {tuple(x.shape)}")
        try:
            fits = np.broadcast_shapes(tuple(x.shape), self.scale.shape) == tuple(x.shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name}: expected a shape the calibration's {self.scale.shape} broadcasts to, got {tuple(x.shape)}"
            )

    def _upcast(self, x):
        if isinstance(x, np.ndarray):
            return x.astype(np.float64)
        import torch

        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    def precondition(self, x, *, validate: bool = True):
        """``x (..., d)`` -> ``x' = Rot^T (Rot(x - mu) / s)``, in the compute dtype; ``validate=False`` lets a
        non-finite row through (it stays non-finite, as a tier's ``quantize(validate=False)`` stores it)."""
        self._check("x", x, finite=validate)
        x = self._upcast(x)
        m, s, mu = self._consts(x)
        if mu is not None:
            x = x - mu
        return ((x @ m.T) / s) @ m

    def restore(self, x_prime):
        """``x' (..., d)`` -> ``x = Rot^T (s * Rot x') + mu``, in the compute dtype (a non-finite row, which a
        code stored by ``quantize(validate=False)`` decodes to, stays non-finite)."""
        self._check("x_prime", x_prime, finite=False)
        x_prime = self._upcast(x_prime)
        m, s, mu = self._consts(x_prime)
        x = ((x_prime @ m.T) * s) @ m
        return x if mu is None else x + mu

    def queries(self, q):
        """``q (..., d)`` -> ``A^-1 q = Rot^T (s * Rot q)``: ``q . x = (A^-1 q) . x' + q . mu``."""
        self._check("q", q)
        q = self._upcast(q)
        m, s, _ = self._consts(q)
        return ((q @ m.T) * s) @ m

    def offsets(self, q):
        """``q (..., d)`` -> ``q . mu`` of shape ``(...)`` (zeros without a center)."""
        self._check("q", q)
        q = self._upcast(q)
        _, _, mu = self._consts(q)
        return (q * (0 if mu is None else mu)).sum(-1)


def _is_int(a) -> bool:
    return isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_))


def _normalize_axis(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if _is_int(axis) else axis
    if not isinstance(axes, (tuple, list)) or not all(_is_int(a) for a in axes):
        raise TypeError(f"axis: expected an int or a tuple of ints, got {axis!r}")
    out = tuple(sorted({int(a) % ndim for a in axes if -ndim <= a < ndim}))
    if len(out) != len(axes) or not out or ndim - 1 in out:
        raise ValueError(
            f"axis: expected distinct sample axes among 0..{ndim - 2} (not the last, vector axis), got {axis!r}"
        )
    return out


def _real_array(name: str, a) -> np.ndarray:
    """``a`` (NumPy or torch) as a float32 NumPy array; real numbers only."""
    if type(a).__module__.split(".")[0] == "torch":
        a = a.detach().cpu().numpy()
    a = np.asarray(a) if isinstance(a, (np.ndarray, list, tuple)) else None
    if a is None or a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected an array of real numbers, got {'no array' if a is None else a.dtype}")
    return np.array(a, dtype=np.float32)


def _as_float64(name: str, x) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a real floating-point dtype, got {x.dtype}")
        x = x.detach().cpu().double().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected a real floating-point dtype, got {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return x


def _weights(mask, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape)
    if type(mask).__module__.split(".")[0] == "torch":
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask: expected a bool array (True = real sample), got dtype {mask.dtype}")
    try:
        return np.broadcast_to(mask, shape).astype(np.float64)
    except ValueError:
        raise ValueError(f"mask: expected a shape that broadcasts to {shape}, got {mask.shape}") from None


def calibrate(
    samples, params: QuantParams, *, axis, mask=None, center: bool = False, prior: float = 0.0
) -> Calibration:
    """Fit a `Calibration` for ``params`` on ``samples (..., d)`` (NumPy or torch), reducing over ``axis``.

    ``mask`` (bool, broadcastable to ``samples.shape[:-1]``) marks the real samples (False: padding).
    Zero vectors have no direction and are left out of the scales. Every group needs at least one
    real non-zero sample unless ``prior > 0`` (the number of isotropic pseudo-samples, see above).
    """
    if not isinstance(params, QuantParams):
        raise TypeError(f"params: expected QuantParams from rotorquant.build_params(spec), got {type(params).__name__}")
    x = _as_float64("samples", samples)
    d = params.spec.dim
    if x.ndim < 2 or x.shape[-1] != d:
        raise ValueError(f"samples: expected shape (samples..., {d}), got {x.shape}")
    axes = _normalize_axis(axis, x.ndim)
    if isinstance(prior, (bool, np.bool_)) or not isinstance(prior, numbers.Real) or not 0 <= prior < math.inf:
        raise ValueError(f"prior: expected a finite number >= 0, got {prior!r}")
    if not isinstance(center, (bool, np.bool_)):
        raise TypeError(f"center: expected a bool, got {center!r}")
    prior = float(prior)
    w = _weights(mask, x.shape[:-1])[..., None]
    count = w.sum(axis=axes, keepdims=True)
    mu = None
    if center:
        mu = (x * w).sum(axis=axes, keepdims=True) / np.maximum(count + prior, 1e-300)
        x = x - mu
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    w = w * (norms > 0)
    count = w.sum(axis=axes, keepdims=True)
    if prior == 0 and (count == 0).any():
        raise ValueError("samples: expected at least one real, non-zero sample in every group, got a group with none")
    y = (x / np.where(norms > 0, norms, 1.0)) @ params.rotation_matrix().T
    scale = np.sqrt((d * (y**2 * w).sum(axis=axes, keepdims=True) + prior) / (count + prior))
    return Calibration(params, np.maximum(scale, MIN_SCALE), mu)




def quantize_with(quantize, x, params: QuantParams, calibration: Calibration, validate: bool):
    """A tier's ``quantize`` of ``x`` through ``calibration``: the code of ``x' = A (x - mu)``, carrying the
    calibration and the dtype of ``x``."""
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration: expected a rotorquant.Calibration or None, got {type(calibration).__name__}")
    if not calibration.params.same_as(params):
        raise ValueError(f"calibration: expected one fitted for {params.spec}, got one fitted for {calibration.spec}")
    code = quantize(calibration.precondition(x, validate=validate), params, validate=validate)
    return dataclasses.replace(code, dtype=str(x.dtype).removeprefix("torch."), calibration=calibration)


def _inner(code, params: QuantParams):
    """The code of ``x'`` (no calibration, the compute dtype) that a tier decodes."""
    if not code.calibration.params.same_as(params):
        raise ValueError(f"code: expected a calibration fitted for {params.spec}, got one for {code.calibration.spec}")
    return dataclasses.replace(code, calibration=None, dtype="float64" if code.dtype == "float64" else "float32")


def dequantize_with(dequantize, code, params: QuantParams):
    """A tier's ``dequantize`` of a calibrated code: ``x = A^-1 x' + mu``, in the code's dtype (NumPy: float64,
    as the reference returns)."""
    x = code.calibration.restore(dequantize(_inner(code, params), params))
    if isinstance(x, np.ndarray):
        return x
    from .tiers.tensors import output_dtype

    return x.to(output_dtype(code))


def scores_with(scores, q, code, params: QuantParams):
    """A tier's ``scores`` of ``q`` against a calibrated code: ``(A^-1 q) . x' + q . mu``; the statistics must
    be the same for every vector of a row (shape ``(..., 1, d)``), as they are applied to the queries."""
    cal = code.calibration
    if len(cal.scale.shape) >= 2 and cal.scale.shape[-2] != 1:
        raise ValueError(
            f"code.calibration: scores need statistics that are the same for every vector of a row, shape "
            f"(..., 1, {cal.spec.dim}), got {cal.scale.shape} (they would be applied along the query axis)"
        )
    s = scores(cal.queries(q), _inner(code, params), params) + cal.offsets(q)[..., None]
    return s if isinstance(s, np.ndarray) else s.to(q.dtype)
