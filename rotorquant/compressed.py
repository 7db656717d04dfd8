"""`Compressed`: the packed payload of a batch of vectors, the same in every tier.

Per vector (leading shape ``...``), with ``b = spec.mse_bits``, ``m = spec.qjl_dim``:

=================  ===========================  ============================================
field              dtype, shape                 meaning
=================  ===========================  ============================================
``codes``          uint8 ``(..., ceil(d*b/8))``  little-endian bit stream of the d codes
``norms``          norm dtype ``(...)``          scale ``s``: ``x_hat = s * R^T c`` (``||x||``)
``qjl_signs``      uint8 ``(..., ceil(m/8))``    bit i set iff ``(S r)_i >= 0``; QJL only
``residual_norms`` norm dtype ``(...)``          ``||r|| = ||x - x_hat_mse||``; QJL only
=================  ===========================  ============================================

The arrays are NumPy arrays in the NumPy tier and torch tensors in the others.
``spec``, ``dtype`` (the input's dtype name) and ``calibration`` are metadata, not payload. A code
made by a `rotorquant.Quantizer` with a `rotorquant.Calibration` carries it and only that quantizer
decodes it (the tiers refuse it: they would return the preconditioned vectors).
See ``docs/format.md`` for the byte-by-byte layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .spec import QuantizerSpec


PAYLOAD_FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")
"""The payload fields of a `Compressed`, in order (the QJL ones are None without QJL)."""


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
