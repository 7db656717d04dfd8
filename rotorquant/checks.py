"""Input checks shared by every tier: each raises one clear error naming the
argument, what was expected and what was received. Tiers compute the facts
(shape, dtype, finiteness) with their own array library and call these."""

from __future__ import annotations

import numpy as np

from .compressed import Compressed
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


def check_norms_fit(name: str, max_norm: float, limit: float, norm_dtype: str, corrected: bool = False) -> None:
    """The largest norm to store fits the norm dtype (``corrected``: it is ``||x|| / ||c[k]||``, norm_correction)."""
    if not max_norm <= limit:
        stored = "; with norm_correction the stored ||x|| / ||c[k]||" if corrected else ""
        raise ValueError(
            f"{name}: expected vector norms <= {limit:g} (the largest finite {norm_dtype}, "
            f"the spec's norm_dtype{stored}), got a norm of {max_norm:g}"
        )


def check_code(name: str, code: object, params: QuantParams) -> None:
    """``code`` must be a `Compressed` built for ``params.spec`` with the documented shapes."""
    if not isinstance(code, Compressed):
        raise TypeError(f"{name}: expected a rotorquant.Compressed, got {type(code).__name__}")
    if code.spec != params.spec:
        raise ValueError(f"{name}: expected a code built for {params.spec}, got one built for {code.spec}")
    if code.calibration is not None:
        raise ValueError(
            f"{name}: expected a code made without a Calibration, got a calibrated one "
            "(decode it with the rotorquant.Quantizer that made it)"
        )
    spec = params.spec
    if tuple(code.codes.shape[-1:]) != (spec.code_bytes,):
        raise ValueError(f"{name}.codes: expected shape (..., {spec.code_bytes}), got {tuple(code.codes.shape)}")
    if tuple(code.norms.shape) != code.shape:
        raise ValueError(f"{name}.norms: expected shape {code.shape}, got {tuple(code.norms.shape)}")
    if spec.qjl and (code.qjl_signs is None or code.residual_norms is None):
        raise ValueError(f"{name}: expected qjl_signs and residual_norms (spec.qjl=True), got None")
    if spec.qjl and tuple(code.qjl_signs.shape) != (*code.shape, spec.sign_bytes):
        raise ValueError(
            f"{name}.qjl_signs: expected shape {(*code.shape, spec.sign_bytes)}, got {tuple(code.qjl_signs.shape)}"
        )
    if spec.qjl and tuple(code.residual_norms.shape) != code.shape:
        raise ValueError(f"{name}.residual_norms: expected shape {code.shape}, got {tuple(code.residual_norms.shape)}")


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


def check_block_table_integer(is_integer: bool, dtype: str) -> None:
    """Block ids are integers."""
    if not is_integer:
        raise TypeError(f"block_table: expected integers, got dtype {dtype}")


def check_block_ids(bad_batches: list[int], num_blocks: int) -> None:
    """No sequence names a block out of range where its keys (below ``lengths``) lie."""
    if bad_batches:
        raise ValueError(
            f"block_table: expected block ids in 0..{num_blocks - 1} for every block holding keys below "
            f"lengths, got ids out of range in sequences {bad_batches[:8]}"
        )


def check_lengths_integer(is_integer: bool, dtype: str) -> None:
    """Per-sequence lengths are integers (not floats, complex or bools)."""
    if not is_integer:
        raise TypeError(f"lengths: expected integers, got dtype {dtype}")


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
