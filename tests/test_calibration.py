"""`rotorquant.calibrate` and a `Quantizer` with a `Calibration`, on every tier present."""

import numpy as np
import pytest

import rotorquant as rq
from tiers import TIERS, to_numpy

SPEC = rq.QuantizerSpec(dim=35, bits=3, stages=1)  # one rotor stage: 11 rotors and a Cl(2) tail
PARAMS = rq.build_params(SPEC)
CHANNEL_RMS = np.random.default_rng(99).permutation(np.geomspace(0.1, 4.0, SPEC.dim))  # uneven, as real keys


def _keys(seed=0, shape=(2, 3, 40)):
    """Vectors with uneven channels and an offset: ``(*shape, dim)`` float64."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((*shape, SPEC.dim)) * CHANNEL_RMS + 0.7


def _rel_mse(x, x_hat):
    return float(np.sum((x - x_hat) ** 2) / np.sum(x**2))


def test_isotropic_samples_fit_unit_scales():
    x = np.random.default_rng(1).standard_normal((20000, SPEC.dim))
    cal = rq.calibrate(x, PARAMS, axis=0)
    assert cal.scale.shape == (1, SPEC.dim) and cal.center is None and cal.scale.dtype == np.float32
    np.testing.assert_allclose(cal.scale, 1.0, atol=0.04)


def test_scales_measure_rotated_unit_channels():
    """The definition: s_j^2 = d * mean((Rot(x - mu) / ||x - mu||)_j^2), per group, keeping sample axes."""
    x = _keys()
    x[..., :3] = 0.7 + 0.01 * (x[..., :3] - 0.7)  # the first rotor group nearly constant: its scales floor
    cal = rq.calibrate(x, PARAMS, axis=(0, 2), center=True)
    assert cal.scale.shape == cal.center.shape == (1, 3, 1, SPEC.dim)
    mu = x.mean(axis=(0, 2), keepdims=True)
    u = (x - mu) / np.linalg.norm(x - mu, axis=-1, keepdims=True)
    y = u @ PARAMS.rotation_matrix().T
    want = np.maximum(np.sqrt(SPEC.dim * np.mean(y**2, axis=(0, 2), keepdims=True)), rq.calibration.MIN_SCALE)
    assert (want == rq.calibration.MIN_SCALE).any()  # the floor is exercised
    np.testing.assert_allclose(cal.scale, want, rtol=1e-6)
    np.testing.assert_allclose(cal.center, mu, rtol=1e-6)
    assert cal.nbytes == 4 * 2 * 3 * SPEC.dim


def test_mask_leaves_padding_out():
    x = _keys()
    mask = np.zeros(x.shape[:-1], dtype=bool)
    mask[..., :25] = True
    padded = x.copy()
    padded[..., 25:, :] = 1e6  # garbage that must not count
    got = rq.calibrate(padded, PARAMS, axis=(0, 2), mask=mask, center=True)
    want = rq.calibrate(x[..., :25, :], PARAMS, axis=(0, 2), center=True)
    np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
    np.testing.assert_allclose(got.center, want.center, rtol=1e-6)


def test_prior_pulls_a_tiny_sample_toward_identity():
    x = _keys(shape=(2,))
    loose = rq.calibrate(x, PARAMS, axis=0)
    firm = rq.calibrate(x, PARAMS, axis=0, prior=10000.0)
    assert np.abs(firm.scale - 1).max() < 0.01 < np.abs(loose.scale - 1).max()
    empty = rq.calibrate(x, PARAMS, axis=0, mask=np.zeros(2, dtype=bool), prior=4.0)
    np.testing.assert_array_equal(empty.scale, 1.0)


def test_precondition_restore_and_score_identities():
    """restore inverts precondition; q . x = (A^-1 q) . A(x - mu) + q . mu exactly (float64)."""
    x = _keys()
    cal = rq.calibrate(x, PARAMS, axis=(0, 2), center=True)
    q = np.random.default_rng(2).standard_normal(x.shape)
    xp = cal.precondition(x)
    np.testing.assert_allclose(cal.restore(xp), x, atol=1e-5)  # float32 statistics: exact up to their rounding
    lhs = np.sum(q * x, axis=-1)
    rhs = np.sum(cal.queries(q) * xp, axis=-1) + cal.offsets(q)
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)


def test_precondition_evens_the_rotated_channels():
    x = _keys(shape=(4, 3, 400))
    cal = rq.calibrate(x, PARAMS, axis=(0, 2), center=True)
    refit = rq.calibrate(cal.precondition(x), PARAMS, axis=(0, 2))
    assert np.abs(rq.calibrate(x, PARAMS, axis=(0, 2)).scale - 1).max() > 1.0
    assert np.abs(refit.scale - 1).max() < 0.15


@pytest.mark.parametrize("tier", [t for t in TIERS if "float32" in t.dtypes], ids=lambda t: t.name)
def test_calibrated_quantizer_on_every_tier(tier):
    """Held-out vectors: calibration lowers the error; every tier makes the reference's codes."""
    cal = rq.calibrate(_keys(seed=0), PARAMS, axis=(0, 2), center=True)
    x = _keys(seed=1, shape=(2, 3, 8))
    plain = rq.Quantizer(SPEC, tier=tier.module.__name__.rsplit(".", 1)[1])
    calibrated = rq.Quantizer(SPEC, tier=plain.tier, calibration=cal)
    reference = rq.Quantizer(SPEC, tier="numpy", calibration=cal)
    xt = tier.array(x, "float32")
    code, ref_code = calibrated.quantize(xt), reference.quantize(x.astype(np.float32))
    assert code.calibration is cal and code.dtype == "float32" and code.nbytes == plain.quantize(xt).nbytes
    mismatch = np.mean(to_numpy(code.codes) != ref_code.codes)
    assert mismatch < 0.01  # float32 rounding flips rare ties
    x_hat = to_numpy(calibrated.dequantize(code))
    assert _rel_mse(x, x_hat) < 0.6 * _rel_mse(x, to_numpy(plain.dequantize(plain.quantize(xt))))
    q = np.random.default_rng(3).standard_normal((2, 3, 5, SPEC.dim))
    s = to_numpy(calibrated.scores(tier.array(q, "float32"), code))
    np.testing.assert_allclose(s, q @ np.swapaxes(x_hat, -1, -2), atol=2e-3 * np.abs(s).max())


