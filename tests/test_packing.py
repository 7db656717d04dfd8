"""The interleaved code packing: the spec option, the NumPy layout and its conversions, and a NumPy model of
the byte-permute (PRMT) lookups the Triton kernels run on a GPU, checked bit for bit against the reference.

Every tier's bytes are checked by tests/test_tier_agreement.py (packing is one of its axes); the kernels'
lookups themselves by tests/test_triton_tier.py (the asm on a CUDA GPU, its integer emulation anywhere).
"""

from __future__ import annotations

import numpy as np
import pytest

import rotorquant as rq
from rotorquant.format import pack_codes, packed_length, repack_codes, unpack_codes
from rotorquant.spec import Packing

U32 = np.uint32


# ---------------------------------------------------------------------------- the spec option


def test_packing_is_a_str_enum_defaulting_to_contiguous():
    assert rq.QuantizerSpec(dim=64, bits=3).packing is Packing.CONTIGUOUS
    spec = rq.QuantizerSpec(dim=64, bits=3, packing="interleaved")
    assert spec.packing is Packing.INTERLEAVED and spec.packing == "interleaved" and repr(spec.packing) == "'interleaved'"
    # the same bytes per vector as the contiguous packing
    assert spec.code_bytes == rq.QuantizerSpec(dim=64, bits=3).code_bytes == 24
    assert rq.QuantizerSpec(dim=96, bits=5, qjl=True, packing="interleaved").mse_bits == 4


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dim": 64, "bits": 3, "packing": "planes"}, r"QuantizerSpec.packing: expected one of \['contiguous', 'interleaved'\], got 'planes'"),
        ({"dim": 40, "bits": 3, "packing": "interleaved"}, r"QuantizerSpec.packing: expected 'contiguous' for dim=40 and mse_bits=3"),
        ({"dim": 64, "bits": 5, "packing": "interleaved"}, r"QuantizerSpec.packing: expected 'contiguous' for dim=64 and mse_bits=5"),
        ({"dim": 64, "bits": 2, "qjl": True, "packing": "interleaved"}, r"mse_bits=1 \('interleaved' needs dim a multiple of 32"),
    ],
)  # fmt: skip
def test_interleaved_packing_is_refused_where_it_is_not_defined(kw, message):
    with pytest.raises(ValueError, match=message):
        rq.QuantizerSpec(**kw)


# ---------------------------------------------------------------------------- the NumPy layout


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim, lead", [(32, (5,)), (96, (2, 3)), (256, ())])
def test_interleaved_rows_round_trip_and_convert_both_ways(bits, dim, lead):
    codes = np.random.default_rng(dim + bits).integers(0, 2**bits, (*lead, dim))
    codes.reshape(-1, dim)[0] = np.arange(dim) % 2**bits  # every code in every position class
    packed = pack_codes(codes, bits, "interleaved")
    assert packed.dtype == np.uint8 and packed.shape == (*lead, packed_length(dim, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, dim, "interleaved"), codes)
    contiguous = pack_codes(codes, bits)
    np.testing.assert_array_equal(repack_codes(contiguous, bits, dim, "contiguous", "interleaved"), packed)
    np.testing.assert_array_equal(repack_codes(packed, bits, dim, "interleaved", "contiguous"), contiguous)
    assert not np.array_equal(packed, contiguous)


def _words(codes: np.ndarray, bits: int) -> list[int]:
    """One 32-code row's plane words, as Python ints."""
    return pack_codes(codes, bits, "interleaved").view("<u4").tolist()


