"""From packed codes to the values they stand for, inside a kernel: centroid levels, QJL signs, and the
square sum of a row's levels.

Shared by every kernel that reads codes (dequantize, scores, attention) or needs the levels of codes it
just chose (quantize). The codebook is antisymmetric, ``c[2**b - 1 - k] = -c[k]`` (checked on the host),
so up to 4 bits a level is picked from registers by the code's bits, with no per-code memory access.

Rows in the interleaved packing (`load_interleaved_levels`) give float16 levels by byte-permute table
lookups: the float16 bit patterns ``e_i`` of the 8 (2 bits: 4) table entries are split into a low-byte and
a high-byte table of two 32-bit words each (`byte_tables`), and a selector word whose nibbles 0..3 index
4 codes gives their 4 levels in four ``prmt.b32`` (default mode: byte ``i`` of ``prmt(a, b, s)`` is byte
``s[4i:4i+3]`` of the 8 bytes ``b:a``):

    lo = prmt(lo0, lo1, sel)   hi = prmt(hi0, hi1, sel)      (4 bits: hi ^= 0x80 per code whose top bit is 0)
    levels 0, 1 = prmt(lo, hi, 0x5140)   levels 2, 3 = prmt(lo, hi, 0x7362)

On a GPU that is inline PTX (``PRMT``); the interpreter, which runs no asm, computes the same bytes with
integer operations.

The sum of a row's squared levels, which the norm correction needs (`square_sum_of_levels`), is counted rather
than looked up: up to 4 bits it depends only on how many codes have each magnitude, and those counts come from
popcounts of the words the codes pack into (`magnitude_bit_counts`; the GPU's ``popc`` with ``POPC``, integer
operations under the interpreter, which has no libdevice).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .bitstream import group_words, interleaved_selectors, read_codes, selector_codes


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
def byte_tables(
    cent_ptr,  # (2**BITS,) centroids (float32 or float64), antisymmetric
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
):
    """``(lo0, lo1, hi0, hi1)`` uint32 tables of the float16 lookups: with ``e_i`` the float16 bit patterns of
    the table entries (``c[0..3]`` at 2 bits, ``c[0..7]`` at 3, the magnitudes ``c[8..15]`` at 4; 0 past
    them), byte ``i`` of ``lo0`` / ``lo1`` is the low byte of ``e_i`` / ``e_{4+i}``, and ``hi0`` / ``hi1`` hold
    the high bytes."""
    first: tl.constexpr = 8 if BITS == 4 else 0
    entries: tl.constexpr = 4 if BITS == 2 else 8
    e = tl.arange(0, 8)
    h = tl.load(cent_ptr + first + e, mask=e < entries, other=0.0).to(tl.float16).to(tl.uint16, bitcast=True)
    h = h.to(tl.uint32)
    shift = (8 * (e % 4)).to(tl.uint32)
    lo, hi = (h & 255) << shift, (h >> 8) << shift
    first_four = e < 4
    return (
        tl.sum(tl.where(first_four, lo, 0), axis=0),
        tl.sum(tl.where(first_four, 0, lo), axis=0),
        tl.sum(tl.where(first_four, hi, 0), axis=0),
        tl.sum(tl.where(first_four, 0, hi), axis=0),
    )


@triton.jit
def _quadruple(
    t,  # (..) tensor
):
    """``(.., 2, 2)``: four copies of every element, in one thread's registers (one packed asm call's inputs)."""
    return tl.join(tl.join(t, t), tl.join(t, t))


@triton.jit
def _prmt_levels(
    sel,  # (..) uint32 selectors: 4 table indices in nibbles 0..3
    top,  # (..) uint32 (4 bits): code j's top bit at bit 8j + 7
    tables,  # (lo0, lo1, hi0, hi1) uint32 byte tables (`byte_tables`)
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
):
    """``(.., 2, 2)`` float16 levels of the 4 nibbles (``[i, k]``: nibble ``2i + k``) by inline ``prmt.b32``, four
    per selector (module docstring). One asm call takes 4 elements (``pack=4``): the 4 copies of a selector,
    and returns their 4 float16 levels in two registers."""
    lo0, lo1, hi0, hi1 = tables
    if BITS == 4:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 lo, hi, neg;\n"
            "prmt.b32 lo, $10, $14, $2;\n"
            "prmt.b32 hi, $18, $22, $2;\n"
            "not.b32 neg, $6;\n"
            "and.b32 neg, neg, 0x80808080;\n"
            "xor.b32 hi, hi, neg;\n"
            "prmt.b32 $0, lo, hi, 0x5140;\n"
            "prmt.b32 $1, lo, hi, 0x7362; }",
            "=r,=r," + ",".join(["r"] * 24),
            [_quadruple(sel), _quadruple(top), lo0, lo1, hi0, hi1],
            dtype=tl.float16, is_pure=False, pack=4,
        )  # fmt: skip
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 lo, hi;\n"
            "prmt.b32 lo, $6, $10, $2;\n"
            "prmt.b32 hi, $14, $18, $2;\n"
            "prmt.b32 $0, lo, hi, 0x5140;\n"
            "prmt.b32 $1, lo, hi, 0x7362; }",
            "=r,=r," + ",".join(["r"] * 20),
            [_quadruple(sel), lo0, lo1, hi0, hi1],
            dtype=tl.float16, is_pure=False, pack=4,
        )  # fmt: skip


@triton.jit
def _table_level(
    sel,  # (..) uint32 selectors, as in `_prmt_levels`
    top,  # (..) uint32 (4 bits): code j's top bit at bit 8j + 7
    tables,  # (lo0, lo1, hi0, hi1) uint32 byte tables
    J: tl.constexpr,  # which nibble
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
):
    """Nibble ``J``'s float16 level, computed as `_prmt_levels` computes it, with integer operations."""
    lo0, lo1, hi0, hi1 = tables
    i = (sel >> (4 * J)) & 7
    shift = 8 * (i & 3)
    lo = (tl.where(i < 4, lo0, lo1) >> shift) & 255
    hi = (tl.where(i < 4, hi0, hi1) >> shift) & 255
    if BITS == 4:
        hi = hi ^ (~(top >> (8 * J)) & 128)
    return (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def load_interleaved_levels(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8), rows in the interleaved packing
    row_mask,  # (ROWS,) bool: which rows exist
    count,  # codes per row (d, a multiple of 32); levels past it are 0
    cent_ptr,  # (2**BITS,) CDT centroids
    tables,  # float16 DTYPE: (lo0, lo1, hi0, hi1) byte tables of the centroids (`byte_tables`); else None
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # power of two >= max(count, 32)
    DTYPE: tl.constexpr,  # dtype of the result
    WORDS: tl.constexpr,  # rows start 4-byte aligned (one 32-bit load per word)
    PRMT: tl.constexpr,  # float16: lookups by inline prmt.b32 (a GPU); else by integer operations
):
    """``(ROWS, WIDTH)`` centroid levels ``c[k]`` of rows in the interleaved packing, 0 past ``count``: float16
    by byte-table lookups (module docstring), other dtypes by `centroid_levels` of the codes."""
    sel, top = interleaved_selectors(row_ptr, row_mask, count, BITS, WIDTH // 32, WORDS)
    if DTYPE == tl.float16 and PRMT:
        level = _prmt_levels(sel, top, tables, BITS)
    elif DTYPE == tl.float16:
        level = tl.join(
            tl.join(_table_level(sel, top, tables, 0, BITS), _table_level(sel, top, tables, 2, BITS)),
            tl.join(_table_level(sel, top, tables, 1, BITS), _table_level(sel, top, tables, 3, BITS)),
        )
    else:
        level = centroid_levels(selector_codes(sel, top, BITS), cent_ptr, BITS, BITS == 4).to(DTYPE)
    level = tl.reshape(level, (ROWS, WIDTH))
    j = tl.arange(0, WIDTH)[None, :]
    return mma_operand(tl.where(j < count, level, 0.0).to(DTYPE))


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


@triton.jit
def set_bits(
    w,  # (..) uint32 words
    POPC: tl.constexpr,  # count with the GPU's popc (libdevice); else with integer operations (the interpreter)
):
    """``(..)`` int32: the number of set bits of each word."""
    if POPC:
        return libdevice.popc(w.to(tl.int32, bitcast=True))
    else:
        w = w - ((w >> 1) & 0x55555555)
        w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
        w = (w + (w >> 4)) & 0x0F0F0F0F
        return ((w * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def magnitude_bit_counts(
    code,  # (ROWS, WIDTH) integer codes in [0, 2**BITS) of the tile's coordinates (`bitstream.tile_coordinates`)
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    ROWS: tl.constexpr,  # rows
    WIDTH: tl.constexpr,  # columns (a multiple of 8; of 64 with TRANSPOSED)
    TRANSPOSED: tl.constexpr,  # the columns hold their coordinates as `bitstream.tile_coordinates` says
    POPC: tl.constexpr,  # count bits with the GPU's popc (libdevice); else with integer operations
):
    """The codes' magnitude indices ``j`` counted by their bits: a tuple whose entry ``S - 1`` (``S = 1 .. H - 1``,
    ``H = 2**(BITS-1)``, a set of bit positions) is ``(ROWS, WIDTH // 8)`` int32, the codes of each word of 8
    (`bitstream.group_words`, the words the codes pack into) whose ``j`` has every bit of ``S``. The magnitude
    index is ``k - H`` in the upper half and ``H - 1 - k`` below, so bit ``i`` of ``j`` is bit ``i`` of ``k`` XNOR
    the top bit: one word operation gives the mask of a bit, an AND of masks that of a set, a popcount its count."""
    lanes: tl.constexpr = 0x11111111 if BITS == 4 else (0x249249 if BITS == 3 else 0x5555)  # bit 0 of each code
    words = group_words(code.to(tl.uint32), BITS, ROWS, WIDTH, TRANSPOSED)
    top = words >> (BITS - 1)
    j0 = ((words ^ top) & lanes) ^ lanes  # XNOR, masked
    if BITS == 2:
        return (set_bits(j0, POPC),)
    j1 = (((words >> 1) ^ top) & lanes) ^ lanes
    if BITS == 3:
        return set_bits(j0, POPC), set_bits(j1, POPC), set_bits(j0 & j1, POPC)
    j2 = (((words >> 2) ^ top) & lanes) ^ lanes
    return (set_bits(j0, POPC), set_bits(j1, POPC), set_bits(j0 & j1, POPC), set_bits(j2, POPC),
            set_bits(j0 & j2, POPC), set_bits(j1 & j2, POPC), set_bits(j0 & j1 & j2, POPC))  # fmt: skip


@triton.jit
def add_counts(
    a,  # tuple of tensors, or () for no counts yet
    b,  # tuple of tensors (as many as a, of the same shapes, unless a is empty)
):
    """The tuple of the sums ``a[i] + b[i]`` (``b`` for an empty ``a``)."""
    if len(a) == 0:
        out = b
    else:
        out = ()
        for i in tl.static_range(len(a)):
            out = out + (a[i] + b[i],)
    return out


@triton.jit
def square_sum_of_levels(
    counts,  # `magnitude_bit_counts` of a row's codes, summed over its tiles: tuple of (ROWS, G) int32
    count: tl.constexpr,  # codes per row
    pad: tl.constexpr,  # padding codes per row among those counted (code 0, so j = H - 1: every bit)
    cent_ptr,  # (2**BITS,) centroids, antisymmetric: c[2**BITS - 1 - k] = -c[k]
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
):
    """``(ROWS,)`` ``sum_t c[k_t]**2`` over each row's ``count`` codes, in the centroids' dtype, from the bit counts
    ``m_S`` (less the padding's): a level's square is ``c[H + j]**2``, and the number of codes with magnitude
    index ``j`` is, by inclusion-exclusion, ``n_j = sum_{S >= bits(j)} (-1)**|S - bits(j)| m_S`` (``m_{} =
    count``). The ``n_j`` are exact integers, so the sum rounds once per magnitude."""
    H: tl.constexpr = 1 << (BITS - 1)
    m0 = tl.sum(counts[0], axis=1) - pad
    if BITS == 2:
        n = (count - m0, m0)
    else:
        m1, m01 = tl.sum(counts[1], axis=1) - pad, tl.sum(counts[2], axis=1) - pad
        if BITS == 3:
            n = (count - m0 - m1 + m01, m0 - m01, m1 - m01, m01)
        else:
            m2, m02 = tl.sum(counts[3], axis=1) - pad, tl.sum(counts[4], axis=1) - pad
            m12, m012 = tl.sum(counts[5], axis=1) - pad, tl.sum(counts[6], axis=1) - pad
            n = (count - m0 - m1 - m2 + m01 + m02 + m12 - m012, m0 - m01 - m02 + m012, m1 - m01 - m12 + m012,
                 m01 - m012, m2 - m02 - m12 + m012, m02 - m012, m12 - m012, m012)  # fmt: skip
    c = tl.load(cent_ptr + H)
    total = n[0].to(c.dtype) * (c * c)
    for j in tl.static_range(1, H):
        c = tl.load(cent_ptr + H + j)
        total += n[j].to(c.dtype) * (c * c)
    return total
