"""Fused quantize: norm -> normalize -> rotate -> nearest centroid -> bit-pack (-> QJL sketch).

One program compresses ``BLOCK_N`` vectors; arithmetic is float32 (float64 for float64 inputs). For a row ``x``:

    big = max_j |x_j|,  root = ||x / big||,  s = big * root         (no overflow in the squares)
    u = (x / big) / root                                             (u = 0 for a zero vector)
    (divisions are multiplications by per-row reciprocals; a row whose max is below 2**-64 is first
    scaled by 2**64, exactly, so 1 / big stays finite for subnormals. float16 inputs skip ``big``:
    s = ||x||, u = x / s, since their squares can neither overflow nor underflow float32)
    y = Rot(u)            one rotor stage:  y_c = sum_i W[i, c] * u[3*(c//3) + i]   (3x3 blocks, O(d))
                          any other rotation (the rotor butterfly, Hadamard, dense):
                                            y = u @ R^T with its matrix          (tl.dot, O(d^2))
    k_c = #{i : y_c >= boundaries[i]}       (binary search; boundaries picked by selects up to 4 bits)
    stored norm = s, or s / ||c[k]|| with norm correction
    QJL:  S r = s * (S Rot^T) (y - c[k]),  ||r|| = s * ||y - c[k]||   (the rotation is orthogonal)

The coordinates are processed in chunks of ``BLOCK_C`` (a multiple of 8, so each chunk packs
into whole bytes; of 32 for the interleaved packing, whose words hold 32 codes each). With ``SLOTS``
the results go straight into a cache's fields at the entries ``slots`` names (`rotorquant.engine.slots`),
norms rounded to the cache's norm dtype in the kernel.
"""

import triton
import triton.language as tl

from .bitstream import store_codes, store_interleaved
from .levels import centroid_levels


@triton.jit
def _boundary(
    bnd_ptr,  # pointer to the ascending CDT boundaries
    I: tl.constexpr,  # index, known when compiling
):
    """``b[I]``: a uniform load (the same address for every coordinate), so it stays in a register."""
    return tl.load(bnd_ptr + I)


@triton.jit
def nearest_code(
    y,  # (ROWS, COLS) float32 rotated coordinates
    bnd_ptr,  # pointer to the 2**BITS - 1 ascending CDT boundaries b
    BITS: tl.constexpr,  # bits per code
):
    """``#{i : y >= b[i]}`` by binary search, which equals the count since the boundaries ascend. The
    bits are decided from the top: the bit of weight ``2**t`` is ``y >= b[code_so_far + 2**t - 1]``,
    where ``code_so_far`` holds the higher bits already decided. Up to 4 bits the boundary each step
    compares against is picked from registers by a tree of selects on those bits; beyond, it is read
    from the table (BITS dependent reads)."""
    if BITS <= 4:
        p_top = y >= _boundary(bnd_ptr, (1 << (BITS - 1)) - 1)
        code = p_top.to(tl.int32) << (BITS - 1)
        if BITS >= 2:  # code so far: 0 or 2**(BITS-1)
            q = 1 << (BITS - 2)
            p1 = y >= tl.where(p_top, _boundary(bnd_ptr, 3 * q - 1), _boundary(bnd_ptr, q - 1))
            code += p1.to(tl.int32) << (BITS - 2)
        if BITS >= 3:  # code so far: a multiple of 2**(BITS-2)
            e = 1 << (BITS - 3)
            low = tl.where(p1, _boundary(bnd_ptr, 3 * e - 1), _boundary(bnd_ptr, e - 1))
            high = tl.where(p1, _boundary(bnd_ptr, 7 * e - 1), _boundary(bnd_ptr, 5 * e - 1))
            p2 = y >= tl.where(p_top, high, low)
            code += p2.to(tl.int32) << (BITS - 3)
        if BITS == 4:  # code so far: even; compare against b[code + 0], i.e. b[2j] for j = code // 2
            b_lo = tl.where(p2, tl.where(p1, _boundary(bnd_ptr, 6), _boundary(bnd_ptr, 2)),
                            tl.where(p1, _boundary(bnd_ptr, 4), _boundary(bnd_ptr, 0)))
            b_hi = tl.where(p2, tl.where(p1, _boundary(bnd_ptr, 14), _boundary(bnd_ptr, 10)),
                            tl.where(p1, _boundary(bnd_ptr, 12), _boundary(bnd_ptr, 8)))
            code += (y >= tl.where(p_top, b_hi, b_lo)).to(tl.int32)
    else:
        code = tl.zeros(y.shape, dtype=tl.int32)
        for t in tl.static_range(BITS):
            cand = code + (1 << (BITS - 1 - t))  # in 1 .. 2**BITS - 1: always a valid boundary index + 1
            code = tl.where(y >= tl.load(bnd_ptr + cand - 1), cand, code)
    return code


