"""`QuantizerSpec`: the frozen description of one quantizer.

A spec is pure configuration. Every number the tiers use is derived from it by
`rotorquant.build_params(spec)`; two equal specs always give bit-identical
parameters, on every machine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .math.rotations import default_stages


class _StrEnum(str, enum.Enum):
    """A ``str`` enum that prints as its value, so specs and errors read ``rotation='rotor'``."""

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return self.value


class Rotation(_StrEnum):
    """How a unit vector is rotated before its coordinates are quantized (`rotorquant.math.rotations`).

    - ``"rotor"``: RotorQuant, a butterfly of Cl(3,0) rotors. In each of ``stages`` stages the
      consecutive 3-dim groups ``(3g, 3g+1, 3g+2)`` are rotated through the sandwich ``R v R~`` by
      rotors that spread a coordinate's energy over the group as evenly as three dimensions allow
      (a 2-coordinate remainder by a Cl(2) rotor, a 1-coordinate remainder left as is), with a
      stride-3 shuffle between stages, so that after ``ceil(log3 d)`` stages every coordinate has
      mixed with (nearly) every other. Cost: O(d) per stage.
    - ``"hadamard"``: random signs, then a normalized Walsh-Hadamard transform on power-of-two
      blocks of the vector. Cost: O(d log d).
    - ``"dense"``: TurboQuant. One Haar-random ``d x d`` orthogonal matrix. Cost: O(d^2).

    The enum is a ``str`` so ``Rotation.ROTOR == "rotor"``.
    """

    ROTOR = "rotor"
    HADAMARD = "hadamard"
    DENSE = "dense"


class NormDtype(_StrEnum):
    """Storage dtype of the per-vector norms (and QJL residual norms).

    - ``"float32"`` (default): any finite float32 norm round-trips.
    - ``"float16"``: 2 bytes smaller per vector; quantizing a vector whose norm
      exceeds 65504 raises ``ValueError`` instead of storing ``inf``.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"


class Packing(_StrEnum):
    """How the codes of one vector are laid out in its ``code_bytes`` bytes (``docs/format.md``).

    - ``"contiguous"`` (default, the reference): a little-endian bit stream, coordinate ``j``'s
      ``b``-bit code at stream bits ``[j*b, (j+1)*b)``. Any ``dim`` and bit width.
    - ``"interleaved"``: each chunk of 32 coordinates is spread over ``b`` 32-bit words (the row
      holds ``b`` planes of ``dim / 32`` words), so that a GPU turns one word into 4 codes' table
      lookups with one mask or shift. Needs ``dim`` a multiple of 32 and ``mse_bits`` 2, 3 or 4.

    Both store exactly ``ceil(dim * mse_bits / 8)`` bytes; `rotorquant.format.repack_codes`
    converts either way. QJL signs are a plain bit stream in both.
    """

    CONTIGUOUS = "contiguous"
    INTERLEAVED = "interleaved"


INTERLEAVED_BITS = (2, 3, 4)
"""The codebook bit widths (``mse_bits``) the interleaved packing is defined for."""

INTERLEAVED_CHUNK = 32
"""Coordinates per chunk of the interleaved packing: ``dim`` must be a multiple of it."""

MAX_BITS = 8


