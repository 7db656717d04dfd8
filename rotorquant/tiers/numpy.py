"""The NumPy reference tier: the ground truth, written to be read.

Pipeline for one vector ``x`` in R^d (``c`` = centroids, ``b`` = boundaries):

    s = ||x||,  u = x / s                          normalize
    y = Rot(u)                                     rotors: R_g u_g R_g~ per 3-dim group (clifford)
    k_j = #{i : y_j >= b_i}                        nearest centroid
    x_mse = s * Rot^T(c[k])                        reconstruction
    with QJL:  r = x - x_mse,  z = sign(S r),  x_hat = x_mse + ||r|| sqrt(pi/2)/m * S^T z

Everything runs in float64; outputs are float64.
"""

from __future__ import annotations

import math

import numpy as np

from .. import cache_slots, checks, paging
from ..bitpack import pack_codes, unpack_codes
from ..cl3 import rotate_groups
from ..compressed import Compressed
from ..params import QuantParams
from ..spec import NormDtype

_NORM_DTYPES = {NormDtype.FLOAT32: np.float32, NormDtype.FLOAT16: np.float16}


def _as_vectors(name: str, x: object, dim: int, finite: bool = True) -> np.ndarray:
    """Validate ``x`` as real floating vectors ``(..., dim)`` (finite unless ``finite=False``) and return it
    as float64."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    checks.check_floating(name, x.dtype, np.issubdtype(x.dtype, np.floating))
    checks.check_last_dim(name, x.shape, dim)
    x = x.astype(np.float64)
    if finite:
        checks.check_finite(name, bool(np.isfinite(x).all()))
    return x


def _group_rotors(params: QuantParams) -> np.ndarray:
    """``(ceil(d/3), 4)``: the group rotors, then the tail rotor when ``d % 3 != 0``."""
    if params.tail_rotor is None:
        return params.rotors
    return np.vstack([params.rotors, params.tail_rotor])


def rotate(u: np.ndarray, params: QuantParams, inverse: bool = False) -> np.ndarray:
    """``(..., d)`` -> ``(..., d)``: the spec's rotation (``inverse=True``: its transpose)."""
    if params.rotation is not None:
        return u @ (params.rotation if inverse else params.rotation.T)
    d = params.spec.dim
    rotors = _group_rotors(params)
    padded = np.zeros((*u.shape[:-1], 3 * len(rotors)))
    padded[..., :d] = u
    groups = padded.reshape(*u.shape[:-1], len(rotors), 3)
    return rotate_groups(groups, rotors, inverse).reshape(padded.shape)[..., :d]


def quantize(x: np.ndarray, params: QuantParams, *, validate: bool = True) -> Compressed:
    """Compress vectors ``x (..., d)`` into a `Compressed` of leading shape ``(...)``.

    ``validate=False`` skips the checks that read values (``x`` finite, every norm within the spec's
    norm dtype): a vector that would fail them is stored with a non-finite norm, so it decodes to
    non-finite values, never to finite wrong ones.
    """
    checks.check_params(params)
    validate = checks.check_bool("validate", validate)
    x64 = _as_vectors("x", x, params.spec.dim, finite=validate)
    with np.errstate(invalid="ignore", over="ignore"):  # reached only by non-finite rows (validate=False)
        return _quantize(x64, params, x.dtype.name, validate)


def quantize_into(x: np.ndarray, params: QuantParams, cache: Compressed, slots, *, validate: bool = True) -> None:
    """Compress ``x (..., d)`` and write vector ``i`` into ``cache`` at flat index ``slots[i]``, in place.

    ``cache``: a `Compressed` for ``params.spec`` of leading shape ``L`` (1 to 4 dims), the dtype of ``x``;
    ``slots``: integers of ``x``'s leading shape, each a row-major flat index over ``L``, or -1 to skip
    (see `rotorquant.cache_slots`). Each written entry is exactly ``quantize(x, params)``'s for its vector.

    ``validate=True`` checks everything before writing anything: ``x`` as `quantize` does, every slot in
    ``-1..size(L) - 1``, no entry written twice. ``validate=False`` skips the checks that read values: a
    vector `quantize` would refuse is stored with a non-finite norm, a slot out of range writes nothing,
    and for repeated slots which vector lands is unspecified.
    """
    checks.check_params(params)
    validate = checks.check_bool("validate", validate)
    x64 = _as_vectors("x", x, params.spec.dim, finite=False)
    _check_cache(cache, params)
    cache_slots.check_x_dtype(x.dtype.name, cache.dtype)
    index = np.asarray(slots)
    cache_slots.check_slots_integer(index.dtype.kind in "iu", str(index.dtype))
    cache_slots.check_slots_shape(index.shape, x64.shape[:-1])
    if index.dtype == np.uint64:  # values past int64 would wrap negative (to -1: skip); keep them out of range
        index = np.minimum(index, np.uint64(np.iinfo(np.int64).max))
    index = index.astype(np.int64)
    if validate:
        cache_slots.check_slot_values(index.reshape(-1), cache_slots.size(cache.shape))
        checks.check_finite("x", bool(np.isfinite(x64).all()))
    with np.errstate(invalid="ignore", over="ignore"):  # reached only by non-finite rows (validate=False)
        code = _quantize(x64, params, x.dtype.name, validate)
    cache_slots.write(cache, code, index)


