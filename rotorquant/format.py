"""The compressed format, the same in every tier: the `Compressed` container and its bit stream.

Per vector (leading shape ``...``), with ``b = spec.mse_bits``, ``m = spec.qjl_dim``:

=================  ===========================  ============================================
field              dtype, shape                 meaning
=================  ===========================  ============================================
``codes``          uint8 ``(..., ceil(d*b/8))``  little-endian bit stream of the d codes
``norms``          norm dtype ``(...)``          scale ``s``: ``x_hat = s * R^T c`` (``||x||``)
``qjl_signs``      uint8 ``(..., ceil(m/8))``    bit i set iff ``(S r)_i >= 0``; QJL only
``residual_norms`` norm dtype ``(...)``          ``||r|| = ||x - x_hat_mse||``; QJL only
=================  ===========================  ============================================

The bit stream: coordinate ``j``'s ``b``-bit code occupies bits ``[j*b, (j+1)*b)`` of a little-endian
stream; bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``, and bit ``t`` of a code is stream bit
``j*b + t``. ``d`` codes take ``ceil(d*b/8)`` bytes; unused high bits of the last byte are zero. QJL
signs are the same stream with ``b = 1``. `pack_codes` and `unpack_codes` are the NumPy reference the
other tiers' packers match byte for byte.

With ``spec.packing == "interleaved"`` (``b`` in 2..4, ``d`` a multiple of 32) the same ``d*b/8`` bytes hold
the codes rearranged for GPU table lookups: the row is ``b`` planes of ``C = d / 32`` little-endian 32-bit
words, plane ``p``'s word ``c`` at bytes ``4 * (p*C + c)``, and word ``c`` of every plane holds chunk ``c``
(coordinates ``32c .. 32c + 31``). Within a chunk, with ``G_g[n]`` the code of coordinate ``32c + 8g + n``
(``g``, ``n`` in 0..3, 0..7), nibble ``n`` (bits ``4n .. 4n + 3``) of the words is

    b = 2:  word 0: G_0[n] | G_2[n] << 2            word 1: G_1[n] | G_3[n] << 2
    b = 3:  word p (p = 0, 1, 2): G_p[n] | (bit p of G_3[n]) << 3
    b = 4:  word p (p = 0..3): m(G_p[n]) | t(G_p[4h + j]) << 3, for n = 2j + h (j in 0..3, h in 0, 1)

where at 4 bits ``m(k)`` is the magnitude index ``k - 8`` (k >= 8) or ``7 - k`` (k < 8) and ``t(k) = k >> 3`` the
top bit: word ``p`` holds group ``p``'s magnitudes in its nibbles' low 3 bits and its top bits at bits ``8j + 4h + 3``.

`repack_codes` converts between the packings.

The arrays are NumPy arrays in the NumPy tier and torch tensors in the others.
``spec``, ``dtype`` (the input's dtype name) and ``calibration`` are metadata, not payload. A code
made by a `rotorquant.Quantizer` with a `rotorquant.Calibration` carries it and only that quantizer
decodes it (the tiers refuse it: they would return the preconditioned vectors).
See ``docs/format.md`` for the byte-by-byte layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import INTERLEAVED_BITS, INTERLEAVED_CHUNK, NormDtype, Packing, QuantizerSpec


PAYLOAD_FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")
"""The payload fields of a `Compressed`, in order (the QJL ones are None without QJL)."""

PACKED_FIELDS = ("codes", "qjl_signs")
"""The payload fields that hold bit streams (uint8); the others hold norms in the spec's norm dtype."""

CODE_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""Values of `Compressed.dtype`: the dtype of the vectors a code was made from."""

NORM_DTYPES = {NormDtype.FLOAT32: np.float32, NormDtype.FLOAT16: np.float16}
"""The NumPy dtype of each `rotorquant.NormDtype`."""


@dataclass(frozen=True, eq=False)
class Compressed:
    """Bit-packed vectors. ``nbytes`` is the size of the payload actually held."""

    codes: Any
    norms: Any
    spec: QuantizerSpec
    dtype: str = "float32"
    qjl_signs: Any = None
    residual_norms: Any = None
    calibration: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading shape: one entry per compressed vector."""
        return tuple(self.codes.shape[:-1])

    @property
    def nbytes(self) -> int:
        """Bytes of payload: codes, norms and, with QJL, signs and residual norms."""
        held = (self.codes, self.norms, self.qjl_signs, self.residual_norms)
        return int(sum(a.nbytes for a in held if a is not None))

