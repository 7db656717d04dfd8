"""`quantize_into`: new vectors compressed straight into a cache at flat slots, in every tier present.

A cache of junk entries is viewed in several layouts (head-major, token-major, a vLLM-style paged
pool, one and four leading dims). Writing vectors at slots must leave exactly what the tier's own
`quantize` returns at those entries and every other entry untouched; -1 skips a vector; with
``validate=True`` nothing is written unless every check passes; with ``validate=False`` a slot out
of range writes nothing and a refused vector is stored non-finite. The Triton tier's unchecked call
is one kernel launch that reads nothing back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import rotorquant as rq
from rotorquant.tiers import numpy as ref
from tiers import TIERS, Tier, code_to_numpy

FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")
SPECS = [
    pytest.param(dict(dim=67, bits=3, qjl=True, norm_dtype="float16"), id="rotor-b3-qjl-d67-fp16norms"),
    pytest.param(dict(dim=32, bits=2, rotation="dense", norm_correction=True), id="dense-b2-normcorr-d32"),
    pytest.param(dict(dim=128, bits=4), id="rotor-b4-d128"),
]
# name: (storage shape, axes order giving the cache's leading shape); 30 entries each but the last
LAYOUTS = {
    "head-major": ((2, 3, 5), (0, 1, 2)),
    "token-major": ((2, 5, 3), (0, 2, 1)),
    "vllm-pages": ((5, 2, 3), (0, 2, 1)),  # (num_blocks, page, Hkv) read as (num_blocks, Hkv, page)
    "flat": ((30,), (0,)),
    "4d": ((2, 1, 3, 5), (3, 1, 0, 2)),
    "token-major-3": ((3, 5, 3), (0, 2, 1)),  # one batch row more than the others
}
SLOTS = np.array([[0, 29], [-1, 7], [13, 6], [21, -1]])  # (4, 2): x holds 4 x 2 vectors


def _params(kw: dict) -> rq.QuantParams:
    return rq.build_params(rq.QuantizerSpec(**kw))


def _on(tier: Tier, a: np.ndarray):
    return a if tier.device is None else torch.as_tensor(a, device=tier.device)


def _x(tier: Tier, shape: tuple[int, ...], seed: int, dtype: str = "float32"):
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.asarray(x, dtype=dtype) if tier.device is None else torch.tensor(x, dtype=getattr(torch, dtype), device=tier.device)


def _permuted(code: rq.Compressed, axes: tuple[int, ...]) -> rq.Compressed:
    """``code`` with its leading dims permuted (a view of the same memory)."""

    def view(a):
        order = (*axes, *range(len(axes), a.ndim))
        return a.transpose(*order) if isinstance(a, np.ndarray) else a.permute(*order)

    return dataclasses.replace(code, **{f: view(getattr(code, f)) for f in FIELDS if getattr(code, f) is not None})


def _cache(tier: Tier, params: rq.QuantParams, layout: str, seed: int = 0, dtype: str = "float32") -> rq.Compressed:
    """A cache of junk entries in ``layout``, in the tier, recording ``dtype`` inputs."""
    storage, axes = LAYOUTS[layout]
    junk = ref.quantize(np.random.default_rng(seed).standard_normal((*storage, params.spec.dim)), params)
    return _permuted(tier.code(junk, dtype), axes)


def _copy(code: rq.Compressed) -> rq.Compressed:
    """``code``'s payload copied to NumPy (`code_to_numpy` may share memory with ``code``)."""
    code = code_to_numpy(code)
    return dataclasses.replace(code, **{f: np.array(getattr(code, f)) for f in FIELDS if getattr(code, f) is not None})


def _expected(before: rq.Compressed, new: rq.Compressed, slots: np.ndarray) -> rq.Compressed:
    """``before`` (NumPy, logical layout) with vector ``i`` of ``new`` written at entry ``slots[i]``."""
    out = {f: np.array(getattr(before, f)) for f in FIELDS if getattr(before, f) is not None}
    new = code_to_numpy(new)
    for i, slot in enumerate(slots.reshape(-1)):
        if 0 <= slot < len(out["norms"].reshape(-1)):
            at = np.unravel_index(slot, before.shape)
            for f, values in out.items():
                values[at] = getattr(new, f).reshape(len(slots.reshape(-1)), *values.shape[len(at) :])[i]
    return dataclasses.replace(before, **out)


