"""The Cl(3,0) algebra: clifford's Cayley table as data, rotors, and the closed-form 3x3 matrices."""

import numpy as np
import pytest

import rotorquant as rq
from rotorquant.math import cl3
from rotorquant.math.rotations import default_stages, hadamard_blocks, stride_permutation, walsh_hadamard
from rotorquant.math.rotors import (
    equalizing_plane_rotor,
    equalizing_rotors,
    haar_rotors,
    matrix_rotors,
    rotor_matrices,
)

RNG = np.random.default_rng(1234)


def _random_mvs(n):
    return RNG.standard_normal((n, 8))


def _is_associative(gmt):
    a, b, c = (_random_mvs(50) for _ in range(3))

    def gp(x, y):
        return np.einsum("...i,...k,ijk->...j", x, y, gmt)

    return np.allclose(gp(gp(a, b), c), gp(a, gp(b, c)), atol=1e-12)


def test_product_contraction_matches_clifford_multivector_product():
    for a, b in zip(_random_mvs(20), _random_mvs(20)):
        want = (cl3.LAYOUT.MultiVector(a) * cl3.LAYOUT.MultiVector(b)).value
        np.testing.assert_allclose(cl3.geometric_product(a, b), want, atol=1e-14)


def test_reverse_matches_clifford():
    for a in _random_mvs(10):
        np.testing.assert_allclose(cl3.reverse(a), (~cl3.LAYOUT.MultiVector(a)).value, atol=0)


def test_cayley_table_is_associative_and_a_corrupted_one_is_not():
    assert _is_associative(cl3.GMT)
    broken = cl3.GMT.copy()
    e12, e1, e2 = 4, 1, 2  # blade slots: e1 * e2 = +e12 in the table
    assert broken[e1, e12, e2] == 1.0
    broken[e1, e12, e2] = -1.0  # the kind of sign error a hand-typed table makes
    assert not _is_associative(broken)


def test_sandwich_of_a_vector_is_a_pure_vector():
    rotors = cl3.embed_rotors(haar_rotors(RNG, 200))
    vectors = cl3.embed_vectors(RNG.standard_normal((200, 3)))
    out = cl3.sandwich(rotors, vectors)
    others = np.delete(out, cl3.VECTOR_SLOTS, axis=-1)
    assert np.max(np.abs(others)) < 1e-14
    np.testing.assert_allclose(
        np.linalg.norm(cl3.extract_vectors(out), axis=-1), np.linalg.norm(vectors, axis=-1), rtol=1e-13
    )


def test_unit_rotors_satisfy_r_rtilde_is_one():
    params = rq.build_params(rq.QuantizerSpec(dim=128, bits=3))
    r = cl3.embed_rotors(params.rotors)
    one = np.zeros(8)
    one[0] = 1.0
    np.testing.assert_allclose(cl3.geometric_product(r, cl3.reverse(r)), np.broadcast_to(one, r.shape), atol=1e-14)


def test_rotor_matrices_match_clifford_sandwich_to_1e12():
    rotors = haar_rotors(RNG, 500)
    mats = rotor_matrices(rotors)
    basis = np.eye(3)
    for k in range(3):  # column k of M is the image of e_k
        image = cl3.rotate_groups(np.broadcast_to(basis[k], (500, 1, 3)), rotors[:, None, :])[:, 0]
        np.testing.assert_allclose(mats[..., :, k], image, atol=1e-12)
    np.testing.assert_allclose(mats @ np.swapaxes(mats, -1, -2), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)


def test_inverse_sandwich_undoes_forward():
    rotors = haar_rotors(RNG, 40)
    v = RNG.standard_normal((7, 40, 3))
    back = cl3.rotate_groups(cl3.rotate_groups(v, rotors), rotors, inverse=True)
    np.testing.assert_allclose(back, v, atol=1e-13)


def test_haar_rotors_are_uniform_on_so3():
    """For Haar-random rotations E[M] = 0 and E[M_ij^2] = 1/3; checked to 5 standard errors."""
    mats = rotor_matrices(haar_rotors(np.random.default_rng(7), 20000))
    se_mean = np.sqrt(1 / 3 / 20000)
    assert np.max(np.abs(mats.mean(axis=0))) < 5 * se_mean
    assert np.max(np.abs((mats**2).mean(axis=0) - 1 / 3)) < 0.02


