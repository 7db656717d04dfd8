"""The Triton tier: fused GPU kernels with the reference's semantics and byte format.

Same functions and signatures as `rotorquant.tiers.numpy`; inputs and outputs are torch
tensors on a CUDA device (or CPU tensors under the Triton interpreter, ``TRITON_INTERPRET=1``
set before this module is imported). The kernels live in `rotorquant.kernels`:

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

import functools
import math
from dataclasses import dataclass

import numpy as np

try:
    import torch
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "rotorquant.tiers.triton needs torch and triton: pip install 'rotorquant[triton]' "
        f"(missing: {err.name})"
    ) from err

from .. import cache_slots, checks, paging
from ..compressed import Compressed
from ..kernels.attention import attention_combine_kernel, attention_query_kernel, attention_split_kernel
from ..kernels.dequantize import dequantize_kernel
from ..kernels.quantize import quantize_kernel
from ..kernels.scores import scores_kernel
from ..params import QuantParams
from ..spec import QuantizerSpec
from ..torch_checks import (
    NORM_DTYPES,
    as_slots,
    check_block_table_dtype,
    check_cache,
    check_lengths_dtype,
    check_vectors,
    compute_dtype,
    dtype_name,
    output_dtype,
)

__all__ = ["attention", "dequantize", "quantize", "quantize_into", "scores"]

INTERPRETING = type(quantize_kernel).__name__ == "InterpretedFunction"
"""True when ``TRITON_INTERPRET=1`` was set before the kernels were imported (CPU tensors)."""

_LOG2E = 1.0 / math.log(2.0)
# float32 tl.dots: three TF32 passes on tensor cores (float32-level accuracy) instead of "ieee", whose
# FMA lowering spills thousands of bytes at d = 128; the interpreter multiplies in float32 either way.
_TF32X3 = "ieee" if INTERPRETING else "tf32x3"
# 8 warps: every kernel compiles for sm_90 without register spills at d = 128 (4 warps spill).
_WARPS = 8
# Multiply-adds fused into FMAs, as Triton has always defaulted to; stated on every launch because
# Triton 3.9 warns that 3.10 will default to unfused, which would change the kernels' rounding.
_FUSED = {"enable_fp_fusion": True}
_SQRT_HALF_PI = math.sqrt(math.pi / 2)
# Caches with more entries than this unravel slots in int64 (tests lower it to cover that path).
_INT32_ENTRIES = 2**31 - 1


def _pow2(n: int) -> int:
    """Smallest power of two >= max(n, 16) (tl.arange and tl.dot sizes)."""
    return max(16, triton.next_power_of_2(n))


@dataclass(frozen=True)
class _Tables:
    """A spec's constants on one device in the compute dtype, zero-padded to kernel tile sizes.

    ``block_d`` = pow2(d), ``block_m`` = pow2(qjl_dim). ``fwd``/``inv``: dense ``R^T``/``R``
    ``(block_d, block_d)``, or rotor weights ``(3, block_d)`` with ``fwd[i, c] = blocks[c//3, c%3, i]``
    and ``inv[i, c] = blocks[c//3, i, c%3]``. ``rmat``: the whole rotation ``R`` padded
    (``x = y @ R``); ``rot_t``: ``(d, block_d)`` ``R^T`` (``Rot(q) = q @ rot_t``). QJL:
    ``proj`` = ``(S R^T)^T`` ``(block_d, block_m)``, ``smat`` = ``sqrt(pi/2)/m S`` ``(block_m, block_d)`` (the QJL
    scale folded in, in float64: a Python float kernel argument would reach the GPU as float32),
    ``sketch_t`` = ``S^T`` ``(d, block_m)``.
    """

    block_d: int
    block_m: int
    centroids: torch.Tensor
    boundaries: torch.Tensor
    fwd: torch.Tensor
    inv: torch.Tensor
    rmat: torch.Tensor
    rot_t: torch.Tensor
    proj: torch.Tensor | None
    smat: torch.Tensor | None
    sketch_t: torch.Tensor | None



def _kernel_dtypes(compute: torch.dtype) -> dict:
    """The kernels' ``CDT`` and ``DOT_PRECISION`` for a compute dtype (float64 dots are exact "ieee")."""
    if compute == torch.float64:
        return {"CDT": tl.float64, "DOT_PRECISION": "ieee"}
    return {"CDT": tl.float32, "DOT_PRECISION": _TF32X3}


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a kernel writes for an output of ``dtype``: under the interpreter, whose float32 -> bfloat16
    cast truncates, bfloat16 is written as float32 and rounded by torch afterwards (on a GPU the kernels
    round to nearest even, as torch does)."""
    return torch.float32 if dtype == torch.bfloat16 and INTERPRETING else dtype


def _padded(a, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float64)
    out[: a.shape[0], : a.shape[1]] = a
    return out.to(device=device, dtype=dtype)


def _rotor_weights(blocks, dim: int, block_d: int, transpose: bool) -> torch.Tensor:
    """``(3, block_d)``: ``w[i, c]`` multiplies coordinate ``3*(c//3)+i`` to give output ``c`` (0 off the vector)."""
    b = torch.tensor(blocks, dtype=torch.float64)
    w = torch.zeros((3, block_d), dtype=torch.float64)
    for c in range(dim):
        g, r = divmod(c, 3)
        for i in range(3):
            if 3 * g + i < dim:
                w[i, c] = b[g, i, r] if transpose else b[g, r, i]
    return w


@functools.lru_cache(maxsize=64)
def _tables(params: QuantParams, device: torch.device, dtype: torch.dtype) -> _Tables:
    spec = params.spec
    if not np.array_equal(params.centroids, -params.centroids[::-1]):
        raise ValueError(
            "params.centroids: expected an antisymmetric codebook, c[k] = -c[2**bits - 1 - k] exactly (as "
            "build_params makes it; the kernels decode the lower half from the upper), got an asymmetric one"
        )
    d, bd = spec.dim, _pow2(spec.dim)
    rot = torch.tensor(params.rotation_matrix(), dtype=torch.float64)
    if params.rotation is not None:
        fwd, inv = _padded(rot.T, (bd, bd), device, dtype), _padded(rot, (bd, bd), device, dtype)
    else:
        fwd = _rotor_weights(params.blocks, d, bd, transpose=False).to(device=device, dtype=dtype)
        inv = _rotor_weights(params.blocks, d, bd, transpose=True).to(device=device, dtype=dtype)
    proj = smat = sketch_t = None
    bm = _pow2(spec.qjl_dim)
    if spec.qjl:
        s = torch.tensor(params.qjl_matrix, dtype=torch.float64)
        proj = _padded(rot @ s.T, (bd, bm), device, dtype)
        smat = _padded(s * (_SQRT_HALF_PI / spec.qjl_dim), (bm, bd), device, dtype)
        sketch_t = _padded(s.T, (d, bm), device, dtype)
    return _Tables(
        block_d=bd,
        block_m=bm,
        centroids=torch.tensor(params.centroids, dtype=dtype, device=device),
        boundaries=torch.tensor(params.boundaries, dtype=dtype, device=device),
        fwd=fwd,
        inv=inv,
        rmat=_padded(rot, (bd, bd), device, dtype),
        rot_t=_padded(rot.T, (d, bd), device, dtype),
        proj=proj,
        smat=smat,
        sketch_t=sketch_t,
    )


# ---------------------------------------------------------------------------- input checks


def _check_device(name: str, device: torch.device) -> None:
    if device.type == "cuda" or (INTERPRETING and device.type == "cpu"):
        return
    hint = "" if INTERPRETING else " (CPU tensors need TRITON_INTERPRET=1 set before importing rotorquant.tiers.triton)"
    raise ValueError(f"{name}: expected a tensor on a CUDA device{hint}, got one on {device}")



def _as_vectors(name: str, x: object, dim: int) -> torch.Tensor:
    """``x`` must be a real floating tensor ``(..., dim)`` on a device the kernels can run on."""
    check_vectors(name, x, dim)
    _check_device(name, x.device)
    return x


def _check_code_tensors(name: str, code: Compressed, device: torch.device | None) -> torch.device:
    """The payload must be torch tensors of the documented dtypes on one device (``device`` if given)."""
    spec = code.spec
    norm_dtype = NORM_DTYPES[spec.norm_dtype]
    fields = {"codes": (code.codes, torch.uint8), "norms": (code.norms, norm_dtype)}
    if spec.qjl:
        fields["qjl_signs"] = (code.qjl_signs, torch.uint8)
        fields["residual_norms"] = (code.residual_norms, norm_dtype)
    for field, (t, dtype) in fields.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name}.{field}: expected a torch.Tensor (a code from the torch or triton tier), got {type(t).__name__}"
            )
        if t.dtype != dtype:
            raise TypeError(f"{name}.{field}: expected dtype {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
        device = t.device if device is None else device
        if t.device != device:
            raise ValueError(f"{name}.{field}: expected device {device}, got {t.device}")
        _check_device(f"{name}.{field}", t.device)
    return device



def _words(*packed: torch.Tensor) -> bool:
    """Whether the kernels may read these ``(..., bytes)`` packed payloads (rows contiguous) as 32-bit words:
    every row starts 4-byte aligned (the pointer and the strides of every dimension longer than 1 are
    multiples of 4) and is a whole number of words long (its byte length a multiple of 4)."""
    return all(
        t.data_ptr() % 4 == 0
        and t.shape[-1] % 4 == 0
        and all(st % 4 == 0 for size, st in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)
        for t in packed
    )


def _check_finite(name: str, t: torch.Tensor) -> None:
    checks.check_finite(name, bool(torch.isfinite(t).all()))


# ---------------------------------------------------------------------------- quantize


def _quantize_launch(spec: QuantizerSpec, block_d: int, block_m: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_C, num_warps)``: float32 ``tl.dot`` operands of a chunk stay <= 32 KiB. The rotor
    path without QJL (no tl.dot) runs 16 vectors on 2 warps at d <= 128: fastest in the launch sweep of
    `benchmarks/gpu_speed.py` on an H200 (23 us vs 49 us for 32 vectors on 8 warps at n = 16384)."""
    if INTERPRETING:
        return 16, 16, _WARPS
    if spec.rotation.value == "rotor" and not spec.qjl and block_d <= 128:
        return 16, block_d, 2
    block_n = 32 if block_d <= 128 else 16
    chunk = block_d if spec.rotation.value == "rotor" else max(16, 8192 // block_d)
    if spec.qjl:
        chunk = min(chunk, max(16, 8192 // block_m))
    return block_n, min(chunk, block_d), _WARPS


def _quantize_rows(
    rows: torch.Tensor,
    params: QuantParams,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    block_c: int | None = None,
    cap_norms: bool = False,
    into: tuple[Compressed, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch `quantize_kernel` on ``rows (n, d)`` (unit stride): float32
    ``(codes, norms, raw_norms, signs, residual_norms)``; no checks, no synchronization.
    ``cap_norms``: stored norms past the norm dtype's largest value come out Inf.
    ``into = (cache, slots)``: write into ``cache``'s fields at the flat entries ``slots (n,)`` instead
    (see `rotorquant.cache_slots`); the cache's fields are returned.
    ``block_n`` (vectors per program), ``num_warps`` and ``block_c`` (coordinates per chunk) override
    the launch configuration (benchmarks)."""
    spec = params.spec
    compute = compute_dtype(rows.dtype)
    tab = _tables(params, rows.device, compute)
    n = rows.shape[0]
    if into is None:
        new = functools.partial(torch.empty, device=rows.device)
        codes = new((n, spec.code_bytes), dtype=torch.uint8)
        norms = new((n,), dtype=compute)
        raw = new((n,), dtype=compute) if spec.norm_correction else norms
        signs = new((n, spec.sign_bytes), dtype=torch.uint8) if spec.qjl else None
        res = new((n,), dtype=compute) if spec.qjl else None
        slot_args = (codes, *[1] * 4, *[0] * 16)  # unused without SLOTS
        wide = False
    else:
        cache, slots = into
        codes, norms, signs, res = cache.codes, cache.norms, cache.qjl_signs, cache.residual_norms
        raw = norms
        slot_args = _slot_args(cache, slots)
        wide = cache_slots.size(cache.shape) > _INT32_ENTRIES
    default_n, default_c, default_warps = _quantize_launch(spec, tab.block_d, tab.block_m)
    block_n, num_warps, block_c = block_n or default_n, num_warps or default_warps, block_c or default_c
    if n:
        quantize_kernel[(triton.cdiv(n, block_n),)](
            rows, rows.stride(0), n, spec.dim,
            codes, spec.code_bytes, norms, raw,
            tab.fwd, tab.boundaries, tab.centroids,
            tab.proj if spec.qjl else tab.centroids,
            signs if spec.qjl else codes, spec.sign_bytes,
            res if spec.qjl else norms, spec.qjl_dim, *slot_args,
            **_kernel_dtypes(compute), BITS=spec.mse_bits, DENSE=params.rotation is not None, QJL=spec.qjl,
            NORM_CORRECTION=spec.norm_correction, SQUARES_FIT=rows.dtype == torch.float16,
            NORM_MAX=float(torch.finfo(NORM_DTYPES[spec.norm_dtype]).max) if cap_norms else 0.0,
            SLOTS=into is not None, SLOT_INDEX=tl.int64 if wide else tl.int32, BLOCK_N=block_n, BLOCK_D=tab.block_d,
            BLOCK_C=block_c, BLOCK_M=tab.block_m, num_warps=num_warps, **_FUSED,
        )  # fmt: skip
    return codes, norms, raw, signs, res


def _slot_args(cache: Compressed, slots: torch.Tensor) -> tuple:
    """`quantize_kernel`'s ``slots_ptr .. res_s3`` for writing into ``cache`` at ``slots``: its leading shape
    and each field's strides over it, padded in front to four dims (size 1, stride 0)."""
    pad = cache_slots.MAX_CACHE_DIMS - len(cache.shape)
    sizes = (1,) * pad + cache.shape

    def strides(t: torch.Tensor | None) -> tuple[int, ...]:
        return (0,) * 4 if t is None else (0,) * pad + t.stride()[: len(cache.shape)]

    fields = (cache.codes, cache.norms, cache.qjl_signs, cache.residual_norms)
    return (slots, *sizes[1:], cache_slots.size(cache.shape), *[st for t in fields for st in strides(t)])


def _check_norms(x: torch.Tensor, raw: torch.Tensor, norms: torch.Tensor, spec: QuantizerSpec) -> None:
    """One synchronization: the kernel's norms ``raw`` are finite and they and the norms to store fit the
    norm dtype, else the reference's errors."""
    if raw.numel() == 0:
        return
    limit = float(torch.finfo(NORM_DTYPES[spec.norm_dtype]).max)
    if bool((~torch.isfinite(raw)).any() | (raw.amax() > limit) | (norms.amax() > limit)):
        _check_finite("x", x)
        exact = float(torch.linalg.vector_norm(x.to(torch.float64), dim=-1).max())
        checks.check_norms_fit("x", exact, limit, spec.norm_dtype.value)
        if spec.norm_correction:
            checks.check_norms_fit("x", float(norms.max()), limit, spec.norm_dtype.value, corrected=True)


def quantize(x: torch.Tensor, params: QuantParams, *, validate: bool = True) -> Compressed:
    """Compress vectors ``x (..., d)`` into a `Compressed` of leading shape ``(...)`` (one fused kernel).

    ``validate=False`` skips the one check that reads values (every norm finite and within the spec's
    norm dtype; a vector that would fail it is stored with a non-finite norm, so it decodes to
    non-finite values): the call then never synchronizes with the host, and CUDA graphs can capture it.
    """
    checks.check_params(params)
    spec = params.spec
    validate = checks.check_bool("validate", validate)
    x = _as_vectors("x", x, spec.dim)
    lead = tuple(x.shape[:-1])
    rows = x.reshape(-1, spec.dim)
    if rows.shape[0] and rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes, norms, raw, signs, res = _quantize_rows(rows, params, cap_norms=not validate)
    if validate:
        _check_norms(x, raw, norms, spec)
    norm_dtype = NORM_DTYPES[spec.norm_dtype]
    fields = dict(
        codes=codes.reshape(*lead, spec.code_bytes),
        norms=norms.to(norm_dtype).reshape(lead),
        spec=spec,
        dtype=dtype_name(x.dtype),
    )
    if spec.qjl:
        fields["qjl_signs"] = signs.reshape(*lead, spec.sign_bytes)
        fields["residual_norms"] = res.to(norm_dtype).reshape(lead)
    return Compressed(**fields)


def quantize_into(x: torch.Tensor, params: QuantParams, cache: Compressed, slots, *, validate: bool = True) -> None:
    """Compress ``x (..., d)`` and write vector ``i`` into ``cache`` at flat index ``slots[i]``, in place.

    ``cache``: a `Compressed` for ``params.spec`` of leading shape ``L`` (1 to 4 dims, fields in any
    layout: a paged pool, a vLLM-style ``(num_blocks, page, Hkv)`` view) on ``x``'s device, of ``x``'s
    dtype; ``slots``: integers of ``x``'s leading shape, each a row-major flat index over ``L``, or -1 to
    skip (see `rotorquant.cache_slots`). Each written entry is exactly ``quantize(x, params)``'s for its
    vector.

    ``validate=True`` checks everything before writing anything (``x`` as `quantize` does, every slot in
    ``-1..size(L) - 1``, no entry written twice; host synchronizations), then quantizes and copies.
    ``validate=False`` skips the checks that read values and runs one fused kernel that writes straight
    into the cache, with no other launch when ``x`` and ``slots`` (int32 or int64, on the device) are
    contiguous: it never synchronizes, so CUDA graphs can capture it. A vector `quantize`
    would refuse is stored with a non-finite norm, a slot out of range writes nothing, and for repeated
    slots which vector lands (field by field) is unspecified.
    """
    checks.check_params(params)
    validate = checks.check_bool("validate", validate)
    x = _as_vectors("x", x, params.spec.dim)
    check_cache(cache, params, x.device)
    cache_slots.check_x_dtype(dtype_name(x.dtype), cache.dtype)
    index = as_slots(slots, tuple(x.shape[:-1]), x.device).reshape(-1)
    if validate:
        cache_slots.check_slot_values(index, cache_slots.size(cache.shape))
        cache_slots.write(cache, quantize(x, params), index)
        return
    if cache_slots.size(cache.shape) == 0:  # every slot out of range: nothing to write
        return
    rows = x.reshape(-1, params.spec.dim)
    if rows.shape[0] and rows.stride(-1) != 1:
        rows = rows.contiguous()
    _quantize_rows(rows, params, cap_norms=True, into=(cache, index))


# ---------------------------------------------------------------------------- dequantize


def dequantize(code: Compressed, params: QuantParams) -> torch.Tensor:
    """Reconstruct ``(..., d)`` vectors in the code's dtype: ``s Rot^T c[k]`` (+ the QJL term)."""
    checks.check_params(params)
    checks.check_code("code", code, params)
    device = _check_code_tensors("code", code, None)
    out_dtype = output_dtype(code)
    spec = params.spec
    tab = _tables(params, device, compute_dtype(out_dtype))
    lead = code.shape
    n = math.prod(lead)
    out = torch.empty((n, spec.dim), dtype=_store_dtype(out_dtype), device=device)
    block_n = 16 if INTERPRETING or tab.block_d > 128 else 32
    block_c = 16 if INTERPRETING else min(tab.block_d, max(16, 8192 // tab.block_d))
    if n:
        codes = code.codes.reshape(n, spec.code_bytes).contiguous()
        norms = code.norms.reshape(n).contiguous()
        signs = code.qjl_signs.reshape(n, spec.sign_bytes).contiguous() if spec.qjl else codes
        res = code.residual_norms.reshape(n).contiguous() if spec.qjl else norms
        dequantize_kernel[(triton.cdiv(n, block_n),)](
            codes, spec.code_bytes, norms, n, spec.dim, out,
            tab.inv, tab.centroids,
            signs, spec.sign_bytes, res,
            tab.smat if spec.qjl else tab.centroids, spec.qjl_dim,
            **_kernel_dtypes(compute_dtype(out_dtype)), BITS=spec.mse_bits, DENSE=params.rotation is not None,
            QJL=spec.qjl, BLOCK_N=block_n, BLOCK_D=tab.block_d, BLOCK_C=block_c, BLOCK_M=tab.block_m,
            WORDS=_words(codes, signs), num_warps=_WARPS, **_FUSED,
        )  # fmt: skip
    return out.to(out_dtype).reshape(*lead, spec.dim)


# ---------------------------------------------------------------------------- scores


def _flat(t: torch.Tensor, lead: tuple[int, ...], tail: tuple[int, ...]) -> torch.Tensor:
    """Broadcast ``t`` to ``(*lead, *tail)`` and flatten the leading dims (a copy only if needed)."""
    return t.expand(*lead, *tail).reshape(-1, *tail).contiguous()


def scores(q: torch.Tensor, code: Compressed, params: QuantParams) -> torch.Tensor:
    """Estimates of ``q @ x.T``: ``q (..., M, d)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``.

    Each query is rotated once (``Rot(q) = q @ R^T``); the kernel unpacks key codes to centroid
    levels in registers and computes ``s * Rot(q) . c[k]`` (+ ``rho sqrt(pi/2)/m <S q, z>`` with QJL).
    """
    checks.check_params(params)
    checks.check_code("code", code, params)
    spec = params.spec
    q = _as_vectors("q", q, spec.dim)
    checks.check_min_ndim("q", tuple(q.shape), 2, "(..., M, dim)")
    checks.check_min_ndim("code", code.shape, 1, "(..., N)")
    _check_code_tensors("code", code, q.device)
    _check_finite("q", q)
    try:
        lead = tuple(torch.broadcast_shapes(q.shape[:-2], code.shape[:-1]))
    except RuntimeError:
        raise checks.broadcast_error("q", tuple(q.shape[:-2]), "code", code.shape[:-1]) from None
    compute = compute_dtype(q.dtype)
    tab = _tables(params, q.device, compute)
    big_m, big_n = q.shape[-2], code.shape[-1]
    qf = q.to(compute)
    q_rot = _flat(qf @ tab.rot_t, lead, (big_m, tab.block_d))
    batch = q_rot.shape[0]
    out = torch.empty((batch, big_m, big_n), dtype=_store_dtype(q.dtype), device=q.device)
    codes = _flat(code.codes, lead, (big_n, spec.code_bytes))
    norms = _flat(code.norms, lead, (big_n,))
    if spec.qjl:
        q_sk = _flat((qf @ tab.sketch_t) * (_SQRT_HALF_PI / spec.qjl_dim), lead, (big_m, tab.block_m))
        signs = _flat(code.qjl_signs, lead, (big_n, spec.sign_bytes))
        res = _flat(code.residual_norms, lead, (big_n,))
    else:
        q_sk, signs, res = q_rot, codes, norms
    block_q = 16 if INTERPRETING else max(16, min(64, triton.next_power_of_2(big_m)))
    block_n = 16 if INTERPRETING else 64
    if out.numel():
        grid = (batch * triton.cdiv(big_n, block_n), triton.cdiv(big_m, block_q))
        scores_kernel[grid](
            q_rot, q_sk, codes, norms, signs, res, tab.centroids, out,
            big_m, big_n, spec.dim, spec.qjl_dim, spec.code_bytes, spec.sign_bytes,
            **_kernel_dtypes(compute), BITS=spec.mse_bits, QJL=spec.qjl, BLOCK_Q=block_q, BLOCK_N=block_n,
            BLOCK_D=tab.block_d, BLOCK_M=tab.block_m, WORDS=_words(codes, signs), num_warps=_WARPS, **_FUSED,
        )  # fmt: skip
    return out.to(q.dtype).reshape(*lead, big_m, big_n)


# ---------------------------------------------------------------------------- attention


def _lengths(lengths: object, batch: int, kv_len: int, device: torch.device, least: int, validate: bool) -> torch.Tensor:
    """``lengths`` as an int32 or int64 tensor on ``device``, as given when it is one (all ``kv_len`` when
    None; other integer dtypes as int64): the kernels clamp each value as they load it (`load_length`), so
    none wraps into range. With ``validate``, each in ``least..kv_len`` (one host synchronization)."""
    if lengths is None:
        return torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    t = torch.as_tensor(lengths)
    check_lengths_dtype(t)
    t = _wide_index(t)
    checks.check_lengths_shape(tuple(t.shape), batch)
    if validate and t.numel():  # where the lengths are (host lengths need no GPU synchronization)
        lo, hi = torch.aminmax(t)
        checks.check_lengths_range(int(lo), int(hi), kv_len, least=least)
    return t.to(device).contiguous()


def _wide_index(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor as the kernels read it: int32 and int64 as they are, others as int64 (unsigned
    dtypes past uint8 also lack comparisons in torch; uint64 past int64 wraps negative, still out of range)."""
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@dataclass(frozen=True)
class _AttentionLaunch:
    """Launch configuration of `attention_split_kernel` on a GPU (the interpreter uses 16-key blocks).

    ``block_n`` keys per step for half-precision queries at head dims <= 128 (half of it for float32
    queries, whose operands are twice as wide, and per doubling of the head dim), ``num_warps``,
    ``num_stages`` (software pipelining of the key loop), and ``programs_per_sm``: the split plan aims
    at about this many programs per multiprocessor. The defaults were the fastest of the launch sweep
    of `benchmarks/gpu_speed.py` at context 32K on an H200 (1725 us vs 2201 us for 64 keys).
    """

    block_n: int = 128
    num_warps: int = _WARPS
    num_stages: int = 2
    programs_per_sm: int = 4


def _split_plan(programs: int, kv_len: int, block_n: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """``(splits, split_len)``: about ``per_sm`` programs per SM, each split a whole number of key blocks
    (at least four unless the cache is shorter)."""
    sms = _multiprocessors(device)
    splits = max(1, min(triton.cdiv(per_sm * sms, programs), triton.cdiv(kv_len, 4 * block_n)))
    split_len = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    return triton.cdiv(kv_len, split_len), split_len


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

    ``validate=False`` skips the checks that read values (``q`` finite, ``lengths`` in range): with
    ``lengths`` None or an integer tensor on ``q``'s device the call then never synchronizes with the
    host, and CUDA graphs can capture it. A query with NaN or Inf gets a non-finite output row, every
    query of a sequence whose length is out of range gets NaN (the kernels read no key past ``N``). A
    non-finite cache entry, stored by ``quantize(validate=False)``, makes every query that attends to it
    non-finite; ``0 * NaN`` may spread it to other queries of its sequence and head.

    With ``block_table (B, max_blocks)`` the caches are paged (see `rotorquant.paging`): ``k_code`` and
    ``v_code`` of leading shape ``(num_blocks, Hkv, page)`` (or a view of blocks stored
    ``(num_blocks, page, Hkv, ...)``), key ``n`` of sequence ``b`` in slot ``n % page`` of block
    ``block_table[b, n // page]``, ``N = max_blocks * page``; the kernel follows the table, nothing is
    gathered. A block id out of range where a sequence's keys lie is an error, or with
    ``validate=False`` NaN rows for that sequence (block 0 is read in its place).

    Returns ``(B, Hq, T, d_v)`` in the query's dtype.
    """
    return _attention(
        q, k_code, v_code, k_params, v_params, scale=scale, lengths=lengths, causal=causal, validate=validate,
        block_table=block_table,
    )  # fmt: skip


def _attention(
    q, k_code, v_code, k_params, v_params, *, scale, lengths, causal=False, validate=True, block_table=None, splits=None
):
    """`attention` with the number of key splits forced when ``splits`` is given (tests use it)."""
    checks.check_params(k_params)
    checks.check_params(v_params)
    checks.check_code("k_code", k_code, k_params)
    checks.check_code("v_code", v_code, v_params)
    q = _as_vectors("q", q, k_params.spec.dim)
    k_shape, v_shape = k_code.shape, v_code.shape
    if block_table is not None:
        table = torch.as_tensor(block_table, device=q.device)
        check_block_table_dtype(table)
        table = _wide_index(table)
        k_shape = v_shape = paging.logical_shape(k_code, v_code, tuple(table.shape), q.shape[0])
    checks.check_attention_shapes(tuple(q.shape), k_shape, v_shape)
    _check_code_tensors("k_code", k_code, q.device)
    _check_code_tensors("v_code", v_code, q.device)
    causal = checks.check_causal(causal, q.shape[2], k_shape[2])
    validate = checks.check_bool("validate", validate)
    if validate:
        _check_finite("q", q)
    least = max(q.shape[2], 1) if causal else 1
    lens = _lengths(lengths, k_shape[0], k_shape[2], q.device, least, validate)
    if block_table is not None:
        table = _block_table(table, lens, k_code.shape, validate)
    return _attention_launch(
        q, k_code, v_code, k_params, v_params, scale=scale, lens=lens, causal=causal, splits=splits,
        block_table=table if block_table is not None else None,
    )  # fmt: skip


def _block_table(table: torch.Tensor, lens: torch.Tensor, paged_shape: tuple[int, ...], validate: bool) -> torch.Tensor:
    """``table`` (int32 or int64) with a unit column stride for the kernel, which checks each id it reads;
    with ``validate``, every id where keys below ``lens`` lie is checked here first (one host
    synchronization)."""
    blocks, _, page = paged_shape
    if validate:
        paging.check_ids(table, torch.arange(table.shape[1], device=table.device) * page, lens, blocks)
    return table if table.stride(1) == 1 or table.shape[1] == 1 else table.contiguous()


def _payload(code: Compressed) -> tuple[torch.Tensor, ...]:
    """``(codes, norms, signs, residual_norms)`` of a cache of leading shape ``(B, Hkv, N)`` as they lie in
    memory (views, strides kept: head-major, token-major or a slice of a bigger cache is read in place);
    only a packed row whose bytes are not contiguous is copied. Without QJL, codes and norms stand in
    for the sign fields (never read)."""
    codes = code.codes if code.codes.stride(-1) == 1 or code.codes.shape[-1] == 1 else code.codes.contiguous()
    if code.spec.qjl:
        signs = code.qjl_signs
        signs = signs if signs.stride(-1) == 1 or signs.shape[-1] == 1 else signs.contiguous()
        return codes, code.norms, signs, code.residual_norms
    return codes, code.norms, codes, code.norms


@functools.lru_cache(maxsize=64)
def _query_maps(params: QuantParams, device: torch.device, dtype: torch.dtype, factor: float) -> tuple:
    """``(f R^T, f sqrt(pi/2)/m S^T or None)`` zero-padded to ``(block_d, block_d)`` and ``(block_d, block_m)``,
    scaled in float64 then converted (``factor`` = f is the same on every call of an engine, so this is
    built once)."""
    spec = params.spec
    bd, bm = _pow2(spec.dim), _pow2(spec.qjl_dim)
    rot = torch.tensor(params.rotation_matrix(), dtype=torch.float64)
    sketch = None
    if spec.qjl:
        s = torch.tensor(params.qjl_matrix, dtype=torch.float64)
        sketch = _padded(s.T * (factor * _SQRT_HALF_PI / spec.qjl_dim), (bd, bm), device, dtype)
    return _padded(rot.T * factor, (bd, bd), device, dtype), sketch


def _rotated_queries(q: torch.Tensor, k_params: QuantParams, kv_heads: int, factor: float) -> tuple:
    """``(q_rot, q_sk)``: the queries ``(B, Hq, T, d)`` rotated into K's domain and pre-scaled by ``factor``,
    ``(B * Hkv, Hq / Hkv * T, block_d)`` (and their K QJL sketches, else ``q_rot`` again), by one launch of
    `attention_query_kernel`."""
    spec = k_params.spec
    compute = compute_dtype(q.dtype)
    rot, sketch = _query_maps(k_params, q.device, compute, factor)
    bd, bm = rot.shape[0], _pow2(spec.qjl_dim)
    batch, q_heads, q_len = q.shape[:3]
    rows = q_heads // kv_heads * q_len
    q_rot = torch.empty((batch * kv_heads, rows, bd), dtype=compute, device=q.device)
    q_sk = torch.empty((batch * kv_heads, rows, bm), dtype=compute, device=q.device) if spec.qjl else q_rot
    if q.stride(-1) != 1:
        q = q.contiguous()
    tile = 16 if INTERPRETING else min(64, bd, bm if spec.qjl else bd)  # product tile (few or no spills at 8 warps)
    attention_query_kernel[(batch * kv_heads, triton.cdiv(rows, 16))](
        q, *q.stride()[:3], rot, rot if sketch is None else sketch, q_rot, q_sk, kv_heads, rows, q_len,
        dk=spec.dim, K_QJL=spec.qjl, **_kernel_dtypes(compute), BLOCK_Q=16, BLOCK_DK=bd, BLOCK_MK=bm,
        BLOCK_C=tile, num_warps=_WARPS, **_FUSED,
    )  # fmt: skip
    return q_rot, q_sk


def _attention_launch(
    q, k_code, v_code, k_params, v_params, *, scale, lens, causal=False, splits=None, block_table=None,
    launch=_AttentionLaunch(),
):  # fmt: skip
    """The three kernel launches of `attention` on checked inputs (``lens``: int32 or int64 lengths on the
    device; ``block_table``: int32 or int64 on the device with a unit column stride, or None); no
    synchronization, so CUDA graphs can capture it (warm up with the same ``scale``: the query tables are
    built, with a host-to-device copy, on a call with a new one). ``launch`` overrides the configuration
    (benchmarks)."""
    kspec, vspec = k_params.spec, v_params.spec
    batch, kv_heads, kv_len = k_code.shape
    page = 0
    if block_table is not None:  # the logical cache: (B, Hkv, max_blocks * page)
        page = kv_len
        batch, kv_len = block_table.shape[0], block_table.shape[1] * page
    q_len = q.shape[2]
    rows = (q.shape[1] // kv_heads) * q_len
    bh = batch * kv_heads
    compute = compute_dtype(q.dtype)
    tk, tv = _tables(k_params, q.device, compute), _tables(v_params, q.device, compute)
    factor = (1.0 / math.sqrt(kspec.dim) if scale is None else float(scale)) * _LOG2E
    out = torch.empty((bh, rows, vspec.dim), dtype=_store_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out.to(q.dtype).reshape(batch, q.shape[1], q_len, vspec.dim)

    half = q.dtype in (torch.float16, torch.bfloat16)
    block_q = 16 if INTERPRETING else max(16, min(64, triton.next_power_of_2(rows)))
    # keys per step: wider operands, fewer keys, so shared memory stays well under 227 KiB
    block_n = launch.block_n * 128 // max(128, tk.block_d, tv.block_d) // (1 if half else 2)
    if max(kspec.mse_bits, vspec.mse_bits) > 4:  # levels gathered from the table, staged in shared memory
        block_n //= 2
    block_n = 16 if INTERPRETING or compute == torch.float64 else max(16, block_n)
    row_blocks = triton.cdiv(rows, block_q)
    q_rot, q_sk = _rotated_queries(q, k_params, kv_heads, factor)
    if splits is None:
        splits, split_len = _split_plan(bh * row_blocks, kv_len, block_n, q.device, launch.programs_per_sm)
    else:
        split_len = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    new = functools.partial(torch.empty, device=q.device, dtype=compute)
    mx, denom = new((bh, splits, rows)), new((bh, splits, rows))
    acc = new((bh, splits, rows, tv.block_d))
    accq = new((bh, splits, rows, tv.block_m)) if vspec.qjl else acc

    kc, kn, ks, kr = _payload(k_code)
    vc, vn, vs, vr = _payload(v_code)
    strides = [st for t in (kc, kn, ks, kr, vc, vn, vs, vr) for st in t.stride()[:3]]
    stages = {} if INTERPRETING else {"num_stages": launch.num_stages}
    attention_split_kernel[(bh, splits, row_blocks)](
        q_rot, q_sk, kc, kn, ks, kr, tk.centroids, vc, vn, vs, vr, tv.centroids, *strides, lens,
        *((lens, 0, 1) if block_table is None else (block_table, block_table.stride(0), k_code.shape[0])),
        mx, denom, acc, accq,
        kv_heads=kv_heads, N=kv_len, R=rows, q_len=q_len, split_len=split_len, dk=kspec.dim, dv=vspec.dim,
        mk=kspec.qjl_dim, mv=vspec.qjl_dim, k_code_bytes=kspec.code_bytes, v_code_bytes=vspec.code_bytes,
        k_sign_bytes=kspec.sign_bytes, v_sign_bytes=vspec.sign_bytes, splits=splits,
        K_BITS=kspec.mse_bits, V_BITS=vspec.mse_bits, K_QJL=kspec.qjl, V_QJL=vspec.qjl, CAUSAL=causal, PAGE=page,
        DOT_DTYPE=tl.float16 if half else _kernel_dtypes(compute)["CDT"], **_kernel_dtypes(compute),
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_DK=tk.block_d, BLOCK_DV=tv.block_d,
        BLOCK_MK=tk.block_m, BLOCK_MV=tv.block_m, K_WORDS=_words(kc, ks), V_WORDS=_words(vc, vs),
        num_warps=launch.num_warps, **stages, **_FUSED,
    )  # fmt: skip
    block_c = 16 if INTERPRETING else min(tv.block_d, max(16, 8192 // tv.block_d))
    attention_combine_kernel[(bh, row_blocks)](
        mx, denom, acc, accq, tv.rmat, tv.smat if vspec.qjl else tv.rmat, out, lens,
        kv_heads=kv_heads, N=kv_len, least=max(q_len, 1) if causal else 1, R=rows, dv=vspec.dim, splits=splits,
        V_QJL=vspec.qjl, **_kernel_dtypes(compute), BLOCK_Q=block_q, BLOCK_DV=tv.block_d, BLOCK_C=block_c,
        BLOCK_MV=tv.block_m, num_warps=_WARPS, **_FUSED,
    )  # fmt: skip
    return out.to(q.dtype).reshape(batch, q.shape[1], q_len, vspec.dim)
