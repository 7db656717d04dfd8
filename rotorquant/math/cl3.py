"""Cl(3,0) through the `clifford` package: the algebra as data.

Multivectors are float64 arrays ``(..., 8)`` of coefficients on clifford's blade
basis ``1, e1, e2, e3, e12, e13, e23, e123``. The geometric product is one
contraction with clifford's Cayley table ``Layout.gmt`` (never typed by hand):

    (a b)_j = sum_{i,k} a_i b_k gmt[i, j, k]

Needs the ``ref`` extra (``pip install rotorquant[ref]``).
"""

from __future__ import annotations

import numpy as np

try:
    import clifford
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("rotorquant's NumPy reference tier needs clifford: pip install 'rotorquant[ref]'") from exc

LAYOUT, BLADES = clifford.Cl(3)
GMT = np.asarray(LAYOUT.gmt.todense(), dtype=np.float64)  # (8, 8, 8)
VECTOR_SLOTS = [LAYOUT.bladeTupList.index(b) for b in [(1,), (2,), (3,)]]
ROTOR_SLOTS = [LAYOUT.bladeTupList.index(b) for b in [(), (1, 2), (1, 3), (2, 3)]]
GRADES = np.array(LAYOUT.gradeList)
_REVERSE_SIGNS = np.where(GRADES % 4 < 2, 1.0, -1.0)  # reversion flips grades 2 and 3


def geometric_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b`` for multivectors ``(..., 8)`` that broadcast against each other."""
    return np.einsum("...i,...k,ijk->...j", a, b, GMT, optimize=True)


def reverse(a: np.ndarray) -> np.ndarray:
    """``a~``: the order of the vector factors reversed (sign -1 on grades 2 and 3)."""
    return a * _REVERSE_SIGNS


def embed_vectors(v: np.ndarray) -> np.ndarray:
    """``(..., 3)`` coordinates -> ``(..., 8)`` grade-1 multivectors ``v1 e1 + v2 e2 + v3 e3``."""
    mv = np.zeros((*v.shape[:-1], 8))
    mv[..., VECTOR_SLOTS] = v
    return mv


def embed_rotors(r: np.ndarray) -> np.ndarray:
    """``(..., 4)`` components ``(s, b12, b13, b23)`` -> ``(..., 8)`` even multivectors."""
    mv = np.zeros((*r.shape[:-1], 8))
    mv[..., ROTOR_SLOTS] = r
    return mv


def extract_vectors(mv: np.ndarray) -> np.ndarray:
    """The grade-1 coordinates ``(..., 3)`` of multivectors ``(..., 8)``."""
    return mv[..., VECTOR_SLOTS]


def sandwich(rotor: np.ndarray, mv: np.ndarray) -> np.ndarray:
    """``R X R~`` for rotors and multivectors ``(..., 8)``."""
    return geometric_product(geometric_product(rotor, mv), reverse(rotor))


def rotate_groups(v: np.ndarray, rotors: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Rotate 3-vectors ``v (..., G, 3)`` by rotors ``(G, 4)``: embed, sandwich, extract.

    Forward ``R v R~``; ``inverse=True`` uses ``R~ v R``. The sandwich of a vector is a
    pure vector (its other grades vanish), so extracting grade 1 loses nothing.
    """
    r = embed_rotors(rotors)
    if inverse:
        r = reverse(r)
    return extract_vectors(sandwich(r, embed_vectors(v)))
