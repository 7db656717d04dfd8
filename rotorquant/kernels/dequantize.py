"""Fused dequantize: unpack -> centroids -> inverse rotation -> scale (+ QJL term).

For a row with codes ``k``, stored norm ``s`` and, with QJL, signs ``z`` and residual norm ``rho``:

    x_hat = s * Rot^T(c[k]) + rho * sqrt(pi/2) / m * S^T z

    one rotor stage:  x_c = sum_i W^T[i, c] * c[k_{3*(c//3)+i}]   (codes gathered from the packed bytes, O(d))
    any other rotation:  x = c[k] @ R with its matrix      (tl.dot, O(d^2))
"""

import triton
import triton.language as tl

from .bitstream import gather_codes, gather_interleaved
from .levels import centroid_levels, load_interleaved_levels, load_levels, load_signs


@triton.jit
def dequantize_kernel(
    codes_ptr,  # (n, code_bytes) uint8 packed codes
    code_bytes,  # ceil(d * BITS / 8)
    norms_ptr,  # (n,) stored norms (float32 or float16)
    n,  # number of vectors
    d,  # vector dimension
    out_ptr,  # (n, d) output, rows d apart, in the code's dtype (float32 for bfloat16 under the interpreter)
    rot_ptr,  # MATRIX: (BLOCK_D, BLOCK_D) CDT R zero-padded; else: (3, BLOCK_D) transposed rotor weights W^T
    cent_ptr,  # (2**BITS,) CDT centroids
    signs_ptr,  # QJL: (n, sign_bytes) uint8 packed signs
    sign_bytes,  # QJL: ceil(m / 8)
    res_norms_ptr,  # QJL: (n,) residual norms (float32 or float16)
    smat_ptr,  # QJL: (BLOCK_M, BLOCK_D) CDT sqrt(pi/2) / m * S zero-padded (scaled on the host, in float64)
    m,  # QJL: number of projections
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 inputs, else tl.float32
    DOT_PRECISION: tl.constexpr,  # input_precision of the tl.dots: "tf32x3" (float32-accurate) or "ieee"
    BITS: tl.constexpr,  # bits per code (spec.mse_bits)
    MATRIX: tl.constexpr,  # True: the rotation as a matrix (tl.dot); False: one stage of rotor blocks
    QJL: tl.constexpr,  # True: add the QJL term
    BLOCK_N: tl.constexpr,  # vectors per program
    BLOCK_D: tl.constexpr,  # power of two >= max(d, 16)
    BLOCK_C: tl.constexpr,  # output coordinates per chunk: power of two, 16 <= BLOCK_C <= BLOCK_D
    BLOCK_M: tl.constexpr,  # power of two >= max(m, 16) (QJL only)
    OUT_MAX: tl.constexpr,  # the output dtype's largest finite value, where rows with finite norms saturate
    WORDS: tl.constexpr,  # packed rows (codes, signs) start 4-byte aligned, whole 32-bit words long
    INTERLEAVED: tl.constexpr,  # codes in the interleaved packing (BITS 2..4, d a multiple of 32)
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    code_rows = codes_ptr + rows64 * code_bytes
    s = tl.load(norms_ptr + rows, mask=row_ok, other=0.0).to(CDT)
    if MATRIX and INTERLEAVED:
        level = load_interleaved_levels(code_rows, row_ok, d, cent_ptr, None, BITS, BLOCK_N, BLOCK_D, CDT, WORDS, False)
    elif MATRIX:
        level = load_levels(code_rows, row_ok, code_bytes, cent_ptr, d, BITS, BLOCK_N, BLOCK_D, CDT, WORDS)
    if QJL:
        mcols = tl.arange(0, BLOCK_M)
        z = load_signs(signs_ptr + rows64 * sign_bytes, row_ok, sign_bytes, m, BLOCK_N, BLOCK_M, CDT, WORDS)
        rho = tl.load(res_norms_ptr + rows, mask=row_ok, other=0.0).to(CDT)
        finite = (tl.abs(s) < float("inf")) & (tl.abs(rho) < float("inf"))
    else:
        finite = tl.abs(s) < float("inf")
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        if MATRIX:
            x = tl.dot(level, tl.load(rot_ptr + cols[:, None] * BLOCK_D + cc[None, :]), input_precision=DOT_PRECISION)
        else:
            x = tl.zeros((BLOCK_N, BLOCK_C), dtype=CDT)
            for i in tl.static_range(3):
                src = tl.broadcast_to((3 * (cc // 3) + i)[None, :], (BLOCK_N, BLOCK_C))
                if INTERLEAVED:
                    k = gather_interleaved(code_rows, src, row_ok[:, None] & (src < d), d, BITS)
                else:
                    k = gather_codes(code_rows, src, row_ok[:, None] & (src < d), code_bytes, BITS)
                x += tl.load(rot_ptr + i * BLOCK_D + cc)[None, :] * centroid_levels(k, cent_ptr, BITS)
        x = x * s[:, None]
        if QJL:
            smat = tl.load(smat_ptr + mcols[:, None] * BLOCK_D + cc[None, :])
            x += tl.dot(z, smat, input_precision=DOT_PRECISION) * rho[:, None]
        out = out_ptr + rows64[:, None] * d + cc[None, :]
        # a row with finite norms saturates at +-OUT_MAX (it may round past it, or overflow); others keep NaN/Inf
        x = tl.where(finite[:, None] & (x > OUT_MAX), OUT_MAX, x)
        x = tl.where(finite[:, None] & (x < -OUT_MAX), -OUT_MAX, x)
        tl.store(out, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cc < d)[None, :])
