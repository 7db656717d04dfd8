"""In-kernel reading and writing of the packed code format (``rotorquant.bitpack``).

Coordinate ``j``'s ``b``-bit code sits at stream bits ``[j*b, (j+1)*b)``; stream bit ``i``
is bit ``i % 8`` of byte ``i // 8``. Eight consecutive codes fill exactly ``b`` bytes, so a
group of 8 codes is one little-endian integer of ``8*b <= 64`` bits:

    word_g = sum_{t<8} code_{8g+t} << (t*b) = sum_{k<b} byte_{g*b+k} << (8k)

Reading whole rows (`read_codes`): each group's ``b`` bytes are loaded once and assembled into
``word_g``, and its 8 codes are shifted out of it (``b/8`` loads per code). Reading arbitrary
coordinates (`gather_codes`): every code is cut straight out of the one or two bytes it spans.
Writing (`store_codes`): the first sum above builds the words, the second splits them into bytes.

Both sums add disjoint bit fields, so ``tl.sum`` computes them exactly (no carries), which
is much faster than ``tl.reduce`` with a bitwise-or combine. Words of up to 32 bits
(``BITS <= 4``) are unsigned 32-bit integers; only wider codes pay for 64-bit arithmetic.
"""

import triton
import triton.language as tl


@triton.jit
def as_words(
    t,  # integer tensor
    BITS: tl.constexpr,  # bits per code, 1..8
):
    """``t`` in the unsigned type that holds 8 codes (``8 * BITS`` bits): uint32 up to 4 bits, else uint64."""
    if 8 * BITS <= 32:
        return t.to(tl.uint32)
    else:
        return t.to(tl.uint64)


@triton.jit
def gather_codes(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    index,  # (ROWS, COLS) or (1, COLS) int32 coordinate index of every wanted code
    mask,  # (ROWS, COLS) bool: which codes to read; the others are 0
    n_bytes,  # int: packed bytes per row; the byte after the last is never read
    BITS: tl.constexpr,  # bits per code, 1..8
):
    """``(ROWS, COLS)`` int32 codes at arbitrary coordinates: a ``BITS``-bit code lies in byte
    ``j*BITS // 8`` and, only when it crosses a byte boundary, the next one (never for 1, 2, 4, 8 bits)."""
    bit = index * BITS
    byte = bit // 8
    shift = bit % 8
    code = tl.load(row_ptr[:, None] + byte, mask=mask, other=0).to(tl.int32) >> shift
    if 8 % BITS != 0:
        spill = mask & (shift + BITS > 8) & (byte + 1 < n_bytes)
        code = code | (tl.load(row_ptr[:, None] + byte + 1, mask=spill, other=0).to(tl.int32) << (8 - shift))
    return code & ((1 << BITS) - 1)


@triton.jit
def read_codes(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    n_bytes,  # int: packed bytes per row; bytes at or past it are not read (their codes are 0)
    BITS: tl.constexpr,  # bits per code, 1..8
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # codes per row to read, from coordinate 0 (power of two >= 8)
):
    """``(ROWS, WIDTH)`` int32 codes of coordinates ``0..WIDTH-1``, one word per group of 8 codes."""
    offs = tl.arange(0, WIDTH // 8) * BITS  # first byte of each group
    word = as_words(tl.zeros((ROWS, WIDTH // 8), dtype=tl.int32), BITS)
    for k in tl.static_range(BITS):
        ok = row_mask[:, None] & (offs + k < n_bytes)[None, :]
        byte = tl.load(row_ptr[:, None] + (offs + k)[None, :], mask=ok, other=0)
        word = word | (as_words(byte, BITS) << (8 * k))
    # the 8 codes of a group, t = 4a + 2b + c, stacked by nested joins (kept in one thread's registers)
    low = (1 << BITS) - 1
    c0, c1, c2, c3 = word & low, (word >> BITS) & low, (word >> 2 * BITS) & low, (word >> 3 * BITS) & low
    c4, c5, c6 = (word >> 4 * BITS) & low, (word >> 5 * BITS) & low, (word >> 6 * BITS) & low
    c7 = (word >> 7 * BITS) & low
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))  # c = 0
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))  # c = 1
    return tl.reshape(tl.join(even, odd), (ROWS, WIDTH)).to(tl.int32)


@triton.jit
def store_codes(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    codes,  # (ROWS, WIDTH) integer codes in [0, 2**BITS), 0 past the last coordinate
    first_byte,  # int: byte offset of this tile's first code (its first coordinate is a multiple of 8)
    n_bytes,  # int: packed bytes per row; bytes at or past it are not written
    BITS: tl.constexpr,  # bits per code, 1..8
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # codes per row in the tile (power of two >= 8)
):
    """Pack ``codes`` and write their ``WIDTH * BITS / 8`` bytes at ``first_byte`` of each row."""
    lane = tl.arange(0, 8)
    grouped = tl.reshape(as_words(codes, BITS), (ROWS, WIDTH // 8, 8))
    word = tl.sum(grouped << as_words(BITS * lane, BITS)[None, None, :], axis=2)  # (ROWS, WIDTH // 8)
    raw = (word[:, :, None] >> as_words(8 * lane, BITS)[None, None, :]) & 255
    offs = first_byte + tl.arange(0, WIDTH // 8)[:, None] * BITS + lane[None, :]
    ok = (lane[None, :] < BITS) & (offs < n_bytes)
    tl.store(row_ptr[:, None, None] + offs[None, :, :], raw.to(tl.uint8), mask=row_mask[:, None, None] & ok[None, :, :])
