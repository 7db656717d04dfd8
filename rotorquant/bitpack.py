"""The bit-packed byte format, written once in NumPy (the reference the other tiers match).

Coordinate ``j``'s ``b``-bit code occupies bits ``[j*b, (j+1)*b)`` of a little-endian
bit stream: bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``, and bit ``t``
of a code is stream bit ``j*b + t``. ``d`` codes take ``ceil(d*b/8)`` bytes; unused
high bits of the last byte are zero. QJL signs are the same stream with ``b = 1``.
"""

from __future__ import annotations

import numpy as np


def packed_length(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``(..., d)`` integer codes in ``[0, 2**bits)`` -> ``(..., ceil(d*bits/8))`` uint8."""
    codes = np.asarray(codes, dtype=np.uint8)
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (..., d, bits), low bit first
    stream = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`: ``(..., ceil(count*bits/8))`` uint8 -> ``(..., count)`` uint8 codes."""
    stream = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    planes = stream.reshape(*packed.shape[:-1], count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
