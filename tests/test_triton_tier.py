"""Triton-specific checks of `rotorquant.tiers.triton` against the NumPy reference.

Runs on a CUDA GPU, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before the tier is imported, as scripts/test.sh does). Shapes stay small so the
interpreter finishes in seconds. The generic cross-tier agreement lives in
tests/test_tier_agreement.py; this file covers what is particular to the kernels: packed
bytes, ragged dimensions (masking), 1..8 bits, the split-K attention path, GQA, lengths,
half-precision attention, and the import / device errors.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rotorquant as rq
from rotorquant.format import pack_codes, repack_codes, unpack_codes

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from rotorquant.tiers import numpy as ref  # noqa: E402
from rotorquant.tiers import triton as tt  # noqa: E402
from rotorquant.tiers.triton import launch  # noqa: E402
from rotorquant.tiers.triton.tables import split_rotation  # noqa: E402
from tiers import split_attention as _split_attention  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from rotorquant.kernels.quantize import nearest_code  # noqa: E402
from rotorquant.kernels.bitstream import tile_coordinates  # noqa: E402
from rotorquant.kernels.levels import (  # noqa: E402
    add_counts, byte_tables, centroid_levels, load_interleaved_levels, magnitude_bit_counts, set_bits,
    square_sum_of_levels,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cpu" if tt.INTERPRETING else "cuda"
needs_kernels = pytest.mark.skipif(
    not (tt.INTERPRETING or torch.cuda.is_available()), reason="needs a CUDA GPU or TRITON_INTERPRET=1"
)


def _spec(dim=64, bits=3, **kw):
    return rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, **kw))


def _data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _np(t):
    return t.detach().cpu().to(torch.float64).numpy() if t.dtype != torch.uint8 else t.cpu().numpy()


def _assert_codes_match(x, code, want, params):
    """Codes equal the reference's except where the reference's rotated coordinate lies within
    1e-5 of a boundary (float32 vs float64 rounding), and there they differ by one level."""
    spec = params.spec
    got_idx = unpack_codes(_np(code.codes), spec.mse_bits, spec.dim).astype(int)
    want_idx = unpack_codes(want.codes, spec.mse_bits, spec.dim).astype(int)
    differ = got_idx != want_idx
    if differ.any():
        x64 = _np(x)
        unit = x64 / np.maximum(np.linalg.norm(x64, axis=-1, keepdims=True), 1e-300)
        y = ref.rotate(unit, params)[differ]
        gap = np.abs(y[:, None] - params.boundaries[None, :]).min(axis=1)
        assert gap.max() < 1e-5, f"{differ.sum()} codes differ away from a boundary (gap {gap.max():.2e})"
        assert np.abs(got_idx - want_idx)[differ].max() == 1
    # the byte stream itself: identical wherever the codes are (padding bits are zero)
    if not differ.any():
        np.testing.assert_array_equal(_np(code.codes), want.codes)
    return differ.mean()


# ---------------------------------------------------------------------------- import and device errors


def _pythonpath() -> str:
    """The repository first, then this process's own PYTHONPATH (where e.g. clifford may live)."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_import_without_triton_gives_install_hint():
    code = """
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("No module named 'triton'", name="triton")
        sys.meta_path.insert(0, Hide())
        import rotorquant, rotorquant.tiers.numpy
        assert rotorquant.build_params(rotorquant.QuantizerSpec(dim=8, bits=2)).centroids.shape == (4,)
        try:
            import rotorquant.tiers.triton
        except ImportError as err:
            print("MESSAGE:", err)
        else:
            raise SystemExit("imported without triton")
    """
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    assert "pip install 'rotorquant[triton]'" in done.stdout


