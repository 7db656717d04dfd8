"""The torch tier: the reference algorithm vectorized over batches, on any torch device.

Same functions and signatures as `rotorquant.tiers.numpy`; inputs are torch tensors of any
leading shape in float16, bfloat16, float32 or float64, on CPU or CUDA. Per vector ``x (d,)``
(``c`` = centroids, ``b`` = boundaries):

    s = ||x||,  u = x / s                    normalize (rows float32 cannot hold: in float64)
    y = Rot u                                one rotor stage: 3x3 blocks as 3 diagonals + 2 column
                                             gathers; every other rotation (the rotor butterfly,
                                             Hadamard, dense): one matmul with its matrix (`LinearMap`)
    k_j = #{i : y_j >= b_i}                  a boundary grid: base[t] + (y_j >= next[t]),
                                             never a (n, d, 2**bits) tensor (`boundary_grid`)
    codes                                    8 one-byte codes -> one int64 -> 3 shift/mask steps
                                             -> ``bits`` little-endian bytes (`pack_bits`), or the
                                             interleaved packing (`rotorquant.format`)
    with QJL:  r = s (u - Rot^T c[k]),  signs = (S r >= 0),  ||r||

Arithmetic runs in float64 for float64 inputs and in float32 otherwise; outputs come back in
the input's dtype (`dequantize`) or the query's dtype (`scores`, `attention`). Rows are processed
in chunks, so no intermediate grows beyond a few times one chunk. Constants come from
`rotorquant.build_params` only, converted once per (spec, device, dtype) and cached.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .. import calibration as calibrated
from .. import checks
from ..engine import attention as engine_attention
from ..engine import slots as engine_slots
from ..format import PAYLOAD_FIELDS, Compressed
from ..spec import INTERLEAVED_CHUNK, Packing
from ..params import QuantParams
from .tensors import NORM_DTYPES, TENSORS, compute_dtype, dtype_name, output_dtype

# Elements of one chunk of rows: small enough to stay in a CPU's L2/L3 cache, large enough
# that a GPU launches few kernels.
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_GPU_CHUNK_ELEMENTS = 1 << 24
# float32 norms are exact to rounding between these bounds; rows outside (or zero) are redone in float64.
_SAFE_NORM_RANGE = (1e-15, 1e18)

if sys.byteorder != "little":  # pragma: no cover - every torch platform is little-endian
    raise ImportError("rotorquant.tiers.torch packs codes through little-endian int64 views")


@dataclass(frozen=True, eq=False)
class LinearMap:
    """A rotation ``y = A u`` of row vectors ``u (n, d)`` in its cheapest exact form.

    Dense: ``matrix_t = A^T`` and ``y = u @ matrix_t``. Block diagonal (rotors): the three
    nonzeros of row ``i`` of ``A`` sit in columns ``partners[k, i]`` (``k = 0, 1, 2``; the
    coordinates of ``i``'s own 3-group, ``partners[0, i] = i``), so

        y_i = sum_k diagonals[k, i] * u[partners[k, i]]

    three contiguous multiply-adds and two column gathers, O(d) per vector.
    """

    matrix_t: torch.Tensor | None
    diagonals: torch.Tensor | None
    partners: torch.Tensor | None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` -> ``(n, d)``."""
        if self.matrix_t is not None:
            return u @ self.matrix_t
        y = u * self.diagonals[0]
        y.addcmul_(u.index_select(1, self.partners[1]), self.diagonals[1])
        y.addcmul_(u.index_select(1, self.partners[2]), self.diagonals[2])
        return y


def block_diagonals(blocks: np.ndarray, dim: int, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(diagonals (3, d), partners (3, d))`` of the block-diagonal map of ``blocks (ceil(d/3), 3, 3)``.

    Row ``i = 3g + a`` of group ``g`` (``m`` = its size, 3 or the ``d % 3`` tail) reads column
    ``3g + (a + k) % m`` with weight ``M_g[a, (a + k) % m]`` (``M_g^T`` when ``transpose``); the
    weight is 0 for ``k >= m`` so a short tail group is not counted twice.
    """
    i = np.arange(dim)
    g, a = i // 3, i % 3
    size = np.minimum(3, dim - 3 * g)
    k = np.arange(3)[:, None]
    j = (a + k) % size
    weights = blocks[g, j, a] if transpose else blocks[g, a, j]
    return np.where(k < size, weights, 0.0), 3 * g + j


@dataclass(frozen=True, eq=False)
class DeviceParams:
    """`QuantParams` converted to tensors of one device and compute dtype.

    Attributes:
        source: the `QuantParams` they came from (cache identity check).
        centroids: ``(2**mse_bits,)``.
        forward, inverse: the rotation ``Rot`` and ``Rot^T`` as `LinearMap`.
        scaled_forward: ``grid_scale * Rot``, which lands directly on the boundary grid.
        qjl_matrix: ``(m, d)``, or None without QJL.
        grid_offset, grid_scale, grid_base, grid_next: the nearest-centroid table of `boundary_grid`
            (``grid_next`` multiplied by ``grid_scale``).
    """

    source: QuantParams
    centroids: torch.Tensor
    forward: LinearMap
    inverse: LinearMap
    scaled_forward: LinearMap
    qjl_matrix: torch.Tensor | None
    grid_offset: float
    grid_scale: float
    grid_base: torch.Tensor
    grid_next: torch.Tensor


def boundary_grid(boundaries: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(offset, scale, base, next)``: a uniform grid over the boundaries with at most one per cell.

    Cell ``t = floor(y * scale + offset)`` (clamped to the table) covers ``[e_t, e_t + h)`` with
    ``h = 1 / scale = (smallest gap) / 2``. With ``base[t] = #{i : b_i < e_t}`` and
    ``next[t] = b[base[t]]`` (the first boundary at or after ``e_t``; +inf if none),

        #{i : b_i <= y} = base[t] + (y >= next[t])

    two table reads and one comparison instead of a binary search. Rounding ``t`` can change the
    answer only for ``y`` within float rounding of a boundary. Tables hold about 4 * 2**bits cells.
    """
    gap = float(np.diff(boundaries).min()) if len(boundaries) > 1 else 1.0
    step = gap / 2
    lo = float(boundaries[0]) - step
    cells = int(math.ceil((float(boundaries[-1]) - lo) / step)) + 2
    base = np.searchsorted(boundaries, lo + step * np.arange(cells), side="left")
    following = np.append(boundaries, np.inf)[base]
    return -lo / step, 1.0 / step, base, following


_DEVICE_PARAMS: dict[tuple, DeviceParams] = {}
_DEVICE_PARAMS_SIZE = 256  # entries kept; the oldest goes first (as build_params' own cache)


def device_params(params: QuantParams, device: torch.device, dtype: torch.dtype) -> DeviceParams:
    """``params`` as tensors on ``device`` in ``dtype``; converted once per (spec, device, dtype)."""
    key = (params.spec, torch.device(device), dtype)
    cached = _DEVICE_PARAMS.get(key)
    if cached is not None and cached.source is params:
        return cached

    def put(a, as_dtype=dtype):
        return None if a is None else torch.tensor(a, dtype=as_dtype, device=device)

    def linear(transpose: bool, scale: float = 1.0) -> LinearMap:
        if not params.single_stage:
            return LinearMap(put(scale * (params.matrix if transpose else params.matrix.T)), None, None)
        diagonals, partners = block_diagonals(params.blocks[0], params.spec.dim, transpose)
        return LinearMap(None, put(scale * diagonals), put(partners, torch.int64))

    offset, scale, base, following = boundary_grid(params.boundaries)
    entry = DeviceParams(
        source=params,
        centroids=put(params.centroids),
        forward=linear(False),
        inverse=linear(True),
        scaled_forward=linear(False, scale),
        qjl_matrix=put(params.qjl_matrix),
        grid_offset=offset,
        grid_scale=scale,
        grid_base=put(base, torch.uint8),
        grid_next=put(scale * following),
    )
    _DEVICE_PARAMS.pop(key, None)
    while len(_DEVICE_PARAMS) >= _DEVICE_PARAMS_SIZE:
        _DEVICE_PARAMS.pop(next(iter(_DEVICE_PARAMS)))
    _DEVICE_PARAMS[key] = entry
    return entry


# ---------------------------------------------------------------- rotation


def rotate(u: torch.Tensor, params: QuantParams, inverse: bool = False) -> torch.Tensor:
    """``(..., d)`` -> ``(..., d)``: the spec's rotation (``inverse=True``: its transpose), in ``u``'s dtype
    (computed in float32, or float64 for float64 input)."""
    checks.check_params(params)
    u = TENSORS.vectors("u", u, params.spec.dim)
    dp = device_params(params, u.device, compute_dtype(u.dtype))
    flat = u.reshape(-1, params.spec.dim).to(dp.centroids.dtype)
    return (dp.inverse if inverse else dp.forward)(flat).to(u.dtype).reshape(u.shape)


# ---------------------------------------------------------------- bit packing


def _signed(mask: int) -> int:
    """A 64-bit pattern as the int64 value torch needs."""
    return mask - (1 << 64) if mask >= 1 << 63 else mask


def _merge_steps(bits: int) -> list[tuple[int, int, int]]:
    """``(shift, keep, move)`` of the three steps that squeeze 8 byte-spaced codes into ``8*bits`` bits.

    Before step ``s`` (0, 1, 2) the word holds groups of ``2**s`` packed codes, ``2**s * bits``
    bits wide, at offsets ``8 * 2**s * k``. Step ``s`` moves every odd group down by
    ``2**s * (8 - bits)`` bits, right behind its even neighbour: ``w = (w & keep) | ((w >> shift) & move)``.
    """
    steps = []
    for s in range(3):
        width, spacing = (1 << s) * bits, 8 << s
        keep = move = 0
        for m in range(0, 64, 2 * spacing):
            keep |= ((1 << width) - 1) << m
            move |= ((1 << width) - 1) << (m + width)
        steps.append(((1 << s) * (8 - bits), _signed(keep), _signed(move)))
    return steps


def pack_bits(codes: torch.Tensor, bits: int, packing: Packing = Packing.CONTIGUOUS) -> torch.Tensor:
    """``(n, d)`` integer codes in ``[0, 2**bits)`` -> ``(n, ceil(d*bits/8))`` uint8, the documented stream
    (``packing``: a `Packing` the spec has already checked against ``bits`` and ``d``).

    Eight codes as bytes read as one little-endian int64 ``w = sum_i k_i << 8i``; three shift-and-mask
    steps (`_merge_steps`) turn it into ``sum_i k_i << (i*bits)``, whose ``bits`` low bytes are exactly
    the stream bytes of those eight codes. Intermediates are one byte per code.
    """
    if packing is Packing.INTERLEAVED:
        return _pack_interleaved(codes, bits)
    n, d = codes.shape
    words = -(-d // 8)
    wide = codes.to(torch.uint8)
    if d % 8:
        wide = torch.nn.functional.pad(wide, (0, 8 * words - d))
    w = wide.contiguous().view(torch.int64)  # (n, words)
    for shift, keep, move in _merge_steps(bits):
        if shift:
            w = (w & keep) | ((w >> shift) & move)
    stream = w.view(torch.uint8).view(n, words, 8)[..., :bits].reshape(n, words * bits)
    return stream[:, : -(-d * bits // 8)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int, packing: Packing = Packing.CONTIGUOUS) -> torch.Tensor:
    """Inverse of `pack_bits`: ``(n, ceil(count*bits/8))`` uint8 -> ``(n, count)`` uint8 codes.

    Each ``bits`` stream bytes widen to one int64 word (high bytes zero); the merge steps run
    backwards, ``w = (w & keep) | ((w & move) << shift)``, leaving code ``i`` in byte ``i``.
    """
    if packing is Packing.INTERLEAVED:
        return _unpack_interleaved(packed, bits, count)
    n, nbytes = packed.shape
    words = -(-count // 8)
    wide = torch.zeros(n, words, 8, dtype=torch.uint8, device=packed.device)
    flat = torch.nn.functional.pad(packed, (0, words * bits - nbytes)) if words * bits != nbytes else packed
    wide[..., :bits] = flat.reshape(n, words, bits)
    w = wide.view(torch.int64).view(n, words)
    for shift, keep, move in reversed(_merge_steps(bits)):
        if shift:
            w = (w & keep) | ((w & move) << shift)
    return w.view(torch.uint8).view(n, 8 * words)[:, :count]


def _interleave_shifts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(4n for nibble n (8,), 8i for byte i (4,))``, int64."""
    return 4 * torch.arange(8, device=device), 8 * torch.arange(4, device=device)


def _pack_interleaved(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_bits` for the interleaved packing (`rotorquant.format`): ``(n, d)`` -> ``(n, d*bits/8)`` uint8.

    With ``G_g[n]`` the code of coordinate ``32c + 8g + n``, nibble ``n`` of chunk ``c``'s word in plane ``p`` is
    ``G_p[n] | G_{p+2}[n] << 2`` (2 bits), ``G_p[n] | (bit p of G_3[n]) << 3`` (3 bits), or ``m(G_p[n]) |
    t(G_p[4h + j]) << 3`` for ``n = 2j + h`` (4 bits: ``m`` the magnitude index, ``t`` the top bit).
    """
    n, d = codes.shape
    chunks = d // INTERLEAVED_CHUNK
    nibbles, bytes_ = _interleave_shifts(codes.device)
    k = codes.to(torch.int64)
    # [c, g, n]: coordinate 32c + 8g + n (4 bits: its magnitude index, k - 8 in the upper half, 7 - k in the lower)
    g = (k if bits < 4 else torch.where(k >= 8, k - 8, 7 - k)).view(n, chunks, 4, 8)
    if bits == 2:
        planes = [g[:, :, 0] | g[:, :, 2] << 2, g[:, :, 1] | g[:, :, 3] << 2]
    elif bits == 3:
        planes = [g[:, :, p] | ((g[:, :, 3] >> p) & 1) << 3 for p in range(3)]
    else:  # [c, g, 2j + h]: the top bit of G_g[4h + j], at bit 3
        top = (k >> 3).view(n, chunks, 4, 2, 4).transpose(-2, -1).reshape(n, chunks, 4, 8)
        planes = [g[:, :, p] | top[:, :, p] << 3 for p in range(4)]
    words = [(nib << nibbles).sum(-1) for nib in planes]  # disjoint bits: the sum is an or
    w = torch.stack(words, 1)  # (n, bits, C)
    return ((w[..., None] >> bytes_) & 255).to(torch.uint8).view(n, bits * chunks * 4)


def _unpack_interleaved(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `_pack_interleaved`: ``(n, count*bits/8)`` uint8 -> ``(n, count)`` uint8 codes."""
    n = packed.shape[0]
    chunks = count // INTERLEAVED_CHUNK
    nibbles, bytes_ = _interleave_shifts(packed.device)
    w = (packed.reshape(n, bits, chunks, 4).to(torch.int64) << bytes_).sum(-1)  # (n, bits, C)
    nib = (w[..., None] >> nibbles) & 15  # (n, bits, C, 8)
    if bits == 2:
        groups = [nib[:, 0] & 3, nib[:, 1] & 3, nib[:, 0] >> 2, nib[:, 1] >> 2]
    elif bits == 3:
        spread = ((nib[:, 0] >> 3) & 1) | ((nib[:, 1] >> 2) & 2) | ((nib[:, 2] >> 1) & 4)
        groups = [nib[:, 0] & 7, nib[:, 1] & 7, nib[:, 2] & 7, spread]
    else:
        m, top = nib & 7, (nib >> 3).view(n, bits, chunks, 4, 2).transpose(-2, -1).reshape(nib.shape)  # [.., 4h + j]
        groups = list(torch.where(top == 1, m + 8, 7 - m).unbind(1))
    k = torch.stack(groups, 2).view(n, count)  # (n, C, 4, 8) in coordinate order
    return k.to(torch.uint8)


# ---------------------------------------------------------------- quantize


def _rows(dim: int, device: torch.device) -> int:
    """Rows per chunk on ``device``."""
    return max(1, _CHUNK_ELEMENTS.get(device.type, _GPU_CHUNK_ELEMENTS) // dim)


def _norms(flat: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``||x||`` per row ``(n,)`` in ``compute`` dtype, free of float32 overflow and underflow.

    float32 sums of squares overflow above ``||x|| ~ 1.8e19`` and lose tiny rows; those rows
    (few or none) are recomputed in float64, which holds any float32 vector's norm.
    """
    s = torch.linalg.vector_norm(flat, dim=-1, dtype=compute)
    if compute == torch.float64:
        return s
    lo, hi = _SAFE_NORM_RANGE
    redo = ~((s > lo) & (s < hi))  # also NaN: redone in float64, still NaN, caught by the finite check
    if bool(redo.any()):
        s64 = torch.linalg.vector_norm(flat[redo].to(torch.float64), dim=-1)
        s = s.to(torch.float64)
        s[redo] = s64
    return s


def _nearest_centroid(y_scaled: torch.Tensor, dp: DeviceParams) -> torch.Tensor:
    """``k = #{i : y >= b_i}`` elementwise (uint8) from ``y_scaled = grid_scale * y`` via `boundary_grid`."""
    # NaN (from a vector that `quantize(validate=False)` stores with a non-finite norm) goes to cell 0:
    # an index, whatever the input, stays in range
    cell = (y_scaled + dp.grid_offset).nan_to_num_(0.0).clamp_(0, len(dp.grid_base) - 1).to(torch.int32).view(-1)
    above = y_scaled.view(-1) >= dp.grid_next.index_select(0, cell)
    return dp.grid_base.index_select(0, cell).add_(above).view(y_scaled.shape)


def _stored_norms(values: torch.Tensor, norm_dtype: torch.dtype) -> torch.Tensor:
    """``values`` cast to ``norm_dtype``, every value past its largest finite one Inf (a plain cast rounds
    values up to half an ulp past it down to that largest value, e.g. float16's 65504)."""
    return torch.where(values > torch.finfo(norm_dtype).max, float("inf"), values).to(norm_dtype)


def _quantize_rows(x: torch.Tensor, s: torch.Tensor, dp: DeviceParams, params: QuantParams, out: dict) -> torch.Tensor | None:
    """Quantize rows ``x (n, d)`` with norms ``s (n,)`` into the slices ``out[field] (n, ...)``; returns the
    largest norm to store with norm correction and the largest QJL residual norm (0-dim tensors, or None
    without norm correction or QJL; past the norm dtype they are stored as Inf)."""
    spec = params.spec
    compute = dp.centroids.dtype
    safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
    # Norms outside float32's comfortable range come as float64 (see `_norms`): divide in float64.
    u = (x.to(safe.dtype) / safe).to(compute) if safe.dtype != compute else x.to(compute) / safe
    idx = _nearest_centroid(dp.scaled_forward(u), dp)
    out["codes"][:] = pack_bits(idx, spec.mse_bits, spec.packing)
    scale = s
    if spec.norm_correction or spec.qjl:
        levels = dp.centroids.index_select(0, idx.view(-1).to(torch.int32)).view(idx.shape)
        if spec.norm_correction:
            scale = s / torch.linalg.vector_norm(levels, dim=-1, dtype=torch.float64)
    out["norms"][:] = _stored_norms(scale, out["norms"].dtype)
    if spec.qjl:
        unit_residual = u - dp.inverse(levels)  # r = s * unit_residual
        projected = unit_residual @ dp.qjl_matrix.T
        out["qjl_signs"][:] = pack_bits(projected * (s > 0)[:, None].to(compute) >= 0, 1)
        rnorm = s * torch.linalg.vector_norm(unit_residual, dim=-1, dtype=torch.float64)
        out["residual_norms"][:] = _stored_norms(rnorm, out["residual_norms"].dtype)
    return (scale.amax() if spec.norm_correction else None), (rnorm.amax() if spec.qjl else None)


def _check_norms(flat: torch.Tensor, s: torch.Tensor, norm_dtype: torch.dtype, spec) -> None:
    """The rows ``flat (n, d)`` are finite and their norms ``s (n,)`` fit ``norm_dtype``."""
    if not bool(torch.isfinite(s).all()):
        checks.check_finite("x", bool(torch.isfinite(flat).all()))
    max_norm = float(s.max()) if s.numel() else 0.0
    checks.check_norms_fit("x", max_norm, float(torch.finfo(norm_dtype).max), spec.norm_dtype.value)


def quantize(x: torch.Tensor, params: QuantParams, *, calibration=None, validate: bool = True) -> Compressed:
    """Compress vectors ``x (..., d)`` into a `Compressed` of leading shape ``(...)`` on ``x``'s device.

    ``validate=False`` skips the checks that read values (``x`` finite, every norm within the spec's
    norm dtype; a vector that would fail them is stored with a non-finite norm, so it decodes to
    non-finite values). One host synchronization remains: rows whose float32 norm is extreme are
    found and redone in float64.
    ``calibration``: a `rotorquant.Calibration` fitted for ``params``: the code of ``A (x - mu)``, carrying the
    calibration, which `dequantize` and `scores` then undo (`rotorquant.calibration.quantize_with`).
    """
    checks.check_params(params)
    spec = params.spec
    validate = checks.check_bool("validate", validate)
    if calibration is not None:
        return calibrated.quantize_with(quantize, x, params, calibration, validate)
    x = TENSORS.vectors("x", x, spec.dim)
    compute = compute_dtype(x.dtype)
    dp = device_params(params, x.device, compute)
    lead = tuple(x.shape[:-1])
    flat = x.reshape(-1, spec.dim)
    if flat.stride(-1) != 1:  # rows reduce in one order whatever the input's layout
        flat = flat.contiguous()
    n = flat.shape[0]
    s = _norms(flat, compute)
    norm_dtype = NORM_DTYPES[spec.norm_dtype]
    if validate:
        _check_norms(flat, s, norm_dtype, spec)

    def empty(width, dtype):
        shape = (n,) if width is None else (n, width)
        return torch.empty(shape, dtype=dtype, device=x.device)

    out = {"codes": empty(spec.code_bytes, torch.uint8), "norms": empty(None, norm_dtype)}
    if spec.qjl:
        out["qjl_signs"] = empty(spec.sign_bytes, torch.uint8)
        out["residual_norms"] = empty(None, norm_dtype)
    step = _rows(spec.dim, x.device)
    largest = []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        largest.append(_quantize_rows(flat[rows], s[rows], dp, params, {k: v[rows] for k, v in out.items()}))
    limit = float(torch.finfo(norm_dtype).max)
    if validate and spec.norm_correction and largest:
        biggest = float(torch.stack([c for c, _ in largest]).max())
        checks.check_norms_fit("x", biggest, limit, spec.norm_dtype.value, corrected=True)
    if validate and spec.qjl and largest:
        biggest = float(torch.stack([r for _, r in largest]).max())
        checks.check_norms_fit("x", biggest, limit, spec.norm_dtype.value, residual=True)
    fields = {k: v.reshape((*lead, *v.shape[1:])) for k, v in out.items()}
    return Compressed(spec=spec, dtype=dtype_name(x.dtype), **fields)


def quantize_into(x: torch.Tensor, params: QuantParams, cache: Compressed, slots, *, validate: bool = True) -> None:
    """Compress ``x (..., d)`` and write vector ``i`` into ``cache`` at flat index ``slots[i]``, in place: the
    reference's `rotorquant.tiers.numpy.quantize_into` on torch tensors (``cache`` and ``slots`` on ``x``'s
    device), written once for every tier in `rotorquant.engine.slots`. This tier quantizes, then copies, and
    synchronizes with the host even with ``validate=False`` (to redo extreme float32 norms).
    """
    engine_slots.quantize_into(TENSORS, quantize, x, params, cache, slots, validate=validate)


# ---------------------------------------------------------------- dequantize, scores, attention


def _flat_fields(code: Compressed) -> dict[str, torch.Tensor]:
    """The payload of ``code`` as rows: ``codes (n, code_bytes)``, ``norms (n,)`` and the QJL fields."""
    n = math.prod(code.shape)
    fields = {f: getattr(code, f) for f in PAYLOAD_FIELDS}
    return {k: v.reshape(n, *v.shape[len(code.shape) :]) for k, v in fields.items() if v is not None}


def _in_chunks(rows: dict[str, torch.Tensor], width: int, fn, out: torch.Tensor) -> torch.Tensor:
    """``out[chunk] = fn(rows[chunk])`` over chunks of rows; returns ``out (n, width)``."""
    n = out.shape[0]
    step = _rows(width, out.device)
    for start in range(0, n, step):
        chunk = slice(start, start + step)
        out[chunk] = fn({k: v[chunk] for k, v in rows.items()})
    return out


def _levels(rows: dict[str, torch.Tensor], dp: DeviceParams, spec) -> torch.Tensor:
    """``c[k]``: the rotated-frame reconstruction of the unit vectors, ``(n, d)``."""
    idx = unpack_bits(rows["codes"], spec.mse_bits, spec.dim, spec.packing)
    return dp.centroids.index_select(0, idx.reshape(-1).to(torch.int32)).view(idx.shape)


def _signs(rows: dict[str, torch.Tensor], dp: DeviceParams, spec) -> torch.Tensor:
    """``z = sign(S r)`` as ``(n, m)`` in {-1, +1}."""
    bits = unpack_bits(rows["qjl_signs"], 1, spec.qjl_dim)
    return bits.to(dp.centroids.dtype).mul_(2).sub_(1)


def _qjl_scale(rows: dict[str, torch.Tensor], spec, dtype: torch.dtype) -> torch.Tensor:
    """``||r|| sqrt(pi/2) / m`` per vector ``(n,)``."""
    return rows["residual_norms"].to(dtype) * (math.sqrt(math.pi / 2) / spec.qjl_dim)


def _dequantize_rows(rows: dict[str, torch.Tensor], dp: DeviceParams, spec) -> torch.Tensor:
    """``(n, d)`` reconstructions in the compute dtype: ``s Rot^T c[k]`` (+ the QJL term)."""
    compute = dp.centroids.dtype
    x_hat = dp.inverse(_levels(rows, dp, spec)).mul_(rows["norms"].to(compute)[:, None])
    if spec.qjl:
        x_hat.addcmul_(_qjl_scale(rows, spec, compute)[:, None], _signs(rows, dp, spec) @ dp.qjl_matrix)
    return x_hat


def _dequantize(code: Compressed, params: QuantParams, dtype: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    """``(n, d)`` reconstructions in ``dtype``, computed chunk by chunk in ``compute``. The values of rows with
    finite norms saturate at ``dtype``'s largest finite value (a float16 reconstruction may exceed 65504 where
    its input did not, and one whose norm is near the float32 maximum may overflow float32); rows with NaN or
    Inf norms keep their NaN and Inf."""
    spec = params.spec
    dp = device_params(params, code.codes.device, compute)
    rows = _flat_fields(code)
    out = torch.empty(rows["codes"].shape[0], spec.dim, dtype=dtype, device=code.codes.device)
    top = torch.finfo(dtype).max

    def chunk_values(chunk):
        x = _dequantize_rows(chunk, dp, spec)
        finite = torch.isfinite(chunk["norms"])
        if spec.qjl:
            finite &= torch.isfinite(chunk["residual_norms"])
        return torch.where(finite[:, None], x.clamp(-top, top), x)

    return _in_chunks(rows, spec.dim, chunk_values, out)


def dequantize(code: Compressed, params: QuantParams) -> torch.Tensor:
    """Reconstruct ``(..., d)`` vectors in the input's dtype ``code.dtype``:
    ``x_mse = s Rot^T c[k]`` (+ ``||r|| sqrt(pi/2)/m S^T z`` with QJL)."""
    checks.check_params(params)
    if getattr(code, "calibration", None) is not None:
        return calibrated.dequantize_with(dequantize, code, params)
    checks.check_code("code", code, params, TENSORS)
    dtype = output_dtype(code)
    return _dequantize(code, params, dtype, compute_dtype(dtype)).reshape(*code.shape, params.spec.dim)


def scores(q: torch.Tensor, code: Compressed, params: QuantParams) -> torch.Tensor:
    """Estimates of ``q @ x.T``: ``q (..., M, d)`` against a code of leading shape ``(..., N)`` -> ``(..., M, N)``
    in ``q``'s dtype.

    Without QJL ``s_n (Rot q_m) . c[k_n]`` (= ``q . x_mse``); with QJL plus ``||r|| sqrt(pi/2)/m <S q, z>``;
    against a calibrated code ``(A^-1 q) . x' + q . mu``.
    """
    checks.check_params(params)
    if getattr(code, "calibration", None) is not None:
        return calibrated.scores_with(scores, q, code, params)
    checks.check_code("code", code, params, TENSORS)
    q = TENSORS.vectors("q", q, params.spec.dim)
    checks.check_finite("q", TENSORS.all_finite(q))
    checks.check_min_ndim("q", tuple(q.shape), 2, "(..., M, dim)")
    checks.check_min_ndim("code", code.shape, 1, "(..., N)")
    TENSORS.check_device("code", code.codes, q, "q")
    try:
        torch.broadcast_shapes(tuple(q.shape[:-2]), code.shape[:-1])
    except RuntimeError:
        raise checks.broadcast_error("q", tuple(q.shape[:-2]), "code", code.shape[:-1]) from None
    return _scores(q, code, params).to(q.dtype)


def _scores(q: torch.Tensor, code: Compressed, params: QuantParams) -> torch.Tensor:
    """`scores` of checked queries ``q (..., M, d)``, in their compute dtype."""
    spec = params.spec
    compute = compute_dtype(q.dtype)
    dp = device_params(params, q.device, compute)
    qc = q.to(compute)
    # q . (s Rot^T c) = s (Rot q) . c: rotate the M queries instead of the N keys.
    rotated_q = dp.forward(qc.reshape(-1, spec.dim)).reshape(qc.shape)
    rows = _flat_fields(code)
    n = rows["codes"].shape[0]
    levels = torch.empty(n, spec.dim, dtype=compute, device=q.device)
    levels = _in_chunks(rows, spec.dim, lambda chunk: _levels(chunk, dp, spec), levels)
    norms = rows["norms"].to(compute).view(code.shape)
    out = (rotated_q @ levels.view(*code.shape, spec.dim).transpose(-1, -2)) * norms[..., None, :]
    if spec.qjl:
        sketch = qc @ dp.qjl_matrix.T  # (..., M, m)
        signs = torch.empty(n, spec.qjl_dim, dtype=compute, device=q.device)
        signs = _in_chunks(rows, spec.qjl_dim, lambda chunk: _signs(chunk, dp, spec), signs)
        qjl = _qjl_scale(rows, spec, compute).view(code.shape)
        out = out + (sketch @ signs.view(*code.shape, spec.qjl_dim).transpose(-1, -2)) * qjl[..., None, :]
    return out


def masked_attention(q, k_code, v_code, k_params, v_params, scale: float, visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of query rows ``q (B, Hkv, R, d)`` over caches of leading shape ``(B, Hkv, N)``, row
    ``r`` of sequence ``b`` seeing the keys ``n < visible[b, r]`` (the reference's
    `rotorquant.tiers.numpy.masked_attention`), computed in ``q``'s compute dtype, returned in ``q``'s dtype."""
    s = _scores(q, k_code, k_params) * scale
    keep = torch.arange(s.shape[-1], device=s.device) < visible[:, None, :, None]
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    v = _dequantize(v_code, v_params, s.dtype, s.dtype)
    out = p @ v.view(*v_code.shape, v_params.spec.dim)
    top = torch.finfo(q.dtype).max  # a finite output past q's range (values reconstructed past it) saturates
    return torch.where(out.isfinite(), out.clamp(-top, top), out).to(q.dtype)


def attention(
    q, k_code, v_code, k_params, v_params, *, scale=None, lengths=None, causal=False, validate=True, block_table=None
) -> torch.Tensor:
    """Decode attention over a compressed K/V cache, in ``q``'s dtype: the reference's
    `rotorquant.tiers.numpy.attention` on torch tensors (caches, lengths and block tables on ``q``'s device,
    or host lengths), written once for every tier in `rotorquant.engine.attention`.

    ``validate=False`` skips the checks that read values (``q`` finite, ``lengths`` and block ids in range),
    so the call never synchronizes with the host when ``lengths`` is None or a tensor on ``q``'s device.
    Paged caches (``block_table``) are gathered into the logical cache.
    """
    return engine_attention.run(
        TENSORS, masked_attention, q, k_code, v_code, k_params, v_params, scale=scale, lengths=lengths,
        causal=causal, validate=validate, block_table=block_table,
    )  # fmt: skip
