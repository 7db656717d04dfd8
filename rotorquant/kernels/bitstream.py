"""In-kernel reading and writing of the packed code format (``rotorquant.format``).

Coordinate ``j``'s ``b``-bit code sits at stream bits ``[j*b, (j+1)*b)``; stream bit ``i``
is bit ``i % 8`` of byte ``i // 8``. Eight consecutive codes fill exactly ``b`` bytes, so a
group of 8 codes is one little-endian integer of ``8*b <= 64`` bits:

    word_g = sum_{t<8} code_{8g+t} << (t*b) = sum_{k<b} byte_{g*b+k} << (8k)

Reading whole rows (`read_codes`): each group's ``word_g`` is assembled from its ``b`` bytes
(``b/8`` loads per code), or, for ``b <= 4`` when every row starts 4-byte aligned and is whole
32-bit words long (``WORDS``: ``ceil(d*b/8)`` a multiple of 4 bytes, as at d = 128), from the ``b``
words of each chunk of 32 codes (``b/32`` loads per code), where a group lies in one word or
straddles two:

    word_g = (w_i >> s) | (w_{i+1} << (32 - s)),   i = 8bg // 32 within the chunk, s = 8bg % 32

Its 8 codes are then shifted out of ``word_g`` at constant offsets. Reading arbitrary
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
def _pick(
    w0, w1, w2, w3,  # (ROWS, C) uint32 words 0..3 of each 32-code chunk
    K: tl.constexpr,  # which one
):
    """``w_K`` (a static choice: the chunk's word index is known when compiling)."""
    if K == 0:
        return w0
    elif K == 1:
        return w1
    elif K == 2:
        return w2
    else:
        return w3


@triton.jit
def _group_in_chunk(
    w0, w1, w2, w3,  # (ROWS, C) uint32 words of each chunk of 32 codes (BITS of them)
    J: tl.constexpr,  # which group of 8 codes in the chunk, 0..3
    BITS: tl.constexpr,  # bits per code, 1..4
):
    """``word_g`` of group ``J`` of each chunk: stream bits ``[8*BITS*J, 8*BITS*(J+1))`` of the chunk,
    from one word or, when the group straddles two, the high bits of one and the low bits of the next."""
    start: tl.constexpr = 8 * BITS * J
    word = _pick(w0, w1, w2, w3, start // 32) >> (start % 32)
    if start % 32 + 8 * BITS > 32:
        word = word | (_pick(w0, w1, w2, w3, start // 32 + 1) << (32 - start % 32))
    return word


@triton.jit
def _group_words(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    n_bytes,  # int: packed bytes per row; bytes at or past it are not read (their codes are 0)
    BITS: tl.constexpr,  # bits per code, 1..8
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # codes per row to read, from coordinate 0 (power of two >= 8)
    WORDS: tl.constexpr,  # rows start 4-byte aligned and n_bytes % 4 == 0: read 32-bit words
):
    """``(ROWS, WIDTH // 8)`` words ``word_g``, uint32 up to 4 bits, else uint64."""
    if WORDS and BITS <= 4 and WIDTH >= 32:
        # a chunk of 32 codes is BITS whole 32-bit words: one load per word
        first = tl.arange(0, WIDTH // 32) * BITS
        wptr = row_ptr.to(tl.pointer_type(tl.uint32))[:, None] + first[None, :]
        w0 = tl.load(wptr, mask=row_mask[:, None] & (4 * first < n_bytes)[None, :], other=0)
        w1 = w0
        w2 = w0
        w3 = w0
        if BITS >= 2:
            w1 = tl.load(wptr + 1, mask=row_mask[:, None] & (4 * first + 4 < n_bytes)[None, :], other=0)
        if BITS >= 3:
            w2 = tl.load(wptr + 2, mask=row_mask[:, None] & (4 * first + 8 < n_bytes)[None, :], other=0)
        if BITS == 4:
            w3 = tl.load(wptr + 3, mask=row_mask[:, None] & (4 * first + 12 < n_bytes)[None, :], other=0)
        g0 = _group_in_chunk(w0, w1, w2, w3, 0, BITS)
        g1 = _group_in_chunk(w0, w1, w2, w3, 1, BITS)
        g2 = _group_in_chunk(w0, w1, w2, w3, 2, BITS)
        g3 = _group_in_chunk(w0, w1, w2, w3, 3, BITS)
        return tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), (ROWS, WIDTH // 8))
    else:
        offs = tl.arange(0, WIDTH // 8) * BITS  # first byte of each group
        word = as_words(tl.zeros((ROWS, WIDTH // 8), dtype=tl.int32), BITS)
        for k in tl.static_range(BITS):
            ok = row_mask[:, None] & (offs + k < n_bytes)[None, :]
            byte = tl.load(row_ptr[:, None] + (offs + k)[None, :], mask=ok, other=0)
            word = word | (as_words(byte, BITS) << (8 * k))
        return word


@triton.jit
def _sign_magnitude(
    word,  # (ROWS, G) uint32 words of 8 codes of BITS <= 4 bits
    BITS: tl.constexpr,  # bits per code
):
    """Every code's low ``BITS - 1`` bits XORed with NOT its top bit, for all 8 codes of a word at once:
    bit ``k`` of code ``t`` (stream bit ``BITS*t + k``) flips when bit ``BITS*t + BITS - 1`` is 0."""
    tl.static_assert(2 <= BITS and BITS <= 4, "sign-magnitude words hold 8 codes of 2 to 4 bits")
    lanes: tl.constexpr = 0x11111111 if BITS == 4 else (0x249249 if BITS == 3 else 0x5555)  # bit 0 of each code
    flipped = word
    for k in tl.static_range(BITS - 1):
        flipped = flipped ^ ((word >> (BITS - 1 - k)) & (lanes << k)) ^ (lanes << k)
    return flipped


@triton.jit
def read_codes(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    n_bytes,  # int: packed bytes per row; bytes at or past it are not read (their codes are 0)
    BITS: tl.constexpr,  # bits per code, 1..8
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # codes per row to read, from coordinate 0 (power of two >= 8)
    WORDS: tl.constexpr,  # rows start 4-byte aligned and n_bytes % 4 == 0: read 32-bit words
    SIGN_MAGNITUDE: tl.constexpr = False,  # (2 <= BITS <= 4) return codes in sign-magnitude form
):
    """``(ROWS, WIDTH)`` int32 codes of coordinates ``0..WIDTH-1``, one word per group of 8 codes.
    In sign-magnitude form a code ``k`` reads as ``k`` if its top bit is set, else as
    ``k ^ (2**(BITS-1) - 1)``: the top bit is kept, the low bits become ``2**BITS - 1 - k``'s."""
    word = _group_words(row_ptr, row_mask, n_bytes, BITS, ROWS, WIDTH, WORDS)
    if SIGN_MAGNITUDE:
        word = _sign_magnitude(word, BITS)
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