def test_cpu_tensor_without_interpreter_is_a_clear_error():
    code = """
        import torch, rotorquant as rq
        from rotorquant.tiers import triton as tt
        assert not tt.INTERPRETING
        try:
            tt.quantize(torch.randn(4, 8), rq.build_params(rq.QuantizerSpec(dim=8, bits=2)))
        except ValueError as err:
            print("MESSAGE:", err)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _pythonpath()
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    assert "x: expected a tensor on a CUDA device" in done.stdout
    assert "TRITON_INTERPRET=1" in done.stdout


# ---------------------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("dim", [20, 64, 100, 256, 300])
def test_split_rotation_holds_the_rotation_to_2_22(dim):
    """Quantize's float16 table: ``(hi + lo) / 2**11`` is ``R^T`` zero-padded to within ``2**-22`` of its largest
    entry, with columns 8x8-transposed in each block of 64 for padded widths 64 to 256."""
    params = _spec(dim=dim, bits=3)
    block = max(16, triton.next_power_of_2(dim))
    table = split_rotation(params.rotation_matrix().T, block, torch.device("cpu"))
    assert table.dtype == torch.float16 and table.shape == (2, block, block)
    got = (table[0].double() + table[1].double()).numpy() / 2048
    want = np.zeros((block, block))
    want[:dim, :dim] = params.rotation_matrix().T
    if 64 <= block <= 256:
        j = np.arange(block)
        want = want[:, (j // 64) * 64 + (j % 8) * 8 + (j % 64) // 8]
    assert np.abs(got - want).max() <= 2.0**-22 * np.abs(want).max()
    assert np.abs(table[0].double().numpy() / 2048 - want).max() > 2.0**-18 * np.abs(want).max()  # lo matters


@triton.jit
def _nearest_and_level_kernel(
    y_ptr,  # (n,) float32 coordinates
    bnd_ptr,  # (2**BITS - 1,) float32 boundaries
    cent_ptr,  # (2**BITS,) float32 centroids
    code_ptr,  # (n,) int32 output: nearest_code's code of y
    level_ptr,  # (n,) float32 output: centroid_levels(code)
    n,  # number of coordinates
    BITS: tl.constexpr,  # bits per code
    BLOCK: tl.constexpr,  # power of two >= n
):
    i = tl.arange(0, BLOCK)
    ok = i < n
    code = nearest_code(tl.load(y_ptr + i, mask=ok, other=0.0), bnd_ptr, BITS, 1.0)
    tl.store(code_ptr + i, code, mask=ok)
    tl.store(level_ptr + i, centroid_levels(code, cent_ptr, BITS), mask=ok)


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))
def test_nearest_code_ties_and_centroid_levels(bits):
    """The kernels' code search and level lookup on their own: every boundary, the floats next to it, +-0, NaN and
    +-3 get ``#{i : y >= b[i]}`` (0 for NaN), except that a coordinate exactly on a negative boundary takes the lower code up to
    4 bits (a tie: the search works on ``|y|``, so ties go to the level of larger magnitude on both sides), and
    every code maps to its centroid."""
    params = _spec(dim=16, bits=bits)
    b = params.boundaries.astype(np.float32)
    y = np.concatenate([b, np.nextafter(b, -np.inf), np.nextafter(b, np.inf), [0.0, -0.0, -3.0, 3.0, np.nan]])
    y = y.astype(np.float32)
    n = y.size
    code = torch.empty(n, dtype=torch.int32, device=DEVICE)
    level = torch.empty(n, dtype=torch.float32, device=DEVICE)
    as_dev = lambda a: torch.tensor(a, dtype=torch.float32, device=DEVICE)  # noqa: E731
    _nearest_and_level_kernel[(1,)](
        as_dev(y), as_dev(b), as_dev(params.centroids), code, level, n, BITS=bits, BLOCK=triton.next_power_of_2(n)
    )  # fmt: skip
    want = np.searchsorted(b, y, side="right")  # #{i : y >= b[i]}
    if bits <= 4:
        want = np.where(y < 0, np.searchsorted(b, y, side="left"), want)
    want[np.isnan(y)] = 0  # NaN >= b[i] is false for every i (searchsorted would sort NaN last)
    np.testing.assert_array_equal(_np(code).astype(int), want)
    np.testing.assert_array_equal(_np(level), params.centroids.astype(np.float32)[want])


@triton.jit
def _set_bits_kernel(
    w_ptr,  # (n,) uint32 words
    out_ptr,  # (n,) int32 output: set_bits of each word
    n,  # number of words
    POPC: tl.constexpr,  # the GPU's popc (CUDA only); else integer operations
    BLOCK: tl.constexpr,  # power of two >= n
):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, set_bits(tl.load(w_ptr + i, mask=i < n, other=0), POPC), mask=i < n)


@needs_kernels
@pytest.mark.parametrize(
    "popc", [False, pytest.param(True, marks=pytest.mark.skipif(DEVICE != "cuda", reason="libdevice runs only on a GPU"))]
)  # fmt: skip
def test_set_bits_counts_every_bit(popc):
    """`set_bits` (the GPU's popc, or the integer operations the interpreter runs) counts the bits of 0, all ones,
    every single bit and random words exactly."""
    words = np.concatenate([[0, 0xFFFFFFFF], 1 << np.arange(32, dtype=np.uint64), np.random.default_rng(0).integers(0, 2**32, 200)])
    words = words.astype(np.uint32)
    out = torch.empty(words.size, dtype=torch.int32, device=DEVICE)
    w = torch.tensor(words.view(np.int32), device=DEVICE).view(torch.uint32)
    _set_bits_kernel[(1,)](w, out, words.size, POPC=popc, BLOCK=triton.next_power_of_2(words.size))
    want = [bin(int(v)).count("1") for v in words]
    np.testing.assert_array_equal(_np(out).astype(int), want)


@triton.jit
def _square_sum_kernel(
    code_ptr,  # (ROWS, WIDTH) int32 codes, 0 past count
    cent_ptr,  # (2**BITS,) float32 centroids
    out_ptr,  # (ROWS,) float32 output: square_sum_of_levels of the rows' counted codes
    count: tl.constexpr,  # counted codes per row
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    ROWS: tl.constexpr,  # rows
    WIDTH: tl.constexpr,  # codes per row, counted or not (two tiles of WIDTH // 2)
    TRANSPOSED: tl.constexpr,  # the tiles' columns hold their coordinates as tile_coordinates says
):
    r = tl.arange(0, ROWS)[:, None]
    HALF: tl.constexpr = WIDTH // 2
    counts = ()
    for c0 in tl.static_range(0, WIDTH, HALF):
        code = tl.load(code_ptr + r * WIDTH + c0 + tile_coordinates(HALF, TRANSPOSED)[None, :])
        counts = add_counts(counts, magnitude_bit_counts(code, BITS, ROWS, HALF, TRANSPOSED, False))
    tl.store(out_ptr + tl.arange(0, ROWS), square_sum_of_levels(counts, count, WIDTH - count, cent_ptr, BITS))


@needs_kernels
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_square_sum_of_levels_counts_every_magnitude(bits, transposed):
    """The norm correction's ``sum_t c[k_t]**2``, counted from popcounts over two tiles of a row: rows of one code
    repeated (every magnitude, both signs), and random rows with 37 of 128 codes padding (code 0), agree with the
    float64 sum of the squared centroids to float32 rounding."""
    params = _spec(dim=16, bits=bits)
    rng = np.random.default_rng(bits)
    count = 91
    codes = np.zeros((32, 128), dtype=np.int32)
    codes[:, :count] = rng.integers(0, 2**bits, (32, count))
    codes[: 2**bits, :count] = np.arange(2**bits)[:, None]
    out = torch.empty(codes.shape[0], dtype=torch.float32, device=DEVICE)
    _square_sum_kernel[(1,)](
        torch.tensor(codes, device=DEVICE), torch.tensor(params.centroids.astype(np.float32), device=DEVICE), out,
        count=count, BITS=bits, ROWS=codes.shape[0], WIDTH=128, TRANSPOSED=transposed,
    )  # fmt: skip
    c = params.centroids.astype(np.float32).astype(np.float64)
    want = (c[codes[:, :count]] ** 2).sum(axis=1)
    np.testing.assert_allclose(_np(out), want, rtol=1e-6)


@triton.jit
def _interleaved_half_levels_kernel(
    rows_ptr,  # (ROWS, count * BITS / 8) uint8 rows in the interleaved packing
    cent_ptr,  # (2**BITS,) float32 centroids
    out_ptr,  # (ROWS, WIDTH) float16 output: the rows' levels, 0 past count
    count,  # codes per row
    BITS: tl.constexpr,  # bits per code: 2, 3 or 4
    ROWS: tl.constexpr,  # rows
    WIDTH: tl.constexpr,  # power of two >= count
    PRMT: tl.constexpr,  # lookups by inline prmt.b32 (CUDA only); else by integer operations
):
    r = tl.arange(0, ROWS)
    level = load_interleaved_levels(
        rows_ptr + r * (count * BITS // 8), r < ROWS, count, cent_ptr, byte_tables(cent_ptr, BITS), BITS, ROWS, WIDTH,
        tl.float16, True, PRMT,
    )  # fmt: skip
    tl.store(out_ptr + r[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :], level)


@needs_kernels
@pytest.mark.parametrize(
    "prmt", [False, pytest.param(True, marks=pytest.mark.skipif(DEVICE != "cuda", reason="inline asm runs only on a CUDA GPU"))]
)  # fmt: skip
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_interleaved_float16_levels_are_the_rounded_centroids(bits, prmt):
    """The attention kernel's float16 lookups for interleaved rows (d = 96 in a 128-wide tile): the PRMT asm on
    a GPU and its integer emulation (what the interpreter runs) both give float16(c[k]) bit for bit, 0 past d.
    tests/test_packing.py models the asm's semantics in NumPy."""
    params = _spec(dim=96, bits=bits, rotation="dense", packing="interleaved")
    codes = np.random.default_rng(bits).integers(0, 2**bits, (16, 96))
    codes[0] = np.arange(96) % 2**bits
    rows = torch.tensor(pack_codes(codes, bits, "interleaved"), device=DEVICE)
    centroids = params.centroids.astype(np.float32)
    out = torch.empty((16, 128), dtype=torch.float16, device=DEVICE)
    _interleaved_half_levels_kernel[(1,)](
        rows, torch.tensor(centroids, device=DEVICE), out, 96, BITS=bits, ROWS=16, WIDTH=128, PRMT=prmt
    )
    want = np.zeros((16, 128), dtype=np.float16)
    want[:, :96] = centroids[codes].astype(np.float16)
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint16), want.view(np.uint16))


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rotation", ["rotor", "dense"])
def test_quantize_bytes_match_reference(bits, rotation):
    params = _spec(dim=67, bits=bits, rotation=rotation)
    x = _data((3, 11, 67), seed=bits)
    code = tt.quantize(x, params)
    want = ref.quantize(_np(x), params)
    assert code.codes.shape == (3, 11, params.spec.code_bytes) and code.codes.dtype == torch.uint8
    assert _assert_codes_match(x, code, want, params) < 0.01
    np.testing.assert_allclose(_np(code.norms), want.norms, rtol=2e-6)
    x_hat = tt.dequantize(code, params)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape
    # exact where the codes agree; one level apart elsewhere
    np.testing.assert_allclose(_np(x_hat), ref.dequantize(want, params), atol=1e-5 + 0.5 * (bits == 8))