def _check_cache(cache: object, params: QuantParams) -> None:
    """``cache`` passes `rotorquant.cache_slots.check_cache` with writable NumPy fields."""
    for field, a in cache_slots.check_cache(cache, params, np.ndarray, "numpy.ndarray", _dtype_and_strides):
        if not a.flags.writeable:
            raise ValueError(f"cache.{field}: expected a writable array, got a read-only one")


def _dtype_and_strides(a: np.ndarray) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """An array's dtype name, strides (in bytes: element strides for the uint8 fields) and byte span."""
    span = cache_slots.byte_span(a.__array_interface__["data"][0], a.shape, a.strides, a.itemsize)
    return a.dtype.name, a.strides, span


def _quantize(x64: np.ndarray, params: QuantParams, dtype: str, validate: bool) -> Compressed:
    """`quantize` of float64 vectors ``x64 (..., d)``; ``dtype``: the input's dtype name."""
    spec = params.spec
    norm_dtype = _NORM_DTYPES[spec.norm_dtype]
    limit = float(np.finfo(norm_dtype).max)
    norms = np.linalg.norm(x64, axis=-1)
    if validate:
        checks.check_norms_fit("x", float(norms.max(initial=0.0)), limit, spec.norm_dtype.value)
    unit = x64 / np.where(norms > 0, norms, 1.0)[..., None]
    idx = np.searchsorted(params.boundaries, rotate(unit, params), side="right")
    levels = params.centroids[idx]
    scale = norms / np.linalg.norm(levels, axis=-1) if spec.norm_correction else norms
    if validate and spec.norm_correction:
        checks.check_norms_fit("x", float(scale.max(initial=0.0)), limit, spec.norm_dtype.value, corrected=True)
    scale = np.where(scale > limit, np.inf, scale)  # validate=False: a norm past the dtype is Inf, never its max
    fields = dict(codes=pack_codes(idx, spec.mse_bits), norms=scale.astype(norm_dtype), spec=spec, dtype=dtype)
    if spec.qjl:
        residual = x64 - norms[..., None] * rotate(levels, params, inverse=True)
        fields["qjl_signs"] = pack_codes(residual @ params.qjl_matrix.T >= 0, 1)
        fields["residual_norms"] = np.linalg.norm(residual, axis=-1).astype(norm_dtype)
    return Compressed(**fields)


def _mse_part(code: Compressed, params: QuantParams) -> np.ndarray:
    """``s * Rot^T(c[k])``, the Lloyd-Max reconstruction ``(..., d)``."""
    idx = unpack_codes(code.codes, params.spec.mse_bits, params.spec.dim)
    return code.norms.astype(np.float64)[..., None] * rotate(params.centroids[idx], params, inverse=True)


def _signs(code: Compressed, params: QuantParams) -> np.ndarray:
    """``z = sign(S r)`` as ``(..., m)`` float64 in {-1, +1}."""
    bits = unpack_codes(code.qjl_signs, 1, params.spec.qjl_dim)
    return 2.0 * bits - 1.0


def _qjl_scale(code: Compressed, params: QuantParams) -> np.ndarray:
    """``||r|| sqrt(pi/2) / m`` per vector ``(...)``."""
    return code.residual_norms.astype(np.float64) * math.sqrt(math.pi / 2) / params.spec.qjl_dim


def dequantize(code: Compressed, params: QuantParams) -> np.ndarray:
    """Reconstruct ``(..., d)`` float64 vectors: ``x_mse`` (+ ``||r|| sqrt(pi/2)/m S^T z`` with QJL)."""
    checks.check_params(params)
    checks.check_code("code", code, params)
    x_hat = _mse_part(code, params)
    if params.spec.qjl:
        x_hat = x_hat + _qjl_scale(code, params)[..., None] * (_signs(code, params) @ params.qjl_matrix)
    return x_hat


def scores(q: np.ndarray, code: Compressed, params: QuantParams) -> np.ndarray:
    """Estimates of ``q @ x.T``: ``q (..., M, d)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``.

    Without QJL ``q . x_mse``; with QJL the unbiased ``q . x_mse + ||r|| sqrt(pi/2)/m <S q, z>``.
    """
    checks.check_params(params)
    checks.check_code("code", code, params)
    q64 = _as_vectors("q", q, params.spec.dim)
    checks.check_min_ndim("q", q64.shape, 2, "(..., M, dim)")
    checks.check_min_ndim("code", code.shape, 1, "(..., N)")
    try:
        np.broadcast_shapes(q64.shape[:-2], code.shape[:-1])
    except ValueError:
        raise checks.broadcast_error("q", q64.shape[:-2], "code", code.shape[:-1]) from None
    return _scores(q64, code, params)


