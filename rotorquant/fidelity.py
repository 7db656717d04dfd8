"""Real-model fidelity: how much compressing MiniLM's keys and values changes attention.

For a `Method` (rotation, bits, QJL, norm correction, codebook), with keys and values compressed
alike and every layer, head and sentence of `rotorquant.minilm.capture_qkv` taken together
(padding masked out of keys, queries and sums):

- ``key_rel_mse``, ``value_rel_mse``: ``sum ||x - x_hat||^2 / sum ||x||^2``;
- ``attn_cosine``: mean over queries of ``cos(o, o_hat)`` with
  ``o = softmax(q K^T / sqrt(d)) V`` and ``o_hat = softmax(scores(q, K_code) / sqrt(d)) dequantize(V_code)``;
- ``top1``: fraction of queries whose highest exact score ``q . k`` is also the highest estimate;
  ``top5``: fraction whose highest exact key is among the 5 highest estimates;
- ``embed_cosine``: mean ``cos(e, e_hat)`` of the sentence embeddings when every attention layer of
  MiniLM runs on compressed K/V (`rotorquant.minilm.run_model`), ``nn_agreement``: fraction of
  sentences whose nearest other sentence (by embedding cosine) is unchanged.

Computed with the torch tier (`rotorquant.tiers.torch`); needs the ``hf`` and ``torch`` extras.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from . import minilm
from .codebook import lloyd_max
from .params import QuantParams, build_params
from .spec import QuantizerSpec, Rotation

_GAUSSIAN_DIM = 1 << 20  # f_d at this d is N(0, 1/d) to ~1e-6: its codebook is the Gaussian one


@dataclass(frozen=True)
class Method:
    """One way to compress keys and values (both get the same settings).

    ``codebook="exact"`` is the Lloyd-Max codebook of the exact coordinate density ``f_32`` that
    `rotorquant.build_params` builds; ``"gaussian"`` swaps in the Lloyd-Max codebook of its
    N(0, 1/d) approximation (what the published RotorQuant code uses at every d), for comparison.
    """

    rotation: str = "rotor"
    bits: int = 3
    qjl: bool = False
    norm_correction: bool = False
    codebook: str = "exact"

    def __post_init__(self) -> None:
        if self.codebook not in ("exact", "gaussian"):
            raise ValueError(f"Method.codebook: expected 'exact' or 'gaussian', got {self.codebook!r}")
        self.spec(minilm.HEAD_DIM)  # validates rotation, bits, qjl, norm_correction

    @property
    def label(self) -> str:
        """Short name, e.g. ``rotor``, ``dense+qjl``, ``rotor+nc``, ``rotor+gauss``."""
        tags = [Rotation(self.rotation).value]
        tags += ["qjl"] * self.qjl + ["nc"] * self.norm_correction + ["gauss"] * (self.codebook == "gaussian")
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


def _torch_tier():
    from .tiers import torch as tier

    return tier


def _masked_softmax(s, key_mask):
    import torch

    return torch.softmax(s.masked_fill(~key_mask, float("-inf")), dim=-1)


def attention_metrics(capture: minilm.QKVCapture, method: Method, seed: int = 0) -> dict[str, float]:
    """Relative MSE of K and V, attention-output cosine, top-1 and top-5 over a whole capture."""
    import torch

    tier = _torch_tier()
    q, k, v = (torch.from_numpy(np.array(a)) for a in (capture.q, capture.k, capture.v))  # (L, S, H, T, d)
    mask = torch.from_numpy(np.array(capture.mask))  # (S, T)
    params = method.params(q.shape[-1], seed)
    k_code, v_code = tier.quantize(k, params), tier.quantize(v, params)
    k_hat, v_hat = tier.dequantize(k_code, params).double(), tier.dequantize(v_code, params).double()
    q, k, v = q.double(), k.double(), v.double()
    token = mask[None, :, None, :, None]  # (1, S, 1, T, 1)

    def rel_mse(x, x_hat):
        return float(((x - x_hat) ** 2 * token).sum() / (x**2 * token).sum())

    scale = 1.0 / math.sqrt(q.shape[-1])
    key_mask = mask[None, :, None, None, :]  # (1, S, 1, 1, T)
    exact = (q @ k.transpose(-1, -2)).masked_fill(~key_mask, float("-inf"))
    est = tier.scores(q.float(), k_code, params).double().masked_fill(~key_mask, float("-inf"))
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


def compressed_attention(method: Method, seed: int = 0) -> minilm.AttentionFn:
    """An `rotorquant.minilm.AttentionFn` that compresses K and V, then attends with ``scores`` and ``dequantize``."""
    import torch

    tier = _torch_tier()

    def attention(query, key, value, mask):
        params = method.params(query.shape[-1], seed)
        k_code, v_code = tier.quantize(key, params), tier.quantize(value, params)
        s = tier.scores(query, k_code, params).to(query.dtype) / math.sqrt(query.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ tier.dequantize(v_code, params).to(query.dtype)

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
    approx = minilm.embed(num_sentences, compressed_attention(method, seed))
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
