"""Input checks shared by every tier: each raises one clear error naming the
argument, what was expected and what was received. Tiers compute the facts
(shape, dtype, finiteness) with their own array library and call these."""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from .format import CODE_DTYPES, PACKED_FIELDS, PAYLOAD_FIELDS, Compressed
from .params import QuantParams


def check_params(params: object) -> None:
    if not isinstance(params, QuantParams):
        raise TypeError(f"params: expected QuantParams from rotorquant.build_params(spec), got {type(params).__name__}")


def check_floating(name: str, dtype: object, is_floating: bool) -> None:
    if not is_floating:
        raise TypeError(f"{name}: expected a real floating-point dtype, got {dtype}")


def check_last_dim(name: str, shape: tuple[int, ...], dim: int) -> None:
    if len(shape) == 0 or shape[-1] != dim:
        raise ValueError(f"{name}: expected shape (..., {dim}), got {tuple(shape)}")


def check_min_ndim(name: str, shape: tuple[int, ...], ndim: int, layout: str) -> None:
    if len(shape) < ndim:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(shape)}")


def check_finite(name: str, all_finite: bool) -> None:
    if not all_finite:
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")


def check_norms_fit(
    name: str, max_norm: float, limit: float, norm_dtype: str, corrected: bool = False, residual: bool = False
) -> None:
    """The largest norm to store fits the norm dtype (``corrected``: it is ``||x|| / ||c[k]||``, norm
    correction; ``residual``: it is a QJL residual norm ``||x - x_mse||``)."""
    if not max_norm <= limit:
        stored = "; with norm_correction the stored ||x|| / ||c[k]||" if corrected else ""
        what = "QJL residual norms ||x - x_mse||" if residual else "vector norms"
        raise ValueError(
            f"{name}: expected {what} <= {limit:g} (the largest finite {norm_dtype}, "
            f"the spec's norm_dtype{stored}), got a norm of {max_norm:g}"
        )


def check_array(name: str, a: object, arrays) -> None:
    """``a`` is an array of the called tier's library (``arrays``: a `rotorquant.arrays` adapter); an array of
    another tier is named as such."""
    if arrays.is_array(a):
        return
    origin = ""
    if isinstance(a, np.ndarray):
        origin = f" (an array of the numpy tier; the {arrays.tier} tier was called)"
    elif type(a).__module__.split(".")[0] == "torch":
        origin = f" (a tensor of the torch or triton tier; the {arrays.tier} tier was called)"
    raise TypeError(f"{name}: expected a {arrays.kind}, got {type(a).__name__}{origin}")


def check_code(name: str, code: object, params: QuantParams, arrays) -> None:
    """``code`` is a `Compressed` built for ``params.spec`` whose payload fields are arrays of the called tier
    (``arrays``: a `rotorquant.arrays` adapter) with the documented dtypes and shapes, all checked before any
    field is read."""
    if not isinstance(code, Compressed):
        raise TypeError(f"{name}: expected a rotorquant.Compressed, got {type(code).__name__}")
    if code.spec != params.spec:
        raise ValueError(f"{name}: expected a code built for {params.spec}, got one built for {code.spec}")
    if code.dtype not in CODE_DTYPES:
        raise ValueError(f"{name}.dtype: expected one of {CODE_DTYPES}, got {code.dtype!r}")
    if code.calibration is not None:
        raise ValueError(
            f"{name}: expected a code made without a Calibration, got a calibrated one (dequantize and scores "
            "take calibrated codes; attention and quantize_into take uncalibrated caches)"
        )
    spec = params.spec
    for field in PAYLOAD_FIELDS:
        a = getattr(code, field)
        wanted = spec.qjl or field in ("codes", "norms")
        if a is None and wanted:
            raise ValueError(f"{name}.{field}: expected an array (spec.qjl={spec.qjl}), got None")
        if a is None:
            continue
        if not wanted:
            raise ValueError(f"{name}.{field}: expected None (spec.qjl=False), got {type(a).__name__}")
        check_array(f"{name}.{field}", a, arrays)
        expected = "uint8" if field in PACKED_FIELDS else spec.norm_dtype.value
        if arrays.dtype_name(a) != expected:
            raise TypeError(f"{name}.{field}: expected dtype {expected}, got {arrays.dtype_name(a)}")
    lead = tuple(code.codes.shape[:-1])
    shapes = {"codes": (*lead, spec.code_bytes), "norms": lead}
    if spec.qjl:
        shapes.update(qjl_signs=(*lead, spec.sign_bytes), residual_norms=lead)
    for field, shape in shapes.items():
        got = tuple(getattr(code, field).shape)
        if got != shape:
            raise ValueError(f"{name}.{field}: expected shape {shape}, got {got}")
    for field in shapes:
        arrays.check_device(f"{name}.{field}", getattr(code, field), code.codes, f"{name}.codes")


