"""From packed codes to the values they stand for, inside a kernel: centroid levels and QJL signs.

Shared by every kernel that reads codes (dequantize, scores, attention) or needs the levels of codes it
just chose (quantize). The codebook is antisymmetric, ``c[2**b - 1 - k] = -c[k]`` (checked on the host),
so up to 4 bits a level is picked from registers by the code's bits, with no per-code memory access.
"""

import triton
import triton.language as tl

from .bitstream import read_codes


@triton.jit
def centroid_levels(
    code,  # int32 codes in [0, 2**BITS)
    cent_ptr,  # (2**BITS,) CDT centroids, antisymmetric: c[2**BITS - 1 - k] = -c[k] (checked on the host)
    BITS: tl.constexpr,  # bits per code
    SIGN_MAGNITUDE: tl.constexpr = False,  # codes come in `read_codes`'s sign-magnitude form (low bits pre-flipped)
):
    """``c[code]``. Up to 4 bits from registers, with no per-code memory access: the top bit is the
    sign, ``c[k] = -c[2**BITS - 1 - k]`` for the lower half, and the magnitude index ``i`` (the low
    bits, flipped for the lower half unless the reader already did) picks one of the ``2**(BITS-1)``
    upper levels by a binary tree of selects on its bits. Wider codes gather from the table."""
    if BITS == 1:
        return tl.where(code != 0, tl.load(cent_ptr + 1), tl.load(cent_ptr))
    elif BITS <= 4:
        half: tl.constexpr = 1 << (BITS - 1)
        top = code >> (BITS - 1)  # 1 for the upper (positive) half
        i = code if SIGN_MAGNITUDE else code ^ (top - 1)  # low bits: the magnitude's index among c[half:]
        b0 = (i & 1) != 0
        mag = tl.where(b0, tl.load(cent_ptr + half + 1), tl.load(cent_ptr + half))
        if BITS >= 3:
            b1 = (i & 2) != 0
            mag = tl.where(b1, tl.where(b0, tl.load(cent_ptr + half + 3), tl.load(cent_ptr + half + 2)), mag)
        if BITS == 4:
            upper = tl.where(b0, tl.load(cent_ptr + half + 5), tl.load(cent_ptr + half + 4))
            upper = tl.where(b1, tl.where(b0, tl.load(cent_ptr + half + 7), tl.load(cent_ptr + half + 6)), upper)
            mag = tl.where((i & 4) != 0, upper, mag)
        return tl.where(top != 0, mag, -mag)
    else:
        return tl.load(cent_ptr + code)


@triton.jit
def mma_operand(
    t,  # (ROWS, COLS) tile computed from packed uint8 codes, about to enter a tl.dot
):
    """``t`` unchanged. For float64 a reduction over a unit axis (a no-op) hides the uint8 loads behind ``t``:
    Triton sizes an MMA operand by the narrowest load it was computed from, which its float64 MMA rejects."""
    if t.dtype == tl.float64:
        return tl.sum(t[:, :, None], axis=2)
    else:
        return t


@triton.jit
def load_levels(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    n_bytes,  # packed bytes per row
    cent_ptr,  # (2**BITS,) CDT centroids
    count,  # codes per row (d); levels past it are 0
    BITS: tl.constexpr,  # bits per code
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # power of two >= max(count, 16)
    DTYPE: tl.constexpr,  # dtype of the result (float32, or float16 for tensor-core dots)
    WORDS: tl.constexpr,  # rows start 4-byte aligned and n_bytes % 4 == 0: read 32-bit words
):
    """``(ROWS, WIDTH)`` centroid levels ``c[k]`` of packed rows, 0 past ``count``."""
    j = tl.arange(0, WIDTH)[None, :]
    # 3 and 4 bits: flip the magnitude bits of 8 codes per word operation (benchmarks/sass_count.py: 2 bits
    # compile to fewer instructions flipping each code)
    sm: tl.constexpr = BITS == 3 or BITS == 4
    code = read_codes(row_ptr, row_mask, n_bytes, BITS, ROWS, WIDTH, WORDS, sm)
    return mma_operand(tl.where(j < count, centroid_levels(code, cent_ptr, BITS, sm), 0.0).to(DTYPE))


@triton.jit
def load_signs(
    row_ptr,  # (ROWS,) pointers to the first packed sign byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    n_bytes,  # packed sign bytes per row, ceil(m / 8)
    m,  # signs per row; entries past it are 0
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # power of two >= max(m, 16)
    DTYPE: tl.constexpr,  # dtype of the result (float32, or float16 for tensor-core dots)
    WORDS: tl.constexpr,  # rows start 4-byte aligned and n_bytes % 4 == 0: read 32-bit words
):
    """``(ROWS, WIDTH)`` signs ``z in {-1, +1}``, 0 past ``m``."""
    j = tl.arange(0, WIDTH)[None, :]
    bit = read_codes(row_ptr, row_mask, n_bytes, 1, ROWS, WIDTH, WORDS)
    return mma_operand(tl.where(j < m, 2.0 * bit.to(DTYPE) - 1.0, 0.0).to(DTYPE))
