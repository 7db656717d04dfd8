"""The NumPy reference tier: the ground truth, written to be read.

Pipeline for one vector ``x`` in R^d (``c`` = centroids, ``b`` = boundaries):

    s = ||x||,  u = x / s                          normalize
    y = Rot(u)                                     rotor butterfly: per stage, shuffle, then R_g u_g R_g~
                                                   per 3-dim group (clifford); Hadamard: H (signs * u);
                                                   dense: M u
    k_j = #{i : y_j >= b_i}                        nearest centroid
    x_mse = s * Rot^T(c[k])                        reconstruction
    with QJL:  r = x - x_mse,  z = sign(S r),  x_hat = x_mse + ||r|| sqrt(pi/2)/m * S^T z

Everything runs in float64; outputs are float64. Argument checks live in `rotorquant.checks`; what an
inference engine adds around the math (appending into a cache at slots, lengths, causal masks, paged
caches, NaN rows for unchecked input) lives in `rotorquant.engine`.
"""

from __future__ import annotations

import math

import numpy as np

from .. import calibration as calibrated
from .. import checks
from ..arrays import NUMPY
from ..engine import attention as engine_attention
from ..engine import slots as engine_slots
from ..format import NORM_DTYPES, Compressed, pack_codes, stored_norms, unpack_codes
from ..math.cl3 import rotate_groups
from ..math.rotations import walsh_hadamard
from ..params import QuantParams


def rotate(u: np.ndarray, params: QuantParams, inverse: bool = False) -> np.ndarray:
    """``(..., d)`` -> ``(..., d)``: the spec's rotation (``inverse=True``: its transpose).

    rotor: stage by stage, ``u <- u[perm_t]``, then every group of three ``R u_g R~`` (clifford);
    inverse: the stages backwards, ``R~ u_g R`` then ``u[perm_t] <- u``.
    hadamard: ``H (s * u)``; inverse: ``s * (H u)``.   dense: ``M u``; inverse: ``M^T u``.
    """
    if params.rotation is not None:
        return u @ (params.rotation if inverse else params.rotation.T)
    if params.signs is not None:
        return params.signs * walsh_hadamard(u) if inverse else walsh_hadamard(params.signs * u)
    stages = range(len(params.rotors))
    for t in reversed(stages) if inverse else stages:
        if not inverse:
            u = u[..., params.permutations[t]]
        u = _rotate_groups(u, params.rotors[t], inverse)
        if inverse:
            u = u[..., np.argsort(params.permutations[t])]
    return u


def _rotate_groups(u: np.ndarray, rotors: np.ndarray, inverse: bool) -> np.ndarray:
    """Each group of three coordinates ``(3g, 3g+1, 3g+2)`` of ``u (..., d)`` rotated by ``rotors[g]`` (the last,
    short group zero-padded to three)."""
    d = u.shape[-1]
    padded = np.zeros((*u.shape[:-1], 3 * len(rotors)))
    padded[..., :d] = u
    groups = padded.reshape(*u.shape[:-1], len(rotors), 3)
    return rotate_groups(groups, rotors, inverse).reshape(padded.shape)[..., :d]


