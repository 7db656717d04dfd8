"""Torch-tier specifics: dtypes, layouts, devices, errors, the rotor path, memory, determinism.

Agreement with the reference over the whole parameter grid lives in test_tier_agreement.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import rotorquant as rq
from rotorquant.math import cl3
from rotorquant.format import pack_codes, unpack_codes
from rotorquant.tiers import numpy as ref
from rotorquant.tiers import torch as tt
from tiers import TORCH_TIERS, code_to_numpy

DEVICES = [t.device for t in TORCH_TIERS]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def params_of(**kw) -> rq.QuantParams:
    return rq.build_params(rq.QuantizerSpec(**{"dim": 128, "bits": 3, **kw}))


def gaussian(*shape, seed=0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def assert_same_code(a: rq.Compressed, b: rq.Compressed) -> None:
    for field in ("codes", "norms", "qjl_signs", "residual_norms"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), field


# ---------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_round_trip(device, dtype):
    """Payload dtypes are fixed by the format; the reconstruction comes back in the input dtype and device."""
    params = params_of(bits=4, qjl=True)
    x = gaussian(5, 3, 128, dtype=dtype, device=device)
    code = tt.quantize(x, params)
    assert code.dtype == str(dtype).removeprefix("torch.")
    assert code.codes.dtype == torch.uint8 and code.codes.shape == (5, 3, params.spec.code_bytes)
    assert code.norms.dtype == torch.float32 and code.norms.shape == (5, 3)
    assert code.qjl_signs.dtype == torch.uint8 and code.residual_norms.dtype == torch.float32
    assert all(t.device == x.device for t in (code.codes, code.norms, code.qjl_signs, code.residual_norms))
    x_hat = tt.dequantize(code, params)
    assert x_hat.dtype == dtype and x_hat.device == x.device and x_hat.shape == x.shape
    rel = float(((x_hat.double() - x.double()).norm(dim=-1) / x.double().norm(dim=-1)).mean())
    assert rel < 0.25, f"relative reconstruction error {rel:.3f} at 4 bits with QJL"
    q = gaussian(5, 2, 128, seed=1, dtype=dtype, device=device)
    out = tt.scores(q, code, params)
    assert out.dtype == dtype and out.shape == (5, 2, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """Transposed and strided views quantize exactly like their contiguous copies."""
    params = params_of(rotation="dense", bits=5, qjl=True)
    base = gaussian(128, 40, device=device)
    x = base.T[::2]  # (20, 128), column-major rows, every other one
    assert not x.is_contiguous()
    assert_same_code(tt.quantize(x, params), tt.quantize(x.contiguous(), params))
    code = tt.quantize(x.contiguous(), params)
    q = gaussian(128, 6, seed=2, device=device).T
    torch.testing.assert_close(tt.scores(q, code, params), tt.scores(q.contiguous(), code, params))


def test_chunking_is_invisible(monkeypatch):
    """Rows split into many chunks (with a ragged last one) give the same bytes as one chunk, for one rotor
    stage (elementwise arithmetic; a matrix rotation goes through BLAS, whose kernels, picked by shape, may
    round differently per chunk)."""
    params = params_of(dim=67, bits=6, qjl=True, stages=1)
    x = gaussian(1001, 67)
    whole = tt.quantize(x, params)
    x_hat = tt.dequantize(whole, params)
    monkeypatch.setitem(tt._CHUNK_ELEMENTS, "cpu", 67 * 37)
    assert_same_code(tt.quantize(x, params), whole)
    torch.testing.assert_close(tt.dequantize(whole, params), x_hat, rtol=0, atol=0)


def test_empty_batch():
    params = params_of(qjl=True)
    code = tt.quantize(torch.zeros(0, 128), params)
    assert code.shape == (0,) and tt.dequantize(code, params).shape == (0, 128)


def test_zero_vector_reconstructs_exactly_zero():
    for qjl in (False, True):
        params = params_of(qjl=qjl)
        x = gaussian(3, 128)
        x[1] = 0
        x_hat = tt.dequantize(tt.quantize(x, params), params)
        assert torch.all(x_hat[1] == 0)


# ---------------------------------------------------------------- numerics at the edges of float32


@pytest.mark.parametrize("scale", [2e38, 1e-30, 1e-42], ids=["near-fp32-max", "tiny", "subnormal"])
def test_extreme_norms_match_reference(scale):
    """Norms up to float32 max and down to subnormals: no overflow/underflow, same codes as float64."""
    params = params_of(dim=67, bits=4)
    x = (gaussian(16, 67, dtype=torch.float64) / math.sqrt(67) * scale).float()
    if scale > 1:
        assert float(x.double().norm(dim=-1).max()) > 1e38  # sum of squares overflows float32
    want = ref.quantize(x.double().numpy(), params)
    got = code_to_numpy(tt.quantize(x, params))
    diff = unpack_codes(got.codes, 4, 67) != unpack_codes(want.codes, 4, 67)
    tolerance = 1 if scale > 1e-40 else 16  # subnormal inputs keep only a few significant bits
    assert diff.sum() <= tolerance
    np.testing.assert_allclose(got.norms, want.norms, rtol=1e-6)


def test_norm_dtype_overflow_raises():
    params = params_of(norm_dtype="float16")
    with pytest.raises(ValueError, match=r"x: expected vector norms <= 65504 .* got a norm of"):
        tt.quantize(torch.full((2, 128), 1e4), params)


@pytest.mark.parametrize(
    "kw", [dict(norm_correction=True), dict(norm_dtype="float16"), dict(qjl=True, qjl_dim=50), dict(dim=130, seed=7)]
)
def test_spec_options_match_reference(kw):
    """Options outside the agreement grid: norm correction, float16 norms, qjl_dim != dim, other seeds."""
    params = params_of(**kw)
    x = gaussian(64, params.spec.dim, dtype=torch.float64)
    want = ref.quantize(x.numpy(), params)
    got = code_to_numpy(tt.quantize(x, params))
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_allclose(got.norms, want.norms, rtol=1e-6)
    if params.spec.qjl:
        np.testing.assert_array_equal(got.qjl_signs, want.qjl_signs)
    x_hat = tt.dequantize(tt.quantize(x, params), params)
    np.testing.assert_allclose(x_hat.numpy(), ref.dequantize(want, params), rtol=0, atol=1e-12 * float(x.abs().max()))


# ---------------------------------------------------------------- the rotor path


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 67, 128])
def test_rotor_blocks_equal_clifford_sandwich(dim):
    """The diagonal/partner form of one stage of 3x3 blocks is the clifford sandwich R v R~ (and its inverse)."""
    params = params_of(dim=dim, stages=1)
    u = gaussian(9, dim, dtype=torch.float64)
    groups = -(-dim // 3)
    padded = np.zeros((9, 3 * groups))
    padded[:, :dim] = u.numpy()
    rotors = params.rotors[0]
    for inverse in (False, True):
        sandwich = cl3.rotate_groups(padded.reshape(9, groups, 3), rotors, inverse).reshape(9, -1)[:, :dim]
        np.testing.assert_allclose(tt.rotate(u, params, inverse=inverse).numpy(), sandwich, rtol=0, atol=1e-13)


def test_rotate_inverse_is_transpose():
    for rotation in ("rotor", "hadamard", "dense"):
        params = params_of(dim=130, rotation=rotation)
        u = gaussian(4, 130, dtype=torch.float64)
        torch.testing.assert_close(tt.rotate(tt.rotate(u, params), params, inverse=True), u, rtol=0, atol=1e-13)


def test_pack_bits_is_the_documented_format():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for d in (1, 5, 8, 67, 130):
            codes = rng.integers(0, 2**bits, size=(3, d))
            packed = tt.pack_bits(torch.from_numpy(codes), bits)
            np.testing.assert_array_equal(packed.numpy(), pack_codes(codes, bits))
            np.testing.assert_array_equal(tt.unpack_bits(packed, bits, d).numpy(), codes)


def test_boundary_grid_matches_searchsorted():
    """The nearest-centroid table gives #{b_i <= y} exactly, including values on the boundaries."""
    for dim, bits in [(2, 8), (3, 1), (128, 3), (128, 8), (130, 5)]:
        params = params_of(dim=dim, bits=bits)
        dp = tt.device_params(params, torch.device("cpu"), torch.float64)
        b = params.boundaries
        y = np.concatenate([np.linspace(-1.1, 1.1, 20001), b, np.nextafter(b, -np.inf), np.nextafter(b, np.inf)])
        got = tt._nearest_centroid(torch.from_numpy(y * dp.grid_scale), dp).numpy()
        want = np.searchsorted(b, y, side="right")
        np.testing.assert_array_equal(got[: 20001 + len(b)], want[: 20001 + len(b)])
        # One ulp from a boundary, scaling y onto the grid may round onto the boundary: a tie.
        assert np.all(np.abs(got - want) <= 1) and np.mean(got != want) < 0.05


