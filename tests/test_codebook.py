import math

import numpy as np
import pytest

from rotorquant.math.codebook import coordinate_density, lloyd_max

DIMS = [2, 3, 5, 32, 67, 128, 1024]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", DIMS)
def test_sorted_symmetric_midpoints(dim, bits):
    book = lloyd_max(dim, bits)
    c, b = book.centroids, book.boundaries
    assert c.shape == (2**bits,) and b.shape == (2**bits - 1,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    np.testing.assert_array_equal(b, (c[1:] + c[:-1]) / 2)
    assert -1 < c[0] and c[-1] < 1


@pytest.mark.parametrize("dim", [5, 32, 128])
@pytest.mark.parametrize("bits", [1, 3, 5])
def test_centroids_are_conditional_means_by_independent_quadrature(dim, bits):
    """Lloyd-Max's second condition, checked on a fine trapezoid grid in x (not the solver's angle quadrature)."""
    book = lloyd_max(dim, bits)
    x = np.linspace(-1, 1, 2_000_001)
    f = coordinate_density(x, dim)
    edges = np.concatenate([[-1.0], book.boundaries, [1.0]])
    for k in range(2**bits):
        inside = (x >= edges[k]) & (x <= edges[k + 1])
        mean = np.trapezoid(x[inside] * f[inside], x[inside]) / np.trapezoid(f[inside], x[inside])
        assert mean == pytest.approx(book.centroids[k], abs=1e-6)


def test_density_integrates_to_one():
    x = np.linspace(-1, 1, 400_001)
    for dim in (4, 32, 128):
        assert np.trapezoid(coordinate_density(x, dim), x) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "bits, positive",
    [(1, [0.7979]), (2, [0.4528, 1.510]), (3, [0.2451, 0.7560, 1.344, 2.152])],
)
def test_large_dim_matches_max_gaussian_table(bits, positive):
    dim = 1 << 20
    scaled = lloyd_max(dim, bits).centroids[2 ** (bits - 1) :] * math.sqrt(dim)
    for got, want in zip(scaled, positive):
        assert float(f"{got:.4g}") == pytest.approx(want, rel=6e-4)  # equal to 3-4 significant digits


@pytest.mark.parametrize("dim", [2, 3, 32, 128, 1024])
def test_one_bit_is_exact(dim):
    """The level is E|x| rounded to float32 (every codebook is pinned to float32 values), and the distortion
    that of that level: E[(x - c)^2] over the cell x > 0 is E[x^2] - 2 c E|x| + c^2 = 1/d - 2 c e + c^2."""
    e = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)  # E|x|
    book = lloyd_max(dim, 1)
    c = float(np.float32(e))
    assert book.centroids[1] == c
    assert dim * book.distortion == pytest.approx(1 - dim * (2 * c * e - c * c), rel=1e-9)


@pytest.mark.parametrize("bits", range(1, 6))
def test_dim3_is_uniform_quantizer(bits):
    levels = 2**bits
    want = (2 * np.arange(levels) + 1) / levels - 1
    np.testing.assert_allclose(lloyd_max(3, bits).centroids, want, atol=1e-12)


def test_distortion_table_at_128():
    got = [round(128 * lloyd_max(128, b).distortion, 4) for b in (1, 2, 3, 4)]
    assert got == [0.3609, 0.1160, 0.0340, 0.0093]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim=1"):
        lloyd_max(1, 3)
    with pytest.raises(ValueError, match="bits=9"):
        lloyd_max(8, 9)
