"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector.

If ``u`` is uniform on the unit sphere of R^d, each coordinate ``x = u_j`` has
density

    f_d(x) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - x^2)^((d-3)/2),  x in [-1, 1],

which tends to N(0, 1/d) as d grows. After a random rotation every coordinate of
a unit vector follows f_d, so one scalar codebook serves all coordinates.

Lloyd-Max alternates the two optimality conditions until they hold together:
boundaries are midpoints of neighbouring centroids, and each centroid is the
conditional mean of its cell. Integrals are taken in the angle ``t``
(``x = sin t``), where the density becomes ``cos(t)^(d-2)``, smooth for every
``d >= 2``; the first moment has the closed form
``int_a^b x f(x) dx ∝ ((1-a^2)^((d-1)/2) - (1-b^2)^((d-1)/2)) / (d-1)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

_PANELS = 4  # Gauss-Legendre panels per cell
_NODES = 24  # nodes per panel
_TOL = 1e-12  # on |F(c) - c|; the closed-form first moment rounds at ~5e-14
_MAX_ITER = 1_000


@dataclass(frozen=True)
class Codebook:
    """A scalar quantizer for `f_d`.

    Attributes:
        centroids: ``(2**bits,)`` ascending reconstruction levels; code ``k`` means ``centroids[k]``.
        boundaries: ``(2**bits - 1,)`` ascending thresholds, the midpoints of neighbouring centroids.
            A value ``y`` gets code ``k = #{i : y >= boundaries[i]}``.
        distortion: ``E[(x - Q(x))^2]`` for one coordinate; a unit vector's MSE is ``dim * distortion``.
        iterations: Newton iterations until ``max |F(c) - c| < 1e-12``; the levels are then rounded to
            float32 values (kept as float64), the same on every machine.
    """

    dim: int
    bits: int
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float
    iterations: int


def coordinate_density(x: np.ndarray, dim: int) -> np.ndarray:
    """``f_d(x)``, the density of one coordinate of a uniform unit vector in R^dim."""
    log_c = math.lgamma(dim / 2) - math.lgamma((dim - 1) / 2) - 0.5 * math.log(math.pi)
    x = np.asarray(x, dtype=np.float64)
    base = np.maximum(1.0 - x * x, 0.0)
    with np.errstate(divide="ignore"):  # d = 2 diverges at |x| = 1
        inside = math.exp(log_c) * base ** ((dim - 3) / 2)
    return np.where(np.abs(x) <= 1.0, inside, 0.0)


def _support(dim: int) -> float:
    """Half-width beyond which f_d has no mass worth integrating (25 standard deviations)."""
    return min(1.0, 25.0 / math.sqrt(dim))


