"""``validate=False``: the unchecked `quantize` and `attention` an inference engine calls every decode step
(`quantize_into` has its own tests in ``tests/test_quantize_into.py``; its unchecked call is part of the
CUDA-graph test here).

In every tier present (see ``tests/tiers.py``):

- on valid input the unchecked call returns exactly what the checked call returns;
- a vector or query that the checks would refuse (NaN, Inf, a norm past the norm dtype) gives
  non-finite output rows, never finite wrong ones, and leaves every other row unchanged;
- a sequence whose length is out of range gets NaN rows;
- the Triton tier, and the torch tier's attention, read no tensor value back on the host (checked here
  by making every Python-level read -- ``item``, ``bool``, ``int``, ``tolist``, ``cpu``, ... -- raise, which
  cannot see a synchronization inside a C++ operator; on a GPU,
  ``test_triton_calls_capture_in_a_cuda_graph`` captures the Triton calls under sync debug mode "error");
- the Triton tier's unchecked attention is three kernel launches and no other torch operator.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rotorquant as rq
from rotorquant.tiers import numpy as ref
from tiers import TIERS, Tier, code_to_numpy, to_numpy

SPECS = [
    pytest.param(dict(dim=67, bits=3, qjl=True, norm_dtype="float16"), id="rotor-b3-qjl-d67-fp16norms"),
    pytest.param(dict(dim=32, bits=2, rotation="dense", norm_correction=True), id="dense-b2-normcorr-d32"),
]
FIELDS = ("codes", "norms", "qjl_signs", "residual_norms")


def _vectors(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _same_code(a: rq.Compressed, b: rq.Compressed, rows=slice(None)) -> bool:
    a, b = code_to_numpy(a), code_to_numpy(b)
    return all(
        getattr(a, f) is None or np.array_equal(getattr(a, f)[rows], getattr(b, f)[rows], equal_nan=True)
        for f in FIELDS
    )


def _array(tier: Tier, x: np.ndarray):
    """``x`` as the tier's float32 input, NaN and Inf kept."""
    return np.asarray(x, dtype=np.float32) if tier.device is None else torch.tensor(x, dtype=torch.float32, device=tier.device)


def _lengths(tier: Tier, lengths: list[int]):
    return np.array(lengths) if tier.device is None else torch.tensor(lengths, dtype=torch.int32, device=tier.device)


@pytest.mark.parametrize("kw", SPECS)
def test_quantize_unchecked_equals_checked_on_valid_input(tier, kw):
    params = rq.build_params(rq.QuantizerSpec(**kw))
    x = _array(tier, _vectors((2, 9, params.spec.dim), 0))
    checked = tier.module.quantize(x, params)
    assert _same_code(tier.module.quantize(x, params, validate=False), checked)


@pytest.mark.parametrize("kw", SPECS)
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
def test_quantize_unchecked_keeps_bad_vectors_non_finite(tier, kw):
    """Row 1 holds a NaN, row 2 an Inf, row 3 a norm past the norm dtype (float16: 65504; float32
    norms: past float32, each entry finite); rows 0 and 4 are valid and come out as if quantized alone."""
    params = rq.build_params(rq.QuantizerSpec(**kw))
    d = params.spec.dim
    x = _vectors((5, d), 1)
    x[1, 3], x[2, 0] = np.nan, np.inf
    x[3] = 2e4 if params.spec.norm_dtype.value == "float16" else 1e38  # norms 1.6e5 / 5.7e38
    with pytest.raises(ValueError, match="^x: expected"):
        tier.module.quantize(_array(tier, x), params)
    code = tier.module.quantize(_array(tier, x), params, validate=False)
    alone = tier.module.quantize(_array(tier, x[[0, 4]]), params)
    assert _same_code(_rows(code, [0, 4]), alone)
    out = to_numpy(tier.module.dequantize(code, params))
    assert np.isfinite(out[[0, 4]]).all()
    for row in (1, 2, 3):
        assert not np.isfinite(out[row]).any(), f"row {row}: {out[row]}"


