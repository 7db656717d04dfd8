"""`build_params(spec)`: every constant of a quantizer, drawn once, in float64 NumPy.

The tiers never draw random numbers: they read these arrays (converting them to
their own device and dtype). All randomness comes from one
``numpy.random.Generator(PCG64(seed))``, consumed in a fixed order:

1. the rotation: ``dim // 3`` Haar rotors, then for ``dim % 3 == 2`` one Cl(2)
   rotor for the last two coordinates (``rotation="rotor"``), or one Haar
   ``dim x dim`` orthogonal matrix (``rotation="dense"``);
2. with QJL, the ``(qjl_dim, dim)`` standard normal projection.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .math.codebook import lloyd_max
from .math.rotors import IDENTITY_ROTOR, haar_orthogonal, haar_plane_rotor, haar_rotors, rotor_matrices
from .spec import QuantizerSpec, Rotation


@dataclass(frozen=True, eq=False)
class QuantParams:
    """The constants of one `QuantizerSpec` (all read-only float64 arrays).

    Attributes:
        spec: the spec they were built from.
        centroids: ``(2**mse_bits,)`` ascending Lloyd-Max levels for unit vectors; code ``k`` means ``centroids[k]``.
        boundaries: ``(2**mse_bits - 1,)`` ascending midpoints; ``code = #{i : y >= boundaries[i]}``.
        distortion: the codebook's per-coordinate MSE on `f_dim`; ``dim * distortion`` is the unit-vector MSE.
        rotors: ``(dim // 3, 4)`` unit rotors ``(s, b12, b13, b23)``; group ``g`` rotates
            coordinates ``(3g, 3g+1, 3g+2)`` as ``e1, e2, e3`` by ``R v R~``. None for dense.
        tail_rotor: ``(4,)`` rotor of the last ``dim % 3`` coordinates, None when ``dim % 3 == 0`` or dense.
            Two coordinates: ``(s, b12, 0, 0)``, a Givens rotation of the e1e2 plane. One coordinate:
            the identity ``(1, 0, 0, 0)`` (SO(1) is trivial, the coordinate is quantized as is).
        blocks: ``(ceil(dim / 3), 3, 3)`` matrices of all rotors including the tail; with ``x`` zero-padded to
            ``3 * ceil(dim / 3)`` coordinates, ``y[3g:3g+3] = blocks[g] @ x[3g:3g+3]``. None for dense.
        rotation: ``(dim, dim)`` orthogonal matrix, ``y = rotation @ x``. None for rotor.
        qjl_matrix: ``(qjl_dim, dim)`` i.i.d. N(0, 1); None without QJL.
    """

    spec: QuantizerSpec
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float
    rotors: np.ndarray | None
    tail_rotor: np.ndarray | None
    blocks: np.ndarray | None
    rotation: np.ndarray | None
    qjl_matrix: np.ndarray | None

    def rotation_matrix(self) -> np.ndarray:
        """The whole rotation as a ``(dim, dim)`` matrix (block diagonal for rotors)."""
        if self.rotation is not None:
            return self.rotation
        d = self.spec.dim
        full = np.zeros((3 * len(self.blocks),) * 2)
        for g, block in enumerate(self.blocks):
            full[3 * g : 3 * g + 3, 3 * g : 3 * g + 3] = block
        return full[:d, :d]


def _readonly(a: np.ndarray | None) -> np.ndarray | None:
    if a is not None:
        a = np.ascontiguousarray(a, dtype=np.float64)
        a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=256)
def build_params(spec: QuantizerSpec) -> QuantParams:
    """All constants of ``spec``, deterministic in ``spec.seed``; cached per spec."""
    if not isinstance(spec, QuantizerSpec):
        raise TypeError(f"build_params: expected spec to be a QuantizerSpec, got {type(spec).__name__}")
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    d = spec.dim
    rotors = tail = blocks = rotation = qjl_matrix = None
    if spec.rotation is Rotation.ROTOR:
        rotors = haar_rotors(rng, d // 3)
        if d % 3 == 2:
            tail = haar_plane_rotor(rng)
        elif d % 3 == 1:
            tail = IDENTITY_ROTOR.copy()
        all_rotors = rotors if tail is None else np.vstack([rotors, tail])
        blocks = rotor_matrices(all_rotors)
    else:
        rotation = haar_orthogonal(rng, d)
    if spec.qjl:
        qjl_matrix = rng.standard_normal((spec.qjl_dim, d))
    book = lloyd_max(d, spec.mse_bits)
    return QuantParams(
        spec=spec,
        centroids=book.centroids,
        boundaries=book.boundaries,
        distortion=book.distortion,
        rotors=_readonly(rotors),
        tail_rotor=_readonly(tail),
        blocks=_readonly(blocks),
        rotation=_readonly(rotation),
        qjl_matrix=_readonly(qjl_matrix),
    )
