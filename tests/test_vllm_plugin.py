"""The vLLM plugin (`rotorquant.integrations.vllm`) against vLLM's real interfaces, on CPU tensors.

Needs vLLM >= 0.33 (installed without its CUDA dependencies by ``scripts/setup.sh``); imported with
``VLLM_TARGET_DEVICE=cpu``. The batch tests run the backend's torch tier and, with
``TRITON_INTERPRET=1``, its Triton tier under the interpreter, behind the same calls.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import types

import numpy as np
import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs it)")

import torch  # noqa: E402
from test_tier_agreement import assert_close  # noqa: E402
from vllm.config import CacheConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, get_kv_quant_mode  # noqa: E402

import rotorquant as rq  # noqa: E402
import rotorquant.integrations.vllm as rv  # noqa: E402
from rotorquant.tiers import torch as torch_tier  # noqa: E402

# (cache dtype, tier the backend runs on CPU tensors): the Triton tier when its interpreter is on
BATCH_CASES = [("rotorquant_k4v2", "rotorquant.tiers.torch"), ("auto", "rotorquant.tiers.torch")] + (
    [("rotorquant_k4v2", "rotorquant.tiers.triton")] if os.environ.get("TRITON_INTERPRET") == "1" else []
)


@pytest.fixture(scope="module")
def plugin():
    """The plugin as vLLM loads it: through the ``vllm.general_plugins`` entry point."""
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "rotorquant"]
    assert entry.value == "rotorquant.integrations.vllm:register"
    entry.load()()
    return rv


@pytest.fixture(scope="module")
def config(plugin):
    return VllmConfig(cache_config=CacheConfig(cache_dtype="rotorquant_k4v2"))


def test_import_needs_no_vllm():
    code = "import sys, rotorquant.integrations.vllm; assert 'vllm' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registration(plugin):
    backend = AttentionBackendEnum["ROTORQUANT"]
    assert backend.get_class() is plugin.RotorQuantAttentionBackend
    assert backend.get_path() == "rotorquant.integrations.vllm.RotorQuantAttentionBackend"
    plugin.register()  # vLLM may load plugins more than once
    for name in plugin.CACHE_DTYPES:
        assert CacheConfig(cache_dtype=name).cache_dtype == name
    with pytest.raises(ValueError, match="rotorquant_k9v9"):
        CacheConfig(cache_dtype="rotorquant_k9v9")


def test_cli_arguments(plugin, tmp_path):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--model", str(tmp_path), "--kv-cache-dtype", "rotorquant_k4v2", "--attention-backend", "ROTORQUANT"]
    )
    engine = EngineArgs.from_cli_args(args)
    assert (engine.kv_cache_dtype, engine.attention_backend) == ("rotorquant_k4v2", "ROTORQUANT")


def test_engine_defaults(plugin, monkeypatch, tmp_path):
    """A rotorquant dtype keeps the first and last two layers native and selects the backend."""
    import vllm.engine.arg_utils as arg_utils

    model = types.SimpleNamespace(hf_text_config=types.SimpleNamespace(num_hidden_layers=7))
    monkeypatch.setattr(arg_utils, "ModelConfig", lambda **kwargs: model)
    engine = EngineArgs(model=str(tmp_path), kv_cache_dtype="rotorquant_k3v3", kv_cache_dtype_skip_layers=["3"])
    assert engine.create_model_config() is model
    assert (engine.kv_cache_dtype_skip_layers, engine.attention_backend) == (["0", "1", "3", "5", "6"], "ROTORQUANT")
    other = EngineArgs(model=str(tmp_path), kv_cache_dtype="fp8")
    other.create_model_config()
    assert (other.kv_cache_dtype_skip_layers, other.attention_backend) == ([], None)
    assert plugin.boundary_layers(3) == ["0", "2"]


def test_quant_mode_is_no_other_format(plugin, config):
    """The dtype's quant mode matches no vLLM format, and the backend sizes pages by the dtype's name."""
    mode = get_kv_quant_mode("rotorquant_k4v2")
    assert mode is KVQuantMode.NONE
    assert not (mode.is_octave or mode.is_turboquant or mode.is_per_token_head or mode.is_nvfp4 or mode.is_ultraquant)
    backend = plugin.RotorQuantAttentionBackend
    with set_current_vllm_config(config):
        pages = {
            backend.customize_spec(
                FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=128, dtype=torch.uint8, kv_quant_mode=m)
            ).page_size_bytes
            for m in (mode, KVQuantMode.CUSTOM, KVQuantMode.OCTAVE_K3V4)
        }
    assert len(pages) == 1


@pytest.mark.parametrize("head_size", rv.HEAD_SIZES)
@pytest.mark.parametrize("cache_dtype", rv.CACHE_DTYPES)
def test_page_size_is_packed_bytes(plugin, cache_dtype, head_size):
    """A page holds block_size x Hkv tokens of packed K and V (codes and norms), nothing more."""
    block, heads = 16, 4
    spec = FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head_size, dtype=torch.uint8)
    with set_current_vllm_config(VllmConfig(cache_config=CacheConfig(cache_dtype=cache_dtype))):
        page = plugin.RotorQuantAttentionBackend.customize_spec(spec).page_size_bytes
        native = plugin.RotorQuantAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head_size, dtype=torch.bfloat16)
        )
    k_spec, v_spec = plugin.specs(cache_dtype, head_size)
    x = torch.randn(block, heads, head_size)
    packed = torch_tier.quantize(x, rq.build_params(k_spec)).nbytes + torch_tier.quantize(x, rq.build_params(v_spec)).nbytes
    assert page == packed
    assert native.page_size_bytes == block * heads * 2 * head_size * 2  # boundary layers: vLLM's own layout


def test_refusals(plugin):
    backend = plugin.RotorQuantAttentionBackend
    reasons = backend.validate_configuration(
        128, torch.bfloat16, "rotorquant_k4v2", None, True, False, False, False, False, None,
        "encoder_decoder", has_sliding_window=True,
    )  # fmt: skip
    assert {"MLA not supported", "sliding window not supported", "attention type encoder_decoder not supported"} <= set(
        reasons
    )
    assert backend.validate_configuration(
        96, torch.bfloat16, "rotorquant_k4v2", 16, False, False, False, False, False, None, AttentionType.DECODER
    ) == ["head_size not supported"]
    impl = plugin.RotorQuantAttentionImpl
    with pytest.raises(NotImplementedError, match="sliding window"):
        impl(4, 64, 0.125, 2, sliding_window=128, kv_cache_dtype="rotorquant_k4v2")
    with pytest.raises(NotImplementedError, match="encoder_decoder"):
        impl(4, 64, 0.125, 2, kv_cache_dtype="rotorquant_k4v2", attn_type=AttentionType.ENCODER_DECODER)
    assert plugin.RotorQuantMetadataBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_BATCH


def test_paged_codes_and_tier_for_name_bad_arguments(plugin):
    layout = plugin.slot_layout("rotorquant_k4v2", 64)
    pool = torch.zeros(2, 3, 16, layout.slot_bytes, dtype=torch.uint8)
    k_code, v_code = plugin.paged_codes(pool, layout, torch.bfloat16)
    assert k_code.codes.shape[:3] == v_code.norms.shape == (2, 3, 16) and k_code.dtype == "bfloat16"
    with pytest.raises(TypeError, match="^kv_cache: expected a torch.Tensor, got ndarray"):
        plugin.paged_codes(pool.numpy(), layout, torch.bfloat16)
    with pytest.raises(ValueError, match=rf"^kv_cache: expected uint8 \(num_blocks, Hkv, page, {layout.slot_bytes}\)"):
        plugin.paged_codes(pool[..., :-1], layout, torch.bfloat16)
    strided = torch.zeros(2, 3, 16, 2 * layout.slot_bytes, dtype=torch.uint8)[..., ::2]
    with pytest.raises(ValueError, match="^kv_cache: expected a unit last stride"):
        plugin.paged_codes(strided, layout, torch.bfloat16)
    with pytest.raises(ValueError, match="^dtype: expected torch.float16, torch.bfloat16 or torch.float32"):
        plugin.paged_codes(pool, layout, torch.int8)
    odd = torch.zeros(2, 3, 16, layout.slot_bytes + 1, dtype=torch.uint8)
    for misaligned in (odd[..., : layout.slot_bytes], odd.view(-1)[1:].view(-1)[: pool.numel()].view(pool.shape)):
        with pytest.raises(ValueError, match="^kv_cache: expected strides and a storage offset that are multiples of 4"):
            plugin.paged_codes(misaligned, layout, torch.bfloat16)
    with pytest.raises(TypeError, match="^layout: expected a SlotLayout"):
        plugin.paged_codes(pool, "rotorquant_k4v2", torch.bfloat16)
    assert plugin.tier_for("cpu") is plugin.tier_for(torch.device("cpu")) is torch_tier
    with pytest.raises(ValueError, match="^device: expected one of"):
        plugin.tier_for("meta")
    for device in ("nonsense", 3.5):
        with pytest.raises(ValueError, match="^device: expected a torch device of a type among"):
            plugin.tier_for(device)


def test_version_gate(plugin, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.32.2")
    with pytest.raises(RuntimeError, match=r"needs vllm >= 0\.33 .*found vllm 0\.32\.2"):
        plugin.register()


# ---------------------------------------------------------------- one batch through the backend

PAGE, BLOCKS, HKV, HQ, DIM = 16, 12, 2, 4, 64


class Pool:
    """A layer's cache as vLLM hands it over: logical (num_blocks, Hkv, page, content) over memory
    stored (num_blocks, page, Hkv, content), holding stale finite entries (of earlier sequences), and
    one shuffled block table for the batch's sequences."""

    def __init__(self, layout, lengths: list[int], gen: torch.Generator):
        if layout is None:  # native: keys then values, float32
            self.memory = torch.randn(BLOCKS, PAGE, HKV, 2 * DIM, generator=gen)
        else:  # packed: any codes, positive norms
            self.memory = torch.randint(0, 256, (BLOCKS, PAGE, HKV, layout.slot_bytes), dtype=torch.uint8, generator=gen)
            for at in (layout.k_norm, layout.v_norm):
                self.memory[..., at : at + 4].view(torch.float32)[..., 0] = torch.rand(BLOCKS, PAGE, HKV, generator=gen) + 1
        self.kv_cache = self.memory.transpose(1, 2)
        ids = torch.randperm(BLOCKS, generator=gen).tolist()
        need = [-(-n // PAGE) for n in lengths]
        self.table = torch.zeros((len(lengths), max(need) + 1), dtype=torch.int32)  # unused entries: 0, as vLLM
        for r, count in enumerate(need):
            self.table[r, :count] = torch.tensor([ids.pop() for _ in range(count)])

    def slots(self, request: int, positions) -> torch.Tensor:
        pos = torch.as_tensor(positions)
        return self.table[request, pos // PAGE].to(torch.int64) * PAGE + pos % PAGE


def metadata(plugin, config, spec, table, query_lens, seq_lens, slots, threshold=None):
    starts = torch.tensor(np.cumsum([0, *query_lens]), dtype=torch.int32)
    cam = CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(query_lens), num_actual_tokens=int(starts[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=table, slot_mapping=slots,
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
    )  # fmt: skip
    with set_current_vllm_config(config):
        builder = plugin.RotorQuantMetadataBuilder(spec, ["layer"], config, torch.device("cpu"))
    if threshold is not None:  # as with num_speculative_tokens = threshold - 1
        builder.reorder_batch_threshold = threshold
    return builder.build(0, cam)


def reference(q, keys, values, scale):
    """Exact attention in float64 and in float32 (the same-dtype baseline): ``q (T, Hq, d)`` over the
    sequence's ``keys, values (S, Hkv, d)``, query t seeing keys 0 .. S - T + t."""
    t, s = q.shape[0], keys.shape[0]
    mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]

    def run(dtype):
        qq, kk, vv = (a.to(dtype).transpose(0, 1) for a in (q, keys, values))
        kk, vv = (a.repeat_interleave(HQ // HKV, dim=0) for a in (kk, vv))
        w = (qq @ kk.transpose(1, 2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        return (w @ vv).transpose(0, 1)

    return run(torch.float64), run(torch.float32)


@pytest.mark.parametrize(
    ("cache_dtype", "tier_module"), BATCH_CASES, ids=lambda v: {"auto": "native"}.get(v, v.rsplit(".", 1)[-1])
)
def test_batch(plugin, config, monkeypatch, cache_dtype, tier_module):
    """Two decodes, one 4-token continuation, one prompt, three padding tokens (slot -1), then a
    uniform batch of 4-token verifications, against exact attention over the dequantized cache (a
    native layer: over the raw keys and values)."""
    monkeypatch.setitem(plugin.TIERS, "cpu", tier_module)
    tier = importlib.import_module(tier_module)
    gen = torch.Generator().manual_seed(0)
    scale = DIM**-0.5
    impl = plugin.RotorQuantAttentionImpl(HQ, DIM, scale, HKV, kv_cache_dtype=cache_dtype)
    packed = cache_dtype != "auto"
    layout = plugin.slot_layout(cache_dtype, DIM) if packed else None
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=DIM, dtype=torch.uint8 if packed else torch.float32)
    past, new = [37, 20, 29, 0], [1, 1, 4, 11]
    pool = Pool(layout, [p + n + 4 for p, n in zip(past, new)], gen)
    keys = [torch.randn(p + n + 4, HKV, DIM, generator=gen) * 2 for p, n in zip(past, new)]
    values = [torch.randn(p + n + 4, HKV, DIM, generator=gen) for p, n in zip(past, new)]

    # the sequences' earlier tokens, stored by earlier steps
    old = [r for r in range(4) if past[r]]
    impl.do_kv_cache_update(
        None, torch.cat([keys[r][: past[r]] for r in old]), torch.cat([values[r][: past[r]] for r in old]),
        pool.kv_cache, torch.cat([pool.slots(r, range(past[r])) for r in old]),
    )  # fmt: skip

    def step(requests, starts, counts, threshold=None, expect_decodes=None):
        """One step: ``counts[i]`` new tokens of request ``requests[i]`` from position ``starts[i]``."""
        k_new = torch.cat([keys[r][s : s + c] for r, s, c in zip(requests, starts, counts)] + [torch.randn(3, HKV, DIM)])
        v_new = torch.cat([values[r][s : s + c] for r, s, c in zip(requests, starts, counts)] + [torch.randn(3, HKV, DIM)])
        slots = torch.cat([pool.slots(r, range(s, s + c)) for r, s, c in zip(requests, starts, counts)] + [torch.full((3,), -1)])
        q = torch.randn(k_new.shape[0], HQ, DIM, generator=gen)
        before = pool.memory.clone()
        impl.do_kv_cache_update(None, k_new, v_new, pool.kv_cache, slots)
        written = torch.zeros(BLOCKS, PAGE, dtype=torch.bool)
        written[slots[slots >= 0] // PAGE, slots[slots >= 0] % PAGE] = True
        assert torch.equal(pool.memory[~written], before[~written]), "a padding token (slot -1) wrote"
        blocks, offsets = slots[slots >= 0] // PAGE, slots[slots >= 0] % PAGE
        if packed:  # each slot holds exactly what quantize makes of its token
            k_code, v_code = plugin.paged_codes(pool.kv_cache, layout, torch.float32)
            for code, x, params in ((k_code, k_new, impl.k_params), (v_code, v_new, impl.v_params)):
                want = tier.quantize(x[: blocks.shape[0]], params)
                assert torch.equal(code.codes.transpose(1, 2)[blocks, offsets], want.codes)
                assert torch.equal(code.norms.transpose(1, 2)[blocks, offsets], want.norms)
        else:
            assert torch.equal(pool.memory[blocks, offsets], torch.cat([k_new, v_new], -1)[: blocks.shape[0]])

        lengths = [s + c for s, c in zip(starts, counts)]
        meta = metadata(plugin, config, spec, pool.table[requests], counts, lengths, slots, threshold)
        assert (meta.num_decodes, meta.decode_len) == expect_decodes
        out = torch.full((q.shape[0], HQ, DIM), float("nan"))
        impl.forward(None, q, k_new, v_new, pool.kv_cache, meta, output=out)
        assert out[sum(counts) :].isnan().all(), "padding rows were written"

        if packed:
            k_all = torch_tier.dequantize(k_code, impl.k_params).transpose(1, 2)  # (blocks, page, Hkv, d)
            v_all = torch_tier.dequantize(v_code, impl.v_params).transpose(1, 2)
        row = 0
        for r, s, c, length in zip(requests, starts, counts, lengths):
            ids = pool.table[r, torch.arange(length) // PAGE].long(), torch.arange(length) % PAGE
            if packed and s > 0:  # read from the compressed cache
                k_seq, v_seq = k_all[ids], v_all[ids]
            else:  # a prompt attends to its raw keys; a native layer stores them exactly
                k_seq, v_seq = keys[r][:length], values[r][:length]
            want, baseline = reference(q[row : row + c], k_seq, v_seq, scale)
            assert_close(f"request {r}", want, out[row : row + c], baseline=baseline, dtype="float32", atol=1e-5)
            row += c

    step([0, 1, 2, 3], past, new, expect_decodes=(2, 1))
    step([0, 1], [38, 21], [4, 4], threshold=4, expect_decodes=(2, 4))
