"""Real-model fidelity: how much compressing MiniLM's keys and values changes attention.

For a `Method` (rotation, bits, QJL, norm correction, codebook), with keys and values compressed
alike and every layer, head and sentence of `rotorquant.bench.minilm.capture_qkv` taken together
(padding masked out of keys, queries and sums):

- ``key_rel_mse``, ``value_rel_mse``: ``sum ||x - x_hat||^2 / sum ||x||^2``;
- ``attn_cosine``: mean over queries of ``cos(o, o_hat)`` with
  ``o = softmax(q K^T / sqrt(d)) V`` and ``o_hat = softmax(scores(q, K_code) / sqrt(d)) dequantize(V_code)``;
- ``top1``: fraction of queries whose highest exact score ``q . k`` is also the highest estimate;
  ``top5``: fraction whose highest exact key is among the 5 highest estimates;
- ``embed_cosine``: mean ``cos(e, e_hat)`` of the sentence embeddings when every attention layer of
  MiniLM runs on compressed K/V (`rotorquant.bench.minilm.run_model`), ``nn_agreement``: fraction of
  sentences whose nearest other sentence (by embedding cosine) is unchanged.

Calibrated methods (`rotorquant.calibrate`: keys centered and scaled per channel, values scaled, per
layer and head) come in two kinds:

- ``calibration="model"`` (``+cal``): statistics stored once per model, cross-fitted so no sentence is
  compressed with statistics of itself: sentence ``i`` uses statistics of the sentences ``j`` with
  ``j % 2 != i % 2``;
- ``calibration="sequence"`` (``+seqcal``): statistics of each sentence's own keys and values (what a
  KV cache can fit on its prompt, `rotorquant.integrations.transformers`), with ``SEQUENCE_PRIOR``
  isotropic pseudo-samples; they cost bytes per sentence (`calibration_nbytes`). In the end-to-end
  run they are fitted on the keys and values each layer actually receives.

Computed with the torch tier (`rotorquant.tiers.torch`); needs the ``hf`` and ``torch`` extras.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import minilm
from rotorquant.calibration import calibrate
from rotorquant.math.codebook import lloyd_max
from rotorquant.params import QuantParams, build_params
from rotorquant.quantizer import Quantizer
from rotorquant.spec import QuantizerSpec, Rotation

_GAUSSIAN_DIM = 1 << 20  # f_d at this d is N(0, 1/d) to ~1e-6: its codebook is the Gaussian one
FOLDS = 2  # calibration="model": sentence i uses statistics of the sentences j with j % FOLDS != i % FOLDS
SEQUENCE_PRIOR = 4.0  # calibration="sequence": isotropic pseudo-samples added to each sentence's statistics
CALIBRATIONS = ("none", "model", "sequence")


@dataclass(frozen=True)
class Method:
    """One way to compress keys and values (both get the same settings).

    ``codebook="exact"`` is the Lloyd-Max codebook of the exact coordinate density ``f_32`` that
    `rotorquant.build_params` builds; ``"gaussian"`` swaps in the Lloyd-Max codebook of its
    N(0, 1/d) approximation (what the published RotorQuant code uses at every d), for comparison.
    ``calibration`` (``"none"``, ``"model"`` or ``"sequence"``) wraps both in a `rotorquant.Calibration`
    (keys centered, see the module docstring).
    """

    rotation: str = "rotor"
    bits: int = 3
    qjl: bool = False
    norm_correction: bool = False
    codebook: str = "exact"
    calibration: str = "none"

    def __post_init__(self) -> None:
        if self.codebook not in ("exact", "gaussian"):
            raise ValueError(f"Method.codebook: expected 'exact' or 'gaussian', got {self.codebook!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"Method.calibration: expected one of {CALIBRATIONS}, got {self.calibration!r}")
        self.spec(minilm.HEAD_DIM)  # validates rotation, bits, qjl, norm_correction

    @property
    def label(self) -> str:
        """Short name, e.g. ``rotor``, ``dense+qjl``, ``rotor+nc``, ``rotor+gauss``, ``rotor+nc+cal``."""
        tags = [Rotation(self.rotation).value]
        tags += ["qjl"] * self.qjl + ["nc"] * self.norm_correction + ["gauss"] * (self.codebook == "gaussian")
        tags += {"none": [], "model": ["cal"], "sequence": ["seqcal"]}[self.calibration]
        return "+".join(tags)

    def spec(self, dim: int, seed: int = 0) -> QuantizerSpec:
        return QuantizerSpec(
            dim=dim,
            bits=self.bits,
            rotation=self.rotation,
            qjl=self.qjl,
            seed=seed,
            norm_correction=self.norm_correction,
        )

    def params(self, dim: int, seed: int = 0) -> QuantParams:
        params = build_params(self.spec(dim, seed))
        return params if self.codebook == "exact" else _with_gaussian_codebook(params)


def _with_gaussian_codebook(params: QuantParams) -> QuantParams:
    """``params`` with the N(0, 1/d) Lloyd-Max codebook: levels of ``f_D`` (D huge) scaled by ``sqrt(D / d)``."""
    book = lloyd_max(_GAUSSIAN_DIM, params.spec.mse_bits)
    scale = math.sqrt(_GAUSSIAN_DIM / params.spec.dim)
    centroids, boundaries = book.centroids * scale, book.boundaries * scale
    for a in (centroids, boundaries):
        a.setflags(write=False)
    return dataclasses.replace(params, centroids=centroids, boundaries=boundaries)


def methods(
    rotations: tuple[str, ...] = ("rotor", "dense"),
    bits: tuple[int, ...] = (2, 3, 4),
    qjl: tuple[bool, ...] = (False, True),
) -> list[Method]:
    """The grid of the fidelity table, ordered by bits, then QJL, then rotation."""
    return [Method(rotation=r, bits=b, qjl=j) for b in bits for j in qjl for r in rotations]


@dataclass(frozen=True)
class FidelityRow:
    """The measured metrics of one `Method` (see the module docstring)."""

    method: Method
    key_rel_mse: float
    value_rel_mse: float
    attn_cosine: float
    top1: float
    top5: float
    embed_cosine: float | None = None
    nn_agreement: float | None = None

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["method"] = {**row["method"], "label": self.method.label}
        return row


def _masked_softmax(s, key_mask):
    import torch

    return torch.softmax(s.masked_fill(~key_mask, float("-inf")), dim=-1)


def quantizers(method: Method, seed: int = 0, capture: minilm.QKVCapture | None = None, layer: int = 0) -> list:
    """``[(key_quantizer, value_quantizer)]`` (torch tier) for one layer of the capture.

    One pair, except for ``calibration="model"``: one pair per fold, pair ``f`` fitted on the sentences
    ``j % FOLDS != f``. ``calibration="sequence"`` fits each sentence on itself (statistics ``(S, H, 1, d)``).
    """
    params = method.params(minilm.HEAD_DIM, seed)
    if method.calibration == "none":
        plain = Quantizer(params.spec, "torch", params=params)
        return [(plain, plain)]
    if capture is None:
        raise ValueError(f"capture: expected the QKVCapture to calibrate {method.label} on, got None")
    keys, values, real = capture.k[layer], capture.v[layer], capture.mask[:, None, :]  # real: (S, 1, T)
    if method.calibration == "sequence":
        return [calibrated_pair(params, keys, values, real, axis=2, prior=SEQUENCE_PRIOR)]
    folds = (np.arange(len(capture.sentences)) % FOLDS)[:, None, None]
    return [calibrated_pair(params, keys, values, real & (folds != f), axis=(0, 2)) for f in range(FOLDS)]


def calibrated_pair(params: QuantParams, keys, values, real, axis, prior: float = 0.0) -> tuple:
    """Torch-tier quantizers for keys (centered and scaled) and values (scaled), fitted over ``axis``."""
    key_cal = calibrate(keys, params, axis=axis, mask=real, center=True, prior=prior)
    value_cal = calibrate(values, params, axis=axis, mask=real, prior=prior)
    return tuple(Quantizer(params.spec, "torch", c, params=params) for c in (key_cal, value_cal))


def calibration_nbytes(capture: minilm.QKVCapture, method: Method, seed: int = 0) -> int:
    """Bytes of statistics over every layer, keys and values: one fold's for ``"model"`` (stored once per
    model), every sentence's for ``"sequence"``."""
    pairs = (quantizers(method, seed, capture, layer)[0] for layer in range(minilm.NUM_LAYERS))
    return sum(kq.calibration.nbytes + vq.calibration.nbytes for kq, vq in pairs)