@pytest.mark.parametrize("tier", [t for t in TIERS if "float32" in t.dtypes], ids=lambda t: t.name)
def test_unchecked_calibrated_quantize_stores_a_non_finite_row_as_non_finite(tier):
    """``validate=False`` skips the finiteness check on every tier alike: the bad row decodes to non-finite
    values, the others to what the checked call gives."""
    cal = rq.calibrate(_keys(seed=0), PARAMS, axis=(0, 2), center=True)
    x = _keys(seed=1, shape=(2, 3, 8)).astype(np.float32)
    bad = x.copy()
    bad[0, 1, 2, 5] = np.nan
    quantize, dequantize = tier.module.quantize, tier.module.dequantize
    with pytest.raises(ValueError, match="x: expected finite values"):
        quantize(tier.array(bad, "float32"), PARAMS, calibration=cal)
    x_hat = to_numpy(dequantize(quantize(tier.array(bad, "float32"), PARAMS, calibration=cal, validate=False), PARAMS))
    good = to_numpy(dequantize(quantize(tier.array(x, "float32"), PARAMS, calibration=cal), PARAMS))
    assert np.isnan(x_hat[0, 1, 2]).all()
    keep = np.ones(x.shape[:-1], dtype=bool)
    keep[0, 1, 2] = False
    np.testing.assert_array_equal(x_hat[keep], good[keep])


