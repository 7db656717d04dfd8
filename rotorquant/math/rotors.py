"""Rotors of Cl(3,0) as data: drawing them, and turning them into 3x3 matrices.

A unit rotor ``R = s + b12 e12 + b13 e13 + b23 e23`` (``s^2 + b12^2 + b13^2 + b23^2 = 1``)
rotates a vector ``v = v1 e1 + v2 e2 + v3 e3`` by the sandwich ``R v R~``, where
``R~ = s - b12 e12 - b13 e13 - b23 e23`` is the reverse. The result is again a pure
vector, so the sandwich is a linear map ``v -> M(R) v`` with ``M(R)`` in SO(3).

`rotor_matrices` gives ``M(R)`` in closed form: it equals the rotation matrix of the
unit quaternion ``(w, x, y, z) = (s, -b23, b13, -b12)``. The tests check it against
the `clifford` package's sandwich for random rotors to 1e-12; nothing here is a
hand-typed Cayley table.
"""

from __future__ import annotations

import numpy as np

IDENTITY_ROTOR = np.array([1.0, 0.0, 0.0, 0.0])


def _disk_points(rng: np.random.Generator, count: int) -> np.ndarray:
    """``(count, 2)`` points uniform in the open unit disk, by rejection from the square ``[-1, 1)^2``.

    Only uniform doubles, products and comparisons: bit-identical on every IEEE machine (no libm)."""
    out = np.empty((0, 2))
    while len(out) < count:
        p = 2.0 * rng.random((2 * (count - len(out)) + 8, 2)) - 1.0
        out = np.concatenate([out, p[np.sum(p * p, axis=-1) < 1.0]])
    return out[:count]


def haar_rotors(rng: np.random.Generator, count: int) -> np.ndarray:
    """``(count, 4)`` unit rotors ``(s, b12, b13, b23)``, Haar-uniform on SO(3).

    Uniform points on the unit 3-sphere (the double cover of SO(3)) by Marsaglia's method: two points
    ``(x1, x2)``, ``(x3, x4)`` uniform in the unit disk with squared radii ``r1``, ``r2`` give
    ``(x1, x2, x3 t, x4 t)``, ``t = sqrt((1 - r1) / r2)``. Square roots and divisions are correctly
    rounded, so the rotors are bit-identical on every machine.
    """
    a, b = _disk_points(rng, count), _disk_points(rng, count)
    r1, r2 = np.sum(a * a, axis=-1), np.sum(b * b, axis=-1)
    t = np.sqrt((1.0 - r1) / np.where(r2 > 0, r2, 1.0))
    return np.concatenate([a, b * t[:, None]], axis=-1)


def haar_plane_rotor(rng: np.random.Generator) -> np.ndarray:
    """One unit rotor ``(s, b12, 0, 0)`` of Cl(2): a Givens rotation of the e1e2 plane by a uniform angle
    (a point uniform in the unit disk, normalized)."""
    p = _disk_points(rng, 1)[0]
    return np.array([*(p / np.sqrt(np.sum(p * p))), 0.0, 0.0])


EQUALIZER = (2.0 * np.ones((3, 3)) - 3.0 * np.eye(3)) / 3.0
"""The 3x3 rotation ``(2/3) J - I`` (rows ``(-1, 2, 2)/3``, ...; the half turn about ``(1, 1, 1)``): it sends
every axis to entries of magnitudes ``1/3, 2/3, 2/3``, spreading a coordinate's energy over three as
evenly as a real 3x3 rotation can (no real 3x3 orthogonal matrix has all entries ``1/sqrt(3)``)."""


def equalizing_rotors(rng: np.random.Generator, count: int) -> np.ndarray:
    """``(count, 4)`` unit rotors of ``diag(a) EQUALIZER diag(b)`` with random signs ``a, b`` (``prod(a) prod(b)
    = 1``, so each is a rotation): equalizing rotations in random orientations (integers only: bit-identical
    everywhere up to the matrix-to-rotor square roots, which are correctly rounded)."""
    signs = 1.0 - 2.0 * rng.integers(0, 2, size=(count, 6))
    a, b = signs[:, :3], signs[:, 3:].copy()
    b[:, 2] *= np.prod(a, axis=1) * np.prod(b, axis=1)  # det = prod(a) prod(b) det(EQUALIZER) = +1
    return matrix_rotors(a[:, :, None] * EQUALIZER * b[:, None, :])


def equalizing_plane_rotor(rng: np.random.Generator) -> np.ndarray:
    """One Cl(2) rotor ``(s, b12, 0, 0)`` turning the e1e2 plane by 45 degrees either way (a random sign): the
    2-dim rotation that splits a coordinate's energy evenly. ``s = cos(pi/8)``, ``|b12| = sin(pi/8)`` in closed
    form (square roots only)."""
    root2 = np.sqrt(2.0)
    sign = 1.0 - 2.0 * rng.integers(0, 2)
    return np.array([np.sqrt(2.0 + root2) / 2.0, sign * np.sqrt(2.0 - root2) / 2.0, 0.0, 0.0])


def matrix_rotors(mats: np.ndarray) -> np.ndarray:
    """The unit rotors ``(..., 4)`` of rotation matrices ``(..., 3, 3)``: the inverse of `rotor_matrices` (up to
    the sign of the rotor, which the sandwich does not see), by Shepperd's method: the quaternion component
    ``(w, x, y, z) = (s, -b23, b13, -b12)`` of largest magnitude is taken from the diagonal, the others from
    the off-diagonal entries divided by it."""
    m = np.asarray(mats, dtype=np.float64)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    lead = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    pick = np.argmax(lead, axis=-1)
    big = np.sqrt(np.take_along_axis(lead, pick[..., None], -1)[..., 0]) / 2  # >= 1/2
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s01, s02, s12 = m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1]
    quarter = 4 * big
    options = [
        (big, d21 / quarter, d02 / quarter, d10 / quarter),
        (d21 / quarter, big, s01 / quarter, s02 / quarter),
        (d02 / quarter, s01 / quarter, big, s12 / quarter),
        (d10 / quarter, s02 / quarter, s12 / quarter, big),
    ]
    w, x, y, z = (np.choose(pick, [o[i] for o in options]) for i in range(4))
    return np.stack([w, -z, y, -x], axis=-1)


def rotor_matrices(rotors: np.ndarray) -> np.ndarray:
    """``(..., 3, 3)`` matrices ``M`` with ``M v = R v R~`` for unit rotors ``(..., 4)`` = ``(s, b12, b13, b23)``."""
    rotors = np.asarray(rotors, dtype=np.float64)
    w, x, y, z = rotors[..., 0], -rotors[..., 3], rotors[..., 2], -rotors[..., 1]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def haar_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A Haar-random ``(dim, dim)`` orthogonal matrix: QR of a Gaussian matrix with the signs of ``diag(R)`` fixed."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))