def _fail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"QuantizerSpec.{field}: expected {expected}, got {got!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantizerSpec:
    """Everything that defines a quantizer.

    Args:
        dim: vector dimension ``d`` (>= 2).
        bits: total bits per coordinate, 1..8. Without QJL all of them index a
            Lloyd-Max codebook; with QJL the codebook gets ``bits - 1`` and each
            of the ``qjl_dim`` projections of the residual gets one sign bit.
        rotation: ``"rotor"``, ``"hadamard"`` or ``"dense"`` (see `Rotation`).
        stages: rotor butterfly stages (``rotation="rotor"`` only, >= 1); None (default) takes
            ``ceil(log3 dim)``, after which every coordinate has mixed with (nearly) every other.
        qjl: add the 1-bit QJL sketch of the residual (TurboQuant_prod), which
            makes `scores` an unbiased estimate of ``q @ x.T``.
        qjl_dim: number of QJL projections ``m``; defaults to ``dim``.
        seed: seed of the one ``numpy.random.Generator`` behind every constant.
        norm_dtype: storage dtype of the norms (see `NormDtype`).
        norm_correction: store ``||x|| / ||c||`` instead of ``||x||`` as the
            norm, where ``c`` is the vector of chosen centroids, so the
            reconstruction has exactly the input's length. Only without QJL.
            None (default): on without QJL, off with it (it measured better on
            every attention metric, and it would bias the QJL estimator).
        packing: layout of the code bytes, ``"contiguous"`` or ``"interleaved"``
            (see `Packing`); ``"interleaved"`` needs ``dim`` a multiple of 32 and
            ``mse_bits`` 2, 3 or 4.

    Invalid values raise ``ValueError`` naming the field, the allowed values
    and the value given.
    """

    dim: int
    bits: int
    rotation: Rotation | str = Rotation.ROTOR
    stages: int | None = None
    qjl: bool = False
    qjl_dim: int | None = None
    seed: int = 0
    norm_dtype: NormDtype | str = NormDtype.FLOAT32
    norm_correction: bool | None = None
    packing: Packing | str = Packing.CONTIGUOUS

    def __post_init__(self) -> None:
        if not _is_int(self.dim) or self.dim < 2:
            _fail("dim", "an int >= 2", self.dim)
        if not _is_int(self.bits) or not 1 <= self.bits <= MAX_BITS:
            _fail("bits", f"an int in 1..{MAX_BITS}", self.bits)
        try:
            object.__setattr__(self, "rotation", Rotation(self.rotation))
        except ValueError:
            _fail("rotation", f"one of {[r.value for r in Rotation]}", self.rotation)
        if self.rotation is Rotation.ROTOR and self.stages is None:
            object.__setattr__(self, "stages", default_stages(self.dim))
        elif self.rotation is Rotation.ROTOR and (not _is_int(self.stages) or self.stages < 1):
            _fail("stages", "an int >= 1 or None", self.stages)
        elif self.rotation is not Rotation.ROTOR and self.stages is not None:
            _fail("stages", f"None with rotation={self.rotation.value!r} (stages are rotor butterfly stages)", self.stages)
        if not isinstance(self.qjl, bool):
            _fail("qjl", "a bool", self.qjl)
        if self.qjl and self.bits < 2:
            _fail("bits", "an int in 2..8 when qjl=True (1 bit goes to the QJL sign)", self.bits)
        if self.qjl_dim is None:
            object.__setattr__(self, "qjl_dim", self.dim)
        elif not _is_int(self.qjl_dim) or self.qjl_dim < 1:
            _fail("qjl_dim", "an int >= 1 or None", self.qjl_dim)
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", "an int >= 0", self.seed)
        try:
            object.__setattr__(self, "norm_dtype", NormDtype(self.norm_dtype))
        except ValueError:
            _fail("norm_dtype", f"one of {[n.value for n in NormDtype]}", self.norm_dtype)
        if self.norm_correction is None:
            object.__setattr__(self, "norm_correction", not self.qjl)
        if not isinstance(self.norm_correction, bool):
            _fail("norm_correction", "a bool or None", self.norm_correction)
        if self.norm_correction and self.qjl:
            _fail("norm_correction", "False when qjl=True (it would bias the QJL estimator)", True)
        try:
            object.__setattr__(self, "packing", Packing(self.packing))
        except ValueError:
            _fail("packing", f"one of {[p.value for p in Packing]}", self.packing)
        if self.packing is Packing.INTERLEAVED and (
            self.mse_bits not in INTERLEAVED_BITS or self.dim % INTERLEAVED_CHUNK
        ):
            _fail(
                "packing",
                f"'contiguous' for dim={self.dim} and mse_bits={self.mse_bits} ('interleaved' needs dim a multiple "
                f"of {INTERLEAVED_CHUNK} and mse_bits in {INTERLEAVED_BITS})",
                self.packing,
            )

    @property
    def mse_bits(self) -> int:
        """Bits per coordinate of the Lloyd-Max stage: ``bits - 1`` with QJL, else ``bits``."""
        return self.bits - 1 if self.qjl else self.bits

    @property
    def code_bytes(self) -> int:
        """Bytes of packed codes per vector: ``ceil(dim * mse_bits / 8)``."""
        return -(-self.dim * self.mse_bits // 8)

    @property
    def sign_bytes(self) -> int:
        """Bytes of packed QJL signs per vector: ``ceil(qjl_dim / 8)``, 0 without QJL."""
        return -(-self.qjl_dim // 8) if self.qjl else 0

    @property
    def norm_bytes(self) -> int:
        """Bytes of one stored norm."""
        return 4 if self.norm_dtype is NormDtype.FLOAT32 else 2

    @property
    def bytes_per_vector(self) -> int:
        """Total payload bytes of one compressed vector (codes, norm, signs, residual norm)."""
        extra = self.sign_bytes + self.norm_bytes if self.qjl else 0
        return self.code_bytes + self.norm_bytes + extra