def test_device_params_cached_per_spec_device_dtype():
    params = params_of(qjl=True)
    a = tt.device_params(params, torch.device("cpu"), torch.float32)
    assert tt.device_params(params, torch.device("cpu"), torch.float32) is a
    assert tt.device_params(params, torch.device("cpu"), torch.float64) is not a


# ---------------------------------------------------------------- scores and attention shapes


def test_scores_broadcast_leading_shapes():
    params = params_of(dim=5, bits=4, qjl=True)
    x = gaussian(1, 3, 6, 5, dtype=torch.float64)
    q = gaussian(2, 1, 4, 5, seed=1, dtype=torch.float64)
    code = tt.quantize(x, params)
    out = tt.scores(q, code, params)
    assert out.shape == (2, 3, 4, 6)
    want = ref.scores(q.numpy(), ref.quantize(x.numpy(), params), params)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)


def test_attention_scale_and_full_length():
    kp, vp = params_of(dim=5, bits=3), params_of(dim=5, bits=2, rotation="dense")
    k, v = gaussian(1, 1, 4, 5, dtype=torch.float64), gaussian(1, 1, 4, 5, seed=1, dtype=torch.float64)
    q = gaussian(1, 2, 3, 5, seed=2, dtype=torch.float64)
    kc, vc = ref.quantize(k.numpy(), kp), ref.quantize(v.numpy(), vp)
    want = ref.attention(q.numpy(), kc, vc, kp, vp, scale=0.3)
    got = tt.attention(q, tt.quantize(k, kp), tt.quantize(v, vp), kp, vp, scale=0.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- errors


@pytest.fixture
def small():
    params = params_of(dim=5)
    return params, tt.quantize(gaussian(2, 4, 5), params)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.tensor([[1.0, float("nan"), 0, 0, 0]]), ValueError, r"x: expected finite values, got NaN or Inf"),
        (torch.tensor([[1.0, float("inf"), 0, 0, 0]]), ValueError, r"x: expected finite values, got NaN or Inf"),
        (torch.zeros(3, 4), ValueError, r"x: expected shape \(\.\.\., 5\), got \(3, 4\)"),
        (torch.zeros(3, 5, dtype=torch.int32), TypeError, r"x: expected a real floating-point dtype, got int32"),
        (torch.zeros(3, 5, dtype=torch.complex64), TypeError, r"x: expected a real floating-point dtype, got complex"),
        (np.zeros((3, 5)), TypeError, r"x: expected a torch.Tensor, got ndarray"),
    ],
    ids=["nan", "inf", "dim", "int", "complex", "numpy"],
)
def test_quantize_errors(bad, error, message):
    with pytest.raises(error, match=message):
        tt.quantize(bad, params_of(dim=5))