def test_interleaved_words_by_hand():
    """The layout of `rotorquant.format`, one code at a time (coordinate 8g + n, nibble n)."""
    codes = np.zeros(32, dtype=np.uint8)
    codes[5] = 0b101  # 3 bits, g = 0, n = 5: plane 0, nibble 5
    codes[26] = 0b110  # g = 3, n = 2: bit 1 at bit 3 of nibble 2 of plane 1, bit 2 of plane 2
    assert _words(codes, 3) == [0b101 << 20, 1 << 11, 1 << 11]
    codes[:] = 0
    codes[17] = 0b11  # 2 bits, g = 2, n = 1: plane 0, nibble 1, bits 2..3
    codes[9] = 0b01  # g = 1, n = 1: plane 1, nibble 1, bits 0..1
    assert _words(codes, 2) == [0b11 << 6, 0b01 << 4]
    codes[:] = 7  # 4 bits, code 7: magnitude index 0, top bit 0
    codes[13] = 12  # g = 1, n = 5 = 4h + j (h = 1, j = 1): magnitude 4 in nibble 5 of plane 1, top bit 8j + 4h + 3
    codes[30] = 0  # g = 3, n = 6: magnitude 7 in nibble 6 of plane 3, top bit 0
    assert _words(codes, 4) == [0, 4 << 20 | 1 << 15, 0, 7 << 24]
    codes[2] = 15  # g = 0, n = 2 = 4h + j (h = 0, j = 2): magnitude 7, top bit 8j + 3 of plane 0
    assert _words(codes, 4) == [7 << 8 | 1 << 19, 4 << 20 | 1 << 15, 0, 7 << 24]


def test_packing_arguments_are_checked():
    with pytest.raises(ValueError, match=r"packing: expected one of \['contiguous', 'interleaved'\], got 'planes'"):
        pack_codes(np.zeros((1, 32)), 3, "planes")
    with pytest.raises(ValueError, match="packing: 'interleaved' needs bits in .* got bits=5 and 32 codes"):
        pack_codes(np.zeros((1, 32)), 5, "interleaved")
    with pytest.raises(ValueError, match="packing: 'interleaved' needs .* a multiple of 32 codes per row, got bits=3 and 40"):
        unpack_codes(np.zeros((1, 15), dtype=np.uint8), 3, 40, "interleaved")


# ---------------------------------------------------------------------------- the PRMT lookups, modelled


def prmt(a, b, sel) -> np.ndarray:
    """PTX ``prmt.b32 d, a, b, c`` in its default mode, on uint32 arrays: the 8 source bytes are ``b:a``
    (``a`` bytes 0..3, ``b`` bytes 4..7); byte ``i`` of ``d`` is source byte ``c[4i+2:4i]``, or, when nibble bit
    ``4i+3`` is set, that byte's top bit copied into all 8 bits."""
    a, b, sel = (np.asarray(x, dtype=U32) for x in (a, b, sel))
    source = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.broadcast(a, b, sel).shape, dtype=U32)
    for i in range(4):
        nibble = (sel >> U32(4 * i)) & U32(15)
        byte = ((source >> (np.uint64(8) * (nibble & U32(7)).astype(np.uint64))) & np.uint64(255)).astype(U32)
        byte = np.where(nibble & U32(8), np.where(byte & U32(128), U32(255), U32(0)), byte)
        out |= byte << U32(8 * i)
    return out


def test_prmt_model_matches_the_ptx_definition():
    a, b = U32(0x44332211), U32(0x88776655)
    assert prmt(a, b, U32(0x3210)) == 0x44332211  # identity
    assert prmt(a, b, U32(0x7654)) == 0x88776655  # the b word
    assert prmt(a, b, U32(0x0123)) == 0x11223344  # bytes reversed
    assert prmt(a, b, U32(0x5140)) == 0x66225511  # the pairing of `_prmt_levels`: lo0 hi0 lo1 hi1
    assert prmt(a, b, U32(0x000F)) == 0x111111FF  # nibble bit 3: byte 7 (0x88) has its sign bit set
    assert prmt(a, b, U32(0x0008)) == 0x11111100  # byte 0 (0x11) has it clear


