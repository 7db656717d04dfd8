"""`attention(..., block_table=...)` over paged caches (`rotorquant.engine.paging`), in every tier present.

A logical cache ``(B, Hkv, N)`` is scattered into shuffled blocks of ``page`` keys, with junk in the
blocks no sequence uses and padding ids (-1, or past the cache) in table entries past a sequence's
length. Attention through the table must equal attention over the logical cache exactly, bad ids
where keys lie must be refused (or give NaN rows with ``validate=False``), and the Triton kernel must
read blocks stored the vLLM way, ``(num_blocks, page, Hkv, ...)``, in place.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import rotorquant as rq
from rotorquant.tiers import numpy as ref
from tiers import TIERS, Tier, code_to_numpy, split_attention, to_numpy

FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")
PAGE, MAX_BLOCKS, BATCH = 4, 3, 2  # logical N = 12 keys
LENGTHS = [12, 7]  # sequence 1 uses blocks 0 and 1 of its row; its third entry is padding


def _params():
    return rq.build_params(rq.QuantizerSpec(dim=32, bits=3, qjl=True)), rq.build_params(rq.QuantizerSpec(dim=32, bits=2, seed=1))


def _paged(logical: rq.Compressed, table: np.ndarray, num_blocks: int, rng) -> rq.Compressed:
    """The NumPy cache ``(num_blocks, Hkv, PAGE)`` holding ``logical``'s keys where ``table`` says; the
    other blocks hold another cache's keys (junk)."""
    junk = {f: rng.permutation(getattr(logical, f).reshape(-1, *getattr(logical, f).shape[3:]))
            for f in FIELDS if getattr(logical, f) is not None}  # fmt: skip
    out = {}
    for f, values in junk.items():
        src = getattr(logical, f)
        block = np.resize(values, (num_blocks, src.shape[1], PAGE, *src.shape[3:]))
        for b in range(BATCH):
            for j in range(MAX_BLOCKS):
                if 0 <= table[b, j] < num_blocks:
                    block[table[b, j]] = src[b, :, j * PAGE : (j + 1) * PAGE]
        out[f] = block
    return dataclasses.replace(logical, **out)


def _setup(tier: Tier, seed: int = 0):
    kp, vp = _params()
    rng = np.random.default_rng(seed)
    logical_k = ref.quantize(rng.standard_normal((BATCH, 2, PAGE * MAX_BLOCKS, 32)), kp)
    logical_v = ref.quantize(rng.standard_normal((BATCH, 2, PAGE * MAX_BLOCKS, 32)), vp)
    table = np.array([[5, 0, 3], [2, 6, -1]])  # 8 blocks; blocks 1, 4, 7 unused
    paged_k, paged_v = (_paged(c, table, 8, rng) for c in (logical_k, logical_v))
    q = rng.standard_normal((BATCH, 4, 2, 32))
    return kp, vp, logical_k, logical_v, paged_k, paged_v, table, q


def _on(tier: Tier, a: np.ndarray):
    return a if tier.device is None else torch.as_tensor(a, device=tier.device)


def _q(tier: Tier, q: np.ndarray):
    return q if tier.device is None else torch.tensor(q, dtype=torch.float32, device=tier.device)


@pytest.mark.parametrize("causal", [False, True])
def test_paged_attention_equals_the_logical_cache(tier, causal):
    """Also with the table and lengths in an unsigned dtype (uint32: few torch operations support it)."""
    kp, vp, lk, lv, pk, pv, table, q = _setup(tier)
    lengths = _on(tier, np.array(LENGTHS))
    want = tier.module.attention(_q(tier, q), tier.code(lk, "float32"), tier.code(lv, "float32"), kp, vp,
                                 lengths=lengths, causal=causal)  # fmt: skip
    for padding in (-1, 99, 2**40):  # what sequence 1's unused third entry holds
        t = table.copy()
        t[1, 2] = padding
        got = tier.module.attention(_q(tier, q), tier.code(pk, "float32"), tier.code(pv, "float32"), kp, vp,
                                    lengths=lengths, causal=causal, block_table=_on(tier, t))  # fmt: skip
        assert np.array_equal(to_numpy(got), to_numpy(want)), padding
    unsigned = tier.module.attention(_q(tier, q), tier.code(pk, "float32"), tier.code(pv, "float32"), kp, vp,
                                     lengths=_unsigned(tier, LENGTHS), causal=causal,
                                     block_table=_unsigned(tier, np.where(table >= 0, table, 7)))  # fmt: skip
    assert np.array_equal(to_numpy(unsigned), to_numpy(want))


