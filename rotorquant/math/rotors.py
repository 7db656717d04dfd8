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


def haar_rotors(rng: np.random.Generator, count: int) -> np.ndarray:
    """``(count, 4)`` unit rotors ``(s, b12, b13, b23)``, Haar-uniform on SO(3).

    A normalized 4-D standard Gaussian is uniform on the unit 3-sphere, the double
    cover of SO(3), so the rotation it encodes is Haar-distributed.
    """
    r = rng.standard_normal((count, 4))
    return r / np.linalg.norm(r, axis=-1, keepdims=True)


def haar_plane_rotor(rng: np.random.Generator) -> np.ndarray:
    """One unit rotor ``(s, b12, 0, 0)`` of Cl(2): a Givens rotation of the e1e2 plane by a uniform angle."""
    r = rng.standard_normal(2)
    return np.array([*(r / np.linalg.norm(r)), 0.0, 0.0])


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
