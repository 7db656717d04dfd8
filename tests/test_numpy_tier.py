"""The NumPy reference tier: distortion, unbiasedness, edge cases and errors."""

import math

import numpy as np
import pytest

import rotorquant as rq
from rotorquant.tiers import numpy as ref

LLOYD_MAX_128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}


def unit_vectors(n, dim, seed):
    x = np.random.default_rng([seed, 99]).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("rotation", ["rotor", "dense"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_isotropic_mse_matches_lloyd_max(rotation, bits):
    params = rq.build_params(rq.QuantizerSpec(dim=128, bits=bits, rotation=rotation, norm_correction=False))
    x = unit_vectors(4000, 128, seed=bits)
    mse = np.mean(np.sum((ref.dequantize(ref.quantize(x, params), params) - x) ** 2, axis=-1))
    assert mse == pytest.approx(LLOYD_MAX_128[bits], rel=0.03)
    assert 128 * params.distortion == pytest.approx(LLOYD_MAX_128[bits], abs=5e-5)


def test_one_bit_exact_distortion():
    c = math.exp(math.lgamma(64) - math.lgamma(64.5)) / math.sqrt(math.pi)
    assert 128 * rq.build_params(rq.QuantizerSpec(dim=128, bits=1)).distortion == pytest.approx(1 - 128 * c * c)


def _pair_errors(bits, qjl, rotation, seeds=100, pairs=200, dim=128):
    """Estimated minus true <q, x> over pairs correlated by construction (q = x + noise), each
    seed a fresh draw of rotation and QJL matrix: the distribution unbiasedness is stated over."""
    est, true = [], []
    for seed in range(seeds):
        spec = rq.QuantizerSpec(dim=dim, bits=bits, qjl=qjl, rotation=rotation, seed=seed, norm_correction=False)
        params = rq.build_params(spec)
        x = unit_vectors(pairs, dim, seed=1000 + seed)
        q = x + 0.7 * np.random.default_rng([seed, 5]).standard_normal((pairs, dim)) / math.sqrt(dim)
        s = ref.scores(q[:, None, :], ref.quantize(x[:, None, :], params), params)[:, 0, 0]
        est.append(s)
        true.append(np.sum(q * x, axis=-1))
    return np.concatenate(est), np.concatenate(true)


@pytest.mark.parametrize("rotation", ["rotor", "dense"])
@pytest.mark.parametrize("bits", [2, 3])
def test_qjl_scores_are_unbiased(rotation, bits):
    est, true = _pair_errors(bits, True, rotation)
    err = est - true
    assert len(err) >= 20000
    assert abs(err.mean()) < 4 * err.std(ddof=1) / math.sqrt(len(err))


def test_mse_only_one_bit_has_the_two_over_pi_bias():
    est, true = _pair_errors(1, False, "rotor")
    slope = np.sum(est * true) / np.sum(true * true)
    assert slope == pytest.approx(2 / math.pi, rel=0.01)
    err = est - true
    assert abs(err.mean()) > 20 * err.std(ddof=1) / math.sqrt(len(err))  # the same test, failing on bias


@pytest.mark.parametrize("qjl", [False, True])
@pytest.mark.parametrize("dim", [2, 5, 67, 130])
def test_scores_equal_q_dot_dequantized(dim, qjl):
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=3, qjl=qjl, qjl_dim=dim + 3))
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((2, 3, 11, dim)), rng.standard_normal((3, 4, dim))
    code = ref.quantize(x, params)
    np.testing.assert_allclose(
        ref.scores(q, code, params), q @ np.swapaxes(ref.dequantize(code, params), -1, -2), atol=1e-10
    )