def test_scores_refuse_statistics_that_vary_along_the_vectors():
    """Per-position statistics fit the codes but would be applied along the queries' axis."""
    x = _keys(shape=(4, 6))
    per_position = rq.calibrate(x, PARAMS, axis=0, center=True)  # (1, 6, d)
    quantizer = rq.Quantizer(SPEC, tier="numpy", calibration=per_position)
    code = quantizer.quantize(x)
    np.testing.assert_allclose(quantizer.dequantize(code), x, atol=0.4 * np.abs(x).max())
    with pytest.raises(ValueError, match=r"calibration: scores need statistics .* got \(1, 6, 35\)"):
        quantizer.scores(x, code)


def test_pickle_keeps_statistics_not_device_copies():
    import pickle

    torch = pytest.importorskip("torch")
    cal = rq.calibrate(_keys(), PARAMS, axis=(0, 2), center=True)
    with torch.inference_mode():
        cal.precondition(torch.ones(2, 3, 4, SPEC.dim))  # fills the per-device cache inside inference mode
    x = torch.ones(2, 3, 4, SPEC.dim, requires_grad=True)
    cal.precondition(x).sum().backward()  # the cached constants are plain tensors
    assert x.grad is not None
    again = pickle.loads(pickle.dumps(cal))
    assert len(pickle.dumps(cal)) < 2 * len(pickle.dumps(PARAMS)) + 4 * cal.nbytes
    np.testing.assert_array_equal(again.scale, cal.scale) and np.testing.assert_array_equal(again.center, cal.center)
    np.testing.assert_array_equal(again.precondition(_keys()), cal.precondition(_keys()))


def test_a_pickled_calibrated_code_decodes_with_the_quantizer_that_made_it():
    """Calibrations are compared by content: a pickle round trip (a new object) still decodes, and the
    unpickled statistics are read-only again."""
    import pickle

    x = _keys()
    cal = rq.calibrate(x, PARAMS, axis=(0, 2), center=True)
    quantizer = rq.Quantizer(SPEC, tier="numpy", calibration=cal)
    code = quantizer.quantize(x)
    again = pickle.loads(pickle.dumps(code))
    assert again.calibration is not cal and again.calibration.same_as(cal) and cal.same_as(again.calibration)
    np.testing.assert_array_equal(quantizer.dequantize(again), quantizer.dequantize(code))
    np.testing.assert_array_equal(quantizer.scores(x[..., :2, :], again), quantizer.scores(x[..., :2, :], code))
    assert rq.Quantizer(SPEC, tier="numpy", calibration=again.calibration).dequantize(code).shape == x.shape
    for a in (again.calibration.scale, again.calibration.center):
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
    # content, not identity: one differing number, a missing center or other parameters are another calibration
    scale = cal.scale.copy()
    scale[0, 1, 0, 3] *= 1.5
    assert not cal.same_as(rq.Calibration(PARAMS, scale, cal.center))
    assert not cal.same_as(rq.Calibration(PARAMS, cal.scale))
    other_params = rq.build_params(rq.QuantizerSpec(dim=35, bits=3, norm_correction=True, seed=1))
    assert not cal.same_as(rq.Calibration(other_params, cal.scale, cal.center)) and not cal.same_as(cal.scale)


def test_direct_construction_is_validated():
    torch = pytest.importorskip("torch")
    scale = np.ones((1, SPEC.dim))
    assert rq.Calibration(PARAMS, torch.ones(1, SPEC.dim)).scale.dtype == np.float32
    with pytest.raises(TypeError, match="scale: expected an array of real numbers, got no array"):
        rq.Calibration(PARAMS, None)
    with pytest.raises(TypeError, match="scale: expected an array of real numbers, got complex128"):
        rq.Calibration(PARAMS, scale + 0j)
    with pytest.raises(TypeError, match="scale: expected an array of real numbers, got no array"):
        rq.Calibration(PARAMS, "ones")
    with pytest.raises(ValueError, match=r"scale: expected shape \(..., 35\), got \(1, 34\)"):
        rq.Calibration(PARAMS, np.ones((1, 34)))
    with pytest.raises(ValueError, match=r"center: expected shape \(1, 35\) \(as scale\), got \(2, 35\)"):
        rq.Calibration(PARAMS, scale, np.zeros((2, SPEC.dim)))
    with pytest.raises(ValueError, match="scale: expected finite values > 0"):
        rq.Calibration(PARAMS, 0 * scale)


