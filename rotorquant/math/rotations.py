"""The rotation families, as data drawn from one generator: the rotor butterfly and the randomized Hadamard.

**Rotor butterfly** (``rotation="rotor"``). ``S`` stages; stage ``s`` first reorders its input by a fixed
permutation (none before the first stage; the stride-3 shuffle `stride_permutation` before every other),
then rotates each group of coordinates ``(3g, 3g+1, 3g+2)`` by its own rotor, ``v -> R v R~``:

    u_0 = u,   u_s = B_s (u_{s-1}[perm_s]),   y = u_S            (B_s block diagonal, one rotor per group)

The last ``d % 3`` coordinates form a short group: two are turned by a Cl(2) rotor (a plane rotation), one
is left as is. Each rotor is an equalizing rotation (`rotorquant.math.rotors.equalizing_rotors`) in a random
orientation: one stage spreads a coordinate's energy over its group of three as evenly as three dimensions
allow (1/9, 4/9, 4/9), and the stride-3 shuffle sends the three outputs of a group to three different
groups of the next stage: a radix-3 butterfly made of rotors, O(d) work per stage. After ``S = ceil(log3 d)``
stages (`default_stages`) every coordinate has mixed with every other when ``d`` is a power of 3; at the other
dims tested (32 to 256) at least 90% of the (input, output) pairs are mixed, though not evenly for every
input (at d = 64 the last coordinate, alone in its group in the first stage, reaches 27 outputs). Measured
on real decoder keys, these ``S`` stages quantize as well as a dense rotation (``docs/benchmarks/decoder.md``).

**Randomized Hadamard** (``rotation="hadamard"``). Random signs, then a normalized Walsh-Hadamard
transform on consecutive power-of-two blocks taken greedily from the front (`hadamard_blocks`: 80 = 64 + 16,
96 = 64 + 32; one block when ``d`` is a power of two):

    y = H (s * u),   H = diag(H_64, H_16, ...),   H_n = H_2 (x) ... (x) H_2 / sqrt(n),   s_i = +-1

Both draw integers and uniform doubles only, and compute with correctly rounded operations (products,
sums, square roots): their parameters are bit-identical on every IEEE machine. A dense Haar rotation
(``rotation="dense"``) takes the QR factorization of a Gaussian matrix: its Gaussian sampler evaluates
``exp`` and ``log`` (the C math library) in its rare tails and QR runs in LAPACK, whose blocking depends on
the build, so dense rotations are pinned only per machine.
"""

from __future__ import annotations

import numpy as np

from .rotors import equalizing_plane_rotor, equalizing_rotors, rotor_matrices


def default_stages(dim: int) -> int:
    """``ceil(log3 dim)`` (at least 1): the butterfly stages after which every coordinate has mixed with (nearly)
    every other. Computed with integers: the smallest ``S`` with ``3**S >= dim``."""
    stages = 1
    while 3**stages < dim:
        stages += 1
    return stages


def stride_permutation(dim: int) -> np.ndarray:
    """``(dim,)`` the stride-3 shuffle ``[0, 3, 6, ..., 1, 4, 7, ..., 2, 5, 8, ...]``: input ``order[p]`` moves to
    position ``p``, so the three outputs ``3g, 3g+1, 3g+2`` of a group land in three different groups (for
    ``dim = 3**k`` it is the base-3 digit rotation of a radix-3 FFT)."""
    return np.concatenate([np.arange(r, dim, 3) for r in range(3)])


def rotor_butterfly(rng: np.random.Generator, dim: int, stages: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rotors (S, G, 4), permutations (S, dim))`` of an ``S``-stage butterfly, ``G = ceil(dim / 3)``: row ``g``
    of stage ``s`` is the rotor of group ``g`` (the last row turns the ``dim % 3`` short group: a plane rotor
    ``(s, b12, 0, 0)`` for two coordinates, the identity for one); stage ``s`` reads its input in the order
    ``permutations[s]`` (the identity for ``s = 0``, `stride_permutation` after)."""
    full, short = divmod(dim, 3)
    rotors = []
    for _ in range(stages):
        stage = equalizing_rotors(rng, full)
        if short == 2:
            stage = np.vstack([stage, equalizing_plane_rotor(rng)])
        elif short == 1:
            stage = np.vstack([stage, [1.0, 0.0, 0.0, 0.0]])
        rotors.append(stage)
    order = stride_permutation(dim)
    permutations = np.stack([np.arange(dim)] + [order] * (stages - 1))
    return np.stack(rotors), permutations


def butterfly_matrix(rotors: np.ndarray, permutations: np.ndarray) -> np.ndarray:
    """The ``(dim, dim)`` matrix ``M`` with ``y = M u`` of the butterfly ``(rotors, permutations)``."""
    dim = permutations.shape[1]
    blocks = rotor_matrices(rotors)  # (S, G, 3, 3)
    m = np.eye(dim)
    for stage_blocks, order in zip(blocks, permutations):
        m = m[order]  # u[order]: rows of the map so far, reordered
        padded = np.zeros((3 * len(stage_blocks), dim))
        padded[:dim] = m
        groups = padded.reshape(len(stage_blocks), 3, dim)
        m = np.einsum("gij,gjk->gik", stage_blocks, groups).reshape(-1, dim)[:dim]
    return m


def hadamard_blocks(dim: int) -> list[int]:
    """The power-of-two block sizes of the Hadamard rotation of ``dim`` coordinates, largest first."""
    sizes, left = [], dim
    while left:
        sizes.append(1 << (left.bit_length() - 1))
        left -= sizes[-1]
    return sizes


def hadamard_signs(rng: np.random.Generator, dim: int) -> np.ndarray:
    """``(dim,)`` random signs +-1 of the randomized Hadamard rotation."""
    return 1.0 - 2.0 * rng.integers(0, 2, size=dim)


def walsh_hadamard(u: np.ndarray) -> np.ndarray:
    """``(..., dim)`` -> ``(..., dim)``: the normalized Walsh-Hadamard transform ``H`` on the `hadamard_blocks` of
    the last axis, by butterflies ``(a, b) -> (a + b, a - b) / sqrt(2)``. ``H`` is symmetric and orthogonal:
    it is its own inverse."""
    out, start = np.array(u, dtype=np.float64), 0
    for size in hadamard_blocks(u.shape[-1]):
        block = out[..., start : start + size]
        half = 1
        while half < size:
            pairs = block.reshape(*block.shape[:-1], size // (2 * half), 2, half)
            a, b = pairs[..., 0, :].copy(), pairs[..., 1, :].copy()
            pairs[..., 0, :], pairs[..., 1, :] = (a + b) / np.sqrt(2.0), (a - b) / np.sqrt(2.0)
            block = pairs.reshape(block.shape)
            half *= 2
        out[..., start : start + size] = block
        start += size
    return out


def hadamard_matrix(signs: np.ndarray) -> np.ndarray:
    """The ``(dim, dim)`` matrix ``M = H diag(signs)`` of the randomized Hadamard rotation."""
    return walsh_hadamard(np.eye(len(signs))).T * signs
