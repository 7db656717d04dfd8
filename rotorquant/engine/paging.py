"""Paged KV caches: keys kept in fixed-size blocks, found through a block table.

A paged cache is a `Compressed` of leading shape ``(num_blocks, Hkv, page)``: block ``j`` holds
``page`` consecutive keys of one sequence for every KV head (a view of blocks stored
``(num_blocks, page, Hkv, ...)``, as vLLM lays them out, works too). ``block_table (B, max_blocks)``
lists each sequence's blocks in order, so key ``n`` of sequence ``b`` is slot ``n % page`` of block
``block_table[b, n // page]``, and the logical cache holds ``N = max_blocks * page`` keys per
sequence. Only blocks holding a key below ``lengths[b]`` are ever read; the rest of a table row may be
anything (padding).

The NumPy and torch tiers gather the logical cache with `gather_pages`; the Triton kernel follows the
table as it walks the keys. The functions here index, compare and reshape only, so they take NumPy
arrays and torch tensors alike.
"""

from __future__ import annotations

import dataclasses

from .. import checks
from ..format import PAYLOAD_FIELDS, Compressed


def logical_shape(
    k_code: Compressed, v_code: Compressed, table_shape: tuple[int, ...], batch: int
) -> tuple[int, int, int]:
    """``(B, Hkv, max_blocks * page)``: the leading shape of the cache a block table of ``table_shape``
    (one row per sequence of the ``batch``) makes of the paged ``k_code`` and ``v_code`` (both
    ``(num_blocks, Hkv, page)``, at least one block)."""
    checks.check_block_table_shape(table_shape, batch)
    if len(k_code.shape) != 3 or k_code.shape[0] == 0 or k_code.shape[2] == 0:
        raise ValueError(
            f"k_code: expected leading shape (num_blocks, kv_heads, page), num_blocks >= 1 and page >= 1, with a "
            f"block_table, got {k_code.shape}"
        )
    if v_code.shape != k_code.shape:
        raise ValueError(f"v_code: expected leading shape {k_code.shape} (as k_code), got {v_code.shape}")
    return table_shape[0], k_code.shape[1], table_shape[1] * k_code.shape[2]


def logical_cache(k_code: Compressed, v_code: Compressed, table, lengths, first_keys):
    """``(k, v, bad)``: the logical caches ``(B, Hkv, max_blocks * page)`` the paged ``k_code`` and ``v_code``
    hold under ``table``, and the ``(B,)`` sequences whose table names a block out of range where their
    keys lie (block 0 is gathered in its place: their rows are made NaN). ``first_keys (max_blocks,)``:
    ``j * page``, the first key of each table column."""
    bad = bad_sequences(table, first_keys, lengths, k_code.shape[0])
    safe = table * ((table >= 0) & (table < k_code.shape[0]))  # unused or (unchecked) bad ids: block 0
    return gather_pages(k_code, safe), gather_pages(v_code, safe), bad


def check_ids(table, first_keys, lengths, num_blocks: int) -> None:
    """Every block id where keys below ``lengths`` lie is in ``0..num_blocks - 1`` (reads the values)."""
    bad = bad_sequences(table, first_keys, lengths, num_blocks).tolist()
    checks.check_block_ids([b for b, is_bad in enumerate(bad) if is_bad], num_blocks)


def bad_sequences(table, first_keys, lengths, num_blocks: int):
    """``(B,)`` bool: the sequences whose table names a block outside ``0..num_blocks - 1`` for a block
    holding keys below ``lengths[b]``. ``first_keys (max_blocks,)``: ``j * page``, the first key of
    each table column."""
    used = first_keys[None, :] < lengths[:, None]
    return (used & ((table < 0) | (table >= num_blocks))).any(1)


def gather_pages(code: Compressed, table) -> Compressed:
    """The logical cache ``(B, Hkv, max_blocks * page)`` of the paged ``code`` (``(num_blocks, Hkv, page)``)
    under ``table (B, max_blocks)`` of block ids in range: a copy, block by block."""

    def gather(t):
        g = t[table].swapaxes(1, 2)  # (B, Hkv, max_blocks, page, ...)
        return g.reshape(*g.shape[:2], g.shape[2] * g.shape[3], *g.shape[4:])

    moved = {f: gather(getattr(code, f)) for f in PAYLOAD_FIELDS if getattr(code, f) is not None}
    return dataclasses.replace(code, **moved)