def _cell_integrals(edges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalized ``(int f, int x f, int x^2 f)`` over each cell ``[edges[i], edges[i+1]]``."""
    t_edges = np.arcsin(edges)
    nodes, weights = np.polynomial.legendre.leggauss(_NODES)
    frac = np.linspace(0.0, 1.0, _PANELS + 1)
    lo = t_edges[:-1, None] + (t_edges[1:] - t_edges[:-1])[:, None] * frac[None, :-1]
    width = (t_edges[1:] - t_edges[:-1])[:, None] / _PANELS
    t = lo[..., None] + width[..., None] * (nodes + 1) / 2  # (cells, panels, nodes)
    w = width[..., None] / 2 * weights * np.cos(t) ** (dim - 2)
    x = np.sin(t)
    mass = w.sum(axis=(1, 2))
    second = (w * x * x).sum(axis=(1, 2))
    tail = (1.0 - edges * edges) ** ((dim - 1) / 2)
    first = (tail[:-1] - tail[1:]) / (dim - 1)
    return mass, first, second


def _initial_centroids(levels: int, dim: int) -> np.ndarray:
    """Quantiles of ``f^(1/3)``, the asymptotically optimal density of levels."""
    t_max = math.asin(_support(dim))
    t = np.linspace(-t_max, t_max, 20001)
    cdf = np.cumsum(np.cos(t) ** (dim / 3))  # f(sin t)^(1/3) dx/dt, up to a constant
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp((np.arange(levels) + 0.5) / levels, cdf, np.sin(t))


def lloyd_map(c: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """One step of the Lloyd-Max map ``c -> F(c)`` for ascending levels ``c``, and its tridiagonal Jacobian ``dF/dc``.

    Plain Lloyd iteration is ``c = lloyd_map(c, dim)[0]`` repeated.

    ``F_i = int_{a_i}^{b_i} x f / int_{a_i}^{b_i} f`` with ``a_i, b_i`` the midpoints around ``c_i``;
    ``dF_i/db_i = f(b_i) (b_i - F_i) / mass_i`` and ``dF_i/da_i = f(a_i) (F_i - a_i) / mass_i``.
    """
    half = _support(dim)
    edges = np.concatenate([[-half], (c[1:] + c[:-1]) / 2, [half]])
    mass, first, _ = _cell_integrals(edges, dim)
    new = first / mass
    inner = edges[1:-1]
    f_inner = (1.0 - inner * inner) ** ((dim - 3) / 2)  # the unnormalized density of `_cell_integrals`
    d_upper = f_inner * (inner - new[:-1]) / mass[:-1]  # dF_i / d b_i, cells 0..k-2
    d_lower = f_inner * (new[1:] - inner) / mass[1:]  # dF_i / d a_i, cells 1..k-1
    k = len(c)
    jac = np.zeros((k, k))
    idx = np.arange(k)
    jac[idx[:-1], idx[:-1]] += d_upper / 2
    jac[idx[:-1], idx[1:]] += d_upper / 2
    jac[idx[1:], idx[1:]] += d_lower / 2
    jac[idx[1:], idx[:-1]] += d_lower / 2
    return new, jac


@functools.lru_cache(maxsize=None)
def lloyd_max(dim: int, bits: int) -> Codebook:
    """The Lloyd-Max codebook with ``2**bits`` levels for `f_dim`, computed to convergence and cached.

    Solves the fixed point ``c = F(c)`` of the Lloyd-Max map by Newton's method
    (the Jacobian is tridiagonal), halving any step that would break the ordering
    of the levels.
    """
    if dim < 2 or not 1 <= bits <= 8:
        raise ValueError(f"lloyd_max: expected dim >= 2 and bits in 1..8, got dim={dim}, bits={bits}")
    c = _initial_centroids(2**bits, dim)
    for iteration in range(1, _MAX_ITER + 1):
        mapped, jac = lloyd_map(c, dim)
        if np.max(np.abs(mapped - c)) < _TOL:
            break
        step = np.linalg.solve(np.eye(len(c)) - jac, mapped - c)
        while np.any(np.diff(c + step) <= 0):  # damp until the levels stay ordered
            step /= 2
        new = c + step
        c = (new - new[::-1]) / 2  # the density is even: keep the codebook exactly symmetric
    else:
        raise RuntimeError(f"lloyd_max(dim={dim}, bits={bits}) did not converge")
    # Pinned to float32 values: the iteration evaluates sin, cos, exp and lgamma, whose last bits differ
    # between math libraries and SIMD paths; float32 levels are the same on every machine (the kernels
    # compute in float32 anyway), and their error, 6e-8 relative, is far below the quantization error.
    c = c.astype(np.float32).astype(np.float64)
    half = _support(dim)
    edges = np.concatenate([[-half], (c[1:] + c[:-1]) / 2, [half]])
    mass, first, second = _cell_integrals(edges, dim)
    distortion = float(np.sum(second - 2 * c * first + c * c * mass) / mass.sum())
    c.setflags(write=False)
    boundaries = (c[1:] + c[:-1]) / 2
    boundaries.setflags(write=False)
    return Codebook(dim, bits, c, boundaries, distortion, iteration)