def _rows(code: rq.Compressed, rows: list[int]) -> rq.Compressed:
    """The code of the vectors ``rows`` of a code of leading shape ``(n,)``."""
    pick = {f: getattr(code, f)[rows] for f in FIELDS if getattr(code, f) is not None}
    return rq.Compressed(spec=code.spec, dtype=code.dtype, **pick)


def _cache(tier: Tier, batch: int, kv_len: int):
    """K/V codes ``(batch, 2, kv_len)`` (3-bit keys with QJL, 2-bit values) moved into ``tier``."""
    k_params = rq.build_params(rq.QuantizerSpec(dim=32, bits=3, qjl=True))
    v_params = rq.build_params(rq.QuantizerSpec(dim=32, bits=2, seed=1))
    k_code = ref.quantize(_vectors((batch, 2, kv_len, 32), 2), k_params)
    v_code = ref.quantize(_vectors((batch, 2, kv_len, 32), 3), v_params)
    return tier.code(k_code, "float32"), tier.code(v_code, "float32"), k_params, v_params


@pytest.mark.parametrize("causal", [False, True])
def test_attention_unchecked_equals_checked_on_valid_input(tier, causal):
    k_code, v_code, kp, vp = _cache(tier, 2, 5)
    q = _array(tier, _vectors((2, 4, 3, 32), 4))
    kw = dict(lengths=_lengths(tier, [5, 3]), causal=causal)
    checked = tier.module.attention(q, k_code, v_code, kp, vp, **kw)
    unchecked = tier.module.attention(q, k_code, v_code, kp, vp, validate=False, **kw)
    assert np.array_equal(to_numpy(unchecked), to_numpy(checked))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_attention_unchecked_gives_nan_rows_for_lengths_out_of_range(tier, causal):
    """Sequence 0 is valid; 1 is longer than the cache, 2 empty, 3 negative, 4 shorter than its 3
    queries (out of range only with ``causal``)."""
    k_code, v_code, kp, vp = _cache(tier, 5, 6)
    q = _array(tier, _vectors((5, 4, 3, 32), 5))
    lengths = [6, 7, 0, -2, 2]
    with pytest.raises(ValueError, match="^lengths: expected values in"):
        tier.module.attention(q, k_code, v_code, kp, vp, lengths=_lengths(tier, lengths), causal=causal)
    out = to_numpy(
        tier.module.attention(q, k_code, v_code, kp, vp, lengths=_lengths(tier, lengths), causal=causal, validate=False)
    )
    fixed = _lengths(tier, [6, 6, 6, 6, 6 if causal else 2])
    valid = to_numpy(tier.module.attention(q, k_code, v_code, kp, vp, lengths=fixed, causal=causal))
    assert np.array_equal(out[0], valid[0])
    assert np.isnan(out[1:4]).all()
    if causal:
        assert np.isnan(out[4]).all()
    else:
        assert np.array_equal(out[4], valid[4])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_attention_unchecked_lengths_past_int32_do_not_wrap(tier):
    """2**32 + 3 and 3 - 2**32 are out of range, not 3 (a cast to int32 would wrap them to 3)."""
    k_code, v_code, kp, vp = _cache(tier, 3, 6)
    q = _array(tier, _vectors((3, 4, 1, 32), 13))
    big = [6, 2**32 + 3, 3 - 2**32]
    lengths = np.array(big) if tier.device is None else torch.tensor(big, dtype=torch.int64, device=tier.device)
    out = to_numpy(tier.module.attention(q, k_code, v_code, kp, vp, lengths=lengths, validate=False))
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()