def _scores(q64: np.ndarray, code: Compressed, params: QuantParams) -> np.ndarray:
    """`scores` of float64 queries ``q64 (..., M, d)`` (checked by the caller)."""
    out = q64 @ np.swapaxes(_mse_part(code, params), -1, -2)
    if params.spec.qjl:
        sketch = q64 @ params.qjl_matrix.T  # (..., M, m)
        out = out + _qjl_scale(code, params)[..., None, :] * (sketch @ np.swapaxes(_signs(code, params), -1, -2))
    return out


def attention(
    q, k_code, v_code, k_params, v_params, *, scale=None, lengths=None, causal=False, validate=True, block_table=None
) -> np.ndarray:
    """Decode attention over a compressed K/V cache.

    ``q (B, Hq, T, d)``; ``k_code``, ``v_code`` of leading shape ``(B, Hkv, N)``; query head ``h``
    reads KV head ``h // (Hq // Hkv)`` (grouped-query attention). Query ``t`` of sequence ``b`` attends
    to its first ``visible[b, t]`` keys:

        visible[b, t] = lengths[b]                  (all N when lengths is None)
        visible[b, t] = lengths[b] - (T - 1 - t)    with causal=True: the T queries are the sequence's
                                                    last T cached tokens, each sees itself and before
        out = softmax(scale * scores(q, K) masked) @ dequantize(V),   scale = 1/sqrt(d) by default.

    ``validate=False`` skips the checks that read values (``q`` finite, ``lengths`` in range): a query
    with NaN or Inf then gets a non-finite output row, and every query of a sequence whose length is
    out of range gets NaN, never a finite wrong row. (A non-finite cache entry, stored by
    ``quantize(validate=False)``, makes every query that attends to it non-finite; ``0 * NaN`` may
    spread it to other queries of its sequence and head.)

    With ``block_table (B, max_blocks)`` the caches are paged (see `rotorquant.paging`): ``k_code`` and
    ``v_code`` of leading shape ``(num_blocks, Hkv, page)``, key ``n`` of sequence ``b`` in slot
    ``n % page`` of block ``block_table[b, n // page]``, ``N = max_blocks * page``.
    A block id out of range where keys below ``lengths[b]`` lie is an error, or with ``validate=False``
    NaN rows for sequence ``b``.

    Returns ``(B, Hq, T, d_v)`` float64.
    """
    checks.check_params(k_params)
    checks.check_params(v_params)
    checks.check_code("k_code", k_code, k_params)
    checks.check_code("v_code", v_code, v_params)
    validate = checks.check_bool("validate", validate)
    q64 = _as_vectors("q", q, k_params.spec.dim, finite=validate)
    k_shape, v_shape = k_code.shape, v_code.shape
    if block_table is not None:
        table = np.asarray(block_table)
        checks.check_block_table_integer(table.dtype.kind in "iu", str(table.dtype))
        k_shape = v_shape = paging.logical_shape(k_code, v_code, table.shape, q64.shape[0])
    group = checks.check_attention_shapes(q64.shape, k_shape, v_shape)
    batch, kv_heads, kv_len = k_shape
    q_len = q64.shape[2]
    causal = checks.check_causal(causal, q_len, kv_len)
    lengths = np.full(batch, kv_len) if lengths is None else np.asarray(lengths)
    checks.check_lengths_integer(lengths.dtype.kind in "iu", str(lengths.dtype))
    checks.check_lengths_shape(lengths.shape, batch)
    least = max(q_len, 1) if causal else 1
    if validate and lengths.size:
        checks.check_lengths_range(int(lengths.min()), int(lengths.max()), kv_len, least=least)
    bad = np.zeros(batch, dtype=bool)
    if block_table is not None:
        first_keys = np.arange(table.shape[1]) * k_code.shape[2]
        k_code, v_code, bad = paging.logical_cache(k_code, v_code, table, lengths, first_keys, validate)
    hidden = q_len - 1 - np.arange(q_len) if causal else np.zeros(q_len, dtype=np.int64)  # later queries' keys
    visible = lengths[:, None] - hidden  # (B, T)
    rows = np.tile(visible, group)  # (B, group * T): row g * T + t
    s = _scores(q64.reshape(batch, kv_heads, group * q_len, q64.shape[3]), k_code, k_params)
    s = s * (1.0 / math.sqrt(k_params.spec.dim) if scale is None else scale)
    s = np.where(np.arange(kv_len) < rows[:, None, :, None], s, -np.inf)
    with np.errstate(invalid="ignore"):  # reached only with validate=False: NaN rows, as documented
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
    out = p @ dequantize(v_code, v_params)  # (B, Hkv, group*T, d_v)
    out[~checks.lengths_in_range(lengths, kv_len, least) | bad] = np.nan
    return out.reshape(batch, q64.shape[1], q_len, v_params.spec.dim)
