"""`RotorQuantCache`: a transformers 5.x KV cache that stores keys and values as packed codes.

    >>> cache = RotorQuantCache(model.config, key_bits=3, value_bits=3, rotation="rotor", residual_length=0)
    >>> out = model.generate(input_ids, max_new_tokens=32, cache=cache)
    >>> cache.nbytes(), cache.code_nbytes(), cache.window_nbytes()

Each layer (`RotorQuantLayer`, a transformers ``CacheLayerMixin``) keeps, per attention layer:

- the packed `rotorquant.Compressed` codes of every token older than the window
  (``B x H x N`` vectors of ``spec.bytes_per_vector`` bytes each, keys and values with their own spec);
- the last ``residual_length`` tokens in the model's dtype (``residual_length=0``: none).

``update(k, v)`` (keys arrive after RoPE) returns ``[dequantize(codes), window, k]`` along the
sequence, so the tokens of the current forward pass are attended in full precision and stored
compressed; older tokens are read back from their codes. The dequantized copy exists only while one
layer's attention runs: memory held between steps is the codes plus the window. Codes are made by the
torch tier on CPU and by the Triton tier on CUDA (`rotorquant.Quantizer` with ``tier="auto"``).

Needs the ``hf`` and ``torch`` extras. Only models whose layers are all full attention are supported.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

try:
    import torch
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:
    raise ImportError(
        "rotorquant.integrations.transformers needs torch and transformers: pip install 'rotorquant[hf,torch]'"
    ) from exc

from ..compressed import Compressed
from ..quantizer import Quantizer, Tier
from ..spec import QuantizerSpec

__all__ = ["RotorQuantCache", "RotorQuantLayer"]


def _map_fields(code: Compressed, fn: Callable[[torch.Tensor], torch.Tensor]) -> Compressed:
    """Apply ``fn`` to every payload tensor of ``code`` (all have the batch first)."""
    fields = ("codes", "norms", "qjl_signs", "residual_norms")
    return dataclasses.replace(code, **{f: fn(getattr(code, f)) for f in fields if getattr(code, f) is not None})


def _concat(a: Compressed, b: Compressed) -> Compressed:
    """Codes of ``(B, H, N1)`` and ``(B, H, N2)`` vectors -> ``(B, H, N1 + N2)`` (the sequence axis is 2)."""
    out = {}
    for f in ("codes", "norms", "qjl_signs", "residual_norms"):
        x, y = getattr(a, f), getattr(b, f)
        out[f] = None if x is None else torch.cat([x, y], dim=2)
    return dataclasses.replace(a, **out)


class RotorQuantLayer(DynamicLayer):
    """One attention layer's cache: packed codes for old tokens, a full-precision recent window.

    Attributes:
        keys, values: the window ``(B, H, W, d)``, ``W <= residual_length`` between calls.
        key_code, value_code: `Compressed` of leading shape ``(B, H, N)`` or None before the first flush.
        cumulative_length: ``N + W``, every token seen.
    """

    is_croppable = False
    is_compileable = False

    def __init__(self, key_quantizer: Quantizer, value_quantizer: Quantizer, residual_length: int = 0):
        super().__init__()
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.residual_length = residual_length
        self.key_code: Compressed | None = None
        self.value_code: Compressed | None = None
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``(B, H, T, d)`` keys and values; return all ``(B, H, N + W + T, d)`` of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        window_k = torch.cat([self.keys, key_states], dim=-2)
        window_v = torch.cat([self.values, value_states], dim=-2)
        if self.key_code is None:
            keys, values = window_k, window_v
        else:
            keys = torch.cat([self.key_quantizer.dequantize(self.key_code).to(window_k.dtype), window_k], dim=-2)
            values = torch.cat([self.value_quantizer.dequantize(self.value_code).to(window_v.dtype), window_v], dim=-2)
        overflow = window_k.shape[-2] - self.residual_length
        if overflow > 0:
            self._append_codes(window_k[..., :overflow, :], window_v[..., :overflow, :])
            window_k, window_v = window_k[..., overflow:, :].clone(), window_v[..., overflow:, :].clone()
        self.keys, self.values = window_k, window_v
        return keys, values

    def _append_codes(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        new_k = self.key_quantizer.quantize(keys.contiguous())
        new_v = self.value_quantizer.quantize(values.contiguous())
        self.key_code = new_k if self.key_code is None else _concat(self.key_code, new_k)
        self.value_code = new_v if self.value_code is None else _concat(self.value_code, new_v)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def code_nbytes(self) -> int:
        """Bytes of the packed codes (keys and values)."""
        return sum(c.nbytes for c in (self.key_code, self.value_code) if c is not None)

    def window_nbytes(self) -> int:
        """Bytes of the full-precision window (keys and values)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        super().reset()
        self.key_code = self.value_code = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.key_code is not None:
            self.key_code, self.value_code = _map_fields(self.key_code, fn), _map_fields(self.value_code, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


class RotorQuantCache(Cache):
    """A transformers ``Cache`` of `RotorQuantLayer` s, one per decoder layer.

    Args:
        config: the model's config (``model.config``); its text config gives the layer count and ``head_dim``.
        key_bits: bits per coordinate of keys (1..8; 2..8 with QJL).
        value_bits: bits per coordinate of values (1..8; 2..8 with QJL).
        rotation: ``"rotor"`` (RotorQuant) or ``"dense"`` (TurboQuant), for keys and values.
        residual_length: the most recent tokens kept in full precision (0: every past token is compressed).
        key_qjl: add the 1-bit QJL residual sketch to keys (unbiased scores; measured worse for softmax
            attention, see ``docs/benchmarks/fidelity.md``).
        value_qjl: the same for values.
        norm_correction: store ``||x|| / ||c||`` so reconstructions keep their length; None (default) turns it
            on for every side without QJL (it measured better on every attention metric at 2, 3 and 4 bits).
        norm_dtype: ``"float32"`` or ``"float16"`` per-vector norms.
        seed: the quantizers' seed.
        tier: ``"auto"`` (torch on CPU, Triton on CUDA), ``"torch"`` or ``"triton"``.
    """

    def __init__(
        self,
        config,
        key_bits: int = 3,
        value_bits: int = 3,
        rotation: str = "rotor",
        residual_length: int = 0,
        *,
        key_qjl: bool = False,
        value_qjl: bool = False,
        norm_correction: bool | None = None,
        norm_dtype: str = "float32",
        seed: int = 0,
        tier: str = "auto",
    ):
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length: expected an int >= 0, got {residual_length!r}")
        if tier not in (Tier.AUTO, Tier.TORCH, Tier.TRITON):
            raise ValueError(f"tier: expected one of 'auto', 'torch', 'triton', got {tier!r}")
        config = config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if set(layer_types) != {"full_attention"}:
            raise ValueError(
                f"config: expected only full-attention layers, got layer types {sorted(set(layer_types))}"
            )
        dim = _head_dim(config)

        def spec(bits: int, qjl: bool) -> QuantizerSpec:
            nc = (not qjl) if norm_correction is None else norm_correction
            return QuantizerSpec(
                dim=dim, bits=bits, rotation=rotation, qjl=qjl, seed=seed, norm_dtype=norm_dtype, norm_correction=nc
            )

        self.key_spec = spec(key_bits, key_qjl)
        self.value_spec = spec(value_bits, value_qjl)
        self.residual_length = residual_length
        key_quantizer = Quantizer(self.key_spec, tier=tier)
        value_quantizer = Quantizer(self.value_spec, tier=tier)
        layers = [
            RotorQuantLayer(key_quantizer, value_quantizer, residual_length) for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    def code_nbytes(self) -> int:
        """Bytes held as packed codes (all layers, keys and values)."""
        return sum(layer.code_nbytes() for layer in self.layers)

    def window_nbytes(self) -> int:
        """Bytes held in the full-precision windows (all layers, keys and values)."""
        return sum(layer.window_nbytes() for layer in self.layers)

    def nbytes(self) -> int:
        """Every byte the cache holds between steps: codes plus windows."""
        return self.code_nbytes() + self.window_nbytes()

    def __repr__(self) -> str:
        return (
            f"RotorQuantCache(key_spec={self.key_spec}, value_spec={self.value_spec}, "
            f"residual_length={self.residual_length}, layers={len(self.layers)})"
        )
