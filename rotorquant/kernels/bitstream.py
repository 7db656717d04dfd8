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

Rows in the interleaved packing (``spec.packing == "interleaved"``, layout below and in
``rotorquant.format``) are read whole as byte-permute selectors (`interleaved_selectors`), or as codes
(`selector_codes`), at arbitrary coordinates bit by bit (`gather_interleaved`), and written in whole
chunks of 32 codes (`store_interleaved`).
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
def tile_coordinates(
    WIDTH: tl.constexpr,  # columns in the tile (power of two; a multiple of 64 when TRANSPOSED)
    TRANSPOSED: tl.constexpr,  # the columns of each 64-column block hold their coordinates 8x8-transposed
):
    """``(WIDTH,)`` int32: the coordinate, from the tile's first, that each column holds. ``TRANSPOSED``:
    column ``j = 64b + 8g + c`` holds coordinate ``64b + 8c + g``, so the 8 coordinates of a packed group
    ``8m .. 8m+7`` sit in columns ``8g + m`` (a stride of 8). A tensor-core product's result gives each
    thread such a strided set of columns, so packing the group is arithmetic inside one thread."""
    j = tl.arange(0, WIDTH)
    if TRANSPOSED:
        return (j // 64) * 64 + (j % 8) * 8 + (j % 64) // 8
    else:
        return j


@triton.jit
def group_words(
    t,  # (ROWS, WIDTH) uint32 or uint64 fields, each below 2**SHIFT
    SHIFT: tl.constexpr,  # bits per field
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # columns (a multiple of 8; of 64 when TRANSPOSED)
    TRANSPOSED: tl.constexpr,  # the columns hold their coordinates as `tile_coordinates` says
):
    """``(ROWS, WIDTH // 8)``: for each group of 8 coordinates ``8m + n``, ``sum_n t[8m + n] << SHIFT * n`` (a
    sum of disjoint bit fields, exact)."""
    n = tl.arange(0, 8)
    if TRANSPOSED:  # [row, block, n, m]: coordinate 64 * block + 8m + n
        grouped = tl.reshape(t, (ROWS, WIDTH // 64, 8, 8)) << (SHIFT * n).to(t.dtype)[None, None, :, None]
        return tl.reshape(tl.sum(grouped, axis=2), (ROWS, WIDTH // 8))
    else:
        return tl.sum(tl.reshape(t, (ROWS, WIDTH // 8, 8)) << (SHIFT * n).to(t.dtype)[None, None, :], axis=2)


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
    TRANSPOSED: tl.constexpr = False,  # the columns hold their coordinates as `tile_coordinates` says
):
    """Pack ``codes`` and write their ``WIDTH * BITS / 8`` bytes at ``first_byte`` of each row."""
    word = group_words(as_words(codes, BITS), BITS, ROWS, WIDTH, TRANSPOSED)  # (ROWS, WIDTH // 8)
    lane = tl.arange(0, triton.next_power_of_2(BITS))  # byte of the group's word
    raw = (word[:, :, None] >> as_words(8 * lane, BITS)[None, None, :]) & 255
    offs = first_byte + tl.arange(0, WIDTH // 8)[:, None] * BITS + lane[None, :]
    ok = (lane[None, :] < BITS) & (offs < n_bytes)
    tl.store(row_ptr[:, None, None] + offs[None, :, :], raw.to(tl.uint8), mask=row_mask[:, None, None] & ok[None, :, :])


# ---------------------------------------------------------------------------- the interleaved packing
# (``rotorquant.format``): a row is BITS planes of C = d / 32 uint32 words, plane p's word c at word
# p * C + c; with G_g[n] the code of coordinate 32c + 8g + n, nibble n of chunk c's words holds
#   2 bits: plane 0: G_0[n] | G_2[n] << 2, plane 1: G_1[n] | G_3[n] << 2
#   3 bits: plane p: G_p[n] | (bit p of G_3[n]) << 3
#   4 bits: plane p: m(G_p[n]) | t(G_p[4h + j]) << 3 for n = 2j + h, with m the magnitude index (k - 8, or 7 - k
#           below 8) and t the top bit k >> 3: bit 8j + 4h + 3 holds the top bit of coordinate 32c + 8p + 4h + j


@triton.jit
def _plane_words(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    chunks,  # int: 32-code chunks per row (d / 32), the words of one plane
    P: tl.constexpr,  # which plane
    CT: tl.constexpr,  # chunks in the tile (power of two >= chunks)
    WORDS: tl.constexpr,  # rows start 4-byte aligned: one 32-bit load per word (else 4 byte loads)
):
    """``(ROWS, CT)`` uint32 words of plane ``P``; 0 for rows that do not exist and chunks past ``chunks``."""
    c = tl.arange(0, CT)
    ok = row_mask[:, None] & (c < chunks)[None, :]
    word = P * chunks + c
    if WORDS:
        return tl.load(row_ptr.to(tl.pointer_type(tl.uint32))[:, None] + word[None, :], mask=ok, other=0)
    else:
        w = tl.zeros(ok.shape, dtype=tl.uint32)
        for i in tl.static_range(4):
            byte = tl.load(row_ptr[:, None] + (4 * word + i)[None, :], mask=ok, other=0)
            w = w | (byte.to(tl.uint32) << (8 * i))
        return w


@triton.jit
def _by_selector(s0, s1, s2, s3, s4, s5, s6, s7):
    """``(ROWS, CT, 2, 2, 2)`` from eight ``(ROWS, CT)`` tensors: element ``[.., a, b, c]`` is ``s_{4a+2b+c}``
    (nested joins, kept in one thread's registers)."""
    even = tl.join(tl.join(s0, s4), tl.join(s2, s6))
    odd = tl.join(tl.join(s1, s5), tl.join(s3, s7))
    return tl.join(even, odd)


@triton.jit
def interleaved_selectors(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8), rows in the interleaved packing
    row_mask,  # (ROWS,) bool: which rows exist (the others read as all-zero words)
    count,  # int: codes per row (d, a multiple of 32)
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    CT: tl.constexpr,  # 32-code chunks in the tile (power of two >= d / 32)
    WORDS: tl.constexpr,  # rows start 4-byte aligned (one 32-bit load per word)
):
    """``(sel, top)``, each ``(ROWS, CT, 2, 2, 2)`` uint32: element ``[r, c, s]`` (``s`` flattened) of ``sel``
    holds in nibbles 0..3 the codes (4 bits: magnitude indices) of coordinates ``32c + 4s + j``, ``j`` = 0..3,
    as byte-permute selectors (bit 3 of every nibble clear); ``top`` (4 bits) holds code ``j``'s top bit at
    bit ``8j + 7``. From the plane words A, B, C, D:

        2 bits: s = 0..3: A, A >> 16, B, B >> 16 masked by 0x33333333; s = 4..7: the same of A >> 2, B >> 2
        3 bits: s = 0..5: A, A >> 16, B, B >> 16, C, C >> 16 masked by 0x77777777; s = 6, 7: the nibbles'
            bits 3 gathered, E = (A >> 3 & 0x11111111) | (B >> 2 & 0x22222222) | (C >> 1 & 0x44444444), E >> 16
        4 bits: s = 2p, 2p + 1: plane p masked by 0x77777777, and that >> 16; top: plane p << 4, plane p
    """
    chunks = count // 32
    a = _plane_words(row_ptr, row_mask, chunks, 0, CT, WORDS)
    b = _plane_words(row_ptr, row_mask, chunks, 1, CT, WORDS)
    if BITS == 2:
        a0, b0 = a & 0x33333333, b & 0x33333333
        a1, b1 = (a >> 2) & 0x33333333, (b >> 2) & 0x33333333
        sel = _by_selector(a0, a0 >> 16, b0, b0 >> 16, a1, a1 >> 16, b1, b1 >> 16)
        return sel, sel
    c = _plane_words(row_ptr, row_mask, chunks, 2, CT, WORDS)
    if BITS == 3:
        spread = ((a >> 3) & 0x11111111) | ((b >> 2) & 0x22222222) | ((c >> 1) & 0x44444444)
        a, b, c = a & 0x77777777, b & 0x77777777, c & 0x77777777
        sel = _by_selector(a, a >> 16, b, b >> 16, c, c >> 16, spread, spread >> 16)
        return sel, sel
    else:
        d = _plane_words(row_ptr, row_mask, chunks, 3, CT, WORDS)
        am, bm, cm, dm = a & 0x77777777, b & 0x77777777, c & 0x77777777, d & 0x77777777
        sel = _by_selector(am, am >> 16, bm, bm >> 16, cm, cm >> 16, dm, dm >> 16)
        return sel, _by_selector(a << 4, a, b << 4, b, c << 4, c, d << 4, d)


@triton.jit
def selector_codes(
    sel,  # (..) uint32 selectors of `interleaved_selectors`
    top,  # (..) uint32 their top bits (4 bits)
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
):
    """``(.., 2, 2)`` int32 codes of the 4 nibbles (element ``[i, k]``: nibble ``2i + k``), for 4 bits in
    `read_codes`'s sign-magnitude form: ``top << 3 | m``."""
    n0, n1, n2, n3 = sel & 15, (sel >> 4) & 15, (sel >> 8) & 15, (sel >> 12) & 15
    if BITS == 4:
        n0, n1 = n0 | ((top >> 4) & 8), n1 | ((top >> 12) & 8)
        n2, n3 = n2 | ((top >> 20) & 8), n3 | ((top >> 28) & 8)
    return tl.join(tl.join(n0, n2), tl.join(n1, n3)).to(tl.int32)


@triton.jit
def gather_interleaved(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8), rows in the interleaved packing
    index,  # (ROWS, COLS) or (1, COLS) int32 coordinate index of every wanted code
    mask,  # (ROWS, COLS) bool: which codes to read; the others are 0
    count,  # int: codes per row (d, a multiple of 32)
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
):
    """``(ROWS, COLS)`` int32 codes at arbitrary coordinates, bit by bit: bit ``t`` of coordinate
    ``32c + 8g + n`` is bit ``pos`` of word ``c`` of plane ``p``, with ``(p, pos)`` = ``(g % 2, 4n + 2 (g // 2) + t)``
    at 2 bits; ``(g, 4n + t)`` for ``g < 3``, else ``(t, 4n + 3)``, at 3 bits; at 4 bits ``(g, 4n + t)`` for the
    magnitude bits ``t < 3`` and ``(g, 8 (n % 4) + 4 (n // 4) + 3)`` for the top bit."""
    chunks = count // 32
    c, r = index // 32, index % 32
    g, n = r // 8, r % 8
    code = tl.zeros(mask.shape, dtype=tl.int32)
    for t in tl.static_range(BITS):
        if BITS == 2:
            plane, pos = g % 2, 4 * n + 2 * (g // 2) + t
        elif BITS == 4:
            plane, pos = g, (4 * n + t) if t < 3 else 8 * (n % 4) + 4 * (n // 4) + 3
        else:
            plane, pos = tl.where(g < 3, g, t), 4 * n + tl.where(g < 3, t, 3)
        bit = 32 * (plane * chunks + c) + pos
        byte = tl.load(row_ptr[:, None] + bit // 8, mask=mask, other=0).to(tl.int32)
        code = code | (((byte >> (bit % 8)) & 1) << t)
    if BITS == 4:  # top << 3 | m: 8 + m in the upper half, 7 - m in the lower
        code = tl.where(code >= 8, code, 7 - code)
    return code


@triton.jit
def _store_words(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    ok,  # (ROWS, CT) bool: which words to write
    word,  # (ROWS, CT) uint32 words
    index,  # (CT,) int32 word index of each column within the row
):
    """Write the words byte by byte, little-endian (rows may have any alignment)."""
    lane = tl.arange(0, 4)
    raw = (word[:, :, None] >> (8 * lane).to(tl.uint32)[None, None, :]) & 255
    offs = 4 * index[None, :, None] + lane[None, None, :]
    tl.store(row_ptr[:, None, None] + offs, raw.to(tl.uint8), mask=ok[:, :, None])


@triton.jit
def _nibbles_to_bytes(
    x,  # (..) uint32 words below 2**16
):
    """``(..)`` uint32: nibble ``i`` of ``x`` (``i`` = 0..3) moved to byte ``i``."""
    x = (x | (x << 8)) & 0x00FF00FF
    return (x | (x << 4)) & 0x0F0F0F0F


@triton.jit
def store_interleaved(
    row_ptr,  # (ROWS,) pointers to the first packed byte of each row (uint8)
    row_mask,  # (ROWS,) bool: which rows exist
    codes,  # (ROWS, WIDTH) integer codes in [0, 2**BITS) of coordinates 32 * first_chunk ..
    first_chunk,  # int: the tile's first 32-code chunk
    chunks,  # int: 32-code chunks per row (d / 32); chunks at or past it are not written
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    ROWS: tl.constexpr,  # rows in the tile
    WIDTH: tl.constexpr,  # codes per row in the tile (a multiple of 32)
    TRANSPOSED: tl.constexpr = False,  # the columns hold their coordinates as `tile_coordinates` says
):
    """Write the tile's whole chunks in the interleaved packing. The 8 codes of group ``g`` of chunk ``c`` (4 bits:
    their magnitude indices) become the nibbles of one word ``N_g = sum_n G_g[n] << 4n`` (a sum of disjoint bit
    fields, exact, as in `store_codes`), and the planes follow with a few word operations:

        2 bits: N_0 | N_2 << 2,  N_1 | N_3 << 2
        3 bits: plane p = N_p | (N_3 << (3 - p)) & 0x88888888 (bit p of each code of group 3 to its nibble's bit 3)
        4 bits: plane p = N_p | B(U_p & 0xFFFF) << 3 | B(U_p >> 16) << 7, with U_p = sum_n (G_p[n] >> 3) << 4n the
            top bits as nibbles and B (`_nibbles_to_bytes`) moving nibble i to byte i
    """
    tl.static_assert(WIDTH % 32 == 0, "the interleaved packing is written in whole chunks of 32 codes")
    CT: tl.constexpr = WIDTH // 32
    k = codes.to(tl.uint32)
    groups = group_words(k if BITS < 4 else tl.where(k >= 8, k - 8, 7 - k), 4, ROWS, WIDTH, TRANSPOSED)
    if BITS == 4:
        tops = group_words(k >> 3, 4, ROWS, WIDTH, TRANSPOSED)
        groups = groups | (_nibbles_to_bytes(tops & 0xFFFF) << 3) | (_nibbles_to_bytes(tops >> 16) << 7)
    even, odd = tl.split(tl.reshape(groups, (ROWS, CT, 2, 2)))  # [.., g // 2, g % 2]
    n0, n2 = tl.split(even)
    n1, n3 = tl.split(odd)
    chunk = first_chunk + tl.arange(0, CT)
    ok = row_mask[:, None] & (chunk < chunks)[None, :]
    if BITS == 2:
        _store_words(row_ptr, ok, n0 | (n2 << 2), chunk)
        _store_words(row_ptr, ok, n1 | (n3 << 2), chunks + chunk)
    elif BITS == 3:
        _store_words(row_ptr, ok, n0 | ((n3 << 3) & 0x88888888), chunk)
        _store_words(row_ptr, ok, n1 | ((n3 << 2) & 0x88888888), chunks + chunk)
        _store_words(row_ptr, ok, n2 | ((n3 << 1) & 0x88888888), 2 * chunks + chunk)
    else:
        _store_words(row_ptr, ok, n0, chunk)
        _store_words(row_ptr, ok, n1, chunks + chunk)
        _store_words(row_ptr, ok, n2, 2 * chunks + chunk)
        _store_words(row_ptr, ok, n3, 3 * chunks + chunk)