def test_code_for_another_spec(small):
    params, code = small
    other = params_of(dim=5, bits=4)
    with pytest.raises(ValueError, match=r"code: expected a code built for .*bits=4.*, got one built for .*bits=3"):
        tt.dequantize(code, other)
    with pytest.raises(ValueError, match=r"code: expected a code built for"):
        tt.scores(torch.zeros(1, 5), code, other)


def test_code_from_numpy_tier(small):
    params, _ = small
    with pytest.raises(TypeError, match=r"code.codes: expected a torch.Tensor, got ndarray \(an array of the numpy tier"):
        tt.dequantize(ref.quantize(np.zeros((2, 5)), params), params)


def test_code_on_another_device_than_query(small):
    """Names both devices. The meta device stands in for a GPU on machines without one."""
    params, code = small
    elsewhere = rq.Compressed(code.codes.to("meta"), code.norms.to("meta"), code.spec, code.dtype)
    with pytest.raises(ValueError, match=r"code: expected device cpu \(as q\), got meta"):
        tt.scores(torch.zeros(1, 5), elsewhere, params)
    q = torch.zeros(2, 2, 1, 5)
    k = rq.Compressed(code.codes.view(2, 1, 4, -1), code.norms.view(2, 1, 4), code.spec, code.dtype)
    v = rq.Compressed(k.codes.to("meta"), k.norms.to("meta"), k.spec, k.dtype)
    with pytest.raises(ValueError, match=r"v_code: expected device cpu \(as q\), got meta"):
        tt.attention(q, k, v, params, params)
    with pytest.raises(ValueError, match=r"k_code: expected device cpu \(as q\), got meta"):
        tt.attention(q, v, k, params, params)


