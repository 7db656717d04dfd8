"""The Triton tier's kernel launches on checked arguments, and the settings they take (`LaunchConfig`).

`rotorquant.tiers.triton` checks its arguments and calls these; benchmarks and tests call them directly
to sweep or force a setting. None of them checks anything or synchronizes with the host, so an engine
can capture them in a CUDA graph. The kernels are the module attributes ``quantize_kernel``,
``dequantize_kernel``, ``scores_kernel``, ``attention_query_kernel``, ``attention_split_kernel`` and
``attention_combine_kernel``: `benchmarks/sass_count.py` replaces them by recorders to compile exactly
what a launch would build.

Compute dtypes: the kernels compute in float32 (float64 for float64 inputs); half-precision queries use
float16 tensor cores in `attention`, with operands scaled into [-1, 1]. Codes in the interleaved packing
become those float16 operands by inline ``prmt.b32`` table lookups on a GPU (``PRMT``), by the same
lookups in integer operations under the interpreter, which runs no inline asm.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from ...engine import slots as engine_slots
from ...format import Compressed
from ...kernels.attention import attention_combine_kernel, attention_query_kernel, attention_split_kernel
from ...kernels.dequantize import dequantize_kernel
from ...kernels.quantize import quantize_kernel
from ...kernels.scores import scores_kernel
from ...params import QuantParams
from ...spec import Packing
from ..tensors import NORM_DTYPES, compute_dtype
from .tables import SQRT_HALF_PI, pow2, query_maps, tables, transposed_tiles

INTERPRETING = type(quantize_kernel).__name__ == "InterpretedFunction"
"""True when ``TRITON_INTERPRET=1`` was set before the kernels were imported (CPU tensors)."""

LOG2E = 1.0 / math.log(2.0)
# float32 tl.dots: three TF32 passes on tensor cores (float32-level accuracy) instead of "ieee", whose
# FMA lowering spills thousands of bytes at d = 128; the interpreter multiplies in float32 either way.
_TF32X3 = "ieee" if INTERPRETING else "tf32x3"
# 8 warps: every kernel compiles for sm_90 without register spills at d = 128 (4 warps spill).
WARPS = 8
# Multiply-adds fused into FMAs, as Triton has always defaulted to; stated on every launch because
# Triton 3.9 warns that 3.10 will default to unfused, which would change the kernels' rounding.
_FUSED = {"enable_fp_fusion": True}


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of the Triton kernels on a GPU (the interpreter always uses 16-wide blocks, in attention
    16 keys per sub-split).

    Quantize (None: the default for the spec, see `quantize_defaults`):
        quantize_block_n: vectors per program.
        quantize_warps: warps per program.
        quantize_block_c: coordinates per chunk (at least 32 for the interleaved packing, which writes whole
            32-code chunks; at least 64 in float32 compute for 32 < d <= 256, whose rotation table then holds
            64-column blocks, `tables.transposed_tiles`).

    Attention (None: planned for the sub-splits and head dim, see `attention_defaults`):
        attention_subsplits: the most sub-splits of a key split that share a program's 16 rows (a power of two;
            1 turns the packing off): with R query rows per KV head a program carries the largest power of two
            <= min(attention_subsplits, 16 / R) (`rotorquant.kernels.attention`). None: 4 for half-precision
            queries (and under the interpreter), 1 for float32 and float64 ones, whose products, not the
            unpacking of codes, take most of the loop (sm_90, float32 queries, 3 bits, d = 128: 26.0 instructions
            per code with one sub-split, 25.9 with four, which spill registers in the loop).
        attention_block_n: keys per step of each sub-split for half-precision queries at head dims <= 128 (half
            of it for float32 queries, whose operands are twice as wide, and per doubling of the head dim).
        attention_warps, attention_stages: warps, and software pipelining of the key loop.
        programs_per_sm: the split plan aims at about this many programs per multiprocessor.
        splits: force this many key splits (None: planned).
        multiprocessors: plan for this many multiprocessors (None: the device's; 4 under the interpreter).

    Appending:
        int32_entries: caches with more entries than this unravel slots in int64 (tests lower it).

    Reading:
        int32_offsets: attention offsets a key's fields within its head's rows (paged: within the pool) in
            int32 when every offset, in elements, is at most this, else in int64 (tests lower it).
    """

    quantize_block_n: int | None = None
    quantize_warps: int | None = None
    quantize_block_c: int | None = None
    attention_subsplits: int | None = None
    attention_block_n: int | None = None
    attention_warps: int | None = None
    attention_stages: int = 2
    programs_per_sm: int = 4
    splits: int | None = None
    multiprocessors: int | None = None
    int32_entries: int = 2**31 - 1
    int32_offsets: int = 2**31 - 1

    def __post_init__(self):
        powers = {"quantize_block_n", "quantize_warps", "quantize_block_c", "attention_subsplits", "attention_block_n",
                  "attention_warps"}  # fmt: skip
        optional = {"quantize_block_n", "quantize_warps", "quantize_block_c", "attention_subsplits",
                    "attention_block_n", "attention_warps", "splits", "multiprocessors"}  # fmt: skip
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in optional and value is None:
                continue
            low = 0 if name in ("int32_entries", "int32_offsets") else 1
            power = name in powers
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (power and value & (value - 1)):
                kind = "a power of two" if power else f"an int >= {low}"
                raise ValueError(f"LaunchConfig.{name}: expected {kind}{' or None' if name in optional else ''}, got {value!r}")


