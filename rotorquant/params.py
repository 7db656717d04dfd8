"""`build_params(spec)`: every constant of a quantizer, drawn once, in float64 NumPy.

The tiers never draw random numbers: they read these arrays (converting them to
their own device and dtype). All randomness comes from one
``numpy.random.Generator(PCG64(seed))``, consumed in a fixed order:

1. the rotation (`rotorquant.math.rotations`): for ``rotation="rotor"`` the rotors of each butterfly
   stage; for ``"hadamard"`` the ``dim`` signs; for ``"dense"`` one Haar ``dim x dim`` orthogonal matrix;
2. with QJL, the ``(qjl_dim, dim)`` standard normal projection.

Rotor and Hadamard parameters and every codebook are bit-identical on every machine; dense rotations and
QJL projections are not (see `rotorquant.math.rotations`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from .math.codebook import lloyd_max
from .math.rotations import butterfly_matrix, hadamard_matrix, hadamard_signs, rotor_butterfly
from .math.rotors import haar_orthogonal, rotor_matrices
from .spec import QuantizerSpec, Rotation


@dataclass(frozen=True, eq=False)
class QuantParams:
    """The constants of one `QuantizerSpec` (all read-only float64 arrays).

    Attributes:
        spec: the spec they were built from.
        centroids: ``(2**mse_bits,)`` ascending Lloyd-Max levels for unit vectors; code ``k`` means ``centroids[k]``.
        boundaries: ``(2**mse_bits - 1,)`` ascending midpoints; ``code = #{i : y >= boundaries[i]}``.
        distortion: the codebook's per-coordinate MSE on `f_dim`; ``dim * distortion`` is the unit-vector MSE.
        rotors: ``(stages, ceil(dim / 3), 4)`` unit rotors ``(s, b12, b13, b23)`` of the rotor butterfly: in stage
            ``t`` group ``g`` rotates coordinates ``(3g, 3g+1, 3g+2)`` as ``e1, e2, e3`` by ``R v R~``; the last
            row turns the ``dim % 3`` short group (two coordinates: ``(s, b12, 0, 0)``, a rotation of the e1e2
            plane; one: the identity ``(1, 0, 0, 0)``). None for the other rotations.
        blocks: ``(stages, ceil(dim / 3), 3, 3)`` the rotors as matrices: with the stage input zero-padded to
            ``3 * ceil(dim / 3)`` coordinates, ``y[3g:3g+3] = blocks[t, g] @ u[3g:3g+3]``. None unless rotor.
        permutations: ``(stages, dim)`` int64: stage ``t`` reads its input as ``u[permutations[t]]`` (the identity
            for ``t = 0``). None unless rotor.
        signs: ``(dim,)`` the random signs of the Hadamard rotation, ``y = H (signs * u)``. None unless hadamard.
        rotation: ``(dim, dim)`` orthogonal matrix, ``y = rotation @ x``. None unless dense.
        qjl_matrix: ``(qjl_dim, dim)`` i.i.d. N(0, 1); None without QJL.
    """

    spec: QuantizerSpec
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float
    rotors: np.ndarray | None
    blocks: np.ndarray | None
    permutations: np.ndarray | None
    signs: np.ndarray | None
    rotation: np.ndarray | None
    qjl_matrix: np.ndarray | None

    @functools.cached_property
    def matrix(self) -> np.ndarray:
        """The whole rotation as a read-only ``(dim, dim)`` matrix ``M``, ``y = M u`` (built once)."""
        if self.rotation is not None:
            return self.rotation
        if self.signs is not None:
            return _readonly(hadamard_matrix(self.signs))
        return _readonly(butterfly_matrix(self.rotors, self.permutations))

    @property
    def single_stage(self) -> bool:
        """Whether the rotation is one block-diagonal stage of rotors: the torch and Triton tiers then rotate
        group by group, O(d); every other rotation they apply as the matrix `matrix`."""
        return self.rotors is not None and len(self.rotors) == 1

    def rotation_matrix(self) -> np.ndarray:
        """The whole rotation as a ``(dim, dim)`` matrix ``M``, ``y = M u`` (see `matrix`)."""
        return self.matrix

    def __setstate__(self, state: dict) -> None:
        """Unpickling: the arrays come back read-only, as `build_params` made them."""
        for value in state.values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
        self.__dict__.update(state)

    def same_as(self, other: object) -> bool:
        """Whether ``other`` holds the same constants: the same object, or equal spec, distortion and arrays
        (e.g. after a pickle round trip)."""
        if self is other:
            return True
        if not isinstance(other, QuantParams) or other.spec != self.spec:
            return False
        for f in dataclasses.fields(self)[1:]:  # after spec
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = (a is None) == (b is None) and (a is None or np.array_equal(a, b))
            if not same:
                return False
        return True


def _readonly(a: np.ndarray | None, dtype=np.float64) -> np.ndarray | None:
    if a is not None:
        a = np.ascontiguousarray(a, dtype=dtype)
        a.setflags(write=False)
    return a


def build_params(spec: QuantizerSpec) -> QuantParams:
    """All constants of ``spec``, deterministic in ``spec.seed``; cached per spec."""
    if not isinstance(spec, QuantizerSpec):  # before the cache lookup, which would hash it
        raise TypeError(f"build_params: expected spec to be a QuantizerSpec, got {type(spec).__name__}")
    return _build(spec)


@functools.lru_cache(maxsize=256)
def _build(spec: QuantizerSpec) -> QuantParams:
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    d = spec.dim
    rotors = blocks = permutations = signs = rotation = qjl_matrix = None
    if spec.rotation is Rotation.ROTOR:
        rotors, permutations = rotor_butterfly(rng, d, spec.stages)
        blocks = rotor_matrices(rotors)
    elif spec.rotation is Rotation.HADAMARD:
        signs = hadamard_signs(rng, d)
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
        blocks=_readonly(blocks),
        permutations=_readonly(permutations, np.int64),
        signs=_readonly(signs),
        rotation=_readonly(rotation),
        qjl_matrix=_readonly(qjl_matrix),
    )