def _same(a: rq.Compressed, b: rq.Compressed) -> bool:
    a, b = code_to_numpy(a), code_to_numpy(b)
    return all(
        getattr(a, f) is None or np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True) for f in FIELDS
    )


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS)[:-1])
@pytest.mark.parametrize("kw", SPECS)
def test_writes_what_quantize_returns_and_nothing_else(tier, kw, layout, validate):
    params = _params(kw)
    cache = _cache(tier, params, layout)
    before = _copy(cache)
    x = _x(tier, (*SLOTS.shape, params.spec.dim), 1)
    tier.module.quantize_into(x, params, cache, _on(tier, SLOTS), validate=validate)
    assert _same(cache, _expected(before, tier.module.quantize(x, params), SLOTS))


@pytest.mark.parametrize("validate", [True, False])
def test_input_dtypes(tier, validate):
    """Every input dtype of the tier, into float16 norms: the vector of norm 1 + 2**-11 + 2**-40 rounds to
    float16 differently in one step from float64 (1.0009765625) and through float32 (1.0), as `quantize`
    stores it here."""
    params = _params(dict(dim=32, bits=3, qjl=True, norm_dtype="float16"))
    x64 = np.random.default_rng(11).standard_normal((6, 32))
    x64[0] = np.eye(32)[0] * (1 + 2**-11 + 2**-40)
    slots = np.array([4, 17, -1, 0, 29, 11])
    for dtype in tier.dtypes:
        x = tier.array(x64, dtype)
        cache = _cache(tier, params, "vllm-pages", dtype=dtype)
        before = _copy(cache)
        tier.module.quantize_into(x, params, cache, _on(tier, slots), validate=validate)
        assert _same(cache, _expected(before, tier.module.quantize(x, params), slots)), dtype


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8"])
def test_slot_dtypes(tier, dtype, validate):
    params = _params(dict(dim=32, bits=3))
    cache = _cache(tier, params, "head-major")
    before = _copy(cache)
    slots = np.array([3, 0, 29], dtype=dtype)
    x = _x(tier, (3, 32), 2)
    tier.module.quantize_into(x, params, cache, _on(tier, slots), validate=validate)
    assert _same(cache, _expected(before, tier.module.quantize(x, params), slots))


def test_slots_out_of_range(tier):
    """Refused when checked; unchecked, those vectors write nothing, in the cache (slot 30 unravels to entry
    0 if its first index is dropped, 2**32 + 3 to entry 3 if cut to int32) or past it (the cache is the
    first 2 of 3 batch rows of a bigger buffer, whose last row must stay as it was), and the rest land."""
    params = _params(dict(dim=32, bits=3, qjl=True))
    slots = np.array([30, 5, -2, 2**40, -(2**40), 2**32 + 3, 1])
    x = _x(tier, (7, 32), 3)
    buffer = _cache(tier, params, "token-major-3")  # (3, 3, 5) over storage (3, 5, 3)
    cache = dataclasses.replace(buffer, **{f: getattr(buffer, f)[:2] for f in FIELDS if getattr(buffer, f) is not None})
    before, spare = _copy(cache), _row(buffer, 2)
    with pytest.raises(ValueError, match=r"^slots: expected values in -1\.\.29 \(-1: skip\), got values in "):
        tier.module.quantize_into(x, params, cache, _on(tier, slots))
    assert _same(cache, before)
    tier.module.quantize_into(x, params, cache, _on(tier, slots), validate=False)
    assert _same(cache, _expected(before, tier.module.quantize(x, params), np.where(np.isin(slots, [5, 1]), slots, -1)))
    assert _same(_row(buffer, 2), spare)


def _row(code: rq.Compressed, i: int) -> rq.Compressed:
    """Entry ``i`` of ``code``'s first leading dim, copied to NumPy."""
    return _copy(dataclasses.replace(code, **{f: getattr(code, f)[i] for f in FIELDS if getattr(code, f) is not None}))


def test_uint64_slots_past_int64_stay_out_of_range(tier):
    """2**64 - 1 must not wrap to -1 (skip): refused when checked, written nowhere unchecked."""
    params = _params(dict(dim=32, bits=3))
    slots = np.array([2**64 - 1, 3], dtype=np.uint64)
    x = _x(tier, (2, 32), 12)
    cache = _cache(tier, params, "flat")
    before = _copy(cache)
    with pytest.raises(ValueError, match=r"^slots: expected values in -1\.\.29 \(-1: skip\), got values in 3\.\.9223372036854775807"):
        tier.module.quantize_into(x, params, cache, _on(tier, slots))
    tier.module.quantize_into(x, params, cache, _on(tier, slots), validate=False)
    assert _same(cache, _expected(before, tier.module.quantize(x, params), np.array([-1, 3])))