@pytest.mark.parametrize("validate", [True, False])
def test_attention_needs_a_key_and_allows_empty_batches(tier, validate):
    k_code, v_code, kp, vp = _cache(tier, 2, 3)
    empty = tier.code(_rows_of_cache(k_code, 0), "float32"), tier.code(_rows_of_cache(v_code, 0), "float32")
    q = _array(tier, _vectors((2, 4, 1, 32), 14))
    with pytest.raises(ValueError, match=r"^k_code: expected at least one cached key \(kv_len >= 1\)"):
        tier.module.attention(q, *empty, kp, vp, validate=validate)
    for shape in ((0, 4, 1, 32), (2, 4, 0, 32)):
        b = shape[0]
        k, v = (tier.code(_rows_of_cache(c, 3, batch=b), "float32") for c in (k_code, v_code))
        out = tier.module.attention(_array(tier, np.zeros(shape)), k, v, kp, vp, validate=validate)
        assert tuple(out.shape) == shape


def _rows_of_cache(code: rq.Compressed, n: int, batch: int | None = None) -> rq.Compressed:
    """The first ``n`` keys (and ``batch`` sequences) of a cache, as a NumPy code."""
    code = code_to_numpy(code)
    b = slice(None) if batch is None else slice(0, batch)
    pick = {f: getattr(code, f)[b, :, :n] for f in FIELDS if getattr(code, f) is not None}
    return rq.Compressed(spec=code.spec, dtype=code.dtype, **pick)