@needs_kernels
@pytest.mark.parametrize(
    "dim, bits, kw",
    [
        (2, 2, {}),
        (3, 3, {"rotation": "dense"}),
        (5, 4, {"qjl": True, "qjl_dim": 9}),
        (128, 3, {"qjl": True}),
        (130, 2, {"qjl": True, "rotation": "dense", "qjl_dim": 40}),
        (130, 4, {"norm_correction": True}),
        (31, 3, {"norm_dtype": "float16", "qjl": True}),
    ],
)
def test_ragged_dims_qjl_and_norm_options(dim, bits, kw):
    params = _spec(dim=dim, bits=bits, **kw)
    x = _data((37, dim), seed=dim)
    x[5] = 0.0
    code = tt.quantize(x, params)
    want = ref.quantize(_np(x), params)
    _assert_codes_match(x, code, want, params)
    spec = params.spec
    norm_dtype = torch.float16 if spec.norm_dtype.value == "float16" else torch.float32
    assert code.norms.dtype == norm_dtype
    np.testing.assert_allclose(_np(code.norms), want.norms.astype(np.float64), rtol=1e-3 if dim == 31 else 2e-6)
    if spec.qjl:
        assert code.qjl_signs.shape == (37, spec.sign_bytes)
        sign_bits = unpack_codes(_np(code.qjl_signs), 1, spec.qjl_dim)
        want_bits = unpack_codes(want.qjl_signs, 1, spec.qjl_dim)
        assert (sign_bits != want_bits).mean() < 0.01
        np.testing.assert_allclose(_np(code.residual_norms), want.residual_norms, rtol=1e-3, atol=1e-6)
    x_hat = tt.dequantize(code, params)
    assert torch.all(x_hat[5] == 0), "a zero vector must reconstruct exactly 0"
    good = (unpack_codes(_np(code.codes), spec.mse_bits, dim) == unpack_codes(want.codes, spec.mse_bits, dim)).all(-1)
    if spec.qjl:
        good &= (_np(code.qjl_signs) == want.qjl_signs).all(-1)
    np.testing.assert_allclose(_np(x_hat)[good], ref.dequantize(want, params)[good], atol=2e-3 if dim == 31 else 2e-5)


@needs_kernels
def test_half_inputs_and_strided_rows():
    params = _spec(dim=40, bits=3)
    base = _data((25, 80), seed=3)
    strided = base[:, ::2]  # last-dim stride 2: copied to unit stride
    rows = base[:, :40]  # row stride 80
    for x in (strided, rows):
        code = tt.quantize(x, params)
        _assert_codes_match(x, code, ref.quantize(_np(x), params), params)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = _data((25, 40), seed=4, dtype=dtype)
        code = tt.quantize(x, params)
        assert code.dtype == str(dtype).removeprefix("torch.")
        x_hat = tt.dequantize(code, params)
        assert x_hat.dtype == dtype
        want = ref.dequantize(ref.quantize(_np(x), params), params)
        # bf16 stores may truncate under the interpreter: allow 2 ulp of the output dtype
        ulp = float(torch.finfo(dtype).eps) * 2 * np.abs(want).max()
        np.testing.assert_allclose(_np(x_hat), want, atol=ulp + 1e-5)