def test_fields_sharing_memory_are_refused(tier):
    params = _params(dict(dim=32, bits=3, qjl=True))
    cache = _cache(tier, params, "head-major")
    shared = dataclasses.replace(cache, residual_norms=cache.norms)
    before = _copy(cache)
    for validate in (True, False):
        with pytest.raises(ValueError, match="^cache.residual_norms: expected memory apart from cache.norms's, got the two overlapping"):
            tier.module.quantize_into(_x(tier, (1, 32), 13), params, shared, _on(tier, np.array([0])), validate=validate)
    assert _same(cache, before)


def test_empty_cache(tier):
    """A cache with no entries: only -1 slots pass the checks; unchecked, nothing is written anywhere."""
    params = _params(dict(dim=32, bits=3))
    empty = tier.code(ref.quantize(np.zeros((2, 0, 5, 32)), params), "float32")
    x = _x(tier, (2, 32), 14)
    tier.module.quantize_into(x, params, empty, _on(tier, np.array([-1, -1])))
    with pytest.raises(ValueError, match=r"^slots: expected values in -1\.\.-1"):
        tier.module.quantize_into(x, params, empty, _on(tier, np.array([-1, 0])))
    tier.module.quantize_into(x, params, empty, _on(tier, np.array([0, 7])), validate=False)
    assert code_to_numpy(empty).norms.size == 0


def test_repeated_slots_are_refused(tier):
    params = _params(dict(dim=32, bits=3))
    cache = _cache(tier, params, "head-major")
    before = _copy(cache)
    with pytest.raises(ValueError, match=r"^slots: expected each cache entry written at most once, got slots repeated: \[4\]"):
        tier.module.quantize_into(_x(tier, (4, 32), 4), params, cache, _on(tier, np.array([4, -1, -1, 4])))
    assert _same(cache, before)


def test_nothing_to_write(tier):
    params = _params(dict(dim=32, bits=3))
    cache = _cache(tier, params, "flat")
    before = _copy(cache)
    for validate in (True, False):
        tier.module.quantize_into(_x(tier, (0, 32), 5), params, cache, _on(tier, np.zeros(0, dtype=np.int64)), validate=validate)
        tier.module.quantize_into(_x(tier, (2, 32), 5), params, cache, _on(tier, np.array([-1, -1])), validate=validate)
    assert _same(cache, before)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
def test_refused_vectors(tier):
    """A NaN, an Inf and a norm past float16: refused before any write when checked; unchecked, stored with
    non-finite norms, the valid vectors as if written alone."""
    params = _params(dict(dim=32, bits=3, norm_dtype="float16"))
    x = np.random.default_rng(6).standard_normal((5, 32))
    x[1, 3], x[2, 0], x[3] = np.nan, np.inf, 2e4
    x = np.asarray(x, dtype=np.float32) if tier.device is None else torch.tensor(x, dtype=torch.float32, device=tier.device)
    slots = np.array([8, 9, 10, 11, 12])
    cache = _cache(tier, params, "vllm-pages")
    before = _copy(cache)
    with pytest.raises(ValueError, match="^x: expected"):
        tier.module.quantize_into(x, params, cache, _on(tier, slots))
    assert _same(cache, before)
    tier.module.quantize_into(x, params, cache, _on(tier, slots), validate=False)
    got = _copy(cache)
    bad = slots[[1, 2, 3]]
    assert not np.isfinite(got.norms.reshape(-1)[bad]).any()
    want = _expected(before, tier.module.quantize(x[[0, 4]], params), slots[[0, 4]])
    for f in ("codes", "norms"):  # every other entry: the valid vectors written, the rest untouched
        flat_got, flat_want = (getattr(c, f).reshape(30, -1) for c in (got, want))
        assert np.array_equal(np.delete(flat_got, bad, axis=0), np.delete(flat_want, bad, axis=0)), f