@triton.jit
def exact_sqrt(
    x,  # float32 or float64 tensor
):
    """Correctly rounded square root (``tl.sqrt`` is approximate for float32)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _as_stored(
    t,  # CDT values
    ptr,  # where they go: CDT (plain quantize) or the cache's norm dtype (SLOTS)
):
    """``t`` in ``ptr``'s element type, rounded as the host rounds the plain outputs (torch casts float64 to
    float16 through float32, so this does too)."""
    return t.to(tl.float32).to(ptr.dtype.element_ty) if t.dtype != ptr.dtype.element_ty else t


@triton.jit
def _dot4(
    i,  # (i0, i1, i2, i3) int64 indices
    st,  # (s0, s1, s2, s3) strides
):
    """``i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3``."""
    return i[0] * st[0] + i[1] * st[1] + i[2] * st[2] + i[3] * st[3]


@triton.jit
def slot_offsets(
    slots_ptr,  # (n,) int32 or int64 flat entry index of each vector
    rows,  # (ROWS,) vector indices
    row_ok,  # (ROWS,) bool: which vectors exist
    SHAPE: tl.constexpr,  # (L1, L2, L3): the cache's leading sizes after the first (constants: cheap division)
    entries,  # L0 * L1 * L2 * L3
    strides,  # 16 strides over (L0, L1, L2, L3): codes (bytes), norms, signs (bytes), residual norms
    INDEX: tl.constexpr,  # tl.int32 when every index fits it (fewer than 2**31 entries), else tl.int64
):
    """``(put, code_at, norm_at, sign_at, res_at)``: which vectors have a slot in ``0..entries - 1``, and the
    element offsets of their entry in each field. Entry ``slot = ((i0 * L1 + i1) * L2 + i2) * L3 + i3``
    is unraveled by divisions by the constants ``L3, L2, L1`` in ``INDEX``."""
    slot = tl.load(slots_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    put = row_ok & (slot >= 0) & (slot < entries)
    e = tl.where(put, slot, 0).to(INDEX)
    i3 = e % SHAPE[2]
    e = e // SHAPE[2]
    i2 = e % SHAPE[1]
    e = e // SHAPE[1]
    i = ((e // SHAPE[0]).to(tl.int64), (e % SHAPE[0]).to(tl.int64), i2.to(tl.int64), i3.to(tl.int64))
    code_at = _dot4(i, (strides[0], strides[1], strides[2], strides[3]))
    norm_at = _dot4(i, (strides[4], strides[5], strides[6], strides[7]))
    sign_at = _dot4(i, (strides[8], strides[9], strides[10], strides[11]))
    res_at = _dot4(i, (strides[12], strides[13], strides[14], strides[15]))
    return put, code_at, norm_at, sign_at, res_at


@triton.jit
def quantize_kernel(
    x_ptr,  # (n, d) input vectors, any float dtype, rows stride_x apart
    stride_x,  # elements between consecutive rows of x
    n,  # number of vectors
    d: tl.constexpr,  # vector dimension
    out,  # output pointers (codes, norms, raw_norms, signs, res_norms):
    # codes (n, code_bytes) uint8 packed codes; norms (n,) the stored norm (s, or s / ||c[k]|| with
    # NORM_CORRECTION); raw_norms (n,) s = ||x|| (written only with NORM_CORRECTION and not SLOTS);
    # QJL: signs (n, sign_bytes) uint8 packed sign bits of S r, res_norms (n,) ||r||. Rows are contiguous,
    # CDT norms; with SLOTS they are a cache's fields (any strides, the cache's norm dtype)
    tables,  # CDT constants (rot, boundaries, centroids, proj): rot = MATRIX: (BLOCK_D, BLOCK_D) R^T
    # zero-padded, rotor: (3, BLOCK_D) weights W; boundaries (2**BITS - 1,); centroids (2**BITS,);
    # QJL: proj (BLOCK_D, BLOCK_M) (S Rot^T)^T zero-padded
    code_bytes: tl.constexpr,  # ceil(d * BITS / 8)
    m,  # QJL: number of projections
    # SLOTS: vector i goes to the cache entry whose row-major flat index over its leading shape
    # (L0, L1, L2, L3) (padded in front with 1s) is slots[i]; a slot outside 0..entries - 1 writes nothing
    slots_ptr,  # SLOTS: (n,) int32 or int64 flat entry index of each vector
    SHAPE: tl.constexpr,  # SLOTS: (L1, L2, L3)
    entries,  # SLOTS: L0 * L1 * L2 * L3
    strides,  # SLOTS: 16 element strides over (L0, L1, L2, L3): codes (bytes), norms, signs (bytes), res_norms
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 inputs, else tl.float32
    DOT_PRECISION: tl.constexpr,  # input_precision of the tl.dots: "tf32x3" (float32-accurate) or "ieee"
    BITS: tl.constexpr,  # bits per code (spec.mse_bits)
    MATRIX: tl.constexpr,  # True: the rotation as a matrix (tl.dot); False: one stage of rotor blocks
    QJL: tl.constexpr,  # True: also write the QJL sketch of the residual
    NORM_CORRECTION: tl.constexpr,  # True: store s / ||c[k]||
    SQUARES_FIT: tl.constexpr,  # True for float16 x: sum(x^2) fits the compute dtype, no max-scaling needed
    NORM_MAX: tl.constexpr,  # > 0: stored and residual norms past it (the norm dtype's largest value) become Inf
    SLOTS: tl.constexpr,  # True: write into a cache at slots (norms cast to its norm dtype; raw_norms unused)
    SLOT_INDEX: tl.constexpr,  # SLOTS: tl.int32 (entries < 2**31) or tl.int64, the dtype slots are unraveled in
    BLOCK_N: tl.constexpr,  # vectors per program
    BLOCK_D: tl.constexpr,  # power of two >= max(d, 16)
    BLOCK_C: tl.constexpr,  # coordinates per chunk: power of two, 16 <= BLOCK_C <= BLOCK_D
    BLOCK_M: tl.constexpr,  # power of two >= max(m, 16) (QJL only)
    INTERLEAVED: tl.constexpr,  # write the codes in the interleaved packing (BITS 2..4, d and BLOCK_C multiples
    # of 32)
):
    codes_ptr, norms_ptr, raw_norms_ptr, signs_ptr, res_norms_ptr = out
    rot_ptr, bnd_ptr, cent_ptr, proj_ptr = tables
    sign_bytes = (m + 7) // 8
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    if SLOTS:
        put, code_at, norm_at, sign_at, res_at = slot_offsets(slots_ptr, rows, row_ok, SHAPE, entries, strides, SLOT_INDEX)
    else:
        put = row_ok
        code_at = rows64 * code_bytes
        norm_at = rows
        sign_at = rows64 * sign_bytes
        res_at = rows
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows64 * stride_x
    x = tl.load(x_rows[:, None] + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < d), other=0.0)
    x = x.to(CDT)
    if SQUARES_FIT:  # float16 x: sum(x^2) <= d * 65504^2 cannot overflow, nor x^2 >= 2^-48 underflow, in float32
        s = exact_sqrt(tl.sum(x * x, axis=1))
        pre = tl.full((BLOCK_N,), 1.0, dtype=CDT)
        scale = 1.0 / tl.where(s > 0, s, 1.0)  # u = x * scale
    else:
        big = tl.max(tl.abs(x), axis=1)
        big = tl.where(big > 0, big, 1.0)
        pre = tl.where(big < 5.421010862427522e-20, 18446744073709551616.0, 1.0)  # 2**-64, 2**64: exact scaling
        inv_big = 1.0 / (big * pre)
        xs = (x * pre[:, None]) * inv_big[:, None]  # x / big, with |xs| <= 1
        root = exact_sqrt(tl.sum(xs * xs, axis=1))
        s = big * root  # NaN or Inf exactly when x holds NaN/Inf or ||x|| overflows float32
        scale = inv_big / tl.where(root > 0, root, 1.0)  # finite: inv_big <= 2**85 (2**1010 in float64), root >= 1
    if MATRIX:
        u = (x * pre[:, None]) * scale[:, None]

    code_rows = codes_ptr + code_at
    mcols = tl.arange(0, BLOCK_M)
    sketch = tl.zeros((BLOCK_N, BLOCK_M), dtype=CDT)
    res_sq = tl.zeros((BLOCK_N,), dtype=CDT)
    cent_sq = tl.zeros((BLOCK_N,), dtype=CDT)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        if MATRIX:
            rt = tl.load(rot_ptr + cols[:, None] * BLOCK_D + cc[None, :])
            y = tl.dot(u, rt, input_precision=DOT_PRECISION)
        else:
            y = tl.zeros((BLOCK_N, BLOCK_C), dtype=CDT)
            for i in tl.static_range(3):
                src = 3 * (cc // 3) + i
                xi = tl.load(x_rows[:, None] + src[None, :], mask=row_ok[:, None] & (src[None, :] < d), other=0.0)
                if SQUARES_FIT:
                    xi = xi.to(CDT) * scale[:, None]
                else:
                    xi = (xi.to(CDT) * pre[:, None]) * scale[:, None]
                y += tl.load(rot_ptr + i * BLOCK_D + cc)[None, :] * xi
        valid = (cc < d)[None, :]
        code = tl.where(valid, nearest_code(y, bnd_ptr, BITS), 0)
        if INTERLEAVED:
            store_interleaved(code_rows, put, code, c0 // 32, d // 32, BITS, BLOCK_N, BLOCK_C)
        else:
            store_codes(code_rows, put, code, c0 * BITS // 8, code_bytes, BITS, BLOCK_N, BLOCK_C)
        if QJL or NORM_CORRECTION:
            level = tl.where(valid, centroid_levels(code, cent_ptr, BITS), 0.0)
            if NORM_CORRECTION:
                cent_sq += tl.sum(level * level, axis=1)
            if QJL:
                diff = tl.where(valid, y - level, 0.0)
                res_sq += tl.sum(diff * diff, axis=1)
                proj = tl.load(proj_ptr + cc[:, None] * BLOCK_M + mcols[None, :])
                sketch += tl.dot(diff, proj, input_precision=DOT_PRECISION)

    stored = s
    if NORM_CORRECTION:
        if not SLOTS:
            tl.store(raw_norms_ptr + rows, s, mask=row_ok)
        stored = s / exact_sqrt(cent_sq)
    if NORM_MAX > 0:  # unchecked calls: Inf, where a cast to the norm dtype would round down to its max
        stored = tl.where(stored > NORM_MAX, float("inf"), stored)
    tl.store(norms_ptr + norm_at, _as_stored(stored, norms_ptr), mask=put)
    if QJL:
        bits = tl.where((sketch * s[:, None] >= 0) & (mcols < m)[None, :], 1, 0)
        store_codes(signs_ptr + sign_at, put, bits, 0, sign_bytes, 1, BLOCK_N, BLOCK_M)
        res_norm = s * exact_sqrt(res_sq)
        if NORM_MAX > 0:  # as for the norms: Inf, where a cast would round down to the norm dtype's max
            res_norm = tl.where(res_norm > NORM_MAX, float("inf"), res_norm)
        tl.store(res_norms_ptr + res_at, _as_stored(res_norm, res_norms_ptr), mask=put)
