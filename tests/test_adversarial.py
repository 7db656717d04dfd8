"""Regressions from an adversarial pass over the public API, in every tier: no silent wrong data, no crash
without a clear message.

- QJL residual norms past a float16 norm dtype: refused when checked, Inf (never finite) when not;
- float16 and bfloat16 inputs near their largest value decode to finite values (saturated), NaN stays NaN;
- a code whose norm is the float32 maximum decodes to finite values (saturated where float32 overflows);
- tampered payloads (a field of another dtype, shape or array library, a list) are refused by name;
- scores against an empty code have shape ``(..., M, 0)``;
- a bad softmax scale is refused by name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import rotorquant as rq
from tiers import TIERS, to_numpy

torch = pytest.importorskip("torch")

QJL_FP16 = rq.QuantizerSpec(dim=64, bits=2, qjl=True, norm_dtype="float16", stages=1)
ONE_HOT = np.array([[6e4] + [0.0] * 63])  # one rotor stage keeps it in 3 coordinates: ||r|| = 68617 > 65504


def _kind(tier) -> str:
    return tier.module.__name__.rsplit(".", 1)[-1]


def test_qjl_residual_norms_past_float16_are_refused_or_infinite(tier):
    params = rq.build_params(QJL_FP16)
    x = tier.array(ONE_HOT, "float32")
    with pytest.raises(ValueError, match=r"x: expected QJL residual norms \|\|x - x_mse\|\| <= 65504 .* got a norm of 68"):
        tier.module.quantize(x, params)
    code = tier.module.quantize(x, params, validate=False)
    assert np.isinf(to_numpy(code.residual_norms)).all() and np.isfinite(to_numpy(code.norms)).all()
    assert not np.isfinite(to_numpy(tier.module.dequantize(code, params))).all()


@pytest.mark.parametrize("dtype, big", [("float16", 65504.0), ("bfloat16", 3.3e38)])
def test_inputs_near_the_dtype_max_decode_to_finite_values(tier, dtype, big):
    """A reconstruction may exceed the largest finite value of its input's dtype where the input did not; it
    saturates to that value. A non-finite norm (unchecked input) still decodes to non-finite values."""
    if dtype not in tier.dtypes:
        pytest.skip(f"the {tier.name} tier takes no {dtype}")
    params = rq.build_params(rq.QuantizerSpec(dim=10, bits=3))
    rows = np.full((2, 10), big / 10)
    rows[0] = big if dtype == "float16" else 0.0  # float16: every coordinate at 65504
    rows[0, 0] = big
    out = tier.module.dequantize(tier.module.quantize(tier.array(rows, dtype), params), params)
    x_hat = to_numpy(out)
    assert np.isfinite(x_hat).all()
    if tier.device is not None:  # the NumPy tier returns float64, which holds any reconstruction
        assert str(out.dtype) == f"torch.{dtype}" and np.abs(x_hat).max() <= float(torch.finfo(out.dtype).max)
    bad = tier.module.quantize(tier.array(np.array([[np.nan] + [1.0] * 9]), dtype), params, validate=False)
    assert np.isnan(to_numpy(tier.module.dequantize(bad, params))).all()


def test_attention_over_values_near_the_float16_max_saturates(tier):
    """Attention outputs average the values, so the exact ones stay within the query dtype's range; values
    reconstructed past it (as in the test above) give a saturated output, never Inf."""
    if tier.device is None:
        pytest.skip("the numpy tier returns float64, which holds any output")
    dtype, big = "float16", 65504.0
    params = rq.build_params(rq.QuantizerSpec(dim=10, bits=3))
    values = np.full((1, 1, 2, 10), big)
    keys = np.ones((1, 1, 2, 10))
    k_code = tier.module.quantize(tier.array(keys, dtype), params)
    v_code = tier.module.quantize(tier.array(values, dtype), params)
    q = tier.array(np.ones((1, 1, 1, 10)), dtype)
    out = tier.module.attention(q, k_code, v_code, params, params)
    top = float(torch.finfo(getattr(torch, dtype)).max)
    want = np.clip(to_numpy(tier.module.dequantize(v_code, params)).astype(np.float64).mean(axis=-2), -top, top)
    got = to_numpy(out)[0, 0, 0]
    assert np.isfinite(got).all() and np.abs(got).max() <= top and (np.abs(want) == top).any()
    np.testing.assert_allclose(got, want[0, 0], rtol=1e-2)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # the interpreter overflows, as intended
def test_a_norm_at_the_float32_max_decodes_to_finite_values(tier):
    """Each 4-bit code of ``e_0`` pushed to the extreme level of its sign makes ``(Rot^T c[k])_0 ~ 2`` (> 1),
    which times the largest float32 norm overflows float32 arithmetic: the reconstruction saturates at the
    float32 maximum instead of becoming Inf (the NumPy tier's float64 holds it)."""
    params = rq.build_params(rq.QuantizerSpec(dim=64, bits=4, packing="contiguous", norm_correction=False))
    code = rq.tiers.numpy.quantize(np.eye(64)[:1], params)
    low, high = code.codes & 15, code.codes >> 4  # two codes per byte; levels 8..15 are the positive half
    extreme = np.where(low >= 8, 15, 0) | np.where(high >= 8, 15, 0) << 4
    top = float(np.finfo(np.float32).max)
    code = dataclasses.replace(code, codes=extreme.astype(np.uint8), norms=np.full_like(code.norms, top))
    x_hat = to_numpy(tier.module.dequantize(tier.code(code, dtype="float32"), params))
    assert np.isfinite(x_hat).all()
    assert np.abs(x_hat).max() > top if tier.device is None else np.abs(x_hat).max() == top


def _code(tier):
    params = rq.build_params(rq.QuantizerSpec(dim=16, bits=3, qjl=True))
    return params, tier.module.quantize(tier.array(np.random.default_rng(0).standard_normal((5, 16)), "float32"), params)


@pytest.mark.parametrize("field", ["codes", "norms", "qjl_signs", "residual_norms"])
def test_every_payload_field_is_checked_for_its_dtype(tier, field):
    params, code = _code(tier)
    a = getattr(code, field)
    tampered = dataclasses.replace(code, **{field: a.astype(np.int32) if tier.device is None else a.to(torch.int32)})
    expected = "uint8" if field in ("codes", "qjl_signs") else "float32"
    with pytest.raises(TypeError, match=rf"^code\.{field}: expected dtype {expected}, got int32$"):
        tier.module.dequantize(tampered, params)
    short = dataclasses.replace(code, **{field: a[:3]})
    with pytest.raises(ValueError, match=r"^code\.\w+: expected shape"):  # cut codes: the other fields mismatch
        tier.module.dequantize(short, params)


@pytest.mark.parametrize("dtype", ["int8", None, "", "float8"])
def test_a_code_dtype_that_names_no_float_dtype_is_refused(tier, dtype):
    params, code = _code(tier)
    tampered = dataclasses.replace(code, dtype=dtype)
    q = tier.array(np.ones((2, 16)), "float32")
    for call in (lambda: tier.module.dequantize(tampered, params), lambda: tier.module.scores(q, tampered, params)):
        with pytest.raises(ValueError, match=rf"^code\.dtype: expected one of \('float16', 'bfloat16', 'float32', 'float64'\), got {dtype!r}$"):
            call()


def test_fields_of_another_tier_or_of_no_array_are_named(tier):
    params, code = _code(tier)
    if tier.device is None:
        foreign = dataclasses.replace(code, codes=torch.from_numpy(code.codes))
        want = r"^code\.codes: expected a numpy\.ndarray, got Tensor \(a tensor of the torch or triton tier; the numpy tier"
    else:
        foreign = dataclasses.replace(code, codes=to_numpy(code.codes, keep_dtype=True))
        want = rf"^code\.codes: expected a torch\.Tensor, got ndarray \(an array of the numpy tier; the {_kind(tier)} tier"
    with pytest.raises(TypeError, match=want):
        tier.module.dequantize(foreign, params)
    listed = dataclasses.replace(code, codes=to_numpy(code.codes, keep_dtype=True).tolist())
    with pytest.raises(TypeError, match=r"^code\.codes: expected a (numpy\.ndarray|torch\.Tensor), got list$"):
        tier.module.scores(tier.array(np.ones((2, 16)), "float32"), listed, params)


def test_scores_against_an_empty_code(tier):
    params = rq.build_params(rq.QuantizerSpec(dim=16, bits=3))
    q = tier.array(np.ones((2, 3, 16)), "float32")
    for lead in ((0,), (2, 0)):
        code = tier.module.quantize(tier.array(np.zeros((*lead, 16)), "float32"), params)
        assert tuple(tier.module.scores(q if len(lead) == 2 else q[0], code, params).shape) == (*lead[:-1], 3, 0)


@pytest.mark.parametrize("scale, error, message", [
    ("x", TypeError, r"^scale: expected None or a real number, got str$"),
    (True, TypeError, r"^scale: expected None or a real number, got bool$"),
    (float("nan"), ValueError, r"^scale: expected a finite number, got nan$"),
])  # fmt: skip
def test_attention_scale_is_validated(tier, scale, error, message):
    params = rq.build_params(rq.QuantizerSpec(dim=16, bits=3))
    kv = tier.module.quantize(tier.array(np.ones((1, 1, 4, 16)), "float32"), params)
    with pytest.raises(error, match=message):
        tier.module.attention(tier.array(np.ones((1, 2, 1, 16)), "float32"), kv, kv, params, params, scale=scale)


def test_every_tier_is_covered():
    """The registry holds at least the NumPy and torch tiers here (and Triton under the interpreter or a GPU)."""
    assert {"numpy", "torch-cpu"} <= {t.name for t in TIERS}
