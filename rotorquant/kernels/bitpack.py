"""In-kernel reading and writing of the packed code format (``rotorquant.bitpack``).

Coordinate ``j``'s ``b``-bit code sits at stream bits ``[j*b, (j+1)*b)``; stream bit ``i``
is bit ``i % 8`` of byte ``i // 8``. Eight consecutive codes therefore fill exactly ``b``
bytes, so a group of 8 codes is one little-endian integer of ``8*b <= 64`` bits:

    word_g = sum_{t<8} code_{8g+t} << (t*b) = sum_{k<b} byte_{g*b+k} << (8k)

Both sums add disjoint bit fields, so ``tl.sum`` computes them exactly (no carries), which
is much faster than ``tl.reduce`` with a bitwise-or combine.
"""

import triton
import triton.language as tl


@triton.jit
def load_code_groups(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    n_bytes,  # int: packed bytes per row, ceil(count * BITS / 8); bytes beyond it are not read
    BITS: tl.constexpr,  # bits per code, 1..8
    WIDTH: tl.constexpr,  # codes per row in the tile (power of two >= 8); codes past the end read 0
):
    """``(ROWS, WIDTH // 8, 8)`` int32 codes, unpacked in registers: coordinate ``8g + t`` at ``[:, g, t]``.

    Callers map the codes (to levels or signs) before reshaping to 2-D, so the layout change
    moves 4 or 2 bytes per element instead of 8.
    """
    group = tl.arange(0, WIDTH // 8)
    lane = tl.arange(0, 8)
    offs = group[:, None] * BITS + lane[None, :]  # byte k of group g: g*BITS + k
    ok = (lane[None, :] < BITS) & (offs < n_bytes)
    raw = tl.load(row_ptr[:, None, None] + offs[None, :, :], mask=row_mask[:, None, None] & ok[None, :, :], other=0)
    word = tl.sum(raw.to(tl.int64) << (8 * lane).to(tl.int64)[None, None, :], axis=2)  # (ROWS, WIDTH // 8)
    codes = (word[:, :, None] >> (BITS * lane).to(tl.int64)[None, None, :]) & ((1 << BITS) - 1)
    return codes.to(tl.int32)


@triton.jit
def group_coordinates(
    WIDTH: tl.constexpr,  # codes per row in the tile
):
    """``(1, WIDTH // 8, 8)`` coordinate index ``8g + t`` of each slot of `load_code_groups`."""
    return (tl.arange(0, WIDTH // 8)[:, None] * 8 + tl.arange(0, 8)[None, :])[None, :, :]


@triton.jit
def gather_codes(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    index,  # (ROWS, COLS) int32 coordinate index of every wanted code
    mask,  # (ROWS, COLS) bool: which codes to read; the others are 0
    n_bytes,  # int: packed bytes per row; the byte after the last is never read
    BITS: tl.constexpr,  # bits per code, 1..8
):
    """Codes at arbitrary coordinates: a ``BITS``-bit code spans at most two bytes."""
    bit = index * BITS
    byte = bit // 8
    lo = tl.load(row_ptr[:, None] + byte, mask=mask, other=0).to(tl.int32)
    hi = tl.load(row_ptr[:, None] + byte + 1, mask=mask & (byte + 1 < n_bytes), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bit % 8)) & ((1 << BITS) - 1)


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
    grouped = tl.reshape(codes.to(tl.int64), (ROWS, WIDTH // 8, 8))
    word = tl.sum(grouped << (BITS * lane).to(tl.int64)[None, None, :], axis=2)  # (ROWS, WIDTH // 8)
    raw = (word[:, :, None] >> (8 * lane).to(tl.int64)[None, None, :]) & 255
    offs = first_byte + tl.arange(0, WIDTH // 8)[:, None] * BITS + lane[None, :]
    ok = (lane[None, :] < BITS) & (offs < n_bytes)
    tl.store(row_ptr[:, None, None] + offs[None, :, :], raw.to(tl.uint8), mask=row_mask[:, None, None] & ok[None, :, :])
