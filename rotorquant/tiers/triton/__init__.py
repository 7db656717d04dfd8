"""The Triton tier: fused GPU kernels with the reference's semantics and byte format.

Same functions and signatures as `rotorquant.tiers.numpy`; inputs and outputs are torch
tensors on a CUDA device (or CPU tensors under the Triton interpreter, ``TRITON_INTERPRET=1``
set before this module is imported). The kernels live in `rotorquant.kernels`, their launches and
settings in `rotorquant.tiers.triton.launch`, the constants they read in `rotorquant.tiers.triton.tables`:

=====================  ==============================================================
function               kernels
=====================  ==============================================================
`quantize`             `quantize_kernel`: norm, rotation, codes, packing, QJL sketch
`quantize_into`        `quantize_kernel` writing into a cache at slots (unchecked calls)
`dequantize`           `dequantize_kernel`: unpack, centroids, inverse rotation, scale
`scores`               `scores_kernel` on queries rotated once: ``s * Rot(q) . c[k]``
`attention`            `attention_query_kernel` + `attention_split_kernel` + `attention_combine_kernel`
=====================  ==============================================================

Arithmetic inside the kernels is float32, float64 for float64 inputs (half-precision queries
use float16 tensor cores in `attention`, with operands scaled into [-1, 1]). Outputs: `dequantize` returns the
code's dtype, `scores` and `attention` the query's dtype.
"""

from __future__ import annotations

try:
    import torch
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "rotorquant.tiers.triton needs torch and triton: pip install 'rotorquant[triton]' "
        f"(missing: {err.name})"
    ) from err

from ... import calibration as calibrated
from ... import checks
from ...engine import attention as engine_attention
from ...engine import slots as engine_slots
from ...format import Compressed
from ...params import QuantParams
from ...spec import QuantizerSpec
from ..tensors import NORM_DTYPES, TensorArrays, dtype_name, output_dtype
from . import launch
from .launch import INTERPRETING

__all__ = ["attention", "dequantize", "quantize", "quantize_into", "scores"]


class TritonArrays(TensorArrays):
    """The `rotorquant.arrays` adapter of this tier: torch tensors on a CUDA device (CPU under the interpreter)."""

    tier = "triton"

    def check_runs_on(self, name: str, device: torch.device) -> None:
        if device.type == "cuda" or (INTERPRETING and device.type == "cpu"):
            return
        hint = "" if INTERPRETING else " (CPU tensors need TRITON_INTERPRET=1 set before importing rotorquant.tiers.triton)"
        raise ValueError(f"{name}: expected a tensor on a CUDA device{hint}, got one on {device}")


TENSORS = TritonArrays()


def _check_norms(x: torch.Tensor, raw: torch.Tensor, norms: torch.Tensor, res, spec: QuantizerSpec) -> None:
    """One synchronization: the kernel's norms ``raw`` are finite and they, the norms to store and the QJL
    residual norms ``res`` fit the norm dtype, else the reference's errors."""
    if raw.numel() == 0:
        return
    limit = float(torch.finfo(NORM_DTYPES[spec.norm_dtype]).max)
    largest = torch.stack([raw.amax(), norms.amax()] + ([res.amax()] if res is not None else []))
    if bool((~torch.isfinite(raw)).any() | (largest > limit).any()):
        checks.check_finite("x", TENSORS.all_finite(x))
        exact = float(torch.linalg.vector_norm(x.to(torch.float64), dim=-1).max())
        checks.check_norms_fit("x", exact, limit, spec.norm_dtype.value)
        if spec.norm_correction:
            checks.check_norms_fit("x", float(norms.max()), limit, spec.norm_dtype.value, corrected=True)
        if res is not None:
            checks.check_norms_fit("x", float(res.max()), limit, spec.norm_dtype.value, residual=True)