DEFAULT = LaunchConfig()


def kernel_dtypes(compute: torch.dtype) -> dict:
    """The kernels' ``CDT`` and ``DOT_PRECISION`` for a compute dtype (float64 dots are exact "ieee")."""
    if compute == torch.float64:
        return {"CDT": tl.float64, "DOT_PRECISION": "ieee"}
    return {"CDT": tl.float32, "DOT_PRECISION": _TF32X3}


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a kernel writes for an output of ``dtype``: under the interpreter, whose float32 -> bfloat16
    cast truncates, bfloat16 is written as float32 and rounded by torch afterwards (on a GPU the kernels
    round to nearest even, as torch does)."""
    return torch.float32 if dtype == torch.bfloat16 and INTERPRETING else dtype


def saturation(dtype: torch.dtype) -> float:
    """The largest finite value of an output dtype, where a kernel saturates the results of rows with finite
    norms: a float16 reconstruction may exceed 65504 where its input did not, and one whose norm is near the
    float32 maximum may overflow float32."""
    return float(torch.finfo(dtype).max)


def word_aligned(*packed: torch.Tensor) -> bool:
    """Whether the kernels may read these ``(..., bytes)`` packed payloads (rows contiguous) as 32-bit words:
    every row starts 4-byte aligned (the pointer and the strides of every dimension longer than 1 are
    multiples of 4) and is a whole number of words long (its byte length a multiple of 4)."""
    return all(
        t.data_ptr() % 4 == 0
        and t.shape[-1] % 4 == 0
        and all(st % 4 == 0 for size, st in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)
        for t in packed
    )


# ---------------------------------------------------------------------------- quantize


def quantize_defaults(params: QuantParams, compute: torch.dtype) -> tuple[int, int, int]:
    """``(vectors per program, coordinates per chunk, warps)`` for ``params`` in ``compute``. float32: 64 vectors
    on 4 warps in chunks of 64 coordinates up to d = 128, the fewest sm_90 instructions per coordinate of the
    settings compiled by `benchmarks/sass_count.py`'s method; 32 vectors to d = 256, and 16 in chunks of 16
    beyond, so that a chunk's float16 table stays within 64 KiB up to d = 1024. float64: ``tl.dot`` operands of a
    chunk stay <= 32 KiB."""
    spec = params.spec
    block_d, block_m = pow2(spec.dim), pow2(spec.qjl_dim)
    if INTERPRETING:
        return 16, 16, WARPS
    if compute == torch.float32:
        return (64 if block_d <= 128 else 32 if block_d <= 256 else 16), (64 if block_d <= 256 else 16), 4
    block_n = 32 if block_d <= 128 else 16
    chunk = max(16, 8192 // block_d)
    if spec.qjl:
        chunk = min(chunk, max(16, 8192 // block_m))
    return block_n, min(chunk, block_d), WARPS


def quantize(
    rows: torch.Tensor,
    params: QuantParams,
    *,
    cap_norms: bool = False,
    into: tuple[Compressed, torch.Tensor] | None = None,
    config: LaunchConfig = DEFAULT,
) -> tuple[torch.Tensor, ...]:
    """Launch `quantize_kernel` on ``rows (n, d)`` (unit stride): ``(codes, norms, raw_norms, signs,
    residual_norms)`` with norms in the compute dtype (``raw_norms``: ``||x||``, which differs from ``norms``
    with norm correction). ``cap_norms``: stored norms past the norm dtype's largest value come out Inf.
    ``into = (cache, slots)``: write into ``cache``'s fields at the flat entries ``slots (n,)`` instead (see
    `rotorquant.engine.slots`), norms in the cache's norm dtype; the cache's fields are returned."""
    spec = params.spec
    compute = compute_dtype(rows.dtype)
    tab = tables(params, rows.device, compute)
    n = rows.shape[0]
    if into is None:
        new = functools.partial(torch.empty, device=rows.device)
        codes = new((n, spec.code_bytes), dtype=torch.uint8)
        norms = new((n,), dtype=compute)
        raw = new((n,), dtype=compute) if spec.norm_correction else norms
        signs = new((n, spec.sign_bytes), dtype=torch.uint8) if spec.qjl else None
        res = new((n,), dtype=compute) if spec.qjl else None
        slots, shape, entries, strides, wide = codes, (1, 1, 1), 1, (0,) * 16, False  # unused without SLOTS
    else:
        cache, slots = into
        codes, norms, signs, res = cache.codes, cache.norms, cache.qjl_signs, cache.residual_norms
        raw = norms
        shape, entries, strides = _slot_layout(cache)
        wide = entries > config.int32_entries
    block_n, block_c, warps = quantize_defaults(params, compute)
    block_n, block_c = config.quantize_block_n or block_n, config.quantize_block_c or block_c
    interleaved = spec.packing is Packing.INTERLEAVED
    if interleaved:
        block_c = max(block_c, 32)
    transposed = compute == torch.float32 and transposed_tiles(tab.block_d)
    if transposed:
        block_c = max(block_c, 64)
    if n:
        quantize_kernel[(triton.cdiv(n, block_n),)](
            rows, rows.stride(0), n, spec.dim,
            (codes, norms, raw, signs if spec.qjl else codes, res if spec.qjl else norms),
            (tab.fwd, tab.boundaries, tab.centroids, tab.proj if spec.qjl else tab.centroids),
            spec.code_bytes, spec.qjl_dim, slots, shape, entries, strides,
            **kernel_dtypes(compute), BITS=spec.mse_bits, QJL=spec.qjl,
            NORM_CORRECTION=spec.norm_correction, SQUARES_FIT=rows.dtype == torch.float16,
            NORM_MAX=float(torch.finfo(NORM_DTYPES[spec.norm_dtype]).max) if cap_norms else 0.0,
            SLOTS=into is not None, SLOT_INDEX=tl.int64 if wide else tl.int32, BLOCK_N=block_n, BLOCK_D=tab.block_d,
            BLOCK_C=block_c, TRANSPOSED=transposed, BLOCK_M=tab.block_m, INTERLEAVED=interleaved, POPC=not INTERPRETING,
            num_warps=config.quantize_warps or warps,
            **_FUSED,
        )  # fmt: skip
    return codes, norms, raw, signs, res


def _slot_layout(cache: Compressed) -> tuple[tuple[int, int, int], int, tuple[int, ...]]:
    """``(SHAPE, entries, strides)`` of `quantize_kernel` for writing into ``cache``: its leading sizes after the
    first, its entries, and each field's strides over the leading dims, padded in front to four dims (size 1,
    stride 0)."""
    pad = engine_slots.MAX_CACHE_DIMS - len(cache.shape)
    sizes = (1,) * pad + cache.shape

    def strides(t: torch.Tensor | None) -> tuple[int, ...]:
        return (0,) * 4 if t is None else (0,) * pad + t.stride()[: len(cache.shape)]

    fields = (cache.codes, cache.norms, cache.qjl_signs, cache.residual_norms)
    return sizes[1:], engine_slots.size(cache.shape), tuple(st for t in fields for st in strides(t))


# ---------------------------------------------------------------------------- dequantize and scores


def dequantize(code: Compressed, params: QuantParams, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch `dequantize_kernel` on every vector of ``code``: ``(n, d)`` in `store_dtype` of ``out_dtype``."""
    spec = params.spec
    device = code.codes.device
    compute = compute_dtype(out_dtype)
    tab = tables(params, device, compute)
    n = math.prod(code.shape)
    out = torch.empty((n, spec.dim), dtype=store_dtype(out_dtype), device=device)
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
            **kernel_dtypes(compute), BITS=spec.mse_bits, MATRIX=not params.single_stage,
            QJL=spec.qjl, BLOCK_N=block_n, BLOCK_D=tab.block_d, BLOCK_C=block_c, BLOCK_M=tab.block_m,
            WORDS=word_aligned(codes, signs), INTERLEAVED=spec.packing is Packing.INTERLEAVED,
            OUT_MAX=saturation(out_dtype), num_warps=WARPS,
            **_FUSED,
        )  # fmt: skip
    return out