def _mutations(tier: Tier, params: rq.QuantParams):
    """``(name, change, error, message)``: one bad argument each, the others valid."""
    other = _params(dict(dim=32, bits=2))

    def field(f, value):
        return lambda a: {**a, "cache": dataclasses.replace(a["cache"], **{f: value(getattr(a["cache"], f))})}

    numpy = tier.device is None
    wide = (lambda t: t.astype(np.float64)) if numpy else (lambda t: t.to(torch.float64))
    expand = (lambda t: np.broadcast_to(t[:1], t.shape)) if numpy else (lambda t: t[:1].expand(t.shape))
    strided = (lambda t: np.repeat(t, 2, axis=-1)[..., ::2]) if numpy else (lambda t: t.repeat_interleave(2, -1)[..., ::2])

    def five(t):
        return t.reshape(1, 1, *t.shape)

    return [
        ("slots shape", lambda a: {**a, "slots": a["slots"][:2]}, ValueError, r"^slots: expected shape \(4,\) \(x's leading shape\), got \(2,\)"),
        ("slots float", lambda a: {**a, "slots": _on(tier, np.array([0.0, 1, 2, 3]))}, TypeError, "^slots: expected integers, got dtype float"),
        ("slots ragged", lambda a: {**a, "slots": [0, [1], 2, 3]}, TypeError,
         r"^slots: expected integers \(an array, a tensor or a list of ints\), got list"),
        ("x dtype", lambda a: {**a, "x": _x(tier, (4, 32), 0, "float64")}, TypeError,
         r"^x: expected dtype float32 \(the cache's dtype\), got float64"),
        ("x dim", lambda a: {**a, "x": _x(tier, (4, 31), 0)}, ValueError, "^x: expected"),
        ("cache spec", lambda a: {**a, "params": other}, ValueError, "^cache: expected a code built for"),
        ("cache type", lambda a: {**a, "cache": "cache"}, TypeError, "^cache: expected a rotorquant.Compressed, got str"),
        ("norms dtype", field("norms", wide), TypeError, "^cache.norms: expected dtype float32, got float64"),
        ("expanded", field("norms", expand), ValueError, "^cache.norms: expected one element per cache entry"),
        ("strided bytes", field("codes", strided), ValueError, r"^cache.codes: expected each entry's bytes contiguous"),
        ("five dims", lambda a: {**a, "cache": dataclasses.replace(a["cache"], **{
            f: five(getattr(a["cache"], f)) for f in ("codes", "norms")})}, ValueError,
         r"^cache: expected 1 to 4 leading dims, got leading shape \(1, 1, 2, 3, 5\)"),  # fmt: skip
        ("validate", lambda a: {**a, "validate": 1}, TypeError, "^validate: expected a bool, got int"),
    ]


@pytest.mark.parametrize("validate", [True, False])
def test_argument_errors_write_nothing(tier, validate):
    params = _params(dict(dim=32, bits=3))
    for name, change, error, message in _mutations(tier, params):
        cache = _cache(tier, params, "head-major")
        before = _copy(cache)
        args = change(dict(x=_x(tier, (4, 32), 7), params=params, cache=cache, slots=_on(tier, np.array([1, 2, 3, 4])),
                           validate=validate))  # fmt: skip
        with pytest.raises(error, match=message):
            tier.module.quantize_into(args["x"], args["params"], args["cache"], args["slots"], validate=args["validate"])
        assert _same(cache, before), name


TORCH_CPU = [t for t in TIERS if t.name == "torch-cpu"]


def test_read_only_numpy_cache_is_refused():
    params = _params(dict(dim=32, bits=3))
    cache = _cache(TIERS[0], params, "flat")
    cache.norms.flags.writeable = False
    before = _copy(cache)
    with pytest.raises(ValueError, match="^cache.norms: expected a writable array, got a read-only one"):
        ref.quantize_into(np.ones((1, 32), dtype=np.float32), params, cache, np.array([3]))
    assert _same(cache, before)


@pytest.mark.parametrize("tier", TORCH_CPU, ids=lambda t: t.name)
def test_cache_on_another_device_is_refused(tier):
    params = _params(dict(dim=32, bits=3))
    cache = _cache(tier, params, "head-major")
    meta = dataclasses.replace(cache, norms=torch.empty(cache.norms.shape, device="meta"))
    with pytest.raises(ValueError, match="^cache.norms: expected device cpu"):
        tier.module.quantize_into(_x(tier, (4, 32), 8), params, meta, torch.arange(4))