def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x (..., d)`` as ``(n, d)`` rows with a unit stride along each row (a copy only if needed)."""
    rows = x.reshape(-1, dim)
    return rows.contiguous() if rows.shape[0] and rows.stride(-1) != 1 else rows


def quantize(x: torch.Tensor, params: QuantParams, *, calibration=None, validate: bool = True) -> Compressed:
    """Compress vectors ``x (..., d)`` into a `Compressed` of leading shape ``(...)`` (one fused kernel).

    ``validate=False`` skips the one check that reads values (every norm finite and within the spec's
    norm dtype; a vector that would fail it is stored with a non-finite norm, so it decodes to
    non-finite values): the call then never synchronizes with the host, and CUDA graphs can capture it.
    ``calibration``: a `rotorquant.Calibration` fitted for ``params``: the code of ``A (x - mu)``, carrying the
    calibration, which `dequantize` and `scores` then undo (`rotorquant.calibration.quantize_with`).
    """
    checks.check_params(params)
    spec = params.spec
    validate = checks.check_bool("validate", validate)
    if calibration is not None:
        return calibrated.quantize_with(quantize, x, params, calibration, validate)
    x = TENSORS.vectors("x", x, spec.dim)
    lead = tuple(x.shape[:-1])
    codes, norms, raw, signs, res = launch.quantize(_rows(x, spec.dim), params, cap_norms=not validate)
    if validate:
        _check_norms(x, raw, norms, res, spec)
    norm_dtype = NORM_DTYPES[spec.norm_dtype]
    fields = dict(codes=codes.reshape(*lead, spec.code_bytes), norms=norms.to(norm_dtype).reshape(lead))
    if spec.qjl:
        fields["qjl_signs"] = signs.reshape(*lead, spec.sign_bytes)
        fields["residual_norms"] = res.to(norm_dtype).reshape(lead)
    return Compressed(**fields, spec=spec, dtype=dtype_name(x.dtype))


def quantize_into(x: torch.Tensor, params: QuantParams, cache: Compressed, slots, *, validate: bool = True) -> None:
    """Compress ``x (..., d)`` and write vector ``i`` into ``cache`` at flat index ``slots[i]``, in place.

    ``cache``: a `Compressed` for ``params.spec`` of leading shape ``L`` (1 to 4 dims, fields in any
    layout: a paged pool, a vLLM-style ``(num_blocks, page, Hkv)`` view) on ``x``'s device, of ``x``'s
    dtype; ``slots``: integers of ``x``'s leading shape, each a row-major flat index over ``L``, or -1 to
    skip (see `rotorquant.engine.slots`). Each written entry is exactly ``quantize(x, params)``'s for its
    vector.

    ``validate=True`` checks everything before writing anything (``x`` as `quantize` does, every slot in
    ``-1..size(L) - 1``, no entry written twice; host synchronizations), then quantizes and copies.
    ``validate=False`` skips the checks that read values and runs one fused kernel that writes straight
    into the cache, with no other launch when ``x`` and ``slots`` (int32 or int64, on the device) are
    contiguous: it never synchronizes, so CUDA graphs can capture it. A vector `quantize`
    would refuse is stored with a non-finite norm, a slot out of range writes nothing, and for repeated
    slots which vector lands (field by field) is unspecified.
    """
    x, index, validate = engine_slots.prepare(TENSORS, x, params, cache, slots, validate)
    if validate:
        engine_slots.write(cache, quantize(x, params), index)
    elif engine_slots.size(cache.shape):  # an empty cache: every slot is out of range, nothing to write
        launch.quantize(_rows(x, params.spec.dim), params, cap_norms=True, into=(cache, index))


def dequantize(code: Compressed, params: QuantParams) -> torch.Tensor:
    """Reconstruct ``(..., d)`` vectors in the code's dtype: ``s Rot^T c[k]`` (+ the QJL term); a calibrated code's
    calibration is undone."""
    checks.check_params(params)
    if getattr(code, "calibration", None) is not None:
        return calibrated.dequantize_with(dequantize, code, params)
    checks.check_code("code", code, params, TENSORS)
    out_dtype = output_dtype(code)
    return launch.dequantize(code, params, out_dtype).to(out_dtype).reshape(*code.shape, params.spec.dim)


def scores(q: torch.Tensor, code: Compressed, params: QuantParams) -> torch.Tensor:
    """Estimates of ``q @ x.T``: ``q (..., M, d)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``.

    Each query is rotated once (``Rot(q) = q @ R^T``); the kernel unpacks key codes to centroid
    levels in registers and computes ``s * Rot(q) . c[k]`` (+ ``rho sqrt(pi/2)/m <S q, z>`` with QJL); against a
    calibrated code ``(A^-1 q) . x' + q . mu``.
    """
    checks.check_params(params)
    if getattr(code, "calibration", None) is not None:
        return calibrated.scores_with(scores, q, code, params)
    checks.check_code("code", code, params, TENSORS)
    q = TENSORS.vectors("q", q, params.spec.dim)
    checks.check_min_ndim("q", tuple(q.shape), 2, "(..., M, dim)")
    checks.check_min_ndim("code", code.shape, 1, "(..., N)")
    TENSORS.check_device("code", code.codes, q, "q")
    checks.check_finite("q", TENSORS.all_finite(q))
    try:
        lead = tuple(torch.broadcast_shapes(q.shape[:-2], code.shape[:-1]))
    except RuntimeError:
        raise checks.broadcast_error("q", tuple(q.shape[:-2]), "code", code.shape[:-1]) from None
    out = launch.scores(q, code, params, lead)
    return out.to(q.dtype).reshape(*lead, q.shape[-2], code.shape[-1])


def attention(
    q, k_code, v_code, k_params, v_params, *, scale=None, lengths=None, causal=False, validate=True, block_table=None
) -> torch.Tensor:
    """Decode attention over a compressed K/V cache (split-K, online softmax; see `rotorquant.kernels.attention`).

    ``q (B, Hq, T, d)``; ``k_code``, ``v_code`` of leading shape ``(B, Hkv, N)``; query head ``h``
    reads KV head ``h // (Hq // Hkv)``; query ``t`` attends to the first ``lengths[b]`` keys, less
    ``T - 1 - t`` with ``causal=True`` (the queries are the sequence's last ``T`` cached tokens):

        out = softmax(scale * scores(q, K) masked) @ dequantize(V),   scale = 1/sqrt(d) by default.

    The caches' fields may be views in any layout (stored token-major ``(B, N, Hkv, ...)`` and permuted, or
    the first ``N`` keys of a longer preallocated cache): the kernel reads them in place through their
    strides, with no copy, as long as each packed row's bytes are contiguous.

    ``validate=False`` skips the checks that read values (``q`` finite, ``lengths`` and block ids in range):
    with ``lengths`` None or an integer tensor on ``q``'s device the call then never synchronizes with the
    host, and CUDA graphs can capture it. A query with NaN or Inf gets a non-finite output row, every
    query of a sequence whose length is out of range gets NaN (the kernels read no key past ``N``). A
    non-finite cache entry, stored by ``quantize(validate=False)``, makes every query that attends to it
    non-finite; ``0 * NaN`` may spread it to other queries of its sequence and head.

    With ``block_table (B, max_blocks)`` the caches are paged (see `rotorquant.engine.paging`): ``k_code`` and
    ``v_code`` of leading shape ``(num_blocks, Hkv, page)`` (or a view of blocks stored
    ``(num_blocks, page, Hkv, ...)``), key ``n`` of sequence ``b`` in slot ``n % page`` of block
    ``block_table[b, n // page]``, ``N = max_blocks * page``; the kernel follows the table, nothing is
    gathered. A block id out of range where a sequence's keys lie is an error, or with
    ``validate=False`` NaN rows for that sequence (block 0 is read in its place).

    Returns ``(B, Hq, T, d_v)`` in the query's dtype.
    """
    r = engine_attention.prepare(
        TENSORS, q, k_code, v_code, k_params, v_params, scale=scale, lengths=lengths, causal=causal,
        validate=validate, block_table=block_table,
    )  # fmt: skip
    return launch.attention(
        r.q, r.k_code, r.v_code, r.k_params, r.v_params, scale=r.scale, lengths=r.lengths, causal=r.causal,
        table=r.table,
    )  # fmt: skip
