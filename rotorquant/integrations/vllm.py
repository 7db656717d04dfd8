"""vLLM plugin: RotorQuant KV-cache dtypes ``rotorquant_k{K}v{V}`` and the attention backend ``ROTORQUANT``.

    $ pip install 'rotorquant[torch,triton]' vllm>=0.33
    $ vllm serve MODEL --kv-cache-dtype rotorquant_k4v2

vLLM finds `register` through the ``vllm.general_plugins`` entry point and runs it in every process
before it parses arguments. `register` needs vLLM >= 0.33 (``register_kv_cache_dtype`` and
``AttentionBackendEnum.register``); importing this module needs neither vLLM nor a GPU.

Each dtype is one preset of `PRESETS`: keys and values get their own `rotorquant.QuantizerSpec`
(`specs`). One token of one KV head is one packed slot of ``slot_bytes`` bytes inside vLLM's uint8
cache, logically ``(num_blocks, Hkv, page, slot_bytes)`` and stored ``(num_blocks, page, Hkv,
slot_bytes)`` (vLLM's ``LBNHC`` layout), so every block's bytes are contiguous (`SlotLayout`):

    [ K codes | V codes | zero pad to norm alignment | K norm | V norm ]

`paged_codes` views the K and V fields of a cache as two `rotorquant.Compressed` of leading shape
``(num_blocks, Hkv, page)`` (strided views, no copy), which ``attention(..., block_table=...)`` reads
in place, and the tier's ``quantize_into(..., validate=False)`` writes new tokens into (the cache's
fields are interleaved in each slot, which ``quantize_into`` accepts since no two share a byte).

The attention impl (per layer, per step; vLLM reorders decodes to the front of the batch):

- ``do_kv_cache_update``: one ``quantize_into`` each for K and V at vLLM's ``slot_mapping`` (-1: skip);
- decodes (one uniform query length ``T``, 1 or ``1 + num_speculative_tokens``): one
  ``attention(q, k, v, ..., block_table=..., lengths=seq_lens, causal=True, validate=False)``,
  no host synchronization, so vLLM captures it in CUDA graphs (``UNIFORM_BATCH``);
- a prompt with nothing cached before it: exact attention on the raw K/V of the step;
- a chunk continuing a cached sequence: ``attention(..., causal=True)`` over the compressed cache.

The Triton tier runs on CUDA tensors, the torch tier on CPU tensors (`tier_for`). Boundary layers
(`BOUNDARY_LAYERS` first and last) stay at the model's precision: `register` makes vLLM's engine
arguments list them in ``kv_cache_dtype_skip_layers`` and select ``ROTORQUANT``, and the impl runs
those layers on a plain paged cache (vLLM's Triton ``unified_attention`` on CUDA, exact torch
attention on CPU). Sliding-window, MLA, encoder and encoder-decoder attention, ALiBi and logit
soft-capping are refused with errors that name them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re

import rotorquant as rq
from rotorquant.presets import PRESETS

DTYPE_PREFIX = "rotorquant_"
CACHE_DTYPES = tuple(DTYPE_PREFIX + preset for preset in PRESETS)
"""The ``--kv-cache-dtype`` values `register` adds, one per preset of `rotorquant.presets`."""

BACKEND_NAME = "ROTORQUANT"
BACKEND_PATH = f"{__name__}.RotorQuantAttentionBackend"
MIN_VLLM = (0, 33)
BOUNDARY_LAYERS = 2
"""Attention layers kept at the model's precision at each end of the stack."""
HEAD_SIZES = (64, 128, 256)
K_SEED = 0
"""The keys' seed; values take ``K_SEED + 1`` (`rotorquant.presets.Preset.specs`)."""
TIERS = {"cuda": "rotorquant.tiers.triton", "cpu": "rotorquant.tiers.torch"}
"""The tier that runs on each device type (`tier_for`)."""


