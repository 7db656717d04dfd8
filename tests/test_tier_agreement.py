"""Every tier against the NumPy reference in float64: one suite, every tier in `tiers.TIERS`.

Cases cross rotation x bits 1..8 x qjl x input dtype; dims (2, 3, 5, 67, 80, 96, 127, 128, 130, 256) and
leading shapes (none, (7,), (2, 3, 5)) cycle through them so that every value of every axis
meets every rotation and bit width. Slow tiers (Triton under the interpreter) get `SMALL_CASES`,
a 16-case cover in which every value of every axis still appears. Packing is one more axis: the
interleaved packing (codebook bits 2..4, dims 32, 96, 128) adds rotation x bits x qjl cases (dtype,
dim and leading shape cycling), and a 6-case cover for slow tiers; every tier reads and writes its
bytes.

What is checked (reference = `rotorquant.tiers.numpy` on the exact float64 values of the input):

- quantize: a code differs only where the reference coordinate lies within `tie_eps` of a
  decision boundary (a rounding tie), and at most 1e-4 of the codes (at least 1) differ apart from exact
  ties (within 1e-12 of a boundary, which any tier may round either way); packed
  bytes equal in every vector whose codes agree; norms and QJL fields close, QJL signs differ
  only where the reference projection is a tie.
- dequantize, scores, attention (fed the reference's code, so ties cannot leak in): flash-attention
  style budget ``max|tier - ref64| <= 2 max|naive torch in the same dtype - ref64| + atol`` (the naive
  error taken at least as large as one rounding of ref64 to the output dtype).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import rotorquant as rq
from rotorquant.format import repack_codes, unpack_codes
from rotorquant.tiers import numpy as ref
from tiers import SHORT, TIERS, Tier, code_to_numpy, exact_float64, to_numpy

ROTATIONS = ("rotor", "rotor-1", "hadamard", "dense")  # rotor-1: one rotor stage (the tiers' block path)
BITS = tuple(range(1, 9))
DIMS = (2, 3, 5, 67, 80, 96, 127, 128, 130, 256)  # 80, 96, 256: head dims of deployed models
LEADS = ((), (7,), (2, 3, 5))
DTYPES = ("float16", "bfloat16", "float32", "float64")
INTERLEAVED_MSE_BITS = (2, 3, 4)  # codebook bits of the interleaved packing
INTERLEAVED_DIMS = (32, 96, 128)
# atol of the error budgets, relative to max |reference|: covers float32 arithmetic of tiers that
# compute in float32 when the naive same-dtype baseline happens to round exactly.
ATOL = {"float16": 1e-5, "bfloat16": 1e-5, "float32": 1e-5, "float64": 1e-12}


@dataclass(frozen=True)
class Case:
    rotation: str
    bits: int
    qjl: bool
    dim: int
    lead: tuple[int, ...]
    dtype: str
    packing: str = "contiguous"

    @property
    def spec(self) -> rq.QuantizerSpec:
        rotation, _, stages = self.rotation.partition("-")
        return rq.QuantizerSpec(
            dim=self.dim, bits=self.bits, rotation=rotation, stages=int(stages) if stages else None, qjl=self.qjl,
            packing=self.packing,
        )  # fmt: skip

    @property
    def id(self) -> str:
        lead = "x".join(map(str, self.lead)) or "1"
        qjl = "-qjl" if self.qjl else ""
        packing = "-interleaved" if self.packing == "interleaved" else ""
        return f"{self.rotation}-b{self.bits}{qjl}-d{self.dim}-n{lead}-{SHORT[self.dtype]}{packing}"

    def rng(self, salt: str = "") -> np.random.Generator:
        return np.random.default_rng(zlib.crc32((self.id + salt).encode()))


def _full_cases() -> list[Case]:
    """Rotation x bits x qjl x dtype in full; dim and leading shape cycle at coprime rates."""
    combos = [
        (rot, bits, qjl, dtype)
        for rot, bits, qjl, dtype in itertools.product(ROTATIONS, BITS, (False, True), DTYPES)
        if bits >= 2 or not qjl
    ]
    return [Case(rot, b, q, DIMS[i % len(DIMS)], LEADS[i % len(LEADS)], dt) for i, (rot, b, q, dt) in enumerate(combos)]


def _small_cases() -> list[Case]:
    """16 cases in which every rotation, bit width, qjl flag, dim, leading shape and dtype appears."""
    cases = []
    for j in range(16):
        bits = BITS[j % len(BITS)]
        qjl = bits >= 2 and (j // 2) % 2 == 1
        dim, lead, dtype = DIMS[j % len(DIMS)], LEADS[j % len(LEADS)], DTYPES[j % len(DTYPES)]
        cases.append(Case(ROTATIONS[j % len(ROTATIONS)], bits, qjl, dim, lead, dtype))
    return cases


def _interleaved_cases(small: bool) -> list[Case]:
    """The interleaved packing: rotation x codebook bits 2..4 x qjl, with dtype, dim and leading shape cycling;
    ``small``: 6 cases in which every rotation, bit width, qjl flag, dim and dtype still appears."""
    combos = list(itertools.product(ROTATIONS, INTERLEAVED_MSE_BITS, (False, True)))
    if small:
        combos = [(ROTATIONS[j % len(ROTATIONS)], INTERLEAVED_MSE_BITS[j % 3], j >= 3) for j in range(6)]
    return [
        Case(rot, mse + qjl, qjl, INTERLEAVED_DIMS[(i + 1) % 3], LEADS[i % 3], DTYPES[i % 4], "interleaved")
        for i, (rot, mse, qjl) in enumerate(combos)
    ]


FULL_CASES = _full_cases() + _interleaved_cases(small=False)
SMALL_CASES = _small_cases() + _interleaved_cases(small=True)


def _pairs(cases_of) -> list:
    return [
        pytest.param(tier, case, id=f"{tier.name}-{case.id}")
        for tier in TIERS
        for case in cases_of(tier)
        if case.dtype in tier.dtypes
    ]


def _cases_for(tier: Tier) -> list[Case]:
    return SMALL_CASES if tier.slow else FULL_CASES


PAIRS = _pairs(_cases_for)


# ---------------------------------------------------------------- helpers


def assert_close(name: str, reference, out, *, baseline=None, dtype: str | None = None, atol: float = 0.0) -> None:
    """``max|out - reference| <= 2 * floor + atol * max(1, max|reference|)``, flash-attention style.

    ``floor`` is the larger of ``max|baseline - reference|`` (``baseline``: the naive torch computation
    in the tier's dtype, the error any same-dtype implementation may be expected to make) and the
    error of rounding the reference once to ``dtype`` (the output's dtype; no tier can beat that).
    On failure the message gives the max abs diff, the budget and the RMS ratio
    ``rms(out - ref) / rms(baseline - ref)``.
    """
    reference, out = to_numpy(reference), to_numpy(out)
    assert out.shape == reference.shape, f"{name}: expected shape {reference.shape}, got {out.shape}"
    assert np.isfinite(out).all(), f"{name}: output has NaN or Inf"
    err = np.abs(out - reference)
    max_err = float(err.max(initial=0.0))
    floor = 0.0 if baseline is None else float(np.abs(to_numpy(baseline) - reference).max(initial=0.0))
    if dtype is not None:
        rounded = to_numpy(torch.tensor(reference).to(_torch_dtype(dtype)))
        floor = max(floor, float(np.abs(rounded - reference).max(initial=0.0)))
    scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
    budget = 2 * floor + atol * scale
    rms = math.sqrt(float(np.mean(err**2))) if err.size else 0.0
    base_rms = 0.0 if baseline is None else math.sqrt(float(np.mean((to_numpy(baseline) - reference) ** 2)))
    ratio = rms / base_rms if base_rms else float("inf") if rms else 0.0
    assert max_err <= budget, (
        f"{name}: max abs diff {max_err:.3g} > budget {budget:.3g} "
        f"(2 x same-dtype error {floor:.3g} + atol {atol:g} x {scale:.3g}); RMS ratio to same-dtype {ratio:.3g}"
    )


def tie_eps(dtype: str) -> float:
    """How close to a boundary (in the rotated unit frame) a coordinate may be for its code to be a tie."""
    return 1e-9 if dtype == "float64" else 1e-6


def sample(case: Case, shape: tuple[int, ...], salt: str = "") -> np.ndarray:
    """Gaussian vectors with per-vector scales from 0.01 to 100; the first vector is zero."""
    rng = case.rng(salt)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, size=(*shape[:-1], 1))
    if x.ndim > 1:
        x.reshape(-1, shape[-1])[0] = 0.0
    return x


def reference_frame(x64: np.ndarray, params: rq.QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """``(norms, y)``: the reference's float64 norms and rotated unit vectors."""
    norms = np.linalg.norm(x64, axis=-1)
    unit = x64 / np.where(norms > 0, norms, 1.0)[..., None]
    return norms, ref.rotate(unit, params)


def near_boundary(y: np.ndarray, params: rq.QuantParams, eps: float) -> np.ndarray:
    """Coordinates within ``eps`` of a decision boundary (the nearest ones on either side)."""
    b = params.boundaries
    right = np.searchsorted(b, y).clip(0, len(b) - 1)
    left = (right - 1).clip(0, len(b) - 1)
    return np.minimum(np.abs(y - b[left]), np.abs(y - b[right])) <= eps


def codes_of(code: rq.Compressed) -> np.ndarray:
    """The integer codes ``(..., d)`` of a code with NumPy payload, read in its spec's packing."""
    spec = code.spec
    return unpack_codes(code.codes, spec.mse_bits, spec.dim, spec.packing)


def check_codes_agree(got: rq.Compressed, want: rq.Compressed, x64: np.ndarray, params: rq.QuantParams, dtype: str):
    """Codes equal except rounding ties (at most 1e-4 of them, at least 1 allowed); returns rows that agree."""
    got_idx, want_idx = codes_of(got), codes_of(want)
    diff = got_idx != want_idx
    _, y = reference_frame(x64, params)
    ties = near_boundary(y, params, tie_eps(dtype))
    bad = diff & ~ties
    assert not bad.any(), (
        f"codes: {int(bad.sum())} codes differ away from any decision boundary; first at "
        f"{np.argwhere(bad)[0].tolist()}: got {got_idx[bad][0]}, want {want_idx[bad][0]} (y={y[bad][0]:.9g})"
    )
    # Exact ties (a coordinate on a boundary to 1e-12, e.g. an exact cancellation in a rotor's rational
    # entries 1/3, 2/3 with low-precision inputs) may go either way in any tier; rounding ties may not be common.
    exact = near_boundary(y, params, 1e-12)
    rounding = diff & ~exact
    assert rounding.sum() <= max(1, 1e-4 * diff.size), f"codes: {int(rounding.sum())} of {diff.size} differ (ties)"
    return ~diff.any(axis=-1)


def check_quantize(tier: Tier, params: rq.QuantParams, x_in, dtype: str) -> None:
    spec = params.spec
    x64 = exact_float64(x_in)
    want = ref.quantize(x64, params)
    code = tier.module.quantize(x_in, params)
    assert code.dtype == dtype, f"code.dtype: expected {dtype!r}, got {code.dtype!r}"
    assert code.spec == spec
    got = code_to_numpy(code)
    for field in ("codes", "norms", "qjl_signs", "residual_norms"):
        g, w = getattr(got, field), getattr(want, field)
        assert (g is None) == (w is None), f"{field}: expected {'None' if w is None else 'an array'}"
        if w is not None:
            got_layout, want_layout = (g.dtype, g.shape), (w.dtype, w.shape)
            assert got_layout == want_layout, f"{field}: expected {want_layout}, got {got_layout}"
    agree = check_codes_agree(got, want, x64, params, dtype)
    np.testing.assert_array_equal(got.codes[agree], want.codes[agree], err_msg="packed bytes of agreeing codes")
    # with norm correction a tie-flipped code changes its row's ||c[k]|| (by about 1% for an outer level at 3
    # bits, d = 128), so those rows get a looser bound
    rows = agree if spec.norm_correction else np.ones_like(agree)
    np.testing.assert_allclose(got.norms[rows], want.norms[rows], rtol=1e-6, err_msg="norms")
    np.testing.assert_allclose(got.norms[~rows], want.norms[~rows], rtol=5e-2, err_msg="norms of rows with a tie")
    if spec.qjl:
        norms, _ = reference_frame(x64, params)
        levels = params.centroids[codes_of(want)]
        residual = x64 - norms[..., None] * ref.rotate(levels, params, inverse=True)
        projection = residual @ params.qjl_matrix.T
        tie = np.abs(projection) <= tie_eps(dtype) * np.linalg.norm(params.qjl_matrix, axis=-1) * norms[..., None]
        got_signs = unpack_codes(got.qjl_signs, 1, spec.qjl_dim)
        want_signs = unpack_codes(want.qjl_signs, 1, spec.qjl_dim)
        bad = (got_signs != want_signs) & ~tie & agree[..., None]
        assert not bad.any(), f"qjl_signs: {int(bad.sum())} signs differ away from a tie"
        err = np.abs(got.residual_norms.astype(np.float64) - want.residual_norms)
        assert np.all(err[agree] <= 1e-5 * norms[agree] + 1e-6 * want.residual_norms[agree]), "residual_norms"


# ---------------------------------------------------------------- naive same-dtype baselines (plain torch)


def naive_dequantize(code: rq.Compressed, params: rq.QuantParams, dtype: torch.dtype) -> torch.Tensor:
    """``s c[k] Rot (+ QJL)`` straight from the formulas, every operation in ``dtype`` on CPU."""
    spec = params.spec

    def t(a):
        return torch.tensor(np.asarray(a, dtype=np.float64), dtype=dtype)

    levels = t(params.centroids[codes_of(code)])
    x = (levels @ t(params.rotation_matrix())) * t(code.norms)[..., None]
    if spec.qjl:
        z = t(2.0 * unpack_codes(code.qjl_signs, 1, spec.qjl_dim) - 1.0)
        scale = code.residual_norms.astype(np.float64) * math.sqrt(math.pi / 2) / spec.qjl_dim
        x = x + t(scale)[..., None] * (z @ t(params.qjl_matrix))
    return x


def naive_attention(q, k_code, v_code, k_params, v_params, lengths, dtype, causal):
    k = naive_dequantize(k_code, k_params, dtype)
    v = naive_dequantize(v_code, v_params, dtype)
    batch, q_heads, q_len, dim = q.shape
    group = q_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    later = torch.arange(q_len - 1, -1, -1) if causal else torch.zeros(q_len, dtype=torch.int64)  # queries after t
    keep = torch.arange(k.shape[2]) < (torch.tensor(lengths)[:, None] - later)[:, None, :, None]
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _torch_dtype(dtype: str) -> torch.dtype:
    return getattr(torch, dtype)


def _check_output_dtype(tier: Tier, out, dtype: str) -> None:
    if tier.device is not None:
        assert out.dtype == _torch_dtype(dtype), f"output dtype: expected {dtype}, got {out.dtype}"
        assert out.device.type == torch.device(tier.device).type


# ---------------------------------------------------------------- the suite


@pytest.mark.parametrize("tier,case", PAIRS)
def test_quantize(tier: Tier, case: Case):
    params = rq.build_params(case.spec)
    x_in = tier.array(sample(case, (*case.lead, case.dim)), case.dtype)
    check_quantize(tier, params, x_in, case.dtype)
    if case.packing == "interleaved":  # the reference's interleaved bytes are its contiguous bytes, converted
        spec, x64 = case.spec, exact_float64(x_in)
        contiguous = ref.quantize(x64, rq.build_params(dataclasses.replace(spec, packing="contiguous"))).codes
        converted = repack_codes(contiguous, spec.mse_bits, spec.dim, "contiguous", "interleaved")
        np.testing.assert_array_equal(ref.quantize(x64, params).codes, converted)


@pytest.mark.parametrize("tier,case", PAIRS)
def test_dequantize(tier: Tier, case: Case):
    params = rq.build_params(case.spec)
    x64 = exact_float64(tier.array(sample(case, (*case.lead, case.dim)), case.dtype))
    want_code = ref.quantize(x64, params)
    out = tier.module.dequantize(tier.code(want_code, case.dtype), params)
    _check_output_dtype(tier, out, case.dtype)
    baseline = naive_dequantize(want_code, params, _torch_dtype(case.dtype))
    want = ref.dequantize(want_code, params)
    assert_close("dequantize", want, out, baseline=baseline, dtype=case.dtype, atol=ATOL[case.dtype])


@pytest.mark.parametrize("tier,case", PAIRS)
def test_scores(tier: Tier, case: Case):
    params = rq.build_params(case.spec)
    x64 = exact_float64(tier.array(sample(case, (*case.lead, 6, case.dim)), case.dtype))
    q_in = tier.array(sample(case, (*case.lead, 3, case.dim), salt="q") / 100.0, case.dtype)
    q64 = exact_float64(q_in)
    want_code = ref.quantize(x64, params)
    out = tier.module.scores(q_in, tier.code(want_code, case.dtype), params)
    _check_output_dtype(tier, out, case.dtype)
    dtype = _torch_dtype(case.dtype)
    baseline = torch.tensor(q64, dtype=dtype) @ naive_dequantize(want_code, params, dtype).transpose(-1, -2)
    want = ref.scores(q64, want_code, params)
    assert_close("scores", want, out, baseline=baseline, dtype=case.dtype, atol=ATOL[case.dtype])


ATTENTION_PAIRS = [p for p in PAIRS if p.values[1].lead == ()] + [
    p for p in PAIRS if p.values[0].slow and p.values[1].lead != ()
]


@pytest.mark.parametrize("tier,case", ATTENTION_PAIRS)
def test_attention(tier: Tier, case: Case):
    """GQA decode attention (4 query heads on 2 KV heads, 3 queries) with per-sequence lengths; causal
    among the 3 queries for even bit widths."""
    k_params = rq.build_params(case.spec)
    v_bits = max(1, case.bits - 1)  # V interleaved too where its codebook bits allow it
    v_packing = case.packing if v_bits in INTERLEAVED_MSE_BITS else "contiguous"
    v_spec = dataclasses.replace(case.spec, bits=v_bits, qjl=False, qjl_dim=None, seed=1, packing=v_packing)
    v_params = rq.build_params(v_spec)
    lengths = [5, 3]
    k64 = exact_float64(tier.array(sample(case, (2, 2, 5, case.dim), salt="k"), case.dtype))
    v64 = exact_float64(tier.array(sample(case, (2, 2, 5, case.dim), salt="v"), case.dtype))
    q_in = tier.array(sample(case, (2, 4, 3, case.dim), salt="q") / 10.0, case.dtype)
    q64 = exact_float64(q_in)
    k_code, v_code = ref.quantize(k64, k_params), ref.quantize(v64, v_params)
    causal = case.bits % 2 == 0
    want = ref.attention(q64, k_code, v_code, k_params, v_params, lengths=np.array(lengths), causal=causal)
    out = tier.module.attention(
        q_in, tier.code(k_code, case.dtype), tier.code(v_code, case.dtype), k_params, v_params,
        lengths=tier_lengths(tier, lengths), causal=causal,
    )
    _check_output_dtype(tier, out, case.dtype)
    dtype = _torch_dtype(case.dtype)
    q_base = torch.tensor(q64, dtype=dtype)
    baseline = naive_attention(q_base, k_code, v_code, k_params, v_params, lengths, dtype, causal)
    assert_close("attention", want, out, baseline=baseline, dtype=case.dtype, atol=ATOL[case.dtype])


def tier_lengths(tier: Tier, lengths: list[int]):
    if tier.device is None:
        return np.array(lengths)
    return torch.tensor(lengths, device=tier.device)


LARGE = [
    pytest.param(tier, rotation, bits, dtype, rows, id=f"{tier.name}-{rotation}-b{bits}-d128-n{rows}-{SHORT[dtype]}")
    for tier in TIERS
    if tier.name != "numpy"
    for rows in ((1024,) if tier.slow else (4096,))
    for rotation in ROTATIONS
    for bits in ((3,) if tier.slow else (1, 3, 8))
    for dtype in (("float32",) if tier.slow else ("float16", "float32"))
]


@pytest.mark.parametrize("tier,rotation,bits,dtype,rows", LARGE)
def test_quantize_large(tier: Tier, rotation: str, bits: int, dtype: str, rows: int):
    """rows x 128 vectors (4096: 524288 codes): at most 1e-4 of the codes may differ, and only at ties."""
    case = Case(rotation, bits, False, 128, (rows,), dtype)
    params = rq.build_params(case.spec)
    check_quantize(tier, params, tier.array(sample(case, (rows, 128)), dtype), dtype)


def test_every_axis_value_is_covered():
    """The pruned cross-product still meets every value of every axis, in both case lists, in each packing."""
    for cases in (FULL_CASES, SMALL_CASES):
        contiguous = [c for c in cases if c.packing == "contiguous"]
        assert {c.rotation for c in contiguous} == set(ROTATIONS)
        assert {c.bits for c in contiguous} == set(BITS)
        assert {c.qjl for c in contiguous} == {False, True}
        assert {c.dim for c in contiguous} == set(DIMS)
        assert {c.lead for c in contiguous} == set(LEADS)
        assert {c.dtype for c in contiguous} == set(DTYPES)
        interleaved = [c for c in cases if c.packing == "interleaved"]
        assert {c.rotation for c in interleaved} == set(ROTATIONS)
        assert {c.spec.mse_bits for c in interleaved} == set(INTERLEAVED_MSE_BITS)
        assert {c.qjl for c in interleaved} == {False, True}
        assert {c.dim for c in interleaved} == set(INTERLEAVED_DIMS)
        assert {c.dtype for c in interleaved} == set(DTYPES)
    contiguous = [c for c in FULL_CASES if c.packing == "contiguous"]
    pairs = {(c.rotation, c.dim) for c in contiguous}
    assert pairs == set(itertools.product(ROTATIONS, DIMS)), "every dim meets every rotation"
    assert len({(c.bits, c.lead) for c in contiguous}) == len(BITS) * len(LEADS), "every bits value meets every lead"


def test_round_trip_shapes(tier: Tier):
    """Smoke test over the `tier` fixture: shapes, payload size and finite reconstructions."""
    spec = rq.QuantizerSpec(dim=67, bits=3, qjl=True)
    params = rq.build_params(spec)
    x = tier.array(sample(Case("rotor", 3, True, 67, (7,), "float32"), (2, 7, 67)), "float32")
    code = tier.module.quantize(x, params)
    assert code.shape == (2, 7) and code.nbytes == 14 * spec.bytes_per_vector
    assert to_numpy(tier.module.dequantize(code, params)).shape == (2, 7, 67)
