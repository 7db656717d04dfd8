"""Decode attention as an engine calls it, written once around any tier's attention math.

A tier supplies the math, ``masked_attention(q, k_code, v_code, k_params, v_params, scale, visible)``: for
query rows ``q (B, Hkv, R, d)`` and caches of leading shape ``(B, Hkv, N)``,

    out[b, h, r] = sum_n softmax_n(scale * <q[b, h, r], k_n>) v_n     over the keys n < visible[b, r]

with ``k_n``, ``v_n`` read from the codes (``scores`` and ``dequantize``). This module turns what an engine
passes to ``attention`` into those arguments, and the result back:

- grouped-query attention: query head ``h`` of ``q (B, Hq, T, d)`` reads KV head ``h // (Hq // Hkv)``;
  its ``T`` queries become rows ``g * T + t`` of that KV head (``g = h % (Hq // Hkv)``), so ``R = Hq / Hkv * T``;
- ``lengths (B,)`` (all ``N`` when None) and ``causal``:

      visible[b, g * T + t] = lengths[b]                    causal=False
      visible[b, g * T + t] = lengths[b] - (T - 1 - t)      causal=True: the T queries are the sequence's
                                                            last T cached tokens, each sees itself and before

- paged caches (``block_table``, `rotorquant.engine.paging`) are gathered into the logical caches;
- ``validate=False``: nothing that reads values is checked; every query of a sequence whose length is out
  of range, or whose block table names a block out of range where its keys lie, gets a NaN row.

The Triton tier uses `prepare` for the same checks and follows lengths, masks and block tables inside its
kernels instead of calling `run`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import checks
from ..format import Compressed
from ..params import QuantParams
from . import paging


@dataclass(frozen=True)
class Request:
    """The checked arguments of one ``attention`` call.

    Attributes:
        q: ``(B, Hq, T, d)`` queries as the tier takes them.
        k_code, v_code: the caches as passed (paged: leading shape ``(num_blocks, Hkv, page)``).
        k_params, v_params: their parameters.
        scale: the softmax scale (``1/sqrt(d)`` when None was passed).
        lengths: ``(B,)`` integers on ``q``'s device (int32 and int64 as passed), all ``kv_len`` when None.
        table: ``(B, max_blocks)`` block table, or None for contiguous caches.
        causal: causal masking among the ``T`` queries.
        validate: whether values were checked.
        kv_heads, group, kv_len: ``Hkv``, ``Hq / Hkv`` and the logical cache length ``N``.
        least: the smallest valid length (1, or ``T`` with causal masking).
    """

    q: object
    k_code: Compressed
    v_code: Compressed
    k_params: QuantParams
    v_params: QuantParams
    scale: float
    lengths: object
    table: object
    causal: bool
    validate: bool
    kv_heads: int
    group: int
    kv_len: int
    least: int


def prepare(arrays, q, k_code, v_code, k_params, v_params, *, scale, lengths, causal, validate, block_table) -> Request:
    """Check every argument of ``attention`` (``arrays``: the tier's `rotorquant.arrays` adapter): types,
    dtypes, devices and shapes always; with ``validate`` also ``q`` finite, ``lengths`` in range and every
    block id where keys lie (reads values: host synchronizations on a GPU)."""
    checks.check_params(k_params)
    checks.check_params(v_params)
    checks.check_code("k_code", k_code, k_params, arrays)
    checks.check_code("v_code", v_code, v_params, arrays)
    validate = checks.check_bool("validate", validate)
    scale = checks.check_scale(scale)
    arrays.vectors("q", q, k_params.spec.dim)
    for name, code in (("k_code", k_code), ("v_code", v_code)):
        arrays.check_device(name, code.codes, q, "q")
    k_shape, v_shape, table = k_code.shape, v_code.shape, None
    if block_table is not None:
        table = arrays.integers("block_table", block_table, q)
        k_shape = v_shape = paging.logical_shape(k_code, v_code, tuple(table.shape), q.shape[0])
    group = checks.check_attention_shapes(tuple(q.shape), k_shape, v_shape)
    batch, kv_heads, kv_len = k_shape
    causal = checks.check_causal(causal, q.shape[2], kv_len)
    least = max(q.shape[2], 1) if causal else 1
    if lengths is None:
        lengths = arrays.full(batch, kv_len, q)
    else:
        lengths = arrays.integers("lengths", lengths, q)
        checks.check_lengths_shape(tuple(lengths.shape), batch)
    if validate:
        checks.check_finite("q", arrays.all_finite(q))
        if batch:
            checks.check_lengths_range(int(lengths.min()), int(lengths.max()), kv_len, least=least)
        if table is not None:
            first_keys = arrays.arange(table.shape[1], table) * k_code.shape[2]
            paging.check_ids(table, first_keys, lengths, k_code.shape[0])
    scale = 1.0 / math.sqrt(k_params.spec.dim) if scale is None else scale
    return Request(
        q, k_code, v_code, k_params, v_params, scale, lengths, table, causal, validate, kv_heads, group, kv_len, least
    )


def run(arrays, masked_attention, q, k_code, v_code, k_params, v_params, *, scale, lengths, causal, validate,
        block_table):  # fmt: skip
    """``attention`` for a tier whose math is ``masked_attention`` (see the module docstring); returns
    ``(B, Hq, T, d_v)`` as ``masked_attention`` computes it."""
    r = prepare(
        arrays, q, k_code, v_code, k_params, v_params, scale=scale, lengths=lengths, causal=causal,
        validate=validate, block_table=block_table,
    )  # fmt: skip
    batch, q_heads, q_len, dim = r.q.shape
    k_code, v_code, bad = r.k_code, r.v_code, None
    if r.table is not None:
        first_keys = arrays.arange(r.table.shape[1], r.table) * k_code.shape[2]
        k_code, v_code, bad = paging.logical_cache(k_code, v_code, r.table, r.lengths, first_keys)
    t = arrays.arange(q_len, r.lengths)
    hidden = (q_len - 1 - t) if r.causal else t * 0  # keys of the later queries, hidden from query t
    heads = arrays.arange(r.group, r.lengths) * 0  # (group,) zeros: the same for every head of the group
    visible = (r.lengths[:, None, None] - hidden[None, None, :] + heads[None, :, None]).reshape(batch, r.group * q_len)
    rows = r.q.reshape(batch, r.kv_heads, r.group * q_len, dim)
    out = masked_attention(rows, k_code, v_code, r.k_params, r.v_params, r.scale, visible)
    undefined = ~checks.lengths_in_range(r.lengths, r.kv_len, r.least)
    if bad is not None:
        undefined = undefined | bad
    out = arrays.nan_where(undefined[:, None, None, None], out)
    return out.reshape(batch, q_heads, q_len, out.shape[-1])