def specs(cache_dtype: str, head_size: int) -> tuple[rq.QuantizerSpec, rq.QuantizerSpec]:
    """The key and value specs of ``cache_dtype`` (one of `CACHE_DTYPES`) at ``head_size``."""
    known = isinstance(cache_dtype, str) and cache_dtype.startswith(DTYPE_PREFIX)
    preset = cache_dtype.removeprefix(DTYPE_PREFIX) if known else None
    if preset not in PRESETS:
        raise ValueError(f"cache_dtype: expected one of {list(CACHE_DTYPES)}, got {cache_dtype!r}")
    return PRESETS[preset].specs(head_size, seed=K_SEED)


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Byte offsets of the fields in one packed slot (one token of one KV head).

    ``[k_codes, k_codes + k_spec.code_bytes)`` K codes, then V codes, then zeros up to ``k_norm``
    (a multiple of the norm size), the K norm at ``k_norm``, the V norm at ``v_norm``;
    ``slot_bytes = v_norm + norm_bytes`` (the page of a block is ``page * Hkv * slot_bytes``).
    """

    k_spec: rq.QuantizerSpec
    v_spec: rq.QuantizerSpec
    k_codes: int
    v_codes: int
    k_norm: int
    v_norm: int
    slot_bytes: int


def slot_layout(cache_dtype: str, head_size: int) -> SlotLayout:
    """The `SlotLayout` of ``cache_dtype`` at ``head_size``."""
    k_spec, v_spec = specs(cache_dtype, head_size)
    norm = k_spec.norm_bytes
    codes_end = k_spec.code_bytes + v_spec.code_bytes
    k_norm = -(-codes_end // norm) * norm
    return SlotLayout(k_spec, v_spec, 0, k_spec.code_bytes, k_norm, k_norm + norm, k_norm + 2 * norm)


def paged_codes(kv_cache, layout: SlotLayout, dtype) -> tuple[rq.Compressed, rq.Compressed]:
    """The K and V codes of a packed cache ``kv_cache`` (uint8 ``(num_blocks, Hkv, page, slot_bytes)``, a
    unit last stride, the other strides and the storage offset multiples of 4 so that the float32 norms are
    aligned) as `rotorquant.Compressed` views of leading shape ``(num_blocks, Hkv, page)``; ``dtype``: the
    torch dtype the model's keys and values have."""
    import torch

    if not isinstance(layout, SlotLayout):
        raise TypeError(f"layout: expected a SlotLayout (slot_layout(cache_dtype, head_size)), got {type(layout).__name__}")
    if not isinstance(kv_cache, torch.Tensor):
        raise TypeError(f"kv_cache: expected a torch.Tensor, got {type(kv_cache).__name__}")
    if kv_cache.dtype != torch.uint8 or kv_cache.ndim != 4 or kv_cache.shape[-1] != layout.slot_bytes:
        raise ValueError(
            f"kv_cache: expected uint8 (num_blocks, Hkv, page, {layout.slot_bytes}), got {kv_cache.dtype} "
            f"{tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache: expected a unit last stride (each slot's bytes contiguous), got strides {kv_cache.stride()}")
    if any(st % 4 for st in kv_cache.stride()[:-1]) or kv_cache.storage_offset() % 4:
        raise ValueError(
            f"kv_cache: expected strides and a storage offset that are multiples of 4 bytes (float32 norms), got "
            f"strides {kv_cache.stride()} and offset {kv_cache.storage_offset()}"
        )
    name = str(dtype).removeprefix("torch.")
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32 (the model's), got {dtype!r}")

    def field(spec, codes, norm):
        norms = kv_cache[..., norm : norm + spec.norm_bytes].view(torch.float32)[..., 0]
        return rq.Compressed(codes=kv_cache[..., codes : codes + spec.code_bytes], norms=norms, spec=spec, dtype=name)

    return field(layout.k_spec, layout.k_codes, layout.k_norm), field(layout.v_spec, layout.v_codes, layout.v_norm)


def write_slots(pool, slots, rows) -> None:
    """``pool[s // page, s % page] = rows[i]`` for each ``s = slots[i] >= 0``, in place, with no host
    synchronization (CUDA graphs can capture it).

    ``pool (num_blocks, page, ...)`` (any strides), ``slots (N,)`` integers (vLLM's slot mapping;
    -1 skips), ``rows (N, ...)``. A skipped row is sent to the first kept row's slot with that row's
    data, so repeated indices always carry equal data; with no row kept, to slot 0 with its own bytes.
    """
    import torch

    page = pool.shape[1]
    slots = slots.to(torch.int64)
    kept = slots >= 0
    first = torch.argmax(kept.to(torch.int8))  # the first kept row (0 when none is kept)
    any_kept = kept.any()
    source = torch.where(kept, torch.arange(slots.shape[0], device=slots.device), first)
    target = torch.where(kept, slots, torch.where(any_kept, slots[first], 0))
    data = torch.where(any_kept.reshape((1,) * rows.ndim), rows[source], pool[0, 0].unsqueeze(0))
    pool.index_put_((target // page, target % page), data)


def tier_for(device):
    """The tier module (``quantize``, ``attention``, ...) that runs on ``device`` (a `torch.device` or its
    name, `TIERS`)."""
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected a torch device of a type among {sorted(TIERS)}, got {device!r}: {error}") from None
    if device.type not in TIERS:
        raise ValueError(f"device: expected one of {sorted(TIERS)}, got {device.type!r}")
    return importlib.import_module(TIERS[device.type])


def boundary_layers(num_layers: int, n: int = BOUNDARY_LAYERS) -> list[str]:
    """The indices (as vLLM's ``kv_cache_dtype_skip_layers`` strings) of the first and last
    ``min(n, num_layers // 2)`` layers."""
    n = min(n, num_layers // 2)
    return [str(i) for i in sorted(set(range(n)) | set(range(num_layers - n, num_layers)))]


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def register() -> None:
    """Add the `CACHE_DTYPES` and the ``ROTORQUANT`` backend to vLLM (the ``vllm.general_plugins`` entry
    point; safe to call more than once). Raises ``RuntimeError`` on vLLM older than 0.33."""
    import vllm

    if _release(vllm.__version__) < MIN_VLLM:
        raise RuntimeError(
            f"rotorquant's vLLM plugin needs vllm >= {'.'.join(map(str, MIN_VLLM))} (register_kv_cache_dtype, "
            f"AttentionBackendEnum.register), found vllm {vllm.__version__}"
        )
    from vllm.config.cache import get_kv_cache_dtype_handler, register_kv_cache_dtype
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for name in CACHE_DTYPES:
        if get_kv_cache_dtype_handler(name) is None:
            handler = _vllm_classes()["RotorQuantCacheDtype"]
            register_kv_cache_dtype(name)(type(handler.__name__, (handler,), {"name": name}))
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)
    if not getattr(EngineArgs.create_model_config, "rotorquant", False):
        EngineArgs.create_model_config = _with_engine_defaults(EngineArgs.create_model_config)


def _with_engine_defaults(create_model_config):
    """``EngineArgs.create_model_config`` that, for a rotorquant dtype, also adds the boundary layers to
    ``kv_cache_dtype_skip_layers`` and selects ``ROTORQUANT`` unless a backend was chosen (vLLM 0.33
    does this itself only for its TurboQuant dtypes; ``create_engine_config`` reads both fields after
    it has made the model config)."""

    @functools.wraps(create_model_config)
    def wrapper(self):
        model_config = create_model_config(self)
        if str(self.kv_cache_dtype).startswith(DTYPE_PREFIX):
            layers = boundary_layers(model_config.hf_text_config.num_hidden_layers)
            self.kv_cache_dtype_skip_layers = sorted(set(self.kv_cache_dtype_skip_layers or ()) | set(layers))
            if self.attention_backend is None and self.attention_config.backend is None:
                self.attention_backend = BACKEND_NAME
        return model_config

    wrapper.rotorquant = True
    return wrapper


def __getattr__(name: str):
    """The vLLM classes (`RotorQuantAttentionBackend`, ...), defined on first access so that importing
    this module does not import vLLM."""
    classes = _vllm_classes() if name in _CLASS_NAMES else {}
    if name not in classes:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return classes[name]


_CLASS_NAMES = (
    "RotorQuantAttentionBackend",
    "RotorQuantMetadata",
    "RotorQuantMetadataBuilder",
    "RotorQuantAttentionImpl",
    "RotorQuantCacheDtype",
)


@functools.cache
def _vllm_classes() -> dict:
    import torch
    import torch.nn.functional as F
    from vllm.config import get_current_vllm_config
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionMetadata,
        AttentionMetadataBuilder,
        AttentionType,
        MultipleOf,
    )
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills
    from vllm.v1.kv_cache_interface import KVCacheLayout, KVQuantMode

    class RotorQuantCacheDtype:
        """vLLM's handler of a rotorquant dtype: uint8 storage, quant mode ``NONE``.

        The backend recognizes its format by the dtype's name, never by its quant mode: in vLLM
        0.33 ``KVQuantMode.CUSTOM`` is an alias of ``OCTAVE_K3V4`` (both 12), so a handler returning
        it would be taken for Octave's format (``is_octave``). ``NONE`` matches no other format, and
        no vLLM kernel reads this cache: only ``ROTORQUANT`` accepts these dtypes.
        """

        def torch_dtype(self):
            return torch.uint8

        def quant_mode(self):
            return KVQuantMode.NONE

    class RotorQuantAttentionBackend(AttentionBackend):
        """``ROTORQUANT``: rotorquant dtypes in packed slots (`SlotLayout`); native dtypes (the
        boundary layers) as vLLM lays them out, keys then values in each token's content."""

        accept_output_buffer = True
        forward_includes_kv_cache_update = False
        supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
        supported_kv_cache_dtypes = ["auto", "float16", "bfloat16", *CACHE_DTYPES]

        @staticmethod
        def get_name() -> str:
            return BACKEND_NAME

        @staticmethod
        def get_impl_cls():
            return RotorQuantAttentionImpl

        @staticmethod
        def get_builder_cls():
            return RotorQuantMetadataBuilder

        @classmethod
        def get_supported_head_sizes(cls) -> list[int]:
            return list(HEAD_SIZES)

        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [MultipleOf(16)]

        @classmethod
        def supported_kv_cache_layouts(cls):
            return (KVCacheLayout.LBNHC,)

        @classmethod
        def supports_kv_connector(cls) -> bool:
            return False

        @classmethod
        def customize_spec(cls, spec):
            """A uint8 spec is a packed one: its content is the slot of the run's cache dtype (the
            current vLLM config's), whatever its quant mode says; other specs are native, unchanged."""
            if spec.dtype != torch.uint8:
                return spec
            cache_dtype = get_current_vllm_config().cache_config.cache_dtype
            layout = slot_layout(cache_dtype, spec.head_size)
            return dataclasses.replace(spec, state_content_bytes=layout.slot_bytes)

    @dataclasses.dataclass
    class RotorQuantMetadata(AttentionMetadata):
        """One step's batch: requests ``[0, num_decodes)`` are decodes of ``decode_len`` tokens each
        (``num_decode_tokens`` in all); host copies of the query starts and sequence lengths plan the rest."""

        num_actual_tokens: int
        query_start_loc: torch.Tensor
        query_start_loc_cpu: torch.Tensor
        seq_lens: torch.Tensor
        seq_lens_cpu: torch.Tensor
        block_table: torch.Tensor
        slot_mapping: torch.Tensor
        max_query_len: int
        max_seq_len: int
        num_decodes: int
        num_decode_tokens: int
        decode_len: int

    class RotorQuantMetadataBuilder(AttentionMetadataBuilder[RotorQuantMetadata]):
        """Splits the batch into uniform decodes (front) and the rest; CUDA graphs for uniform batches."""

        _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            cam = common_attn_metadata
            num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(
                cam, decode_threshold=self.reorder_batch_threshold, require_uniform=True
            )
            starts = cam.query_start_loc_cpu
            decode_len = int(starts[1] - starts[0]) if num_decodes else 0
            seq_lens_cpu = cam.seq_lens_cpu_upper_bound
            return RotorQuantMetadata(
                num_actual_tokens=cam.num_actual_tokens,
                query_start_loc=cam.query_start_loc,
                query_start_loc_cpu=starts,
                seq_lens=cam.seq_lens,
                seq_lens_cpu=cam.seq_lens.cpu() if seq_lens_cpu is None else seq_lens_cpu,
                block_table=cam.block_table_tensor,
                slot_mapping=cam.slot_mapping,
                max_query_len=cam.max_query_len,
                max_seq_len=cam.max_seq_len,
                num_decodes=num_decodes,
                num_decode_tokens=num_decode_tokens,
                decode_len=decode_len,
            )

    def exact_attention(q, k, v, scale):
        """``q (Hq, T, d)`` over ``k, v (Hkv, S, d)``, query ``t`` seeing keys ``0 .. S - T + t``."""
        t, s = q.shape[1], k.shape[1]
        if s == t:  # a whole prompt: the causal mask, which lets torch pick its fused kernels
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    class RotorQuantAttentionImpl(AttentionImpl[RotorQuantMetadata]):
        """One decoder attention layer: packed (rotorquant dtype) or native (the boundary layers)."""

        def __init__(
            self,
            num_heads,
            head_size,
            scale,
            num_kv_heads=None,
            alibi_slopes=None,
            sliding_window=None,
            kv_cache_dtype="auto",
            logits_soft_cap=None,
            attn_type=AttentionType.DECODER,
            kv_sharing_target_layer_name=None,
            **kwargs,
        ):
            refused = {
                "sliding window attention": sliding_window is not None,
                f"attention type {attn_type!r} (encoder, encoder-only and encoder-decoder)": attn_type
                != AttentionType.DECODER,
                "ALiBi slopes": alibi_slopes is not None,
                "logit soft-capping": bool(logits_soft_cap),
                "attention sinks": kwargs.get("sinks") is not None,
            }
            named = [what for what, present in refused.items() if present]
            if named:
                raise NotImplementedError(f"{BACKEND_NAME} attention backend: not supported: {', '.join(named)}")
            self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
            self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
            self.kv_cache_dtype = kv_cache_dtype
            self.layout = slot_layout(kv_cache_dtype, head_size) if kv_cache_dtype.startswith(DTYPE_PREFIX) else None
            if self.layout is not None:
                self.k_params = rq.build_params(self.layout.k_spec)
                self.v_params = rq.build_params(self.layout.v_spec)

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            """Store the step's keys and values ``(N, Hkv, d)`` at ``slot_mapping (N,)`` (-1: skip): one unchecked
            ``quantize_into`` each for K and V, straight into the packed slots."""
            n = slot_mapping.shape[0]
            if self.layout is None:
                pool = kv_cache.transpose(1, 2)  # (num_blocks, page, Hkv, content)
                write_slots(pool, slot_mapping, torch.cat([key[:n], value[:n]], dim=-1).to(pool.dtype))
                return
            tier = tier_for(key.device)
            heads = key.shape[1]
            # entry (block, slot, head) of the stored (num_blocks, page, Hkv) layout: s * Hkv + h, -1 kept
            slots = slot_mapping.to(torch.int64)[:n, None]
            flat = torch.where(slots >= 0, slots * heads + torch.arange(heads, device=slots.device), -1)
            for x, params, code in zip((key, value), (self.k_params, self.v_params), paged_codes(kv_cache, self.layout, key.dtype)):
                stored = dataclasses.replace(code, **{f: getattr(code, f).transpose(1, 2) for f in ("codes", "norms")})
                tier.quantize_into(x[:n], params, stored, flat, validate=False)

        def forward(
            self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
            output_block_scale=None,
        ):  # fmt: skip
            """Attention of the step's queries ``(tokens, Hq, d)`` into ``output`` (the cache already
            holds the step's keys and values)."""
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError(f"{BACKEND_NAME} attention backend: not supported: fused output quantization")
            if attn_metadata is None:  # vLLM's profiling run
                return output.fill_(0)
            n = attn_metadata.num_actual_tokens
            q = query[:n].view(n, self.num_heads, self.head_size)
            out = output[:n].view(n, self.num_heads, self.head_size)
            if self.layout is None:
                self._native(q, kv_cache, attn_metadata, out)
            else:
                self._packed(q, key, value, kv_cache, attn_metadata, out)
            return output

        def _packed(self, q, key, value, kv_cache, meta, out):
            k_code, v_code = paged_codes(kv_cache, self.layout, q.dtype)
            tier = tier_for(q.device)

            starts, lens = meta.query_start_loc_cpu.tolist(), meta.seq_lens_cpu.tolist()

            def cached(first, count, length):
                """Requests ``first .. first + count - 1``, ``length`` queries each, over the cache."""
                rows = q[starts[first] : starts[first] + count * length]
                queries = rows.view(count, length, self.num_heads, self.head_size).transpose(1, 2)
                result = tier.attention(
                    queries, k_code, v_code, self.k_params, self.v_params, scale=self.scale,
                    lengths=meta.seq_lens[first : first + count], causal=True, validate=False,
                    block_table=meta.block_table[first : first + count],
                )  # fmt: skip
                return result.transpose(1, 2).reshape(count * length, self.num_heads, self.head_size)

            decodes = meta.num_decode_tokens // meta.decode_len if meta.num_decodes else 0
            if decodes:
                out[: meta.num_decode_tokens] = cached(0, decodes, meta.decode_len)
            for i in range(meta.num_decodes, len(starts) - 1):
                lo, hi = starts[i], starts[i + 1]
                if hi == lo:
                    continue
                if lens[i] == hi - lo:  # nothing cached before: exact attention on the raw keys and values
                    ks, vs = key[lo:hi].transpose(0, 1), value[lo:hi].transpose(0, 1)
                    out[lo:hi] = exact_attention(q[lo:hi].transpose(0, 1), ks, vs, self.scale).transpose(0, 1)
                else:
                    out[lo:hi] = cached(i, 1, hi - lo)

        def _native(self, q, kv_cache, meta, out):
            pool = kv_cache.transpose(1, 2)  # (num_blocks, page, Hkv, 2 d)
            keys, values = pool[..., : self.head_size], pool[..., self.head_size :]
            if q.device.type == "cuda":
                from vllm.v1.attention.ops.triton_unified_attention import unified_attention

                unified_attention(
                    q=q, k=keys, v=values, out=out, cu_seqlens_q=meta.query_start_loc,
                    max_seqlen_q=meta.max_query_len, seqused_k=meta.seq_lens, max_seqlen_k=meta.max_seq_len,
                    softmax_scale=self.scale, causal=True, window_size=(-1, -1), block_table=meta.block_table,
                    softcap=0, q_descale=None, k_descale=None, v_descale=None,
                )  # fmt: skip
                return
            page = pool.shape[1]
            starts, lens = meta.query_start_loc_cpu.tolist(), meta.seq_lens.tolist()
            for i in range(len(starts) - 1):
                lo, hi, length = starts[i], starts[i + 1], lens[i]
                if hi == lo:
                    continue
                blocks = meta.block_table[i, : math.ceil(length / page)]
                ks = keys[blocks].flatten(0, 1)[:length].transpose(0, 1)
                vs = values[blocks].flatten(0, 1)[:length].transpose(0, 1)
                out[lo:hi] = exact_attention(q[lo:hi].transpose(0, 1), ks, vs, self.scale).transpose(0, 1)

    classes = {cls.__name__: cls for cls in (RotorQuantCacheDtype, RotorQuantAttentionBackend, RotorQuantMetadata,
                                              RotorQuantMetadataBuilder, RotorQuantAttentionImpl)}  # fmt: skip
    for name, cls in classes.items():  # importable as rotorquant.integrations.vllm.<name> (vLLM resolves paths)
        cls.__qualname__ = name
    return classes