def _unsigned(tier: Tier, a) -> object:
    a = np.asarray(a, dtype=np.uint32)
    return a if tier.device is None else torch.from_numpy(a.astype(np.int64)).to(torch.uint32).to(tier.device)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_bad_block_ids_where_keys_lie(tier):
    """Sequence 0 names block 8 (of 8), then 2**32 + 1 (which an int32 cast would wrap to 1), and sequence 1
    block -1, each where its keys lie."""
    kp, vp, lk, lv, pk, pv, table, q = _setup(tier, seed=1)
    args = (_q(tier, q), tier.code(pk, "float32"), tier.code(pv, "float32"), kp, vp)
    for bad_table in (np.array([[5, 8, 3], [2, 6, -1]]), np.array([[5, 2**32 + 1, 3], [2, 6, -1]]),
                      np.array([[5, 0, 3], [-1, 6, -1]])):  # fmt: skip
        with pytest.raises(ValueError, match=r"^block_table: expected block ids in 0\.\.7 .* sequences \[[01]\]"):
            tier.module.attention(*args, lengths=_on(tier, np.array(LENGTHS)), block_table=_on(tier, bad_table))
        out = to_numpy(tier.module.attention(*args, lengths=_on(tier, np.array(LENGTHS)),
                                             block_table=_on(tier, bad_table), validate=False))  # fmt: skip
        want = to_numpy(tier.module.attention(*args, lengths=_on(tier, np.array(LENGTHS)), block_table=_on(tier, table)))
        bad = 0 if bad_table[0, 1] != 0 else 1
        assert np.isnan(out[bad]).all()
        assert np.array_equal(out[1 - bad], want[1 - bad])