# ---------------------------------------------------------------- the Triton tier's unchecked call

TRITON = [t for t in TIERS if t.name == "triton"]


@pytest.mark.parametrize("tier", TRITON, ids=lambda t: t.name)
def test_unchecked_triton_call_is_one_launch_and_reads_nothing_back(tier):
    """Only `quantize_kernel` is launched (no other torch operator, no host read); run afterwards, that
    launch writes what the checked call writes."""
    from test_unchecked_calls import launches_only

    tt, params = tier.module, _params(dict(dim=67, bits=3, qjl=True, norm_dtype="float16"))
    x, slots = _x(tier, (4, 2, 67), 9), _on(tier, SLOTS)
    want, cache = _cache(tier, params, "vllm-pages"), _cache(tier, params, "vllm-pages")
    tt.quantize_into(x, params, want, slots)  # also builds the cached constant tables
    with launches_only(tt.launch, ("quantize_kernel",)) as launches:
        tt.quantize_into(x, params, cache, slots, validate=False)
    assert [name for name, _ in launches] == ["quantize_kernel"]
    launches[0][1]()
    assert _same(cache, want)


@pytest.mark.parametrize("tier", TRITON, ids=lambda t: t.name)
def test_triton_int64_unravel(tier):
    """Caches of 2**31 entries or more unravel slots in int64: that path, forced on a small cache
    (`LaunchConfig.int32_entries`), writes what the int32 path writes."""
    launch = tier.module.launch
    params = _params(dict(dim=32, bits=3, qjl=True))
    x, slots = _x(tier, (*SLOTS.shape, 32), 10), _on(tier, SLOTS)
    narrow, wide = _cache(tier, params, "4d"), _cache(tier, params, "4d")
    tier.module.quantize_into(x, params, narrow, slots, validate=False)
    rows, flat = x.reshape(-1, 32), slots.reshape(-1)
    launch.quantize(rows, params, cap_norms=True, into=(wide, flat), config=launch.LaunchConfig(int32_entries=0))
    assert _same(wide, narrow) and not _same(wide, _cache(tier, params, "4d"))


def _interleaved(tier: Tier, params: rq.QuantParams, norm_at: int, slot_bytes: int) -> tuple[rq.Compressed, object]:
    """A cache whose codes and norms share one uint8 page ``(5 blocks, 2 slots, 3 heads, slot_bytes)``, as an
    engine packs them: codes at bytes ``0..code_bytes``, the float32 norm at ``norm_at``; also the page."""
    spec = params.spec
    page = np.zeros((5, 2, 3, slot_bytes), dtype=np.uint8)
    page = page if tier.device is None else torch.from_numpy(page).to(tier.device)

    def as_float32(b):
        return b.view(np.float32)[..., 0] if tier.device is None else b.view(torch.float32)[..., 0]

    codes, norms = page[..., : spec.code_bytes], as_float32(page[..., norm_at : norm_at + 4])
    cache = rq.Compressed(codes=codes, norms=norms, spec=spec, dtype="float32")
    return _permuted(cache, (0, 2, 1)), page


def test_fields_interleaved_in_one_page(tier):
    """Each entry's codes and norm side by side in one slot of a uint8 page (vLLM's layout): accepted, and
    written exactly as into separate arrays; a norm placed over the codes' bytes is refused."""
    params = _params(dict(dim=32, bits=3))  # 12 bytes of codes
    x = _x(tier, (*SLOTS.shape, 32), 12)
    for validate in (True, False):
        cache, page = _interleaved(tier, params, norm_at=16, slot_bytes=20)
        separate = _cache(tier, params, "vllm-pages")
        zeros = dataclasses.replace(separate, **{f: getattr(separate, f) * 0 for f in ("codes", "norms")})
        tier.module.quantize_into(x, params, cache, _on(tier, SLOTS), validate=validate)
        tier.module.quantize_into(x, params, zeros, _on(tier, SLOTS), validate=validate)
        assert _same(cache, zeros)
        assert not np.any(code_to_numpy(rq.Compressed(page[..., 12:16], page[..., 0, 0], params.spec)).codes)
    overlapping, _ = _interleaved(tier, params, norm_at=8, slot_bytes=20)
    with pytest.raises(ValueError, match=r"cache\.\w+: expected memory apart from cache\.\w+'s, got the two overlapping"):
        tier.module.quantize_into(x, params, overlapping, _on(tier, SLOTS))