def _by_fold(pairs: list, fn):
    """``fn(key_quantizer, value_quantizer)`` -> tuple of ``(S, ...)`` tensors, sentence ``i`` from pair
    ``i % FOLDS`` (from the one pair when there is one)."""
    import torch

    out = None
    for f, (kq, vq) in enumerate(pairs):
        got = fn(kq, vq)
        if out is None:
            out = got
            continue
        fold = torch.arange(got[0].shape[0]) % FOLDS == f
        out = tuple(torch.where(fold.view(-1, *[1] * (g.ndim - 1)), g, o) for g, o in zip(got, out))
    return out


def _layer_estimates(capture: minilm.QKVCapture, method: Method, seed: int, layer: int):
    """``(k_hat, v_hat, scores)`` of one layer: ``(S, H, T, d)``, ``(S, H, T, d)``, ``(S, H, T, T)``."""
    import torch

    q, k, v = (torch.from_numpy(np.array(a[layer])) for a in (capture.q, capture.k, capture.v))

    def estimate(kq, vq):
        k_code, v_code = kq.quantize(k), vq.quantize(v)
        return kq.dequantize(k_code), vq.dequantize(v_code), kq.scores(q, k_code)

    return _by_fold(quantizers(method, seed, capture, layer), estimate)


def attention_metrics(capture: minilm.QKVCapture, method: Method, seed: int = 0) -> dict[str, float]:
    """Relative MSE of K and V, attention-output cosine, top-1 and top-5 over a whole capture."""
    import torch

    q, k, v = (torch.from_numpy(np.array(a)).double() for a in (capture.q, capture.k, capture.v))  # (L, S, H, T, d)
    mask = torch.from_numpy(np.array(capture.mask))  # (S, T)
    layers = [_layer_estimates(capture, method, seed, layer) for layer in range(q.shape[0])]
    k_hat, v_hat, est = (torch.stack([e[i] for e in layers]).double() for i in range(3))
    token = mask[None, :, None, :, None]  # (1, S, 1, T, 1)

    def rel_mse(x, x_hat):
        return float(((x - x_hat) ** 2 * token).sum() / (x**2 * token).sum())

    scale = 1.0 / math.sqrt(q.shape[-1])
    key_mask = mask[None, :, None, None, :]  # (1, S, 1, 1, T)
    exact = (q @ k.transpose(-1, -2)).masked_fill(~key_mask, float("-inf"))
    est = est.masked_fill(~key_mask, float("-inf"))
    out = _masked_softmax(exact * scale, key_mask) @ v
    out_hat = _masked_softmax(est * scale, key_mask) @ v_hat
    query = mask[None, :, None, :].expand(out.shape[:-1])  # (L, S, H, T)
    cos = torch.nn.functional.cosine_similarity(out, out_hat, dim=-1)[query]
    best = exact.argmax(dim=-1, keepdim=True)
    top5 = (est.topk(5, dim=-1).indices == best).any(dim=-1)[query]
    top1 = (est.argmax(dim=-1, keepdim=True) == best)[..., 0][query]
    return dict(
        key_rel_mse=rel_mse(k, k_hat),
        value_rel_mse=rel_mse(v, v_hat),
        attn_cosine=float(cos.mean()),
        top1=float(top1.double().mean()),
        top5=float(top5.double().mean()),
    )


