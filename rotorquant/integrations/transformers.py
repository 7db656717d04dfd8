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

With ``calibration="prefill"`` each layer fits a `rotorquant.Calibration` on the keys and values of
its first ``update`` (the prompt, or its first chunk with chunked prefill): per sequence and KV head,
keys centered and scaled per channel, values scaled, with ``PREFILL_PRIOR`` isotropic pseudo-samples.
Every code of that layer is then made and read through it; ``calibration_nbytes()`` counts the
statistics (float32, ``3 x head_dim`` numbers per sequence, KV head and layer). Padding tokens in the
prompt count as samples (the cache is not given the attention mask).

Needs the ``hf`` and ``torch`` extras. Only models whose layers are all full attention are supported.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

try:
    import torch
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:
    raise ImportError(
        "rotorquant.integrations.transformers needs torch and transformers: pip install 'rotorquant[hf,torch]'"
    ) from exc

from ..calibration import Calibration, calibrate
from ..format import PAYLOAD_FIELDS, Compressed
from ..quantizer import Quantizer, Tier
from ..spec import QuantizerSpec

__all__ = ["RotorQuantCache", "RotorQuantLayer"]

CALIBRATIONS = ("none", "prefill")
PREFILL_PRIOR = 4.0  # isotropic pseudo-samples per sequence: a 1-token prompt stays near the identity


def _map_fields(code: Compressed, fn: Callable[[torch.Tensor], torch.Tensor]) -> Compressed:
    """Apply ``fn`` to every payload tensor of ``code`` (all have the batch first)."""
    return dataclasses.replace(code, **{f: fn(getattr(code, f)) for f in PAYLOAD_FIELDS if getattr(code, f) is not None})


def _map_calibration(cal: Calibration, fn: Callable[[torch.Tensor], torch.Tensor]) -> Calibration:
    """``cal`` with ``fn`` (a batch reindexing) applied to its per-sequence statistics ``(B, H, 1, d)``."""
    arrays = (None if a is None else fn(torch.from_numpy(np.array(a))).numpy() for a in (cal.scale, cal.center))
    return Calibration(cal.params, *arrays)


def _concat(a: Compressed, b: Compressed) -> Compressed:
    """Codes of ``(B, H, N1)`` and ``(B, H, N2)`` vectors -> ``(B, H, N1 + N2)`` (the sequence axis is 2)."""
    out = {}
    for f in PAYLOAD_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        out[f] = None if x is None else torch.cat([x, y], dim=2)
    return dataclasses.replace(a, **out)


class RotorQuantLayer(DynamicLayer):
    """One attention layer's cache: packed codes for old tokens, a full-precision recent window.

    Attributes:
        keys, values: the window ``(B, H, W, d)``, ``W <= residual_length`` between calls.
        key_code, value_code: `Compressed` of leading shape ``(B, H, N)`` or None before the first flush.
        cumulative_length: ``N + W``, every token seen.
        key_quantizer, value_quantizer: with ``calibration="prefill"``, replaced at the first ``update``
            by quantizers holding the calibrations fitted on it.
    """

    is_croppable = False
    is_compileable = False

    def __init__(
        self, key_quantizer: Quantizer, value_quantizer: Quantizer, residual_length: int = 0, calibration: str = "none"
    ):
        super().__init__()
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self._uncalibrated = (key_quantizer, value_quantizer)
        self.residual_length = residual_length
        self.calibration = calibration
        self.key_code: Compressed | None = None
        self.value_code: Compressed | None = None
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``(B, H, T, d)`` keys and values; return all ``(B, H, N + W + T, d)`` of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if self.calibration == "prefill":
                self._fit(key_states, value_states)
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

    def _fit(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Per-sequence, per-head calibrations from the prompt; quantizers that hold them."""
        kq, vq = self.key_quantizer, self.value_quantizer
        key_cal = calibrate(keys, kq.params, axis=2, center=True, prior=PREFILL_PRIOR)
        value_cal = calibrate(values, vq.params, axis=2, prior=PREFILL_PRIOR)
        self._use(key_cal, value_cal)

    def _use(self, key_cal: Calibration, value_cal: Calibration) -> None:
        kq, vq = self.key_quantizer, self.value_quantizer
        self.key_quantizer = Quantizer(kq.spec, kq.tier, key_cal, params=kq.params)
        self.value_quantizer = Quantizer(vq.spec, vq.tier, value_cal, params=vq.params)
        if self.key_code is not None:
            self.key_code = dataclasses.replace(self.key_code, calibration=key_cal)
            self.value_code = dataclasses.replace(self.value_code, calibration=value_cal)

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

    def calibration_nbytes(self) -> int:
        """Bytes of the calibration statistics (keys and values; 0 without calibration)."""
        cals = (self.key_quantizer.calibration, self.value_quantizer.calibration)
        return sum(c.nbytes for c in cals if c is not None)

    def window_nbytes(self) -> int:
        """Bytes of the full-precision window (keys and values)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        super().reset()
        self.key_code = self.value_code = None
        self.key_quantizer, self.value_quantizer = self._uncalibrated  # the next prompt fits anew

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: bool = False) -> None:
        """Apply ``fn`` to every held tensor; ``batch=True`` (a reindexing of the batch axis) also to the
        calibration statistics, which live on the host."""
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.key_code is not None:
            self.key_code, self.value_code = _map_fields(self.key_code, fn), _map_fields(self.value_code, fn)
        fitted = self.key_quantizer.calibration is not self._uncalibrated[0].calibration
        if batch and self.calibration == "prefill" and fitted:
            cals = (self.key_quantizer.calibration, self.value_quantizer.calibration)
            self._use(*(_map_calibration(c, lambda t: fn(t).cpu()) for c in cals))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)), batch=True)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0), batch=True)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices, ...], batch=True)

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
        calibration: ``"none"`` (default) or ``"prefill"``: per-sequence, per-head channel statistics
            fitted on the prompt (see the module docstring; measured on MiniLM in
            ``docs/benchmarks/fidelity.md``, ``+seqcal``).
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
        calibration: str = "none",
        seed: int = 0,
        tier: str = "auto",
    ):
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length: expected an int >= 0, got {residual_length!r}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration: expected one of {CALIBRATIONS}, got {calibration!r}")
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
        self.calibration = calibration
        key_quantizer = Quantizer(self.key_spec, tier=tier)
        value_quantizer = Quantizer(self.value_spec, tier=tier)
        layers = [
            RotorQuantLayer(key_quantizer, value_quantizer, residual_length, calibration)
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    def code_nbytes(self) -> int:
        """Bytes held as packed codes (all layers, keys and values)."""
        return sum(layer.code_nbytes() for layer in self.layers)

    def window_nbytes(self) -> int:
        """Bytes held in the full-precision windows (all layers, keys and values)."""
        return sum(layer.window_nbytes() for layer in self.layers)

    def calibration_nbytes(self) -> int:
        """Bytes of calibration statistics (all layers, keys and values; 0 with ``calibration="none"``)."""
        return sum(layer.calibration_nbytes() for layer in self.layers)

    def nbytes(self) -> int:
        """Every byte the cache holds between steps: codes, windows and calibration statistics."""
        return self.code_nbytes() + self.window_nbytes() + self.calibration_nbytes()

    def __repr__(self) -> str:
        return (
            f"RotorQuantCache(key_spec={self.key_spec}, value_spec={self.value_spec}, "
            f"residual_length={self.residual_length}, calibration={self.calibration!r}, layers={len(self.layers)})"
        )