def _byte_tables(centroids: np.ndarray, bits: int) -> tuple[U32, U32, U32, U32]:
    """`rotorquant.kernels.levels.byte_tables`: the float16 bit patterns of the table entries (c[0..3], c[0..7],
    or c[8..15] at 4 bits) split into low-byte and high-byte words."""
    first, entries = (8, 8) if bits == 4 else (0, 4 if bits == 2 else 8)
    e = np.zeros(8, dtype=U32)
    e[:entries] = centroids[first : first + entries].astype(np.float16).view(np.uint16)
    word = lambda t: U32(sum(int(x) << (8 * i) for i, x in enumerate(t)))  # noqa: E731
    return word(e[:4] & 255), word(e[4:] & 255), word(e[:4] >> 8), word(e[4:] >> 8)


def _selectors(planes: list[np.ndarray], bits: int) -> tuple[list, list]:
    """`rotorquant.kernels.bitstream.interleaved_selectors`: selector s = 0..7 of every chunk (and 4 bits' top
    bits), from the plane words by the same masks and shifts."""
    if bits == 2:
        a0, b0 = planes[0] & U32(0x33333333), planes[1] & U32(0x33333333)
        a1, b1 = (planes[0] >> U32(2)) & U32(0x33333333), (planes[1] >> U32(2)) & U32(0x33333333)
        return [a0, a0 >> U32(16), b0, b0 >> U32(16), a1, a1 >> U32(16), b1, b1 >> U32(16)], [None] * 8
    if bits == 4:
        masked = [p & U32(0x77777777) for p in planes]
        sels = [x for m in masked for x in (m, m >> U32(16))]
        return sels, [x for p in planes for x in (p << U32(4), p)]
    a, b, c = planes
    spread = ((a >> U32(3)) & U32(0x11111111)) | ((b >> U32(2)) & U32(0x22222222)) | ((c >> U32(1)) & U32(0x44444444))
    a, b, c = (x & U32(0x77777777) for x in (a, b, c))
    return [a, a >> U32(16), b, b >> U32(16), c, c >> U32(16), spread, spread >> U32(16)], [None] * 8


def prmt_levels(packed_row: np.ndarray, centroids: np.ndarray, bits: int) -> np.ndarray:
    """float16 bit patterns ``(d,)`` of one interleaved row's levels, computed step by step as the GPU path
    (`rotorquant.kernels.levels._prmt_levels`) computes them."""
    planes = list(packed_row.view("<u4").reshape(bits, -1).astype(U32))
    lo0, lo1, hi0, hi1 = _byte_tables(centroids, bits)
    sels, tops = _selectors(planes, bits)
    out = np.zeros((len(planes[0]), 8, 4), dtype=np.uint16)  # [chunk, s, j]: coordinate 32c + 4s + j
    for s, (sel, top) in enumerate(zip(sels, tops)):
        lo, hi = prmt(lo0, lo1, sel), prmt(hi0, hi1, sel)
        if bits == 4:  # not.b32, and.b32, xor.b32: the sign of every code whose top bit is 0
            hi = hi ^ (~top & U32(0x80808080))
        pair01, pair23 = prmt(lo, hi, U32(0x5140)), prmt(lo, hi, U32(0x7362))
        out[:, s, 0], out[:, s, 1] = pair01 & U32(0xFFFF), pair01 >> U32(16)
        out[:, s, 2], out[:, s, 3] = pair23 & U32(0xFFFF), pair23 >> U32(16)
    return out.reshape(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotation", ["rotor", "dense"])
def test_prmt_lookups_give_the_float16_centroids_bit_for_bit(bits, rotation):
    """The kernels read float32 centroids and round them to float16, as the contiguous path's
    ``centroid_levels(code).to(float16)`` does: the lookups must give exactly those bits for every code."""
    params = rq.build_params(rq.QuantizerSpec(dim=128, bits=bits, rotation=rotation, packing="interleaved"))
    codes = np.random.default_rng(bits).integers(0, 2**bits, (6, 128))
    codes[0] = np.arange(128) % 2**bits  # every code at every position class
    packed = pack_codes(codes, bits, "interleaved")
    centroids = params.centroids.astype(np.float32)
    want = centroids[codes].astype(np.float16).view(np.uint16)
    for row in range(len(codes)):
        np.testing.assert_array_equal(prmt_levels(packed[row], centroids, bits), want[row])
