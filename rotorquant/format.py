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

from .spec import NormDtype, QuantizerSpec


PAYLOAD_FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")
"""The payload fields of a `Compressed`, in order (the QJL ones are None without QJL)."""

PACKED_FIELDS = ("codes", "qjl_signs")
"""The payload fields that hold bit streams (uint8); the others hold norms in the spec's norm dtype."""

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


def stored_norms(values: np.ndarray, norm_dtype: NormDtype) -> np.ndarray:
    """Norms as the format stores them: ``values`` cast to ``norm_dtype``, every value past its largest finite
    value stored as Inf (a plain cast rounds values up to half an ulp past it down to it, e.g. float16's 65504)."""
    dtype = NORM_DTYPES[norm_dtype]
    return np.where(values > np.finfo(dtype).max, np.inf, values).astype(dtype)