@pytest.mark.parametrize("dim", [2, 4, 5, 66, 67, 127, 128, 130])
@pytest.mark.parametrize("stages", [1, None])
def test_tail_groups(dim, stages):
    """The short group of each stage: a Cl(2) plane rotor for two coordinates, the identity for one."""
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=2, stages=stages))
    count = params.spec.stages
    assert params.rotors.shape == (count, -(-dim // 3), 4) and params.blocks.shape == (count, -(-dim // 3), 3, 3)
    assert params.permutations.shape == (count, dim) and params.permutations.dtype == np.int64
    full = params.rotation_matrix()
    np.testing.assert_allclose(full @ full.T, np.eye(dim), atol=1e-12)
    tails = params.rotors[:, -1]
    if dim % 3 == 1:
        np.testing.assert_array_equal(tails, np.tile([1.0, 0.0, 0.0, 0.0], (count, 1)))
    elif dim % 3 == 2:
        assert np.all(tails[:, 2:] == 0.0)  # Cl(2) rotors: only e12
    if stages == 1 and dim % 3 == 1:
        assert full[-1, -1] == 1.0  # one stage leaves a lone last coordinate as is


@pytest.mark.parametrize("dim", [3, 9, 27, 32, 64, 66, 67, 80, 96, 127, 128, 256])
def test_butterfly_mixes_nearly_every_coordinate_with_every_other(dim):
    """After `default_stages` = ceil(log3 d) stages, every output depends on every input when d is a power of 3
    and on at least 90% of them otherwise, and no input keeps more than a quarter of its energy in one output;
    one stage mixes only within groups."""
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=3))
    assert params.spec.stages == default_stages(dim) and 3 ** (params.spec.stages - 1) < dim <= 3**params.spec.stages
    m = params.rotation_matrix()
    support = np.mean(np.abs(m) > 1e-12)
    assert support == 1.0 if 3**params.spec.stages == dim else support >= 0.9, support
    assert np.max(m**2) <= 0.25 or dim <= 9
    single = rq.build_params(rq.QuantizerSpec(dim=dim, bits=3, stages=1)).rotation_matrix()
    assert np.mean(np.abs(single) > 1e-12) <= 3 / dim


def test_equalizing_rotors_split_energy_as_evenly_as_three_dimensions_allow():
    mats = rotor_matrices(equalizing_rotors(np.random.default_rng(3), 300))
    np.testing.assert_allclose(np.sort(np.abs(mats), axis=-1), np.broadcast_to([1 / 3, 2 / 3, 2 / 3], mats.shape), atol=1e-15)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-14)
    plane = rotor_matrices(equalizing_plane_rotor(np.random.default_rng(4)))
    np.testing.assert_allclose(np.abs(plane[:2, :2]), np.sqrt(0.5), atol=1e-15)


def test_matrix_rotors_inverts_rotor_matrices():
    rotors = haar_rotors(RNG, 400)
    back = matrix_rotors(rotor_matrices(rotors))
    np.testing.assert_allclose(np.abs(np.sum(back * rotors, axis=-1)), 1.0, atol=1e-14)  # the same rotor up to sign
    half_turns = rotor_matrices(equalizing_rotors(RNG, 50))  # trace -1: the rotor's scalar part is 0
    np.testing.assert_allclose(rotor_matrices(matrix_rotors(half_turns)), half_turns, atol=1e-15)


def test_stride_permutation_sends_a_groups_outputs_to_three_groups():
    order = stride_permutation(64)
    assert sorted(order) == list(range(64))
    position = np.argsort(order)  # where input i lands
    for g in range(21):
        assert len({position[3 * g + k] // 3 for k in range(3)}) == 3


@pytest.mark.parametrize("dim", [2, 16, 64, 80, 96, 128, 67])
def test_hadamard_rotation(dim):
    """Random signs then the normalized Walsh-Hadamard transform on power-of-two blocks: orthogonal, flat
    (every entry of a block +-1/sqrt(block)), and the fast transform equals the matrix."""
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=3, rotation="hadamard"))
    m = params.rotation_matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(dim), atol=1e-12)
    start = 0
    for size in hadamard_blocks(dim):
        np.testing.assert_allclose(np.abs(m[start : start + size, start : start + size]), size**-0.5, atol=1e-15)
        start += size
    u = RNG.standard_normal((5, dim))
    np.testing.assert_allclose(walsh_hadamard(params.signs * u), u @ m.T, atol=1e-13)
