"""Fused quantize: norm -> rotate -> nearest centroid -> bit-pack (-> QJL sketch).

One program compresses ``BLOCK_N`` vectors; arithmetic is float32 (float64 for float64 inputs). For a row ``x``
and the rotation's matrix ``R`` (every rotation, the rotor butterfly included, is one ``tl.dot``):

    float16 x:  s = sqrt((x x^T)_ii)          (a tensor-core Gram product: exact products, float32 sums)
                y = x @ (2**11 R^T)           (x is an exact float16 operand; y = 2**11 s Rot(u), u = x / s)
    other x:    big = max_j |x_j|,  root = ||x / big||,  s = big * root,  u = (x / big) / root
                (no overflow in the squares; divisions are multiplications by per-row reciprocals, and a row
                whose max is below 2**-64 is first scaled by 2**64, exactly, so 1 / big stays finite)
                y = Rot(u) = u @ R^T
    float32 compute multiplies on float16 tensor cores: R^T = hi + lo to about 2**-22 (`tables.split_rotation`),
    x @ hi + x @ lo for float16 x, and u_hi @ hi + u_hi @ lo + u_lo @ hi with u = u_hi + u_lo otherwise
    (float32-level accuracy: each product is exact, the dropped u_lo @ lo is below 2**-22). float64: one tl.dot.
    k_c = #{i : y_c / unit >= b_i}    (unit = 2**11 s for float16 x, else 1: the boundaries are scaled per row;
                                       a binary search on |y| over the upper half of the antisymmetric codebook)
    stored norm = s, or s / ||c[k]|| with norm correction (2 to 4 bits: ||c[k]||**2 = sum_j n_j c[H + j]**2, the
                  codes of each magnitude j counted by popcounts of the packed words, `levels.square_sum_of_levels`)
    QJL:  S r = s * (S Rot^T) (y / unit - c[k]),  ||r|| = s * ||y / unit - c[k]||   (the rotation is orthogonal)

The coordinates are processed in chunks of ``BLOCK_C`` (a multiple of 8, so each chunk packs into whole bytes;
of 32 for the interleaved packing, whose words hold 32 codes each; of 64 where the split table's columns are
transposed, `rotorquant.kernels.bitstream.tile_coordinates`, so that each thread packs the codes it computed).
With ``SLOTS`` the results go straight into a cache's fields at the entries ``slots`` names
(`rotorquant.engine.slots`), norms rounded to the cache's norm dtype in the kernel.
"""

import triton
import triton.language as tl

from .bitstream import store_codes, store_interleaved, tile_coordinates
from .levels import add_counts, centroid_levels, magnitude_bit_counts, square_sum_of_levels


@triton.jit
def _at(
    ptr,  # pointer to a small table
    I: tl.constexpr,  # index, known when compiling
    unit,  # (ROWS, 1) or scalar factor
):
    """``ptr[I] * unit``: a uniform load (the same address for every coordinate), so it stays in a register."""
    return tl.load(ptr + I) * unit