def _flat(t: torch.Tensor, lead: tuple[int, ...], tail: tuple[int, ...]) -> torch.Tensor:
    """Broadcast ``t`` to ``(*lead, *tail)`` and flatten the leading dims (a copy only if needed)."""
    return t.expand(*lead, *tail).reshape(math.prod(lead), *tail).contiguous()


def scores(q: torch.Tensor, code: Compressed, params: QuantParams, lead: tuple[int, ...]) -> torch.Tensor:
    """Launch `scores_kernel` for ``q (..., M, d)`` against ``code`` of leading shape ``(..., N)``, both
    broadcast to the batch shape ``lead``: ``(prod(lead), M, N)`` in `store_dtype` of ``q``'s dtype."""
    spec = params.spec
    compute = compute_dtype(q.dtype)
    tab = tables(params, q.device, compute)
    big_m, big_n = q.shape[-2], code.shape[-1]
    qf = q.to(compute)
    q_rot = _flat(qf @ tab.rot_t, lead, (big_m, tab.block_d))
    batch = q_rot.shape[0]
    out = torch.empty((batch, big_m, big_n), dtype=store_dtype(q.dtype), device=q.device)
    codes = _flat(code.codes, lead, (big_n, spec.code_bytes))
    norms = _flat(code.norms, lead, (big_n,))
    if spec.qjl:
        q_sk = _flat((qf @ tab.sketch_t) * (SQRT_HALF_PI / spec.qjl_dim), lead, (big_m, tab.block_m))
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
            **kernel_dtypes(compute), BITS=spec.mse_bits, QJL=spec.qjl, BLOCK_Q=block_q, BLOCK_N=block_n,
            BLOCK_D=tab.block_d, BLOCK_M=tab.block_m, WORDS=word_aligned(codes, signs),
            INTERLEAVED=spec.packing is Packing.INTERLEAVED, num_warps=WARPS, **_FUSED,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=16)