@pytest.mark.parametrize("rotation", ["rotor", "dense"])
@pytest.mark.parametrize("dim", [2, 3, 4, 5, 67, 128, 130])
def test_rotation_is_orthogonal_and_matches_its_matrix(rotation, dim):
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=2, rotation=rotation))
    u = np.random.default_rng(1).standard_normal((9, dim))
    y = ref.rotate(u, params)
    np.testing.assert_allclose(y, u @ params.rotation_matrix().T, atol=1e-12)
    np.testing.assert_allclose(ref.rotate(y, params, inverse=True), u, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3, 5, 67, 127, 128, 130])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_stores_exactly_dim_codes(dim, bits):
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits))
    code = ref.quantize(np.random.default_rng(2).standard_normal((4, dim)), params)
    assert code.codes.shape == (4, -(-dim * bits // 8)) and code.codes.dtype == np.uint8
    assert code.nbytes == 4 * params.spec.bytes_per_vector


def test_nbytes_and_compression_at_3_bits():
    x = np.random.default_rng(3).standard_normal((10, 128)).astype(np.float16)
    code = ref.quantize(x, rq.build_params(rq.QuantizerSpec(dim=128, bits=3, norm_dtype="float16")))
    assert code.nbytes == 10 * (48 + 2)
    assert x.nbytes / code.nbytes == pytest.approx(5.12)
    qjl = ref.quantize(x, rq.build_params(rq.QuantizerSpec(dim=128, bits=3, qjl=True)))
    assert qjl.nbytes == 10 * (32 + 4 + 16 + 4)


@pytest.mark.parametrize("qjl", [False, True])
def test_zero_vectors_reconstruct_as_exact_zeros(qjl):
    params = rq.build_params(rq.QuantizerSpec(dim=67, bits=3, qjl=qjl))
    x = np.random.default_rng(4).standard_normal((5, 67))
    x[[1, 3]] = 0.0
    x_hat = ref.dequantize(ref.quantize(x, params), params)
    assert np.all(x_hat[[1, 3]] == 0.0)
    assert np.all(np.abs(x_hat[[0, 2, 4]]) > 0)


def test_norms_up_to_float32_max_round_trip():
    params = rq.build_params(rq.QuantizerSpec(dim=32, bits=4, norm_correction=False))
    x = np.zeros((2, 32), dtype=np.float32)
    x[0, 5] = np.finfo(np.float32).max
    x[1] = np.finfo(np.float32).max / 8  # norm = max / 8 * sqrt(32) < max
    x_hat = ref.dequantize(ref.quantize(x, params), params)
    assert np.all(np.isfinite(x_hat))
    ratio = np.linalg.norm(x_hat, axis=-1) / np.linalg.norm(x.astype(float), axis=-1)
    # Row 0 is one-hot: the butterfly spreads it over the vector unevenly (flatness 6 at d = 32), so its
    # reconstruction's length is off by more than a typical vector's, but finite.
    assert 0.5 < ratio[0] < 1.5
    assert ratio[1] == pytest.approx(1.0, abs=0.05)


def test_norm_beyond_the_norm_dtype_raises():
    x = np.full((1, 16), 1e5)
    with pytest.raises(ValueError, match=r"x: expected vector norms <= 65504 .*float16.* got a norm of 400000"):
        ref.quantize(x, rq.build_params(rq.QuantizerSpec(dim=16, bits=2, norm_dtype="float16")))
    big = np.full((1, 16), np.finfo(np.float32).max)
    with pytest.raises(ValueError, match="float32"):
        ref.quantize(big, rq.build_params(rq.QuantizerSpec(dim=16, bits=2)))


def test_norm_correction_gives_the_input_length():
    x = np.random.default_rng(5).standard_normal((50, 32)) * 3
    params = rq.build_params(rq.QuantizerSpec(dim=32, bits=2, norm_correction=True))
    x_hat = ref.dequantize(ref.quantize(x, params), params)
    np.testing.assert_allclose(np.linalg.norm(x_hat, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)


@pytest.mark.parametrize(
    "bad, error, pattern",
    [
        (np.full((2, 8), np.nan), ValueError, r"x: expected finite values, got NaN or Inf"),
        (np.array([[1.0] * 7 + [np.inf]]), ValueError, r"x: expected finite values"),
        (np.ones((2, 7)), ValueError, r"x: expected shape \(\.\.\., 8\), got \(2, 7\)"),
        (np.ones(()), ValueError, r"x: expected shape \(\.\.\., 8\), got \(\)"),
        (np.ones((2, 8), dtype=np.int32), TypeError, r"x: expected a real floating-point dtype, got int32"),
        (np.ones((2, 8), dtype=np.complex128), TypeError, r"got complex128"),
        (np.ones((2, 8), dtype=object), TypeError, r"got object"),
        ([[1.0] * 8], TypeError, r"x: expected a numpy.ndarray, got list"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, error, pattern):
    with pytest.raises(error, match=pattern):
        ref.quantize(bad, rq.build_params(rq.QuantizerSpec(dim=8, bits=2)))


def test_code_from_another_spec_is_rejected():
    a = rq.build_params(rq.QuantizerSpec(dim=8, bits=2))
    b = rq.build_params(rq.QuantizerSpec(dim=8, bits=2, seed=1))
    code = ref.quantize(np.ones((3, 8)), a)
    with pytest.raises(ValueError, match=r"code: expected a code built for .*seed=1.* got one built for .*seed=0"):
        ref.dequantize(code, b)
    with pytest.raises(TypeError, match="code: expected a rotorquant.Compressed, got ndarray"):
        ref.dequantize(code.codes, a)
    with pytest.raises(ValueError, match=r"q: expected shape \(\.\.\., 8\)"):
        ref.scores(np.ones((1, 9)), code, a)
    with pytest.raises(TypeError, match="params: expected QuantParams"):
        ref.quantize(np.ones((3, 8)), a.spec)


def test_scores_rejects_shapes_that_do_not_broadcast():
    params = rq.build_params(rq.QuantizerSpec(dim=8, bits=2))
    code = ref.quantize(np.ones((3, 5, 8)), params)
    with pytest.raises(ValueError, match=r"q: leading shape \(2,\) does not broadcast with code's \(3,\)"):
        ref.scores(np.ones((2, 4, 8)), code, params)


def _attention_by_loops(q, k_hat, v_hat, lengths, scale, causal=False):
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k_hat.shape[1]
    out = np.zeros((*q.shape[:3], v_hat.shape[-1]))
    for b in range(batch):
        for h in range(q_heads):
            for t in range(q_len):
                end = lengths[b] - (q_len - 1 - t if causal else 0)  # query t is token end - 1 of the sequence
                keys, values = k_hat[b, h // group, :end], v_hat[b, h // group, :end]
                s = scale * keys @ q[b, h, t]
                p = np.exp(s - s.max())
                out[b, h, t] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("k_qjl, causal", [(False, False), (True, False), (False, True)])
def test_attention_matches_loops_with_gqa_and_lengths(k_qjl, causal):
    kp = rq.build_params(rq.QuantizerSpec(dim=16, bits=3, qjl=k_qjl))
    vp = rq.build_params(rq.QuantizerSpec(dim=12, bits=2, rotation="dense"))
    rng = np.random.default_rng(6)
    k_code = ref.quantize(rng.standard_normal((2, 2, 9, 16)), kp)
    v_code = ref.quantize(rng.standard_normal((2, 2, 9, 12)), vp)
    q = rng.standard_normal((2, 6, 3, 16))
    lengths = np.array([9, 4])
    out = ref.attention(q, k_code, v_code, kp, vp, lengths=lengths, causal=causal)
    want = _attention_by_loops(q, ref.dequantize(k_code, kp), ref.dequantize(v_code, vp), lengths, 0.25, causal)
    np.testing.assert_allclose(out, want, atol=1e-12)
    assert out.shape == (2, 6, 3, 12)


def test_attention_errors():
    p = rq.build_params(rq.QuantizerSpec(dim=8, bits=2))
    code = ref.quantize(np.ones((1, 2, 5, 8)), p)
    with pytest.raises(ValueError, match=r"q: expected q_heads a multiple of kv_heads=2, got 3"):
        ref.attention(np.ones((1, 3, 1, 8)), code, code, p, p)
    for bad in (0, 6):
        with pytest.raises(ValueError, match=rf"lengths: expected values in 1..5, got values in {bad}..{bad}"):
            ref.attention(np.ones((1, 2, 1, 8)), code, code, p, p, lengths=np.array([bad]))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(1,\), got \(2,\)"):
        ref.attention(np.ones((1, 2, 1, 8)), code, code, p, p, lengths=np.array([1, 2]))
    causal_range = r"lengths: expected values in 3..5 \(causal=True: each sequence holds the keys of its 3 queries\)"
    with pytest.raises(ValueError, match=causal_range + r", got values in 2..2"):
        ref.attention(np.ones((1, 2, 3, 8)), code, code, p, p, lengths=np.array([2]), causal=True)
    with pytest.raises(ValueError, match=r"q: expected at most kv_len=5 queries with causal=True, got q_len=6"):
        ref.attention(np.ones((1, 2, 6, 8)), code, code, p, p, causal=True)
    with pytest.raises(TypeError, match=r"causal: expected a bool, got str"):
        ref.attention(np.ones((1, 2, 1, 8)), code, code, p, p, causal="yes")
    for bad in ([2.5], [True]):
        with pytest.raises(TypeError, match=r"lengths: expected integers, got dtype (float64|bool)"):
            ref.attention(np.ones((1, 2, 1, 8)), code, code, p, p, lengths=bad)