@triton.jit
def nearest_code(
    y,  # (ROWS, COLS) float rotated coordinates
    bnd_ptr,  # pointer to the 2**BITS - 1 ascending boundaries b (antisymmetric: b[2**BITS - 2 - i] = -b[i])
    BITS: tl.constexpr,  # bits per code
    unit,  # (ROWS, 1) or scalar > 0: y is in units of 1 / unit (it is compared with b * unit)
):
    """``k = #{i : y / unit >= b[i]}``. Up to 4 bits the codebook's symmetry halves the search:
    with ``H = 2**(BITS-1)`` and ``b[H-1] = 0``, the magnitude index ``j = #{t < H-1 : |y| >= b[H+t]}`` is found
    by a binary search of ``BITS - 1`` compares (each picks its boundary from registers by selects on the bits
    already decided), then ``k = H + j`` for ``y >= 0`` and ``k = H - 1 - j`` below (the mirror boundaries). The
    compares are "not below", so NaN sets every bit and gets ``k = 0``, as ``#{i : NaN >= b[i]} = 0``. (A
    coordinate exactly on a negative boundary ``-b`` gets the lower code, where counting gives the upper one: an
    exact tie either way.)
    Wider codes count by a binary search over the table (BITS dependent reads)."""
    if BITS <= 4:
        H: tl.constexpr = 1 << (BITS - 1)
        m = tl.abs(y)
        up = y >= 0
        j = tl.zeros(y.shape, dtype=tl.int32)
        if BITS >= 2:  # bit of weight 2**(BITS-2): |y| >= b[H + 2**(BITS-2) - 1]
            p0 = (m < _at(bnd_ptr, H + (1 << (BITS - 2)) - 1, unit)) == 0
            j += p0.to(tl.int32) << (BITS - 2)
        if BITS >= 3:  # weight 2**(BITS-3): against b[H + j + 2**(BITS-3) - 1]
            e: tl.constexpr = 1 << (BITS - 3)
            p1 = (m < tl.where(p0, _at(bnd_ptr, H + 2 * e + e - 1, unit), _at(bnd_ptr, H + e - 1, unit))) == 0
            j += p1.to(tl.int32) << (BITS - 3)
        if BITS == 4:  # weight 1: against b[8 + j], j = 0, 2, 4, 6
            b_lo = tl.where(p1, _at(bnd_ptr, 10, unit), _at(bnd_ptr, 8, unit))
            b_hi = tl.where(p1, _at(bnd_ptr, 14, unit), _at(bnd_ptr, 12, unit))
            j += ((m < tl.where(p0, b_hi, b_lo)) == 0).to(tl.int32)
        code = tl.where(up, H + j, H - 1 - j)
    else:
        code = tl.zeros(y.shape, dtype=tl.int32)
        for t in tl.static_range(BITS):
            cand = code + (1 << (BITS - 1 - t))  # in 1 .. 2**BITS - 1: always a valid boundary index + 1
            code = tl.where(y >= tl.load(bnd_ptr + cand - 1) * unit, cand, code)
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
    tables,  # constants (rot, boundaries, centroids, proj): rot: float32 compute: (2, BLOCK_D, BLOCK_D) float16
    # [2**11 hi, 2**11 lo] with hi + lo = R^T (zero-padded) to about 2**-22, columns transposed as
    # `tile_coordinates` says for 64 <= BLOCK_D <= 256; float64: (BLOCK_D, BLOCK_D) R^T. CDT: boundaries
    # (2**BITS - 1,), centroids (2**BITS,), QJL: proj (BLOCK_D, BLOCK_M) (S Rot^T)^T zero-padded
    code_bytes: tl.constexpr,  # ceil(d * BITS / 8)
    m,  # QJL: number of projections
    # SLOTS: vector i goes to the cache entry whose row-major flat index over its leading shape
    # (L0, L1, L2, L3) (padded in front with 1s) is slots[i]; a slot outside 0..entries - 1 writes nothing
    slots_ptr,  # SLOTS: (n,) int32 or int64 flat entry index of each vector
    SHAPE: tl.constexpr,  # SLOTS: (L1, L2, L3)
    entries,  # SLOTS: L0 * L1 * L2 * L3
    strides,  # SLOTS: 16 element strides over (L0, L1, L2, L3): codes (bytes), norms, signs (bytes), res_norms
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 inputs, else tl.float32
    DOT_PRECISION: tl.constexpr,  # input_precision of the QJL sketch's and float64 tl.dots: "tf32x3" or "ieee"
    BITS: tl.constexpr,  # bits per code (spec.mse_bits)
    QJL: tl.constexpr,  # True: also write the QJL sketch of the residual
    NORM_CORRECTION: tl.constexpr,  # True: store s / ||c[k]||
    SQUARES_FIT: tl.constexpr,  # True for float16 x: sum(x^2) fits the compute dtype, no max-scaling needed
    NORM_MAX: tl.constexpr,  # > 0: stored and residual norms past it (the norm dtype's largest value) become Inf
    SLOTS: tl.constexpr,  # True: write into a cache at slots (norms cast to its norm dtype; raw_norms unused)
    SLOT_INDEX: tl.constexpr,  # SLOTS: tl.int32 (entries < 2**31) or tl.int64, the dtype slots are unraveled in
    BLOCK_N: tl.constexpr,  # vectors per program
    BLOCK_D: tl.constexpr,  # power of two >= max(d, 16)
    BLOCK_C: tl.constexpr,  # coordinates per chunk: power of two, 16 <= BLOCK_C <= BLOCK_D (>= 64 if TRANSPOSED)
    TRANSPOSED: tl.constexpr,  # the float16 table's columns are transposed (`tables.transposed_tiles`) as
    # `tile_coordinates` says
    BLOCK_M: tl.constexpr,  # power of two >= max(m, 16) (QJL only)
    INTERLEAVED: tl.constexpr,  # write the codes in the interleaved packing (BITS 2..4, d and BLOCK_C multiples
    # of 32)
    POPC: tl.constexpr,  # norm correction counts bits with the GPU's popc (libdevice); else with integer operations
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
    SPLIT: tl.constexpr = rot_ptr.dtype.element_ty == tl.float16  # float32 compute: the float16 split of R^T
    if SQUARES_FIT:  # float16 x, an exact tensor-core operand: s from the Gram diagonal, y = x @ (2**11 R^T)
        gram = tl.dot(x, tl.trans(x))  # exact products, float32 sums: sum(x^2) <= d * 65504^2 cannot overflow
        on_diagonal = tl.arange(0, BLOCK_N)[:, None] == tl.arange(0, BLOCK_N)[None, :]
        s = exact_sqrt(tl.sum(tl.where(on_diagonal, gram, 0.0), axis=1))
        unit = (tl.where(s > 0, s, 1.0) * 2048.0)[:, None]
    else:
        x = x.to(CDT)
        big = tl.max(tl.abs(x), axis=1)
        big = tl.where(big > 0, big, 1.0)
        pre = tl.where(big < 5.421010862427522e-20, 18446744073709551616.0, 1.0)  # 2**-64, 2**64: exact scaling
        inv_big = 1.0 / (big * pre)
        xs = (x * pre[:, None]) * inv_big[:, None]  # x / big, with |xs| <= 1
        root = exact_sqrt(tl.sum(xs * xs, axis=1))
        s = big * root  # NaN or Inf exactly when x holds NaN/Inf or ||x|| overflows float32
        scale = inv_big / tl.where(root > 0, root, 1.0)  # finite: inv_big <= 2**85 (2**1010 in float64), root >= 1
        u = (x * pre[:, None]) * scale[:, None]
        unit = 1.0
        if SPLIT:  # u = u_hi + 2**-11 u_lo to about 2**-22, both float16
            u_hi = u.to(tl.float16)
            u_lo = ((u - u_hi.to(CDT)) * 2048.0).to(tl.float16)

    code_rows = codes_ptr + code_at
    mcols = tl.arange(0, BLOCK_M)
    sketch = tl.zeros((BLOCK_N, BLOCK_M), dtype=CDT)
    res_sq = tl.zeros((BLOCK_N,), dtype=CDT)
    level_sq = tl.zeros((BLOCK_N, BLOCK_C), dtype=CDT)  # not COUNTED (1 bit, 5 to 8 bits): c[k]**2 over the chunks
    COUNTED: tl.constexpr = BITS >= 2 and BITS <= 4  # the norm correction counts magnitudes (`square_sum_of_levels`)
    counts = ()  # COUNTED: `magnitude_bit_counts` summed over the chunks
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cc = c0 + tile_coordinates(BLOCK_C, TRANSPOSED)  # the coordinate of each column of the chunk
        if SPLIT:
            tc = c0 + tl.arange(0, BLOCK_C)
            r_hi = tl.load(rot_ptr + cols[:, None] * BLOCK_D + tc[None, :])
            r_lo = tl.load(rot_ptr + BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + tc[None, :])
            if SQUARES_FIT:  # y = 2**11 ||x|| Rot(u), in units of `unit`
                y = tl.dot(x, r_hi, tl.dot(x, r_lo))
            else:  # the fourth product, u_lo r_lo, is below 2**-22
                y = tl.dot(u_hi, r_hi, tl.dot(u_hi, r_lo, tl.dot(u_lo, r_hi) * 0.00048828125)) * 0.00048828125
        else:
            y = tl.dot(u, tl.load(rot_ptr + cols[:, None] * BLOCK_D + cc[None, :]), input_precision=DOT_PRECISION)
        valid = (cc < d)[None, :]
        code = nearest_code(y, bnd_ptr, BITS, unit)
        if d < BLOCK_D:  # padding columns: code 0
            code = tl.where(valid, code, 0)
        if INTERLEAVED:
            store_interleaved(code_rows, put, code, c0 // 32, d // 32, BITS, BLOCK_N, BLOCK_C, TRANSPOSED)
        else:
            store_codes(code_rows, put, code, c0 * BITS // 8, code_bytes, BITS, BLOCK_N, BLOCK_C, TRANSPOSED)
        if QJL or (NORM_CORRECTION and not COUNTED):
            level = tl.where(valid, centroid_levels(code, cent_ptr, BITS), 0.0)
        if NORM_CORRECTION and COUNTED:
            counts = add_counts(counts, magnitude_bit_counts(code, BITS, BLOCK_N, BLOCK_C, TRANSPOSED, POPC))
        elif NORM_CORRECTION:
            level_sq += level * level
        if QJL:
            diff = tl.where(valid, y / unit - level, 0.0)
            res_sq += tl.sum(diff * diff, axis=1)
            proj = tl.load(proj_ptr + cc[:, None] * BLOCK_M + mcols[None, :])
            sketch += tl.dot(diff, proj, input_precision=DOT_PRECISION)

    stored = s
    if NORM_CORRECTION:
        if not SLOTS:
            tl.store(raw_norms_ptr + rows, s, mask=row_ok)
        if COUNTED:
            stored = s / exact_sqrt(square_sum_of_levels(counts, d, BLOCK_D - d, cent_ptr, BITS))
        else:
            stored = s / exact_sqrt(tl.sum(level_sq, axis=1))
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