def quantize(x: np.ndarray, params: QuantParams, *, calibration=None, validate: bool = True) -> Compressed:
    """Compress vectors ``x (..., d)`` into a `Compressed` of leading shape ``(...)``.

    ``validate=False`` skips the checks that read values (``x`` finite, every norm within the spec's
    norm dtype): a vector that would fail them is stored with a non-finite norm, so it decodes to
    non-finite values, never to finite wrong ones.
    ``calibration``: a `rotorquant.Calibration` fitted for ``params``: the code of ``A (x - mu)``, carrying the
    calibration, which `dequantize` and `scores` then undo (`rotorquant.calibration.quantize_with`).
    """
    checks.check_params(params)
    validate = checks.check_bool("validate", validate)
    if calibration is not None:
        return calibrated.quantize_with(quantize, x, params, calibration, validate)
    x64 = NUMPY.vectors("x", x, params.spec.dim)
    if validate:
        checks.check_finite("x", NUMPY.all_finite(x64))
    spec = params.spec
    limit = float(np.finfo(NORM_DTYPES[spec.norm_dtype]).max)
    with np.errstate(invalid="ignore", over="ignore"):  # reached only by non-finite rows (validate=False)
        norms = np.linalg.norm(x64, axis=-1)  # s = ||x||
        if validate:
            checks.check_norms_fit("x", float(norms.max(initial=0.0)), limit, spec.norm_dtype.value)
        unit = x64 / np.where(norms > 0, norms, 1.0)[..., None]  # u = x / s
        idx = np.searchsorted(params.boundaries, rotate(unit, params), side="right")  # k_j = #{i : y_j >= b_i}
        levels = params.centroids[idx]
        scale = norms / np.linalg.norm(levels, axis=-1) if spec.norm_correction else norms
        if validate and spec.norm_correction:
            checks.check_norms_fit("x", float(scale.max(initial=0.0)), limit, spec.norm_dtype.value, corrected=True)
        fields = dict(codes=pack_codes(idx, spec.mse_bits, spec.packing), norms=stored_norms(scale, spec.norm_dtype))
        if spec.qjl:
            residual = x64 - norms[..., None] * rotate(levels, params, inverse=True)  # r = x - x_mse
            residual_norms = np.linalg.norm(residual, axis=-1)
            if validate:
                checks.check_norms_fit("x", float(residual_norms.max(initial=0.0)), limit, spec.norm_dtype.value,
                                       residual=True)  # fmt: skip
            fields["qjl_signs"] = pack_codes(residual @ params.qjl_matrix.T >= 0, 1)  # z = sign(S r)
            fields["residual_norms"] = stored_norms(residual_norms, spec.norm_dtype)
    return Compressed(**fields, spec=spec, dtype=x.dtype.name)


def quantize_into(x: np.ndarray, params: QuantParams, cache: Compressed, slots, *, validate: bool = True) -> None:
    """Compress ``x (..., d)`` and write vector ``i`` into ``cache`` at flat index ``slots[i]``, in place.

    ``cache``: a `Compressed` for ``params.spec`` of leading shape ``L`` (1 to 4 dims, writable NumPy arrays),
    the dtype of ``x``; ``slots``: integers of ``x``'s leading shape, each a row-major flat index over ``L``,
    or -1 to skip. Each written entry is exactly `quantize`'s for its vector. Written once for every tier
    in `rotorquant.engine.slots`, which documents the checks and what ``validate=False`` leaves unchecked.
    """
    engine_slots.quantize_into(NUMPY, quantize, x, params, cache, slots, validate=validate)


def _mse_part(code: Compressed, params: QuantParams) -> np.ndarray:
    """``s * Rot^T(c[k])``, the Lloyd-Max reconstruction ``(..., d)``."""
    idx = unpack_codes(code.codes, params.spec.mse_bits, params.spec.dim, params.spec.packing)
    return code.norms.astype(np.float64)[..., None] * rotate(params.centroids[idx], params, inverse=True)


def _signs(code: Compressed, params: QuantParams) -> np.ndarray:
    """``z = sign(S r)`` as ``(..., m)`` float64 in {-1, +1}."""
    bits = unpack_codes(code.qjl_signs, 1, params.spec.qjl_dim)
    return 2.0 * bits - 1.0


def _qjl_scale(code: Compressed, params: QuantParams) -> np.ndarray:
    """``||r|| sqrt(pi/2) / m`` per vector ``(...)``."""
    return code.residual_norms.astype(np.float64) * math.sqrt(math.pi / 2) / params.spec.qjl_dim