def test_half_inputs_come_back_in_their_dtype():
    torch = pytest.importorskip("torch")
    cal = rq.calibrate(_keys(), PARAMS, axis=(0, 2), center=True)
    quantizer = rq.Quantizer(SPEC, tier="torch", calibration=cal)
    x = torch.tensor(_keys(seed=1), dtype=torch.float16)
    code = quantizer.quantize(x)
    assert code.dtype == "float16" and quantizer.dequantize(code).dtype == torch.float16
    assert quantizer.scores(x[..., :2, :], code).dtype == torch.float16


def test_codes_carry_their_calibration_through_every_call(tier):
    """A tier's ``quantize(x, params, calibration=cal)`` is what a calibrated `Quantizer` makes; every tier's
    ``dequantize`` and ``scores`` (and every quantizer's) undo the calibration the code carries; attention and
    quantize_into refuse calibrated codes by name."""
    x = _keys()
    cal = rq.calibrate(x, PARAMS, axis=(0, 2), center=True)
    code = tier.module.quantize(tier.array(x, "float32"), PARAMS, calibration=cal)
    made = rq.Quantizer(SPEC, tier="numpy" if tier.device is None else tier.module.__name__.rsplit(".")[-1], calibration=cal)
    assert code.calibration is cal and code.dtype == "float32"
    x_hat = to_numpy(tier.module.dequantize(code, PARAMS))
    np.testing.assert_allclose(x_hat, to_numpy(made.dequantize(code)), rtol=0, atol=0)
    np.testing.assert_allclose(x_hat, to_numpy(rq.Quantizer(SPEC, tier=made.tier).dequantize(code)), rtol=0, atol=0)
    assert _rel_mse(x, x_hat) < _rel_mse(x, to_numpy(tier.module.dequantize(tier.module.quantize(tier.array(x, "float32"), PARAMS), PARAMS)))
    q = tier.array(_keys(seed=3, shape=(2, 3, 4)), "float32")
    exact = to_numpy(q) @ np.swapaxes(x_hat, -1, -2)
    np.testing.assert_allclose(to_numpy(tier.module.scores(q, code, PARAMS)), exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    with pytest.raises(ValueError, match="k_code: expected a code made without a Calibration, got a calibrated one"):
        tier.module.attention(q[:, :, :1].reshape(2, 3, 1, SPEC.dim), code, code, PARAMS, PARAMS)
    with pytest.raises(ValueError, match=r"calibration: expected one fitted for QuantizerSpec\(dim=35, bits=4"):
        tier.module.quantize(tier.array(x, "float32"), rq.build_params(rq.QuantizerSpec(dim=35, bits=4)), calibration=cal)
    with pytest.raises(TypeError, match="calibration: expected a rotorquant.Calibration or None, got dict"):
        tier.module.quantize(tier.array(x, "float32"), PARAMS, calibration={})


def test_quantizer_refuses_a_calibration_of_another_spec():
    cal = rq.calibrate(_keys(), PARAMS, axis=(0, 2))
    with pytest.raises(ValueError, match=r"calibration: expected one fitted for QuantizerSpec\(dim=35, bits=4"):
        rq.Quantizer(rq.QuantizerSpec(dim=35, bits=4), calibration=cal)
    with pytest.raises(TypeError, match="calibration: expected a rotorquant.Calibration, got dict"):
        rq.Quantizer(SPEC, calibration={})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(axis=3), ValueError, r"axis: expected distinct sample axes among 0..2 \(not the last, vector axis\), got 3"),
        (dict(axis=(0, 0)), ValueError, "axis: expected distinct sample axes"),
        (dict(axis=(0, 5)), ValueError, "axis: expected distinct sample axes"),
        (dict(axis="0"), TypeError, "axis: expected an int or a tuple of ints, got '0'"),
        (dict(axis=(True,)), TypeError, r"axis: expected an int or a tuple of ints, got \(True,\)"),
        (dict(axis=0, center="no"), TypeError, "center: expected a bool, got 'no'"),
        (dict(axis=0, mask=np.ones((3, 3), dtype=bool)), ValueError, r"mask: expected a shape that broadcasts to \(2, 3, 40\), got \(3, 3\)"),
        (dict(axis=0, mask=np.ones((2, 3, 40))), TypeError, "mask: expected a bool array"),
        (dict(axis=0, prior=-1.0), ValueError, "prior: expected a finite number >= 0, got -1.0"),
        (dict(axis=0, mask=np.zeros((2, 3, 40), dtype=bool)), ValueError, "at least one real, non-zero sample in every group"),
    ],
)
def test_calibrate_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        rq.calibrate(_keys(), PARAMS, **kwargs)