def broadcast_error(name: str, shape_a: tuple[int, ...], other: str, shape_b: tuple[int, ...]) -> ValueError:
    return ValueError(f"{name}: leading shape {tuple(shape_a)} does not broadcast with {other}'s {tuple(shape_b)}")


def check_attention_shapes(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
    """Shapes of decode attention; returns the GQA group size ``Hq // Hkv``.

    ``q``: ``(B, Hq, T, d)``; ``k_code`` and ``v_code``: leading ``(B, Hkv, N)``.
    """
    check_min_ndim("q", q_shape, 4, "(batch, q_heads, q_len, dim)")
    if len(q_shape) != 4:
        raise ValueError(f"q: expected shape (batch, q_heads, q_len, dim), got {tuple(q_shape)}")
    if len(k_shape) != 3:
        raise ValueError(f"k_code: expected leading shape (batch, kv_heads, kv_len), got {tuple(k_shape)}")
    if tuple(v_shape) != tuple(k_shape):
        raise ValueError(f"v_code: expected leading shape {tuple(k_shape)} (as k_code), got {tuple(v_shape)}")
    if k_shape[0] != q_shape[0]:
        raise ValueError(f"k_code: expected batch {q_shape[0]} (as q), got {k_shape[0]}")
    if k_shape[1] == 0 or q_shape[1] % k_shape[1]:
        raise ValueError(f"q: expected q_heads a multiple of kv_heads={k_shape[1]}, got {q_shape[1]}")
    if k_shape[2] == 0:
        raise ValueError(f"k_code: expected at least one cached key (kv_len >= 1), got leading shape {tuple(k_shape)}")
    return q_shape[1] // k_shape[1]


def check_block_table_shape(shape: tuple[int, ...], batch: int) -> None:
    """A block table is ``(batch, max_blocks)``: one row per sequence."""
    if len(shape) != 2 or shape[0] != batch or shape[1] == 0:
        raise ValueError(f"block_table: expected shape (batch={batch}, max_blocks >= 1), got {tuple(shape)}")


def check_block_ids(bad_batches: list[int], num_blocks: int) -> None:
    """No sequence names a block out of range where its keys (below ``lengths``) lie."""
    if bad_batches:
        raise ValueError(
            f"block_table: expected block ids in 0..{num_blocks - 1} for every block holding keys below "
            f"lengths, got ids out of range in sequences {bad_batches[:8]}"
        )


def check_lengths_shape(lengths_shape: tuple[int, ...], batch: int) -> None:
    """Per-sequence lengths have shape ``(batch,)``."""
    if tuple(lengths_shape) != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths_shape)}")


def check_lengths_range(lo: int, hi: int, kv_len: int, least: int = 1) -> None:
    """Every per-sequence length lies in ``least..kv_len``: ``least`` is 1, or ``q_len`` with causal
    masking (every sequence then holds its own queries' keys)."""
    if lo < least or hi > kv_len:
        why = "" if least == 1 else f" (causal=True: each sequence holds the keys of its {least} queries)"
        raise ValueError(f"lengths: expected values in {least}..{kv_len}{why}, got values in {lo}..{hi}")


def lengths_in_range(lengths, kv_len: int, least: int):
    """Elementwise ``least <= lengths <= kv_len`` (NumPy array or torch tensor): the sequences whose
    attention is defined. With ``validate=False`` the others get NaN rows instead of an error."""
    return (lengths >= least) & (lengths <= kv_len)


def check_integer(name: str, is_integer: bool, dtype: str) -> None:
    """Lengths, block ids and slots are integers (not floats, complex or bools)."""
    if not is_integer:
        raise TypeError(f"{name}: expected integers, got dtype {dtype}")


def refuse_integers(name: str, value: object, error: Exception) -> NoReturn:
    """Lengths, block ids and slots that no array of integers can be made of (ragged or mixed lists)."""
    raise TypeError(f"{name}: expected integers (an array, a tensor or a list of ints), got {type(value).__name__} ({error})")


def check_scale(scale: object) -> float:
    """The softmax scale is None (``1/sqrt(d)``) or a finite real number; returns it as a float or None."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale: expected None or a real number, got {type(scale).__name__}")
    if not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    return float(scale)


def check_bool(name: str, value: object) -> bool:
    """``value`` is a bool (Python or NumPy); returns it as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_causal(causal: object, q_len: int, kv_len: int) -> bool:
    """``causal`` is a bool; with it, the ``q_len`` queries fit in the ``kv_len`` cached keys."""
    causal = check_bool("causal", causal)
    if causal and q_len > kv_len:
        raise ValueError(f"q: expected at most kv_len={kv_len} queries with causal=True, got q_len={q_len}")
    return causal