def compressed_attention(method: Method, seed: int = 0, capture: minilm.QKVCapture | None = None) -> minilm.AttentionFn:
    """An `rotorquant.bench.minilm.AttentionFn` that compresses K and V, then attends with ``scores`` and ``dequantize``.

    ``calibration="model"`` needs the ``capture`` of the same sentences, and the function counts its
    calls to know the layer (MiniLM calls layers 0..5 in order once per forward pass);
    ``calibration="sequence"`` fits each sentence on the keys and values it receives.
    """
    import torch

    calls = itertools.count()

    def attention(query, key, value, mask):
        if method.calibration == "sequence":
            real = torch.ones(key.shape[0], 1, key.shape[2], dtype=torch.bool) if mask is None else mask.any(dim=2)
            params = method.params(query.shape[-1], seed)
            pairs = [calibrated_pair(params, key, value, real, axis=2, prior=SEQUENCE_PRIOR)]
        else:
            pairs = quantizers(method, seed, capture, next(calls) % minilm.NUM_LAYERS)

        def attend(kq, vq):
            k_code, v_code = kq.quantize(key), vq.quantize(value)
            s = kq.scores(query, k_code).to(query.dtype) / math.sqrt(query.shape[-1])
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            return (torch.softmax(s, dim=-1) @ vq.dequantize(v_code).to(query.dtype),)

        return _by_fold(pairs, attend)[0]

    return attention