def test_numpy_scalars_are_accepted():
    cal = rq.calibrate(_keys(), PARAMS, axis=np.int64(0), prior=np.float32(2.0), center=np.bool_(True))
    assert cal.scale.shape == (1, 3, 40, SPEC.dim) and cal.center is not None


def test_calibrate_rejects_bad_samples():
    with pytest.raises(ValueError, match="samples: expected finite values, got NaN or Inf"):
        rq.calibrate(np.full((4, SPEC.dim), np.nan), PARAMS, axis=0)
    with pytest.raises(ValueError, match=r"samples: expected shape \(samples..., 35\), got \(4, 32\)"):
        rq.calibrate(np.ones((4, 32)), PARAMS, axis=0)
    with pytest.raises(TypeError, match="samples: expected a real floating-point dtype, got int64"):
        rq.calibrate(np.ones((4, SPEC.dim), dtype=np.int64), PARAMS, axis=0)
    with pytest.raises(TypeError, match="params: expected QuantParams"):
        rq.calibrate(np.ones((4, SPEC.dim)), SPEC, axis=0)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="samples: expected a real floating-point dtype, got torch.int64"):
        rq.calibrate(torch.ones((4, SPEC.dim), dtype=torch.int64), PARAMS, axis=0)


def test_apply_rejects_bad_vectors():
    cal = rq.calibrate(_keys(), PARAMS, axis=(0, 2))  # per-group scales (1, 3, 1, 35)
    with pytest.raises(ValueError, match=r"x: expected a shape the calibration's \(1, 3, 1, 35\) broadcasts to, got \(2, 4, 5, 35\)"):
        cal.precondition(np.ones((2, 4, 5, SPEC.dim)))
    with pytest.raises(ValueError, match=r"broadcasts to, got \(1, 5, 35\)"):
        cal.restore(np.ones((1, 5, SPEC.dim)))  # would silently expand to (1, 3, 5, 35)
    with pytest.raises(ValueError, match=r"q: expected shape \(..., 35\), got \(3, 34\)"):
        cal.queries(np.ones((3, 34)))
    with pytest.raises(TypeError, match="x_prime: expected a real floating-point dtype, got int64"):
        cal.restore(np.ones((3, SPEC.dim), dtype=np.int64))
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray or torch.Tensor, got list"):
        cal.precondition([0.0] * SPEC.dim)
    with pytest.raises(ValueError, match="x: expected finite values, got NaN or Inf"):
        rq.Quantizer(SPEC, tier="numpy", calibration=cal).quantize(np.full((3, SPEC.dim), np.inf))