def _device_multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def attention_defaults(subsplits: int, block_d: int, lookups: bool) -> tuple[int, int]:
    """``(keys per step of a sub-split, warps)`` of the split kernel for half-precision queries, K and V dims padded
    to ``block_d``; ``lookups``: both in the interleaved packing and neither with QJL. One sub-split: 128 keys on 8
    warps, fewer beyond ``block_d = 128`` as `LaunchConfig.attention_block_n` says, the fastest of the launch sweep
    of `benchmarks/gpu_speed.py` at context 32K on an NVIDIA H200, 2026-11-27 (1725 us against 2201 us for 64 keys
    per step). Several: ``8192 / block_d`` keys (16 to 128), with ``lookups`` on one warp per 16 of them (2 to 8),
    the fewest sm_90 instructions per code of the launches `benchmarks/sass_count.py` compiles at head dims 64, 128
    and 256 (not timed), else on 8 warps: the contiguous packing's unpacking and QJL signs hold more registers, and
    on fewer warps the key loop spills registers to local memory."""
    if subsplits == 1:
        return 128 * 128 // max(128, block_d), WARPS
    keys = min(128, max(16, 8192 // block_d))
    return keys, min(8, max(2, keys // 16)) if lookups else WARPS


def split_plan(programs: int, kv_len: int, block_n: int, device: torch.device, config: LaunchConfig) -> tuple[int, int]:
    """``(splits, split_len)``: about ``config.programs_per_sm`` programs per SM, each split a whole number of
    key blocks (at least four unless the cache is shorter); ``config.splits`` forces the number."""
    if config.splits is None:
        sms = config.multiprocessors or _device_multiprocessors(device)
        splits = max(1, min(triton.cdiv(config.programs_per_sm * sms, programs), triton.cdiv(kv_len, 4 * block_n)))
    else:
        splits = config.splits
    split_len = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    return triton.cdiv(kv_len, split_len), split_len


def payload(code: Compressed) -> tuple[torch.Tensor, ...]:
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


def rotated_queries(q: torch.Tensor, k_params: QuantParams, kv_heads: int, factor: float) -> tuple:
    """``(q_rot, q_sk)``: the queries ``(B, Hq, T, d)`` rotated into K's domain and pre-scaled by ``factor``,
    ``(B * Hkv, Hq / Hkv * T, block_d)`` (and their K QJL sketches, else ``q_rot`` again), by one launch of
    `attention_query_kernel`."""
    spec = k_params.spec
    compute = compute_dtype(q.dtype)
    rot, sketch = query_maps(k_params, q.device, compute, factor)
    bd, bm = rot.shape[0], pow2(spec.qjl_dim)
    batch, q_heads, q_len = q.shape[:3]
    rows = q_heads // kv_heads * q_len
    q_rot = torch.empty((batch * kv_heads, rows, bd), dtype=compute, device=q.device)
    q_sk = torch.empty((batch * kv_heads, rows, bm), dtype=compute, device=q.device) if spec.qjl else q_rot
    if q.stride(-1) != 1:
        q = q.contiguous()
    tile = 16 if INTERPRETING else min(64, bd, bm if spec.qjl else bd)  # product tile (few or no spills at 8 warps)
    attention_query_kernel[(batch * kv_heads, triton.cdiv(rows, 16))](
        q, *q.stride()[:3], rot, rot if sketch is None else sketch, q_rot, q_sk, kv_heads, rows, q_len,
        dk=spec.dim, K_QJL=spec.qjl, **kernel_dtypes(compute), BLOCK_Q=16, BLOCK_DK=bd, BLOCK_MK=bm,
        BLOCK_C=tile, num_warps=WARPS, **_FUSED,
    )  # fmt: skip
    return q_rot, q_sk


def attention(
    q, k_code, v_code, k_params, v_params, *, scale: float, lengths, causal: bool = False, table=None,
    config: LaunchConfig = DEFAULT,
):  # fmt: skip
    """The three kernel launches of `rotorquant.tiers.triton.attention` on checked arguments: ``scale`` a float,
    ``lengths`` int32 or int64 on the device, ``table`` an int32 or int64 block table on the device (or None);
    returns ``(B, Hq, T, d_v)`` in ``q``'s dtype. Warm up a CUDA graph with the ``scale`` it will capture: the
    query tables are built, with a host-to-device copy, on a call with a new one."""
    kspec, vspec = k_params.spec, v_params.spec
    batch, kv_heads, kv_len = k_code.shape
    page = 0
    if table is not None:  # the logical cache: (B, Hkv, max_blocks * page)
        page = kv_len
        batch, kv_len = table.shape[0], table.shape[1] * page
        table = table if table.stride(1) == 1 or table.shape[1] == 1 else table.contiguous()
    q_len = q.shape[2]
    rows = (q.shape[1] // kv_heads) * q_len
    bh = batch * kv_heads
    compute = compute_dtype(q.dtype)
    tk, tv = tables(k_params, q.device, compute), tables(v_params, q.device, compute)
    out = torch.empty((bh, rows, vspec.dim), dtype=store_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out.to(q.dtype).reshape(batch, q.shape[1], q_len, vspec.dim)

    half = q.dtype in (torch.float16, torch.bfloat16)
    most = config.attention_subsplits or (4 if half or INTERPRETING else 1)
    subsplits = 1 << (max(1, min(most, 16 // rows)).bit_length() - 1)
    block_q = 16 if INTERPRETING or subsplits > 1 else max(16, min(64, triton.next_power_of_2(rows)))
    block_d = max(tk.block_d, tv.block_d)
    lookups = all(s.packing is Packing.INTERLEAVED and not s.qjl for s in (kspec, vspec))
    sub_n, warps = attention_defaults(subsplits, block_d, lookups)
    # keys per step of a sub-split: wider operands, fewer keys, so shared memory stays well under 227 KiB
    if config.attention_block_n is not None:
        sub_n = config.attention_block_n * 128 // max(128, block_d)
    sub_n //= 1 if half else 2
    if max(kspec.mse_bits, vspec.mse_bits) > 4:  # levels gathered from the table, staged in shared memory
        sub_n //= 2
    block_n = subsplits * (16 if INTERPRETING or compute == torch.float64 else max(16, sub_n))
    row_blocks = triton.cdiv(rows, block_q)
    q_rot, q_sk = rotated_queries(q, k_params, kv_heads, scale * LOG2E)
    splits, split_len = split_plan(bh * row_blocks, kv_len, block_n, q.device, config)
    new = functools.partial(torch.empty, device=q.device, dtype=compute)
    parts = splits * subsplits  # partial results per query row
    mx, denom = new((bh, parts, rows)), new((bh, parts, rows))
    acc = new((bh, parts, rows, tv.block_d))
    accq = new((bh, parts, rows, tv.block_m)) if vspec.qjl else acc
    k_fields, v_fields = payload(k_code), payload(v_code)
    paged = (lengths, 0, 1) if table is None else (table, table.stride(0), k_code.shape[0])
    # a bound on the offsets of a key's fields past its head's row: key * key stride (masked keys of a split's last
    # block included), paged block id * block stride + slot * key stride
    reach = max((paged[2] - 1) * t.stride(0) + (kv_len + block_n if table is None else page) * t.stride(2)
                for t in (*k_fields, *v_fields))  # fmt: skip
    stages = {} if INTERPRETING else {"num_stages": config.attention_stages}
    attention_split_kernel[(bh, splits, row_blocks)](
        (q_rot, q_sk),
        (*k_fields, tk.centroids), tuple(st for t in k_fields for st in t.stride()[:3]),
        (*v_fields, tv.centroids), tuple(st for t in v_fields for st in t.stride()[:3]),
        lengths, paged, (mx, denom, acc, accq),
        kv_heads=kv_heads, N=kv_len, R=rows, q_len=q_len, split_len=split_len, splits=splits, dk=kspec.dim,
        dv=vspec.dim, mk=kspec.qjl_dim, mv=vspec.qjl_dim, K_BITS=kspec.mse_bits, V_BITS=vspec.mse_bits,
        K_QJL=kspec.qjl, V_QJL=vspec.qjl, K_INTERLEAVED=kspec.packing is Packing.INTERLEAVED,
        V_INTERLEAVED=vspec.packing is Packing.INTERLEAVED, PRMT=not INTERPRETING, CAUSAL=causal, PAGE=page,
        KEY_INDEX=tl.int32 if reach <= config.int32_offsets else tl.int64,
        DOT_DTYPE=tl.float16 if half else kernel_dtypes(compute)["CDT"],
        **kernel_dtypes(compute), BLOCK_Q=block_q, BLOCK_N=block_n, SUBSPLITS=subsplits, BLOCK_DK=tk.block_d,
        BLOCK_DV=tv.block_d, BLOCK_MK=tk.block_m, BLOCK_MV=tv.block_m, K_WORDS=word_aligned(k_fields[0], k_fields[2]),
        V_WORDS=word_aligned(v_fields[0], v_fields[2]), num_warps=config.attention_warps or warps, **stages, **_FUSED,
    )  # fmt: skip
    block_c = 16 if INTERPRETING else min(tv.block_d, max(16, 8192 // tv.block_d))
    attention_combine_kernel[(bh, row_blocks)](
        (mx, denom, acc, accq), tv.rmat, tv.smat if vspec.qjl else tv.rmat, out, lengths,
        kv_heads=kv_heads, N=kv_len, least=max(q_len, 1) if causal else 1, R=rows, dv=vspec.dim, parts=parts,
        V_QJL=vspec.qjl, **kernel_dtypes(compute), BLOCK_Q=block_q, BLOCK_DV=tv.block_d, BLOCK_C=block_c,
        BLOCK_MV=tv.block_m, OUT_MAX=saturation(q.dtype), num_warps=WARPS, **_FUSED,
    )  # fmt: skip
    return out.to(q.dtype).reshape(batch, q.shape[1], q_len, vspec.dim)