def packed_length(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int, packing: Packing | str = Packing.CONTIGUOUS) -> np.ndarray:
    """``(..., d)`` integer codes in ``[0, 2**bits)`` -> ``(..., ceil(d*bits/8))`` uint8 in ``packing``."""
    codes = np.asarray(codes, dtype=np.uint8)
    if _packing(packing, bits, codes.shape[-1]) is Packing.INTERLEAVED:
        return _pack_interleaved(codes, bits)
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (..., d, bits), low bit first
    stream = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int, packing: Packing | str = Packing.CONTIGUOUS) -> np.ndarray:
    """Inverse of `pack_codes`: ``(..., ceil(count*bits/8))`` uint8 -> ``(..., count)`` uint8 codes."""
    if _packing(packing, bits, count) is Packing.INTERLEAVED:
        return _unpack_interleaved(np.asarray(packed, dtype=np.uint8), bits, count)
    stream = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    planes = stream.reshape(*packed.shape[:-1], count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def repack_codes(packed: np.ndarray, bits: int, count: int, source: Packing | str, target: Packing | str) -> np.ndarray:
    """``(..., ceil(count*bits/8))`` uint8 rows of ``count`` codes in ``source`` packing, in ``target`` packing
    (the same length)."""
    return pack_codes(unpack_codes(packed, bits, count, source), bits, target)


def _packing(packing: Packing | str, bits: int, count: int) -> Packing:
    """``packing`` as a `Packing`, checked against the rows it describes."""
    try:
        packing = Packing(packing)
    except ValueError:
        raise ValueError(f"packing: expected one of {[p.value for p in Packing]}, got {packing!r}") from None
    if packing is Packing.INTERLEAVED and (bits not in INTERLEAVED_BITS or count % INTERLEAVED_CHUNK):
        raise ValueError(
            f"packing: 'interleaved' needs bits in {INTERLEAVED_BITS} and a multiple of {INTERLEAVED_CHUNK} "
            f"codes per row, got bits={bits} and {count} codes"
        )
    return packing


_NIBBLES = 4 * np.arange(8, dtype=np.uint32)  # bit offset of nibble n


def _pack_interleaved(codes: np.ndarray, bits: int) -> np.ndarray:
    """``(..., d)`` codes -> ``(..., d*bits/8)`` uint8, interleaved (the layout of the module docstring)."""
    lead, chunks = codes.shape[:-1], codes.shape[-1] // INTERLEAVED_CHUNK
    k = codes.astype(np.uint32)
    # [c, g, n]: coordinate 32c + 8g + n (4 bits: its magnitude index, k - 8 in the upper half, 7 - k in the lower)
    g = (k if bits < 4 else np.where(k >= 8, k - 8, 7 - k)).reshape(*lead, chunks, 4, 8)
    if bits == 2:
        nibbles = [g[..., 0, :] | g[..., 2, :] << 2, g[..., 1, :] | g[..., 3, :] << 2]
    elif bits == 3:
        nibbles = [g[..., p, :] | ((g[..., 3, :] >> p) & 1) << 3 for p in range(3)]
    else:
        top = (k >> 3).reshape(*lead, chunks, 4, 2, 4).swapaxes(-2, -1).reshape(g.shape)  # [c, g, 2j + h]: G_g[4h + j]
        nibbles = [g[..., p, :] | top[..., p, :] << 3 for p in range(4)]
    words = [(nib << _NIBBLES).sum(axis=-1, dtype=np.uint32) for nib in nibbles]  # disjoint bits: sum = or
    planes = np.stack(words, axis=-2).astype("<u4")  # (..., bits, C)
    return np.ascontiguousarray(planes).view(np.uint8).reshape(*lead, bits * chunks * 4)


def _unpack_interleaved(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `_pack_interleaved`: ``(..., count*bits/8)`` uint8 -> ``(..., count)`` uint8 codes."""
    lead, chunks = packed.shape[:-1], count // INTERLEAVED_CHUNK
    words = np.ascontiguousarray(packed).view("<u4").reshape(*lead, bits, chunks).astype(np.uint32)
    nib = (words[..., None] >> _NIBBLES) & 15  # (..., bits, C, 8)
    if bits == 2:
        groups = [nib[..., 0, :, :] & 3, nib[..., 1, :, :] & 3, nib[..., 0, :, :] >> 2, nib[..., 1, :, :] >> 2]
    elif bits == 3:
        spread = sum(((nib[..., p, :, :] >> 3) & 1) << p for p in range(3))
        groups = [nib[..., p, :, :] & 7 for p in range(3)] + [spread]
    else:
        top = (nib >> 3).reshape(*lead, bits, chunks, 4, 2).swapaxes(-2, -1).reshape(nib.shape)  # [p, c, 4h + j]
        k = np.where(top == 1, (nib & 7) + 8, 7 - (nib & 7))
        groups = [k[..., p, :, :] for p in range(4)]
    k = np.stack(groups, axis=-2).reshape(*lead, count)  # (..., C, 4, 8) -> coordinate order
    return k.astype(np.uint8)


def stored_norms(values: np.ndarray, norm_dtype: NormDtype) -> np.ndarray:
    """Norms as the format stores them: ``values`` cast to ``norm_dtype``, every value past its largest finite
    value stored as Inf (a plain cast rounds values up to half an ulp past it down to it, e.g. float16's 65504)."""
    dtype = NORM_DTYPES[norm_dtype]
    return np.where(values > np.finfo(dtype).max, np.inf, values).astype(dtype)
