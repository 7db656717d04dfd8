"""Scores straight from packed codes, in the rotated domain.

With ``q' = Rot(q)`` (rotated once per query, outside the kernel) and ``S q`` the query's
QJL sketch, for a key with codes ``k``, norm ``s``, signs ``z`` and residual norm ``rho``:

    q . x_hat = s * (q' . c[k]) + rho * sqrt(pi/2) / m * (S q . z)

because ``q . Rot^T c = Rot(q) . c``. ``x_hat`` is never materialized: each key tile is
unpacked to centroid levels in registers and multiplied with the query tile by ``tl.dot``.
"""

import triton
import triton.language as tl

from .levels import load_interleaved_levels, load_levels, load_signs


@triton.jit
def scores_kernel(
    qrot_ptr,  # (batch, M, BLOCK_D) CDT rotated queries Rot(q), zero-padded
    qsk_ptr,  # QJL: (batch, M, BLOCK_M) CDT sketches sqrt(pi/2)/m * S q, zero-padded
    codes_ptr,  # (batch, N, code_bytes) uint8 packed key codes
    norms_ptr,  # (batch, N) stored key norms (float32 or float16)
    signs_ptr,  # QJL: (batch, N, sign_bytes) uint8 packed signs
    res_norms_ptr,  # QJL: (batch, N) residual norms
    cent_ptr,  # (2**BITS,) CDT centroids
    out_ptr,  # (batch, M, N) output scores in the query dtype (float32 for bfloat16 under the interpreter)
    M,  # queries per batch entry
    N,  # keys per batch entry
    d,  # vector dimension
    m,  # QJL: number of projections
    code_bytes,  # ceil(d * BITS / 8)
    sign_bytes,  # QJL: ceil(m / 8)
    CDT: tl.constexpr,  # compute dtype: tl.float64 for float64 inputs, else tl.float32
    DOT_PRECISION: tl.constexpr,  # input_precision of the tl.dots: "tf32x3" (float32-accurate) or "ieee"
    BITS: tl.constexpr,  # bits per code (spec.mse_bits)
    QJL: tl.constexpr,  # True: add the QJL term
    BLOCK_Q: tl.constexpr,  # queries per program (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # keys per program (>= 16)
    BLOCK_D: tl.constexpr,  # power of two >= max(d, 16)
    BLOCK_M: tl.constexpr,  # power of two >= max(m, 16) (QJL only)
    WORDS: tl.constexpr,  # packed rows (codes, signs) start 4-byte aligned, whole 32-bit words long
    INTERLEAVED: tl.constexpr,  # codes in the interleaved packing (BITS 2..4, d a multiple of 32)
):
    key_blocks = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // key_blocks).to(tl.int64)  # grid axis 0: batch x key blocks (no 65535 limit)
    qi = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ki = (tl.program_id(0) % key_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ok = qi < M
    k_ok = ki < N
    key = b * N + ki
    q_row = b * M + qi
    q = tl.load(qrot_ptr + q_row[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], mask=q_ok[:, None], other=0.0)
    code_rows = codes_ptr + key * code_bytes
    if INTERLEAVED:
        level = load_interleaved_levels(code_rows, k_ok, d, cent_ptr, None, BITS, BLOCK_N, BLOCK_D, CDT, WORDS, False)
    else:
        level = load_levels(code_rows, k_ok, code_bytes, cent_ptr, d, BITS, BLOCK_N, BLOCK_D, CDT, WORDS)
    s = tl.load(norms_ptr + key, mask=k_ok, other=0.0).to(CDT)
    acc = tl.dot(q, tl.trans(level), input_precision=DOT_PRECISION) * s[None, :]
    if QJL:
        mcols = tl.arange(0, BLOCK_M)
        sk = tl.load(qsk_ptr + q_row[:, None] * BLOCK_M + mcols[None, :], mask=q_ok[:, None], other=0.0)
        z = load_signs(signs_ptr + key * sign_bytes, k_ok, sign_bytes, m, BLOCK_N, BLOCK_M, CDT, WORDS)
        rho = tl.load(res_norms_ptr + key, mask=k_ok, other=0.0).to(CDT)
        acc += tl.dot(sk, tl.trans(z), input_precision=DOT_PRECISION) * rho[None, :]
    out = out_ptr + q_row[:, None] * N + ki[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & k_ok[None, :])