@pytest.mark.parametrize("norm_correction", [False, True])
def test_norms_just_past_float16_are_refused_or_stored_as_inf(tier, norm_correction):
    """With float16 norms, a norm of 65510 (rounds to 65504 in a plain cast) and, with norm correction, a
    vector of norm 64000 (stored as 64000 / ||c[k]|| = 67650 > 65504) are refused; unchecked, they are
    stored as Inf."""
    params = rq.build_params(rq.QuantizerSpec(dim=32, bits=2, norm_dtype="float16", norm_correction=norm_correction))
    x = _vectors((3, 32), 15)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x[0] *= 64000.0 if norm_correction else 65510.0  # row 0's ||c[k]|| is 1 / 1.057
    x[2] *= 100.0
    with pytest.raises(ValueError, match="^x: expected vector norms <= 65504" + (".*norm_correction" if norm_correction else "")):
        tier.module.quantize(_array(tier, x), params)
    norms = to_numpy(tier.module.quantize(_array(tier, x), params, validate=False).norms)
    assert norms[0] == np.inf and np.isfinite(norms[1:]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice encountered")
def test_attention_unchecked_keeps_bad_queries_to_their_rows(tier):
    k_code, v_code, kp, vp = _cache(tier, 2, 5)
    q = _vectors((2, 4, 3, 32), 6)
    q[0, 1, 2, 7], q[1, 3, 0, 0] = np.nan, -np.inf
    with pytest.raises(ValueError, match="^q: expected finite values"):
        tier.module.attention(_array(tier, q), k_code, v_code, kp, vp)
    out = to_numpy(tier.module.attention(_array(tier, q), k_code, v_code, kp, vp, validate=False))
    bad = np.zeros(out.shape[:3], dtype=bool)
    bad[0, 1, 2] = bad[1, 3, 0] = True
    assert not np.isfinite(out[bad]).any()
    q[bad] = 0.0
    valid = to_numpy(tier.module.attention(_array(tier, q), k_code, v_code, kp, vp))
    assert np.array_equal(out[~bad], valid[~bad])


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("field", ["residual_norms", "qjl_signs"])
def test_wrongly_shaped_qjl_fields_are_refused(tier, field, validate):
    """Shapes need no values, so they are checked either way: a field too short would be read past its end."""
    k_code, v_code, kp, vp = _cache(tier, 2, 5)
    short = dataclasses.replace(k_code, **{field: getattr(k_code, field)[:, :, :1]})
    q = _array(tier, _vectors((2, 4, 1, 32), 16))
    with pytest.raises(ValueError, match=f"^k_code.{field}: expected shape"):
        tier.module.attention(q, short, v_code, kp, vp, validate=validate)


def test_validate_must_be_a_bool(tier):
    k_code, v_code, kp, vp = _cache(tier, 1, 2)
    q = _array(tier, _vectors((1, 2, 1, 32), 7))
    with pytest.raises(TypeError, match="^validate: expected a bool, got str"):
        tier.module.attention(q, k_code, v_code, kp, vp, validate="no")
    with pytest.raises(TypeError, match="^validate: expected a bool, got int"):
        tier.module.quantize(q, kp, validate=0)


# ---------------------------------------------------------------- no host synchronization

_HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu")


@contextlib.contextmanager
def no_host_reads():
    """Every `torch.Tensor` method that reads values back to the host raises inside the block."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value back to the host")

        return method

    with pytest.MonkeyPatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


NO_SYNC = [t for t in TIERS if t.device is not None]


@pytest.mark.parametrize("tier", [t for t in NO_SYNC if t.name == "triton" or t.name.startswith("torch")], ids=lambda t: t.name)
def test_unchecked_attention_reads_nothing_back(tier):
    k_code, v_code, kp, vp = _cache(tier, 2, 5)
    q = _array(tier, _vectors((2, 4, 3, 32), 8))
    lengths = _lengths(tier, [5, 3])
    table = torch.tensor([[0], [1]], device=tier.device)  # the cache as a pool of 2 blocks of 5 keys: the same cache
    want = tier.module.attention(q, k_code, v_code, kp, vp, lengths=lengths, causal=True)
    with no_host_reads():
        got = tier.module.attention(q, k_code, v_code, kp, vp, lengths=lengths, causal=True, validate=False)
        paged = tier.module.attention(q, k_code, v_code, kp, vp, lengths=lengths, block_table=table, causal=True,
                                      validate=False)  # fmt: skip
        with pytest.raises(AssertionError, match="read a value back to the host"):  # the checks do read values
            tier.module.attention(q, k_code, v_code, kp, vp, lengths=lengths, causal=True)
    assert torch.equal(got, want) and torch.equal(paged, want)


TRITON = [t for t in TIERS if t.name == "triton"]
# torch operators that launch no GPU kernel: views and allocations
_NO_KERNEL = {"view.default", "_reshape_alias.default", "alias.default", "empty.memory_format"}


class _Dispatched(TorchDispatchMode):
    """Records the name of every torch operator dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def launches_only(module, names: tuple[str, ...]):
    """Inside the block the kernels ``names`` of ``module`` record their launches into the yielded list as
    ``(name, launch)`` instead of running (``launch()`` runs one later), no tensor value is read on the
    host, and the test fails if any torch operator other than a view or an allocation is dispatched."""
    launches = []

    def recorder(name, kernel):
        class Recorder:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((name, lambda: kernel[grid](*args, **kwargs)))

        return Recorder()

    dispatched = _Dispatched()
    with pytest.MonkeyPatch.context() as patch:
        for name in names:
            patch.setattr(module, name, recorder(name, getattr(module, name)))
        with no_host_reads(), dispatched:
            yield launches
    assert set(dispatched.ops) <= _NO_KERNEL, dispatched.ops


@pytest.mark.parametrize("tier", TRITON, ids=lambda t: t.name)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bfloat16: the interpreter adds a conversion
def test_unchecked_triton_attention_is_three_launches(tier, paged, dtype):
    """With int32 lengths and (paged) an int64 block table on the device, the unchecked call launches the
    query, split and combine kernels and nothing else; run afterwards, they give the checked result."""
    tt = tier.module
    k_code, v_code, kp, vp = _cache(tier, 2, 5)
    q = _array(tier, _vectors((2, 4, 3, 32), 14)).to(dtype)
    lengths = _lengths(tier, [5, 4])
    table = {"block_table": torch.tensor([[1], [0]], device=tier.device)} if paged else {}
    if paged:  # sequence b's keys in block 1 - b
        k_code, v_code = (dataclasses.replace(c, **{f: getattr(c, f).flip(0) for f in FIELDS if getattr(c, f) is not None})
                          for c in (k_code, v_code))  # fmt: skip
    want = tt.attention(q, k_code, v_code, kp, vp, lengths=lengths, causal=True, **table)
    kernels = ("attention_query_kernel", "attention_split_kernel", "attention_combine_kernel")
    with launches_only(tt.launch, kernels) as launches:
        got = tt.attention(q, k_code, v_code, kp, vp, lengths=lengths, causal=True, validate=False, **table)
    assert tuple(name for name, _ in launches) == kernels
    for _, launch in launches:
        launch()
    assert torch.equal(got, want)


@pytest.mark.parametrize("tier", TRITON, ids=lambda t: t.name)
@pytest.mark.parametrize("kw", SPECS)
def test_unchecked_triton_quantize_reads_nothing_back(tier, kw):
    params = rq.build_params(rq.QuantizerSpec(**kw))
    x = _array(tier, _vectors((3, 7, params.spec.dim), 9))
    want = tier.module.quantize(x, params)
    with no_host_reads():
        got = tier.module.quantize(x, params, validate=False)
        with pytest.raises(AssertionError, match="read a value back to the host"):
            tier.module.quantize(x, params)
    assert _same_code(got, want)


@pytest.mark.skipif(not (TRITON and TRITON[0].device == "cuda"), reason="CUDA graphs need a GPU")
def test_triton_calls_capture_in_a_cuda_graph():
    """One decode step, quantizing a token's keys (also straight into a cache) and attending over the cache
    (also as a paged pool), captured in a CUDA graph and replayed on new inputs, equals the eager calls;
    host synchronization is an error throughout."""
    tt = TRITON[0].module
    k_params = rq.build_params(rq.QuantizerSpec(dim=128, bits=3))
    v_params = rq.build_params(rq.QuantizerSpec(dim=128, bits=3, seed=1))
    cache = torch.tensor(_vectors((4, 2, 256, 128), 10), dtype=torch.float16, device="cuda")
    k_code, v_code = tt.quantize(cache, k_params), tt.quantize(cache.flip(-1), v_params)
    token = torch.zeros((4, 2, 1, 128), dtype=torch.float16, device="cuda")
    q = torch.zeros((4, 8, 1, 128), dtype=torch.float16, device="cuda")
    lengths = torch.full((4,), 256, dtype=torch.int32, device="cuda")
    table = torch.arange(4, dtype=torch.int32, device="cuda")[:, None]  # the cache as a pool of 4 blocks of 256 keys
    pool = tt.quantize(cache[:, :, :8], k_params)  # a small (4, 2, 8) cache the step appends the token to
    slots = (torch.arange(8, device="cuda") * 8 + 7).reshape(4, 2, 1)  # entry (b, h, 7)

    def step():
        new = tt.quantize(token, k_params, validate=False)
        tt.quantize_into(token, k_params, pool, slots, validate=False)
        out = tt.attention(q, k_code, v_code, k_params, v_params, lengths=lengths, validate=False)
        paged = tt.attention(q, k_code, v_code, k_params, v_params, lengths=lengths, block_table=table, validate=False)
        return new, out, paged

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels and builds the cached tables outside the capture
    torch.cuda.current_stream().wait_stream(side)
    on = dict(device="cuda")
    next_inputs = [
        (token, torch.tensor(_vectors((4, 2, 1, 128), 11), dtype=torch.float16, **on)),
        (q, torch.tensor(_vectors((4, 8, 1, 128), 12), dtype=torch.float16, **on)),
        (lengths, torch.tensor([256, 1, 100, 255], dtype=torch.int32, **on)),
    ]
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            new_code, out, paged = step()
        for static, value in next_inputs:
            static.copy_(value)
        graph.replay()
        # what the replay appended, copied before the eager step below writes the same entries again
        appended = dataclasses.replace(pool, **{f: getattr(pool, f)[:, :, 7:].clone() for f in FIELDS
                                                if getattr(pool, f) is not None})  # fmt: skip
        want_code, want, _ = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert _same_code(new_code, want_code)
    assert _same_code(appended, want_code)
    assert torch.equal(out, want) and torch.equal(paged, want)