@needs_kernels
def test_norms_up_to_float32_max_do_not_overflow():
    params = _spec(dim=24, bits=3)
    x = _data((6, 24), seed=5) * 1e37
    code = tt.quantize(x, params)
    want = ref.quantize(_np(x), params)
    _assert_codes_match(x, code, want, params)
    np.testing.assert_allclose(_np(code.norms), want.norms, rtol=2e-6)


# ---------------------------------------------------------------------------- errors


@needs_kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
def test_bad_inputs_raise_the_shared_errors():
    params = _spec(dim=16, bits=2)
    x = _data((4, 16))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got ndarray"):
        tt.quantize(np.ones((4, 16)), params)
    with pytest.raises(TypeError, match="x: expected a real floating-point dtype, got int64"):
        tt.quantize(torch.ones((4, 16), dtype=torch.int64, device=DEVICE), params)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 16\)"):
        tt.quantize(_data((4, 15)), params)
    bad = x.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite values"):
        tt.quantize(bad, params)
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="x: expected finite values"):
        tt.quantize(bad, params)
    half = _spec(dim=16, bits=2, norm_dtype="float16")
    with pytest.raises(ValueError, match="expected vector norms <= 65504"):
        tt.quantize(x * 1e5, half)
    big = torch.full((2, 16), 3e38, device=DEVICE)  # ||x|| = 1.2e39 > float32 max
    with pytest.raises(ValueError, match="expected vector norms <= 3.40282e"):
        tt.quantize(big, params)
    code = tt.quantize(x, params)
    with pytest.raises(ValueError, match="code: expected a code built for"):
        tt.dequantize(code, _spec(dim=16, bits=3))
    numpy_code = ref.quantize(_np(x), params)
    with pytest.raises(TypeError, match=r"code.codes: expected a torch.Tensor, got ndarray \(an array of the numpy tier; the triton tier was called\)"):
        tt.dequantize(numpy_code, params)
    q = _data((1, 2, 3, 16))
    k = tt.quantize(_data((1, 1, 5, 16)), params)
    with pytest.raises(ValueError, match=r"lengths: expected values in 1..5, got values in 0..0"):
        tt.attention(q, k, k, params, params, lengths=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(1,\)"):
        tt.attention(q, k, k, params, params, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"lengths: expected values in 3\.\.5 \(causal=True: .*got values in 2\.\.2"):
        tt.attention(q, k, k, params, params, lengths=torch.tensor([2]), causal=True)
    with pytest.raises(TypeError, match=r"lengths: expected integers, got dtype float32"):
        tt.attention(q, k, k, params, params, lengths=torch.tensor([2.0]))
    with pytest.raises(ValueError, match="q: expected q_heads a multiple of kv_heads"):
        tt.attention(_data((1, 3, 1, 16)), tt.quantize(_data((1, 2, 5, 16)), params), tt.quantize(_data((1, 2, 5, 16)), params), params, params)
    with pytest.raises(ValueError, match="q: expected finite values"):
        tt.scores(torch.full((2, 16), float("nan"), device=DEVICE), code, params)


@needs_kernels
def test_asymmetric_codebook_is_refused():
    """The kernels decode a code's lower half as the negated upper half: a codebook that is not exactly
    antisymmetric (never built by build_params) is an error, not a silently wrong reconstruction."""
    import dataclasses

    params = _spec(dim=16, bits=3)
    skewed = params.centroids.copy()
    skewed[0] *= 1.01
    bad = dataclasses.replace(params, centroids=skewed)
    code = tt.quantize(_data((4, 16)), params)
    with pytest.raises(ValueError, match="params.centroids: expected an antisymmetric codebook"):
        tt.dequantize(code, bad)


# ---------------------------------------------------------------------------- scores


@needs_kernels
@pytest.mark.parametrize("kw", [{}, {"rotation": "dense"}, {"qjl": True, "qjl_dim": 24}])
def test_scores_match_reference_with_broadcasting(kw):
    params = _spec(dim=67, bits=3, **kw)
    x = _data((2, 1, 21, 67), seed=7)
    q = _data((3, 5, 67), seed=8)  # leading (3,) broadcasts with (2, 1)
    code = tt.quantize(x, params)
    want_code = ref.quantize(_np(x), params)
    _assert_codes_match(x, code, want_code, params)
    got = tt.scores(q, code, params)
    assert got.shape == (2, 3, 5, 21) and got.dtype == torch.float32
    want = ref.scores(_np(q), _as_reference_code(code, params), params)
    np.testing.assert_allclose(_np(got), want, atol=2e-5 * np.abs(want).max())


def _as_reference_code(code, params):
    """The triton tier's payload as NumPy arrays: isolates scores/attention from code rounding."""
    return rq.Compressed(
        codes=_np(code.codes),
        norms=code.norms.cpu().numpy(),
        spec=params.spec,
        dtype=code.dtype,
        qjl_signs=None if code.qjl_signs is None else _np(code.qjl_signs),
        residual_norms=None if code.residual_norms is None else code.residual_norms.cpu().numpy(),
    )


# ---------------------------------------------------------------------------- attention




@needs_kernels
@pytest.mark.parametrize("splits", [1, 6])
def test_attention_causal_with_rows_that_see_no_key_of_a_split(splits):
    """causal=True, 3 queries per sequence, 6 query rows per KV head. Under the interpreter a program's rows
    carry two sub-splits and keys come in blocks of 2 x 16, so with length 33 and 6 splits the second split
    holds key 32 alone, in its first sub-split: hidden from queries 0 and 1 (their rows see no key of that
    split), seen by query 2; the second sub-split's rows see no key at all."""
    kp, vp = _spec(dim=40, bits=3), _spec(dim=40, bits=2, seed=4, qjl=True)
    q = _data((2, 4, 3, 40), seed=50)
    k_code = tt.quantize(_data((2, 2, 90, 40), seed=51), kp)
    v_code = tt.quantize(_data((2, 2, 90, 40), seed=52), vp)
    lengths = torch.tensor([90, 33])
    got = _split_attention(q, k_code, v_code, kp, vp, scale=None, lengths=lengths, causal=True, splits=splits)
    k_ref, v_ref = _as_reference_code(k_code, kp), _as_reference_code(v_code, vp)
    want = ref.attention(_np(q), k_ref, v_ref, kp, vp, lengths=lengths.numpy(), causal=True)
    np.testing.assert_allclose(_np(got), want, atol=2e-5 * np.abs(want).max())
    assert not np.allclose(want, ref.attention(_np(q), k_ref, v_ref, kp, vp, lengths=lengths.numpy()))
    everything = _split_attention(q, k_code, v_code, kp, vp, scale=None, lengths=None, causal=True, splits=splits)
    want = ref.attention(_np(q), k_ref, v_ref, kp, vp, causal=True)  # all 90 keys, the 3 queries the last 3
    np.testing.assert_allclose(_np(everything), want, atol=2e-5 * np.abs(want).max())


@needs_kernels
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_heads, q_len", [(2, 1), (6, 1), (4, 2), (2, 5), (20, 1)])
def test_attention_subsplits_in_the_rows_of_a_program(q_heads, q_len, causal):
    """With R = q_heads / 2 * q_len query rows per KV head, a program's 16 rows carry the largest power of two
    <= min(4, 16 / R) sub-splits (R = 1, 3, 4: four; R = 5: two; R = 10: one). Each sub-split reads its own
    sub-block of every key block; lengths 70 and 5 leave sub-splits with keys in no block, or in none of a
    block. Packed or not (``attention_subsplits=1``), the result is the reference's."""
    kp, vp = _spec(dim=32, bits=2, qjl=True, seed=5), _spec(dim=32, bits=3, qjl=True, seed=6)
    q = _data((2, q_heads, q_len, 32), seed=60)
    k_code = tt.quantize(_data((2, 2, 70, 32), seed=61), kp)
    v_code = tt.quantize(_data((2, 2, 70, 32), seed=62), vp)
    lengths = torch.tensor([70, max(5, q_len)])
    k_ref, v_ref = _as_reference_code(k_code, kp), _as_reference_code(v_code, vp)
    want = ref.attention(_np(q), k_ref, v_ref, kp, vp, lengths=lengths.numpy(), causal=causal)
    for subsplits in (4, 1):
        got = _split_attention(
            q, k_code, v_code, kp, vp, scale=None, lengths=lengths, causal=causal, splits=2, subsplits=subsplits
        )
        np.testing.assert_allclose(_np(got), want, atol=2e-5 * np.abs(want).max())


@needs_kernels
def test_attention_with_one_key_returns_that_value():
    kp, vp = _spec(dim=32, bits=3), _spec(dim=32, bits=3, seed=2)
    q = _data((2, 4, 1, 32), seed=20)
    k_code = tt.quantize(_data((2, 2, 40, 32), seed=21), kp)
    v_code = tt.quantize(_data((2, 2, 40, 32), seed=22), vp)
    # splits 2 and 3 start past length 1: they stay empty and must not change the result
    got = _split_attention(q, k_code, v_code, kp, vp, scale=None, lengths=torch.tensor([1, 1]), splits=3)
    first = tt.dequantize(v_code, vp)[:, :, 0]  # (B, Hkv, d)
    want = first.repeat_interleave(2, dim=1)[:, :, None, :]
    np.testing.assert_allclose(_np(got), _np(want), atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_precision_error_budget(dtype):
    """Half-precision queries run float16 tensor-core dots; the error stays within 2 ulp of
    ``dtype`` (the output rounding; the interpreter truncates bf16) plus 1e-3 of the output scale."""
    kp, vp = _spec(dim=64, bits=3), _spec(dim=64, bits=3, qjl=True, seed=3)
    q = _data((1, 4, 1, 64), seed=30, dtype=dtype)
    k_code = tt.quantize(_data((1, 2, 70, 64), seed=31, dtype=dtype), kp)
    v_code = tt.quantize(_data((1, 2, 70, 64), seed=32, dtype=dtype), vp)
    got = _split_attention(q, k_code, v_code, kp, vp, scale=None, lengths=None, splits=2)
    assert got.dtype == dtype
    want = ref.attention(_np(q), _as_reference_code(k_code, kp), _as_reference_code(v_code, vp), kp, vp)
    budget = 2 * float(torch.finfo(dtype).eps) * np.abs(want) + 1e-3 * np.abs(want).max()
    assert np.all(np.abs(_np(got) - want) <= budget)


def _repacked(code: rq.Compressed, params: rq.QuantParams) -> rq.Compressed:
    """``code`` with its codes converted (in NumPy) to ``params.spec``'s packing, for ``params.spec``."""
    spec = params.spec
    codes = repack_codes(_np(code.codes), spec.mse_bits, spec.dim, code.spec.packing, spec.packing)
    return dataclasses.replace(code, codes=torch.from_numpy(codes).to(code.codes.device), spec=spec)


def _paged(code: rq.Compressed, page: int, order: torch.Tensor) -> rq.Compressed:
    """A cache ``(B, Hkv, N)`` as a pool of ``B * N / page`` blocks ``(block, Hkv, page)``: sequence ``b``'s block
    ``i`` stored at ``order[b * N / page + i]``."""

    def pool(t):
        b, h, n = t.shape[:3]
        blocks = t.reshape(b, h, n // page, page, *t.shape[3:]).transpose(1, 2).reshape(b * n // page, h, page, *t.shape[3:])
        out = torch.empty_like(blocks)
        out[order.to(t.device)] = blocks
        return out

    fields = ("codes", "norms", "qjl_signs", "residual_norms")
    return dataclasses.replace(code, **{f: pool(getattr(code, f)) for f in fields if getattr(code, f) is not None})


@needs_kernels
@pytest.mark.parametrize(
    "bits, dim, v_kw, dtype",
    [(2, 96, {"bits": 4}, torch.float16), (3, 64, {"bits": 4, "qjl": True}, torch.float32), (4, 32, {"bits": 2}, torch.float16)],
)  # fmt: skip
def test_interleaved_caches_attend_exactly_as_contiguous_ones(bits, dim, v_kw, dtype):
    """The same codes in either packing give the same levels (float16 ones by the byte-table lookups), so
    attention over interleaved caches equals attention over contiguous ones bit for bit: split, causal, and
    paged in a shuffled pool of 16-key blocks. `quantize` writes the interleaved bytes directly."""
    kp, vp = _spec(dim=dim, bits=bits), _spec(dim=dim, seed=1, **v_kw)
    kpi, vpi = (_spec(dim=dim, **{**kw, "packing": "interleaved"}) for kw in ({"bits": bits}, {"seed": 1, **v_kw}))
    k_x, v_x = _data((2, 2, 48, dim), seed=70), _data((2, 2, 48, dim), seed=71)
    k, v = tt.quantize(k_x, kp), tt.quantize(v_x, vp)
    ki, vi = _repacked(k, kpi), _repacked(v, vpi)
    for x, p, code in ((k_x, kpi, ki), (v_x, vpi, vi)):
        direct = tt.quantize(x, p)
        assert direct.spec.packing == "interleaved" and torch.equal(direct.codes, code.codes)
    q = _data((2, 4, 3, dim), seed=72, dtype=dtype)
    lengths = torch.tensor([48, 29])
    order = torch.randperm(6, generator=torch.Generator().manual_seed(dim))
    table = order.reshape(2, 3).to(DEVICE)
    for causal in (False, True):
        want = _split_attention(q, k, v, kp, vp, scale=None, lengths=lengths, causal=causal, splits=2)
        got = _split_attention(q, ki, vi, kpi, vpi, scale=None, lengths=lengths, causal=causal, splits=2)
        assert torch.equal(got, want)
    paged = _split_attention(
        q, _paged(ki, 16, order), _paged(vi, 16, order), kpi, vpi, scale=None, lengths=lengths, causal=True, splits=2,
        block_table=table,
    )  # fmt: skip
    assert torch.equal(paged, want)


@needs_kernels
def test_unchecked_quantize_into_writes_interleaved_bytes():
    """The fused `quantize_into` kernel writes whole interleaved chunks at the slots' entries of a vLLM-style
    pool, ``(num_blocks, page, Hkv)`` read as ``(num_blocks, Hkv, page)``, and nothing else."""
    params = _spec(dim=96, bits=3, packing="interleaved")
    pool = tt.quantize(_data((3, 4, 2, 96), seed=80), params)
    cache = dataclasses.replace(pool, codes=pool.codes.transpose(1, 2), norms=pool.norms.transpose(1, 2))
    before = cache.codes.clone()
    x = _data((5, 96), seed=81)
    slots = torch.tensor([0, 7, -1, 22, 13], device=DEVICE)
    tt.quantize_into(x, params, cache, slots, validate=False)
    want = before.reshape(-1, params.spec.code_bytes).clone()
    new = tt.quantize(x, params).codes
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want[slot] = new[i]
    assert torch.equal(cache.codes.reshape(-1, params.spec.code_bytes), want)


def _laid_out(code: rq.Compressed, layout: str) -> rq.Compressed:
    """The cache ``code`` (leading ``(B, Hkv, N)``) with the same values in another memory layout:
    ``token-major`` (stored ``(B, N, Hkv)``, viewed as ``(B, Hkv, N)``), ``slice`` (the first N keys
    of a longer preallocated cache), ``strided-bytes`` (each packed row's bytes 2 apart: copied)."""

    def move(t, packed):
        if layout == "token-major":
            perm = (0, 2, 1, 3) if packed else (0, 2, 1)
            return t.permute(*perm).contiguous().permute(*perm)
        if layout == "slice":
            big = torch.zeros((*t.shape[:2], t.shape[2] + 5, *t.shape[3:]), dtype=t.dtype)
            big[:, :, : t.shape[2]] = t
            return big[:, :, : t.shape[2]]
        if not packed:
            return t
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]

    fields = {"codes": True, "norms": False, "qjl_signs": True, "residual_norms": False}
    moved = {f: move(getattr(code, f), packed) for f, packed in fields.items() if getattr(code, f) is not None}
    return dataclasses.replace(code, **moved)


@needs_kernels
@pytest.mark.parametrize("layout", ["token-major", "slice", "strided-bytes"])
@pytest.mark.parametrize("k_kw", [{"dim": 32, "bits": 3, "qjl": True}, {"dim": 24, "bits": 2}])
def test_attention_reads_caches_in_any_layout(layout, k_kw):
    """Caches that are views (token-major storage, a slice of a longer cache) are read in place, with
    results identical to the contiguous cache's; d = 24 at 2 bits has 6-byte rows (byte reads)."""
    kp = _spec(**k_kw)
    vp = _spec(**{**k_kw, "seed": 5, "qjl": not k_kw.get("qjl", False)})
    q = _data((2, 4, 2, kp.spec.dim), seed=60)
    k_code = tt.quantize(_data((2, 2, 37, kp.spec.dim), seed=61), kp)
    v_code = tt.quantize(_data((2, 2, 37, vp.spec.dim), seed=62), vp)
    k_view, v_view = _laid_out(k_code, layout), _laid_out(v_code, layout)
    assert not k_view.codes.is_contiguous()
    if layout != "strided-bytes":
        fields = (k_view.codes, k_view.norms, k_view.qjl_signs, k_view.residual_norms)
        assert all(b is None or a.data_ptr() == b.data_ptr() for a, b in zip(launch.payload(k_view), fields))
    lengths = torch.tensor([37, 20])
    for causal in (False, True):
        want = _split_attention(q, k_code, v_code, kp, vp, scale=None, lengths=lengths, causal=causal, splits=2)
        got = _split_attention(q, k_view, v_view, kp, vp, scale=None, lengths=lengths, causal=causal, splits=2)
        assert torch.equal(got, want)


def test_word_reads_need_every_row_aligned():
    """`launch.word_aligned`: the pointer, the row length and the stride of every dimension longer than 1 must be
    multiples of 4 bytes (size-1 dimensions may have any stride)."""
    rows = torch.zeros(2, 3, 5, 12, dtype=torch.uint8)
    assert launch.word_aligned(rows) and launch.word_aligned(rows.permute(0, 2, 1, 3))  # head-major and token-major views
    assert not launch.word_aligned(torch.zeros(2, 3, 15, dtype=torch.uint8)[..., :12])  # rows 15 bytes apart
    assert not launch.word_aligned(torch.zeros(2, 3, 6, dtype=torch.uint8))  # 6-byte rows
    assert not launch.word_aligned(_one_byte_off(rows))
    assert launch.word_aligned(torch.zeros(1, 3, 12, dtype=torch.uint8).as_strided((1, 3, 12), (7, 12, 1)))


def _one_byte_off(t):
    """A copy of the uint8 tensor ``t`` whose data starts one byte past a 4-byte boundary."""
    buf = torch.zeros(t.numel() + 1, dtype=torch.uint8, device=t.device)
    moved = buf[1:].view(t.shape)
    moved.copy_(t)
    return moved


@needs_kernels
@pytest.mark.parametrize(
    "bits, qjl, dim, packing",
    [(1, False, 64, "contiguous"), (2, True, 96, "contiguous"), (3, False, 160, "contiguous"), (3, True, 64, "contiguous"),
     (4, False, 64, "contiguous"), (5, True, 96, "contiguous"), (2, False, 96, "interleaved"), (5, True, 32, "interleaved")],
)  # fmt: skip
def test_word_reads_and_byte_reads_agree_with_reference(bits, qjl, dim, packing):
    """Packed rows of these dims are whole 32-bit words, so aligned payloads are read as words (at 96 and
    160 the last 32-code chunks of the padded tile lie past the row and are masked); the same bytes one
    byte off alignment are read byte by byte. Both give the reference's values, scores and attention."""
    params = _spec(dim=dim, bits=bits, qjl=qjl, qjl_dim=32, packing=packing)
    code = tt.quantize(_data((2, 2, 40, dim), seed=40), params)
    moved = dataclasses.replace(
        code, codes=_one_byte_off(code.codes), qjl_signs=_one_byte_off(code.qjl_signs) if qjl else None
    )
    assert launch.word_aligned(code.codes) and not launch.word_aligned(moved.codes)
    q = _data((2, 4, 3, dim), seed=41)
    same = _as_reference_code(code, params)
    want_values = ref.dequantize(same, params)
    want_scores = ref.scores(_np(q[:, :2]), same, params)
    want_attention = ref.attention(_np(q), same, same, params, params)
    for c in (code, moved):
        got_values, got_scores = tt.dequantize(c, params), tt.scores(q[:, :2], c, params)
        np.testing.assert_allclose(_np(got_values), want_values, atol=1e-6 * np.abs(want_values).max())
        np.testing.assert_allclose(_np(got_scores), want_scores, atol=2e-5 * np.abs(want_scores).max())
        got = tt.attention(q, c, c, params, params)
        np.testing.assert_allclose(_np(got), want_attention, atol=2e-5 * np.abs(want_attention).max())


# ---------------------------------------------------------------------------- real-GPU compilation

_AOT_SCRIPT = r"""
import re
import sys
import torch
sys.path.insert(0, "benchmarks")
from sass_count import compile_for_sm90, record_attention, recording
from triton.tools.disasm import get_sass
import rotorquant as rq
from rotorquant.tiers.triton import launch

def drive(dtype, causal=False, paged=False, q_heads=8, config=launch.DEFAULT, **kw):
    # every launch the tier makes for this spec, on CPU tensors standing in for CUDA ones (nothing runs)
    p = rq.build_params(rq.QuantizerSpec(**kw))
    spec, n = p.spec, 64
    codes, norms, raw, signs, res = launch.quantize(torch.zeros(n, spec.dim, dtype=dtype), p)
    if paged:  # and unchecked quantize, whose kernel caps the norms
        launch.quantize(torch.zeros(n, spec.dim, dtype=dtype), p, cap_norms=True)
    norms = torch.ones(n, dtype=torch.float16 if spec.norm_dtype.value == "float16" else torch.float32)
    f = dict(codes=codes, norms=norms, qjl_signs=signs, residual_norms=norms.clone() if spec.qjl else None)
    code = rq.Compressed(spec=spec, dtype=str(dtype)[6:], **f)
    launch.dequantize(code, p, dtype)
    launch.scores(torch.zeros(3, spec.dim, dtype=dtype), code, p, ())
    cache = rq.Compressed(spec=spec, dtype=code.dtype, **{k: None if v is None else v.reshape(2, 2, 16, *v.shape[1:]) for k, v in f.items()})
    lengths = torch.tensor([16, 16], dtype=torch.int32)
    launch.attention(torch.zeros(2, q_heads, 2, spec.dim, dtype=dtype), cache, cache, p, p, scale=0.125, lengths=lengths,
                     causal=causal)  # fmt: skip
    slots = torch.tensor([0, 5, -1, 63])
    launch.quantize(torch.zeros(4, spec.dim, dtype=dtype), p, cap_norms=True, into=(cache, slots), config=config)
    if paged:  # the cache as 2 blocks of 16 keys, each sequence reading both (int64 table and lengths)
        launch.attention(torch.zeros(2, 8, 2, spec.dim, dtype=dtype), cache, cache, p, p, scale=0.125,
                         table=torch.tensor([[1, 0], [0, 1]]), lengths=torch.tensor([32, 5]))  # fmt: skip

with recording() as recorders:
    drive(torch.float16, dim=128, bits=3, causal=True, paged=True)
    drive(torch.float32, dim=128, bits=3, rotation="dense", qjl=True)
    drive(torch.bfloat16, dim=67, bits=8, norm_correction=True, norm_dtype="float16")
    drive(torch.float64, dim=130, bits=2, qjl=True, qjl_dim=40)
    drive(torch.float16, dim=64, bits=5, qjl=True, qjl_dim=32)
    drive(torch.bfloat16, dim=256, bits=4, qjl=True, q_heads=64)  # 64 query rows per KV head
    drive(torch.float16, dim=80, bits=3, causal=True)  # a head dim that is not a power of two
    # quantize_into's int64 unravel, for caches past 2**31 entries
    drive(torch.float32, dim=128, bits=3, qjl=True, config=launch.LaunchConfig(int32_entries=0))
    # the interleaved packing: float16 attention operands by the PRMT asm, float32 ones from the codes
    drive(torch.float16, dim=128, bits=3, causal=True, paged=True, packing="interleaved")
    drive(torch.float32, dim=96, bits=4, packing="interleaved")
# and the decode benchmark's split kernel over interleaved caches at the other bit widths and head dims
benchmark = [record_attention(bits, dim, "interleaved") for bits, dim in ((2, 64), (4, 256))]

def asm_layouts(ttgir):
    # every PRMT asm's tensors keep each packed call's 4 elements, the 2 x 2 innermost dims, in one thread
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<(.*)>$", ttgir, re.M))
    ok = []
    for line in re.findall(r"tt\.elementwise_inline_asm .*prmt\.b32.*", ttgir):
        for name in re.findall(r"tensor<[^,>]*, (#\w+)>", line):
            size = [int(x) for x in re.search(r"sizePerThread = \[([\d, ]+)\]", layouts[name])[1].split(",")]
            order = [int(x) for x in re.search(r"order = \[([\d, ]+)\]", layouts[name])[1].split(",")]
            ok.append(size[-2:] == [2, 2] and order[:2] == [len(size) - 1, len(size) - 2])
    return len(ok), all(ok)

launches = [l for r in recorders.values() for l in r.launches] + benchmark
variants = {repr((l.fn.__name__, l.signature, l.constexprs, l.attrs, l.options)): l for l in launches}
for l in variants.values():
    k = compile_for_sm90(l)
    spills = len(re.findall(r"\b(?:STL|LDL)\b", get_sass(k.asm["cubin"])))
    tensors, layouts_ok = asm_layouts(k.asm["ttgir"])
    print(l.fn.__name__, "spills", spills, "shared", k.metadata.shared, "prmt", k.asm["ptx"].count("prmt.b32"),
          "asm_tensors", tensors, "asm_layouts_ok", layouts_ok, "popc", k.asm["ptx"].count("popc.b32"))
"""


_PTXAS = os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(_PTXAS), reason="triton's bundled ptxas is missing")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run every kernel for real")
def test_kernels_compile_for_a_gpu(tmp_path):
    """Every kernel variant the tier launches (float16/bfloat16/float32/float64 inputs, rotor/dense, QJL,
    norm correction, ragged d, quantize into a cache, 64 query rows per KV head at d = 256, both packings)
    compiles ahead of time for an sm_90 GPU with Triton's own ptxas, and fits the 227 KiB of shared memory of an
    H100; the query rotation spills few registers, if any. Half-precision attention over interleaved caches
    runs the PRMT asm, whose packed calls see 4 copies of one selector (checked in the TTGIR layouts); the
    other kernels run none. Quantize with norm correction at 2 to 4 bits counts with the GPU's popc. Catches what the interpreter cannot: constexpr misuse, tl.dot shapes and dtypes,
    pointer types, int64 shifts, inline asm."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _pythonpath()
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line.split() for line in done.stdout.split("\n") if " shared " in line]
    shared = [int(line[4]) for line in lines]
    kernels = {line[0] for line in lines}
    assert kernels == {"quantize_kernel", "dequantize_kernel", "scores_kernel", "attention_query_kernel", "attention_split_kernel",
                       "attention_combine_kernel"}
    assert len(shared) >= 15 and max(shared) <= 227 * 1024, done.stdout
    query = [int(line[2]) for line in lines if line[0] == "attention_query_kernel"]
    assert len(query) >= 5 and max(query) <= 16, done.stdout  # local loads and stores: 0 to 8 with Triton 3.8 / 3.9
    asm = [(line[0], int(line[6]), line[10]) for line in lines if int(line[8])]  # variants with the PRMT asm
    assert len(asm) >= 4 and all(name == "attention_split_kernel" for name, *_ in asm), asm  # the half-precision ones
    assert all(prmt >= 64 and ok == "True" for _, prmt, ok in asm), asm
    popc = {(line[0], int(line[12])) for line in lines if int(line[12])}  # norm correction's counts, 2 to 4 bits
    assert popc and {name for name, _ in popc} == {"quantize_kernel"}, popc


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attention_block_n=96), r"LaunchConfig.attention_block_n: expected a power of two or None, got 96"),
        (dict(attention_subsplits=3), r"LaunchConfig.attention_subsplits: expected a power of two or None, got 3"),
        (dict(quantize_block_c=0), r"LaunchConfig.quantize_block_c: expected a power of two or None, got 0"),
        (dict(quantize_warps=2.0), r"LaunchConfig.quantize_warps: expected a power of two or None, got 2.0"),
        (dict(attention_stages=0), r"LaunchConfig.attention_stages: expected an int >= 1, got 0"),
        (dict(splits=True), r"LaunchConfig.splits: expected an int >= 1 or None, got True"),
        (dict(int32_entries=-1), r"LaunchConfig.int32_entries: expected an int >= 0, got -1"),
    ],
)
def test_launch_config_names_a_bad_setting(change, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        launch.LaunchConfig(**change)
    assert launch.LaunchConfig(splits=3, quantize_block_n=64, int32_entries=0).splits == 3