def dequantize(code: Compressed, params: QuantParams) -> np.ndarray:
    """Reconstruct ``(..., d)`` float64 vectors: ``x_mse`` (+ ``||r|| sqrt(pi/2)/m S^T z`` with QJL); a calibrated
    code's calibration is undone (`rotorquant.calibration.dequantize_with`)."""
    checks.check_params(params)
    if getattr(code, "calibration", None) is not None:
        return calibrated.dequantize_with(dequantize, code, params)
    checks.check_code("code", code, params, NUMPY)
    x_hat = _mse_part(code, params)
    if params.spec.qjl:
        x_hat = x_hat + _qjl_scale(code, params)[..., None] * (_signs(code, params) @ params.qjl_matrix)
    return x_hat


def scores(q: np.ndarray, code: Compressed, params: QuantParams) -> np.ndarray:
    """Estimates of ``q @ x.T``: ``q (..., M, d)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``.

    Without QJL ``q . x_mse``; with QJL the unbiased ``q . x_mse + ||r|| sqrt(pi/2)/m <S q, z>``; against a
    calibrated code ``(A^-1 q) . x' + q . mu`` (`rotorquant.calibration.scores_with`).
    """
    checks.check_params(params)
    if getattr(code, "calibration", None) is not None:
        return calibrated.scores_with(scores, q, code, params)
    checks.check_code("code", code, params, NUMPY)
    q64 = NUMPY.vectors("q", q, params.spec.dim)
    checks.check_finite("q", NUMPY.all_finite(q64))
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


def masked_attention(q, k_code, v_code, k_params, v_params, scale: float, visible: np.ndarray) -> np.ndarray:
    """Softmax attention of query rows ``q (B, Hkv, R, d)`` over caches of leading shape ``(B, Hkv, N)``, row
    ``r`` of sequence ``b`` seeing the keys ``n < visible[b, r]``:

        out = softmax(scale * scores(q, K), keys n >= visible masked) @ dequantize(V)    (B, Hkv, R, d_v)
    """
    s = scale * _scores(q.astype(np.float64), k_code, k_params)  # (B, Hkv, R, N)
    s = np.where(np.arange(s.shape[-1]) < visible[:, None, :, None], s, -np.inf)
    with np.errstate(invalid="ignore"):  # NaN rows only where a query or key is not finite (validate=False)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
    return p @ dequantize(v_code, v_params)


def attention(
    q, k_code, v_code, k_params, v_params, *, scale=None, lengths=None, causal=False, validate=True, block_table=None
) -> np.ndarray:
    """Decode attention over a compressed K/V cache: `masked_attention` as an engine calls it.

    ``q (B, Hq, T, d)``; ``k_code``, ``v_code`` of leading shape ``(B, Hkv, N)``; query head ``h`` reads KV
    head ``h // (Hq // Hkv)`` (grouped-query attention). Query ``t`` of sequence ``b`` attends to its first
    ``lengths[b]`` keys (all ``N`` when None), less ``T - 1 - t`` with ``causal=True`` (the queries are the
    sequence's last ``T`` cached tokens); ``scale`` is ``1/sqrt(d)`` by default.

    ``validate=False`` skips the checks that read values (``q`` finite, ``lengths`` and block ids in range):
    a query with NaN or Inf then gets a non-finite output row, and every query of a sequence whose length
    or block table is out of range gets NaN, never a finite wrong row. (A non-finite cache entry, stored
    by ``quantize(validate=False)``, makes every query that attends to it non-finite; ``0 * NaN`` may
    spread it to other queries of its sequence and head.)

    With ``block_table (B, max_blocks)`` the caches are paged (see `rotorquant.engine.paging`): ``k_code``
    and ``v_code`` of leading shape ``(num_blocks, Hkv, page)``, key ``n`` of sequence ``b`` in slot
    ``n % page`` of block ``block_table[b, n // page]``, ``N = max_blocks * page``. The engine glue is
    `rotorquant.engine.attention`.

    Returns ``(B, Hq, T, d_v)`` float64.
    """
    return engine_attention.run(
        NUMPY, masked_attention, q, k_code, v_code, k_params, v_params, scale=scale, lengths=lengths,
        causal=causal, validate=validate, block_table=block_table,
    )  # fmt: skip
