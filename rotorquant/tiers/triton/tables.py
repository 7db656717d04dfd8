"""A spec's constants as the Triton kernels read them: tensors on the device, zero-padded to tile sizes.

Everything here is derived from `rotorquant.build_params` in float64 and converted once per (spec,
device, compute dtype), or once per (spec, device, dtype, scale) for the query maps of attention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton

from ...params import QuantParams

SQRT_HALF_PI = math.sqrt(math.pi / 2)


def pow2(n: int) -> int:
    """Smallest power of two >= max(n, 16) (tl.arange and tl.dot sizes)."""
    return max(16, triton.next_power_of_2(n))


@dataclass(frozen=True)
class Tables:
    """A spec's constants on one device in the compute dtype, zero-padded to kernel tile sizes.

    ``block_d`` = pow2(d), ``block_m`` = pow2(qjl_dim). ``fwd``/``inv``: the rotation's matrix ``R^T``/``R``
    ``(block_d, block_d)``, or for one rotor stage the weights ``(3, block_d)`` with
    ``fwd[i, c] = blocks[0, c//3, c%3, i]`` and ``inv[i, c] = blocks[0, c//3, i, c%3]``. ``rmat``: the whole rotation ``R`` padded
    (``x = y @ R``); ``rot_t``: ``(d, block_d)`` ``R^T`` (``Rot(q) = q @ rot_t``). QJL:
    ``proj`` = ``(S R^T)^T`` ``(block_d, block_m)``, ``smat`` = ``sqrt(pi/2)/m S`` ``(block_m, block_d)`` (the QJL
    scale folded in, in float64: a Python float kernel argument would reach the GPU as float32),
    ``sketch_t`` = ``S^T`` ``(d, block_m)``.
    """

    block_d: int
    block_m: int
    centroids: torch.Tensor
    boundaries: torch.Tensor
    fwd: torch.Tensor
    inv: torch.Tensor
    rmat: torch.Tensor
    rot_t: torch.Tensor
    proj: torch.Tensor | None
    smat: torch.Tensor | None
    sketch_t: torch.Tensor | None


def padded(a, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``a (r, c)`` (float64) zero-padded to ``shape``, converted to ``dtype`` on ``device``."""
    out = torch.zeros(shape, dtype=torch.float64)
    out[: a.shape[0], : a.shape[1]] = torch.tensor(np.asarray(a), dtype=torch.float64)
    return out.to(device=device, dtype=dtype)


def rotor_weights(blocks: np.ndarray, dim: int, block_d: int, transpose: bool) -> np.ndarray:
    """``(3, block_d)``: ``w[i, c]`` multiplies coordinate ``3*(c//3)+i`` to give output ``c`` (0 off the vector):
    ``blocks[c//3, c%3, i]``, or ``blocks[c//3, i, c%3]`` for the inverse (``transpose``)."""
    c = np.arange(dim)
    g, r = c // 3, c % 3
    w = np.zeros((3, block_d))
    for i in range(3):
        inside = 3 * g + i < dim
        w[i, :dim] = np.where(inside, blocks[g, i, r] if transpose else blocks[g, r, i], 0.0)
    return w


@functools.lru_cache(maxsize=64)
def tables(params: QuantParams, device: torch.device, dtype: torch.dtype) -> Tables:
    """``params``' `Tables` on ``device`` in ``dtype`` (cached)."""
    spec = params.spec
    if not np.array_equal(params.centroids, -params.centroids[::-1]):
        raise ValueError(
            "params.centroids: expected an antisymmetric codebook, c[k] = -c[2**bits - 1 - k] exactly (as "
            "build_params makes it; the kernels decode the lower half from the upper), got an asymmetric one"
        )
    d, bd, bm = spec.dim, pow2(spec.dim), pow2(spec.qjl_dim)
    rot = params.rotation_matrix()
    if params.single_stage:
        fwd = padded(rotor_weights(params.blocks[0], d, bd, transpose=False), (3, bd), device, dtype)
        inv = padded(rotor_weights(params.blocks[0], d, bd, transpose=True), (3, bd), device, dtype)
    else:
        fwd, inv = padded(rot.T, (bd, bd), device, dtype), padded(rot, (bd, bd), device, dtype)
    proj = smat = sketch_t = None
    if spec.qjl:
        s = params.qjl_matrix
        proj = padded(rot @ s.T, (bd, bm), device, dtype)
        smat = padded(s * (SQRT_HALF_PI / spec.qjl_dim), (bm, bd), device, dtype)
        sketch_t = padded(s.T, (d, bm), device, dtype)
    return Tables(
        block_d=bd,
        block_m=bm,
        centroids=torch.tensor(params.centroids, dtype=dtype, device=device),
        boundaries=torch.tensor(params.boundaries, dtype=dtype, device=device),
        fwd=fwd,
        inv=inv,
        rmat=padded(rot, (bd, bd), device, dtype),
        rot_t=padded(rot.T, (d, bd), device, dtype),
        proj=proj,
        smat=smat,
        sketch_t=sketch_t,
    )


@functools.lru_cache(maxsize=64)
def query_maps(params: QuantParams, device: torch.device, dtype: torch.dtype, factor: float) -> tuple:
    """``(f R^T, f sqrt(pi/2)/m S^T or None)`` zero-padded to ``(block_d, block_d)`` and ``(block_d, block_m)``,
    scaled in float64 then converted (``factor`` = f is the same on every call of an engine, so this is
    built once)."""
    spec = params.spec
    bd, bm = pow2(spec.dim), pow2(spec.qjl_dim)
    rot = params.rotation_matrix()
    sketch = None
    if spec.qjl:
        sketch = padded(params.qjl_matrix.T * (factor * SQRT_HALF_PI / spec.qjl_dim), (bd, bm), device, dtype)
    return padded(rot.T * factor, (bd, bd), device, dtype), sketch
