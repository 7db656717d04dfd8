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

    ``block_d`` = pow2(d), ``block_m`` = pow2(qjl_dim). ``fwd``: ``R^T`` for quantize, in float32 compute as
    its float16 split (`split_rotation`), in float64 ``(block_d, block_d)``. ``inv``: ``R`` ``(block_d, block_d)``
    for dequantize, or for one rotor stage the weights ``(3, block_d)`` of `rotor_weights`. ``rmat``: the whole rotation ``R`` padded
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


def rotor_weights(blocks: np.ndarray, dim: int, block_d: int) -> np.ndarray:
    """``(3, block_d)``: the inverse of one rotor stage as weights, ``w[i, c] = blocks[c//3, i, c%3]`` multiplies
    coordinate ``3*(c//3)+i`` to give output ``c`` (0 off the vector)."""
    c = np.arange(dim)
    g, r = c // 3, c % 3
    w = np.zeros((3, block_d))
    for i in range(3):
        w[i, :dim] = np.where(3 * g + i < dim, blocks[g, i, r], 0.0)
    return w


def transposed_tiles(block_d: int) -> bool:
    """Whether the split rotation's columns are 8x8-transposed in each 64-column block (`split_rotation`): for
    ``64 <= block_d <= 256``, and then the quantize kernel's chunks are multiples of 64 columns (wider rows
    take narrower chunks, so that a chunk's two table halves stay within 64 KiB)."""
    return 64 <= block_d <= 256


def split_rotation(rot_t: np.ndarray, block_d: int, device: torch.device) -> torch.Tensor:
    """``(2, block_d, block_d)`` float16 ``[2**11 hi, 2**11 lo]`` of ``rot_t (d, d)`` zero-padded, with
    ``hi = fp16(R^T)`` and ``lo = fp16(2**11 (R^T - hi)) / 2**11``: ``hi + lo`` is ``R^T`` to about ``2**-22``
    (each entry of a rotation is at most 1, so 2**11 hi stays below 2048 and lo is no float16 subnormal
    but for entries below 2**-14), which the tensor cores multiply by float16 operands exactly. Column ``j``
    holds coordinate `rotorquant.kernels.bitstream.tile_coordinates` ``(j)`` where `transposed_tiles`."""
    full = padded(rot_t, (block_d, block_d), torch.device("cpu"), torch.float64)
    if transposed_tiles(block_d):
        j = torch.arange(block_d)
        full = full[:, (j // 64) * 64 + (j % 8) * 8 + (j % 64) // 8]
    hi = full.to(torch.float16)
    lo = ((full - hi.double()) * 2048.0).to(torch.float16)
    return torch.stack([hi * 2048.0, lo]).to(device)


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
        inv = padded(rotor_weights(params.blocks[0], d, bd), (3, bd), device, dtype)
    else:
        inv = padded(rot, (bd, bd), device, dtype)
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
        fwd=split_rotation(rot.T, bd, device) if dtype == torch.float32 else padded(rot.T, (bd, bd), device, dtype),
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