def channel_outliers(capture: minilm.QKVCapture) -> dict[str, float]:
    """How uneven the channels are: ``max_j rms_j / median_j rms_j`` per (layer, head), averaged.

    ``rms_j`` is the root mean square of channel ``j`` over all real tokens. A dense rotation spreads
    one dominant channel over all ``d`` coordinates; a 3-dim rotor only over its group of 3.
    """
    mask = np.asarray(capture.mask)

    def ratio(x: np.ndarray) -> float:
        tokens = np.moveaxis(x, 2, 1)[:, :, mask]  # (L, H, tokens, d)
        rms = np.sqrt(np.mean(tokens.astype(np.float64) ** 2, axis=2))
        return float(np.mean(rms.max(axis=-1) / np.median(rms, axis=-1)))

    return dict(key_channel_ratio=ratio(capture.k), value_channel_ratio=ratio(capture.v))


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row (embeddings are unit vectors) ``(S,)``."""
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


@functools.lru_cache(maxsize=4)
def _exact_embeddings(num_sentences: int | None) -> np.ndarray:
    return minilm.embed(num_sentences)


def end_to_end_metrics(method: Method, num_sentences: int | None = None, seed: int = 0) -> dict[str, float]:
    """Sentence-embedding cosine and nearest-neighbour agreement with every MiniLM layer on compressed K/V."""
    exact = _exact_embeddings(num_sentences)
    capture = minilm.capture_qkv(num_sentences) if method.calibration == "model" else None
    approx = minilm.embed(num_sentences, compressed_attention(method, seed, capture))
    return dict(
        embed_cosine=float(np.mean(np.sum(exact * approx, axis=-1))),
        nn_agreement=float(np.mean(nearest_neighbours(exact) == nearest_neighbours(approx))),
    )


def measure(
    method_list: list[Method],
    num_sentences: int | None = None,
    seed: int = 0,
    end_to_end: bool = True,
    progress: bool = False,
) -> list[FidelityRow]:
    """One `FidelityRow` per method on the first ``num_sentences`` sentences (all when None)."""
    from tqdm.auto import tqdm

    capture = minilm.capture_qkv(num_sentences)
    rows = []
    for method in tqdm(method_list, desc="fidelity", disable=not progress, leave=False):
        metrics = attention_metrics(capture, method, seed)
        if end_to_end:
            metrics.update(end_to_end_metrics(method, num_sentences, seed))
        rows.append(FidelityRow(method, **metrics))
    return rows


def markdown_table(rows: list[FidelityRow]) -> str:
    """The rows as a Markdown table (end-to-end columns only when measured)."""
    e2e = any(r.embed_cosine is not None for r in rows)
    head = "| method | bits | K rel. MSE | V rel. MSE | attn-output cos | top-1 | top-5 |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if e2e:
        head, rule = head + " embedding cos | NN agreement |", rule + "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r.method.label} | {r.method.bits} | {r.key_rel_mse:.4f} | {r.value_rel_mse:.4f} "
            f"| {r.attn_cosine:.4f} | {r.top1:.3f} | {r.top5:.3f} |"
        )
        if e2e:
            line += f" {_fmt(r.embed_cosine, '.5f')} | {_fmt(r.nn_agreement, '.3f')} |"
        lines.append(line)
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