def test_scores_errors(small):
    params, code = small
    with pytest.raises(ValueError, match=r"q: expected finite values"):
        tt.scores(torch.full((1, 5), float("nan")), code, params)
    with pytest.raises(ValueError, match=r"q: expected shape \(\.\.\., M, dim\)"):
        tt.scores(torch.zeros(5), code, params)
    with pytest.raises(ValueError, match=r"q: leading shape \(3,\) does not broadcast with code's \(2,\)"):
        tt.scores(torch.zeros(3, 1, 5), code, params)


def test_attention_length_errors(small):
    params, code = small
    k = rq.Compressed(code.codes.view(2, 1, 4, -1), code.norms.view(2, 1, 4), code.spec, code.dtype)
    q = torch.zeros(2, 2, 1, 5)
    with pytest.raises(ValueError, match=r"lengths: expected values in 1\.\.4, got values in 0\.\.2"):
        tt.attention(q, k, k, params, params, lengths=[0, 2])
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\), got \(3,\)"):
        tt.attention(q, k, k, params, params, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"lengths: expected values in 2\.\.4 \(causal=True: .*got values in 1\.\.4"):
        tt.attention(torch.zeros(2, 2, 2, 5), k, k, params, params, lengths=[4, 1], causal=True)
    with pytest.raises(ValueError, match=r"q: expected at most kv_len=4 queries with causal=True, got q_len=5"):
        tt.attention(torch.zeros(2, 2, 5, 5), k, k, params, params, causal=True)
    with pytest.raises(TypeError, match=r"causal: expected a bool, got int"):
        tt.attention(q, k, k, params, params, causal=1)
    with pytest.raises(TypeError, match=r"lengths: expected integers, got dtype float32"):
        tt.attention(q, k, k, params, params, lengths=[2.5, 1.0])


def test_attention_causal_without_lengths_matches_reference():
    """``causal=True`` with ``lengths=None``: every sequence holds all N keys, the T queries are the last T."""
    kp, vp = rq.build_params(rq.QuantizerSpec(dim=12, bits=3)), rq.build_params(rq.QuantizerSpec(dim=12, bits=2))
    g = torch.Generator().manual_seed(3)
    shapes = ((2, 4, 3, 12), (2, 2, 7, 12), (2, 2, 7, 12))
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes)
    kc, vc = ref.quantize(k.numpy(), kp), ref.quantize(v.numpy(), vp)
    want = ref.attention(q.numpy(), kc, vc, kp, vp, causal=True)
    got = tt.attention(q, tt.quantize(k, kp), tt.quantize(v, vp), kp, vp, causal=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert not np.allclose(want, ref.attention(q.numpy(), kc, vc, kp, vp))


def test_bad_code_dtype_name(small):
    params, code = small
    with pytest.raises(ValueError, match=r"code.dtype: expected one of .*got 'int8'"):
        tt.dequantize(rq.Compressed(code.codes, code.norms, code.spec, "int8"), params)


# ---------------------------------------------------------------- determinism and memory


def test_deterministic_across_calls_and_caches():
    params = params_of(dim=130, bits=5, qjl=True)
    x = gaussian(300, 130)
    first = tt.quantize(x, params)
    tt._DEVICE_PARAMS.clear()
    assert_same_code(tt.quantize(x, params), first)
    assert torch.equal(tt.dequantize(first, params), tt.dequantize(first, params))


_MEMORY_PROBE = """
import json, resource, sys, torch
import rotorquant as rq
from rotorquant.tiers import torch as tt
torch.set_num_threads(1)
n, d, bits = int(sys.argv[1]), 128, 8
params = rq.build_params(rq.QuantizerSpec(dim=d, bits=bits))
tt.dequantize(tt.quantize(torch.randn(64, d), params), params)  # warm-up: params, allocator
x = torch.randn(n, d)
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
code = tt.quantize(x, params)
after_quantize = peak()
x_hat = tt.dequantize(code, params)
after_dequantize = peak()
print(json.dumps(dict(input=x.nbytes, code=code.nbytes, quantize=after_quantize - base,
                      dequantize=after_dequantize - after_quantize, output=x_hat.nbytes)))
"""


def test_memory_stays_near_the_payload():
    """262144 x 128 float32 (128 MiB) at 8 bits, in a fresh process: quantize's peak memory grows by
    little more than the 33 MiB payload, dequantize's by little more than its 128 MiB output; a
    per-call (n, d, 2**bits) or unchunked int64 intermediate would add 256 MiB or more."""
    run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "262144"], capture_output=True, text=True, check=True)
    m = json.loads(run.stdout)
    assert m["quantize"] <= m["code"] + 0.25 * m["input"], m
    assert m["dequantize"] <= m["output"] + 0.25 * m["input"], m