def test_block_table_argument_errors(tier):
    kp, vp, lk, lv, pk, pv, table, q = _setup(tier)
    args = (_q(tier, q), tier.code(pk, "float32"), tier.code(pv, "float32"), kp, vp)
    with pytest.raises(TypeError, match="^block_table: expected integers, got dtype float"):
        tier.module.attention(*args, block_table=_on(tier, table.astype(np.float32)))
    with pytest.raises(ValueError, match=r"^block_table: expected shape \(batch=2, max_blocks >= 1\), got \(6,\)"):
        tier.module.attention(*args, block_table=_on(tier, table.reshape(-1)))
    with pytest.raises(ValueError, match=r"^block_table: expected shape \(batch=2, max_blocks >= 1\), got \(3, 2\)"):
        tier.module.attention(*args, block_table=_on(tier, np.zeros((3, 2), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"^block_table: expected shape \(batch=2, max_blocks >= 1\), got \(2, 0\)"):
        tier.module.attention(*args, block_table=_on(tier, table[:, :0]))
    short_v = dataclasses.replace(args[2], **{f: getattr(args[2], f)[:7] for f in ("codes", "norms")})
    with pytest.raises(ValueError, match=r"^v_code: expected leading shape \(8, 2, 4\)"):
        tier.module.attention(*args[:2], short_v, kp, vp, block_table=_on(tier, table))


TRITON = [t for t in TIERS if t.name == "triton"]


@pytest.mark.parametrize("tier", TRITON, ids=lambda t: t.name)
def test_triton_reads_blocks_stored_token_major_in_place(tier):
    """Blocks stored ``(num_blocks, page, Hkv, ...)`` (vLLM's layout), viewed as ``(num_blocks, Hkv, page)``."""
    from rotorquant.tiers.triton import launch

    kp, vp, lk, lv, pk, pv, table, q = _setup(tier, seed=2)

    def token_major(code):
        code = tier.code(code, "float32")
        moved = {}
        for f in FIELDS:
            t = getattr(code, f)
            if t is not None:
                perm = (0, 2, 1, 3) if t.dim() == 4 else (0, 2, 1)
                moved[f] = t.permute(*perm).contiguous().permute(*perm)
        return dataclasses.replace(code, **moved)

    k_view, v_view = token_major(pk), token_major(pv)
    assert all(a.data_ptr() == getattr(k_view, f).data_ptr() for a, f in zip(launch.payload(k_view), FIELDS))
    lengths, t = _on(tier, np.array(LENGTHS)), _on(tier, table)
    for splits in (1, 3):
        want = split_attention(_q(tier, q), tier.code(lk, "float32"), tier.code(lv, "float32"), kp, vp, scale=None,
                               lengths=lengths, splits=splits)  # fmt: skip
        got = split_attention(_q(tier, q), k_view, v_view, kp, vp, scale=None, lengths=lengths, block_table=t,
                              splits=splits)  # fmt: skip
        assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tier", TRITON, ids=lambda t: t.name)
def test_triton_int64_key_offsets(tier, causal):
    """Caches whose key offsets pass 2**31 elements read keys through int64 offsets: that path, forced on small
    caches (`LaunchConfig.int32_offsets`), gives exactly what the int32 path gives, paged or not, over keys
    that fill whole blocks of a split and keys that fill part of one."""
    kp, vp, lk, lv, pk, pv, table, q = _setup(tier, seed=3)
    rng = np.random.default_rng(3)
    long = [tier.code(ref.quantize(rng.standard_normal((BATCH, 2, 70, 32)), p), "float32") for p in (kp, vp)]
    logical = [tier.code(lk, "float32"), tier.code(lv, "float32")]
    paged = [tier.code(pk, "float32"), tier.code(pv, "float32")]
    cases = ((long, None, [70, 45]), (logical, None, LENGTHS), (paged, _on(tier, table), LENGTHS))
    for codes, block_table, lengths in cases:  # 70 keys: whole blocks of 16 (the interpreter's) in each split
        kw = dict(scale=None, lengths=_on(tier, np.array(lengths)), splits=2, causal=causal, block_table=block_table)
        narrow = split_attention(_q(tier, q), *codes, kp, vp, **kw)
        wide = split_attention(_q(tier, q), *codes, kp, vp, int32_offsets=0, **kw)
        assert torch.equal(wide, narrow) and torch.isfinite(narrow).all()


def test_gather_pages_is_the_reference_layout():
    """`paging.gather_pages` puts key ``n`` of sequence ``b`` where the table says (checked key by key, every field)."""
    from rotorquant.engine import paging

    kp, vp, lk, lv, pk, pv, table, q = _setup(TIERS[0])
    safe = np.where(table >= 0, table, 0)
    got = code_to_numpy(paging.gather_pages(pk, safe))
    for b in range(BATCH):
        for n in range(PAGE * MAX_BLOCKS):
            if table[b, n // PAGE] >= 0:
                for f in FIELDS:
                    assert np.array_equal(getattr(got, f)[b, :, n], getattr(lk, f)[b, :, n]), (f, b, n)


def test_appending_a_step_to_a_paged_cache(tier):
    """The plain append `quantize_into` replaces: quantize the step's keys and values, assign each field at
    its (block, slot)."""
    kp, vp, lk, lv, pk, pv, table, q = _setup(tier, seed=3)
    pool_k, pool_v = tier.code(pk, "float32"), tier.code(pv, "float32")
    rng = np.random.default_rng(4)
    new_k, new_v = rng.standard_normal((BATCH, 2, 32)), rng.standard_normal((BATCH, 2, 32))  # (tokens, Hkv, d)
    code_k = tier.module.quantize(_q(tier, new_k), kp)
    code_v = tier.module.quantize(_q(tier, new_v), vp)
    position = np.array([5, 7])  # each sequence's next key: sequence 1 grows into its padding-free block 1
    blocks, slots = _on(tier, table[np.arange(BATCH), position // PAGE]), _on(tier, position % PAGE)
    for pool, code in ((pool_k, code_k), (pool_v, code_v)):
        for f in FIELDS:
            if getattr(code, f) is not None:
                getattr(pool, f)[blocks, :, slots] = getattr(code, f)
    lengths = _on(tier, position + 1)
    got = tier.module.attention(_q(tier, q), pool_k, pool_v, kp, vp, lengths=lengths, block_table=_on(tier, table))
    logical_k, logical_v = (code_to_numpy(c) for c in (lk, lv))
    for logical, code in ((logical_k, code_k), (logical_v, code_v)):
        code = code_to_numpy(code)
        for f in FIELDS:
            if getattr(code, f) is not None:
                getattr(logical, f)[np.arange(BATCH), :, position] = getattr(code, f)
    want = tier.module.attention(_q(tier, q), tier.code(logical_k, "float32"), tier.code(logical_v, "float32"), kp, vp,
                                 lengths=lengths)  # fmt: skip
    assert np.array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("validate", [True, False])
def test_quantize_into_appends_a_step_to_a_paged_cache(tier, validate):
    """`quantize_into` with each new vector's flat pool index ((block * Hkv + head) * PAGE + slot) leaves the
    pools byte for byte as the recipe above does."""
    kp, vp, lk, lv, pk, pv, table, q = _setup(tier, seed=5)
    rng = np.random.default_rng(6)
    new_k, new_v = rng.standard_normal((BATCH, 2, 32)), rng.standard_normal((BATCH, 2, 32))  # (tokens, Hkv, d)
    position = np.array([5, 7])
    block = table[np.arange(BATCH), position // PAGE]
    slots = (block[:, None] * 2 + np.arange(2)[None, :]) * PAGE + (position % PAGE)[:, None]  # (tokens, Hkv)
    dtype = "float64" if tier.device is None else "float32"  # what `_q` gives: the cache records x's dtype
    for params, new, paged in ((kp, new_k, pk), (vp, new_v, pv)):
        into, recipe = tier.code(paged, dtype), tier.code(paged, dtype)
        tier.module.quantize_into(_q(tier, new), params, into, _on(tier, slots), validate=validate)
        code = tier.module.quantize(_q(tier, new), params)
        blocks, at = _on(tier, block), _on(tier, position % PAGE)
        for f in FIELDS:
            if getattr(code, f) is not None:
                getattr(recipe, f)[blocks, :, at] = getattr(code, f)
        for f in FIELDS:
            if getattr(code, f) is not None:
                assert np.array_equal(getattr(code_to_numpy(into), f), getattr(code_to_numpy(recipe), f)), f
