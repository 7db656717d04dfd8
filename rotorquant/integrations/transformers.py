"""`RotorQuantCache`: a transformers 5.x KV cache that stores keys and values as packed codes.

    >>> cache = RotorQuantCache(model.config)                       # the default preset (rotorquant.presets)
    >>> cache = RotorQuantCache(model.config, "k4v4", residual_length=16)
    >>> out = model.generate(input_ids, max_new_tokens=32, cache=cache)
    >>> cache.nbytes(), cache.nbytes("sliding_attention"), cache.code_nbytes(), cache.window_nbytes()
    >>> cache.save("prompt.safetensors"); again = RotorQuantCache.load("prompt.safetensors", model.config)

Each decoder layer follows the config's ``layer_types`` (`plan_layers` turns the config and the options into
one `LayerPlan` per layer, the one place where per-layer specs are decided):

- ``"full_attention"`` (`RotorQuantLayer`): the packed `rotorquant.Compressed` codes of every token older than
  the window (``B x H x N`` vectors of ``spec.bytes_per_vector`` bytes, keys and values with their own spec),
  and the last ``residual_length`` tokens in the model's dtype (``residual_length=0``: none);
- ``"sliding_attention"`` (`RotorQuantSlidingLayer`): the same, for at most ``sliding_window - 1`` tokens:
  tokens that leave the window are dropped, as transformers' ``DynamicSlidingWindowLayer`` drops them.

``update(k, v)`` (keys arrive after RoPE) returns ``[dequantize(codes), window, k]`` along the sequence, so the
tokens of the current forward pass are attended in full precision and stored compressed; older tokens are
read back from their codes. The dequantized copy exists only while one layer's attention runs: memory held
between steps is the codes plus the window, and every held tensor owns exactly its bytes (slices are copied),
so `RotorQuantCache.nbytes` is the memory held. Codes are made by the torch tier on CPU and by the Triton tier
on CUDA (`rotorquant.Quantizer` with ``tier="auto"``).

``crop(-n)`` removes the last ``n`` tokens: from the window first, then from the codes. Under
``activate_past_recording`` (what transformers' assisted generation turns on, and leaves on), window tokens
are compressed only at the next ``crop``, so a crop leaves the cache exactly as a cache fed the shorter
sequence. Without it, tokens already compressed stay compressed after a crop (the window refills with the
next tokens).

With ``calibration="prefill"`` each layer fits a `rotorquant.Calibration` on the keys and values of its first
``update`` (the prompt, or its first chunk with chunked prefill): per sequence and KV head, keys centered and
scaled per channel, values scaled, with ``PREFILL_PRIOR`` isotropic pseudo-samples. Every code of that layer
is then made and read through it; ``calibration_nbytes()`` counts the statistics (float32, ``3 x head_dim``
numbers per sequence, KV head and layer). Padding tokens in the prompt count as samples (the cache is not
given the attention mask). A crop below the prompt the statistics were fitted on raises ``ValueError``.

Needs the ``hf`` and ``torch`` extras.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

try:
    import torch
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:
    raise ImportError(
        "rotorquant.integrations.transformers needs torch and transformers: pip install 'rotorquant[hf,torch]'"
    ) from exc

from .. import files
from ..calibration import Calibration, calibrate
from ..format import PAYLOAD_FIELDS, Compressed
from ..params import build_params
from ..presets import DEFAULT_PRESET, packing_for
from ..presets import preset as named_preset
from ..quantizer import Quantizer, Tier
from ..spec import QuantizerSpec
from ..tiers.tensors import dtype_name

__all__ = ["KINDS", "LayerPlan", "RotorQuantCache", "RotorQuantLayer", "RotorQuantSlidingLayer", "plan_layers"]

CALIBRATIONS = ("none", "prefill")
PREFILL_PRIOR = 4.0  # isotropic pseudo-samples per sequence: a 1-token prompt stays near the identity

KINDS = ("full_attention", "sliding_attention")
"""The layer types (``config.layer_types``) the cache stores."""

OPTIONS = (
    "preset", "key_bits", "value_bits", "rotation", "stages", "residual_length", "key_qjl", "value_qjl",
    "norm_correction", "norm_dtype",
)  # fmt: skip
"""The options that may differ per layer kind (``per_kind``)."""


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` holding exactly its own storage: a view into a larger tensor is copied, so what is counted is held."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _map_fields(code: Compressed, fn: Callable[[torch.Tensor], torch.Tensor]) -> Compressed:
    """``fn`` applied to every payload tensor of ``code`` (all have the batch first), the results owned."""
    fields = {f: _owned(fn(getattr(code, f))) for f in PAYLOAD_FIELDS if getattr(code, f) is not None}
    return dataclasses.replace(code, **fields)


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
    """One full-attention layer's cache: packed codes for old tokens, a full-precision recent window.

    Attributes:
        keys, values: the window ``(B, H, W, d)``, ``W <= residual_length`` between calls (more while past
            recording is on, until the next ``crop``).
        key_code, value_code: `Compressed` of leading shape ``(B, H, N)``, or None while no token is compressed.
        cumulative_length: every token seen (``N + W`` here).
        fitted_length: tokens the ``calibration="prefill"`` statistics were fitted on (0: not fitted).
        key_quantizer, value_quantizer: with ``calibration="prefill"``, replaced at the first ``update``
            by quantizers holding the calibrations fitted on it.
    """

    is_croppable = True
    is_compileable = False
    held_limit: int | None = None  # the most tokens held between steps; None: every token seen

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
        self.fitted_length = 0
        self.record_past = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """An empty ``(B, H, 0, d)`` window in the dtype and on the device of the first states."""
        self.device = key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def activate_past_recording(self, **kwargs) -> None:
        """Keep every new token in the window until the next ``crop`` (which then compresses and drops as
        ``update`` would have), so that a crop can undo a forward pass exactly. ``kwargs`` are the options that
        transformers' ``Cache.activate_past_recording`` hands every layer (``recurrent_states_to_keep`` in
        transformers 5.25, for linear-attention layers); an attention layer keeps no recurrent states, so it
        takes them as transformers' own attention layers do, and uses none."""
        self.record_past = True

    @property
    def code_length(self) -> int:
        """``N``: tokens held as codes."""
        return 0 if self.key_code is None else self.key_code.shape[-1]

    @property
    def window_length(self) -> int:
        """``W``: tokens held in full precision."""
        return self.keys.shape[-2] if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``(B, H, T, d)`` keys and values; return the ``(B, H, N + W + T, d)`` ones attention sees."""
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.calibration == "prefill" and not self.fitted_length and key_states.shape[-2]:
            self._fit(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        window_k = torch.cat([self.keys, key_states], dim=-2)
        window_v = torch.cat([self.values, value_states], dim=-2)
        if self.key_code is None:
            keys, values = window_k, window_v
        else:
            keys = torch.cat([self.key_quantizer.dequantize(self.key_code).to(window_k.dtype), window_k], dim=-2)
            values = torch.cat([self.value_quantizer.dequantize(self.value_code).to(window_v.dtype), window_v], dim=-2)
        self.keys, self.values = window_k, window_v
        if not self.record_past:
            self._restrict()
        elif self.held_limit is not None:  # the states the mask of get_mask_sizes covers
            visible = self.held_limit + key_states.shape[-2]
            keys, values = keys[..., -visible:, :], values[..., -visible:, :]
        return keys, values

    def _check_states(self, key_states, value_states) -> None:
        """Keys and values of one shape ``(B, H, T, d)``, ``d`` the specs' dimension; after the first call, the
        held batch, heads, dtype and device."""
        dim = self.key_quantizer.spec.dim
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name}: expected a floating-point torch.Tensor, got {got}")
            if t.ndim != 4 or t.shape[-1] != dim:
                raise ValueError(f"{name}: expected shape (batch, kv_heads, tokens, {dim}), got {tuple(t.shape)}")
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"value_states: expected the shape of key_states {tuple(key_states.shape)}, got {tuple(value_states.shape)}"
            )
        if self.is_initialized:
            held = (tuple(self.keys.shape[:2]), self.keys.dtype, self.keys.device)
            got = (tuple(key_states.shape[:2]), key_states.dtype, key_states.device)
            if got != held or value_states.dtype != held[1] or value_states.device != held[2]:
                raise ValueError(
                    f"key_states, value_states: expected (batch, kv_heads) {held[0]}, dtype {held[1]} and device "
                    f"{held[2]}, as this layer holds, got {got[0]}, {key_states.dtype}/{value_states.dtype} and "
                    f"{key_states.device}/{value_states.device}"
                )

    def _restrict(self) -> None:
        """Drop the oldest tokens past ``held_limit``, then compress the window's tokens past ``residual_length``
        (tokens about to be dropped are never compressed)."""
        held = self.code_length + self.window_length
        if self.held_limit is not None and held > self.held_limit:
            self._drop_front(held - self.held_limit)
        overflow = self.window_length - self.residual_length
        if overflow > 0:
            self._append_codes(self.keys[..., :overflow, :], self.values[..., :overflow, :])
            self.keys, self.values = _owned(self.keys[..., overflow:, :]), _owned(self.values[..., overflow:, :])

    def _slice_codes(self, start: int, stop: int) -> None:
        """Keep tokens ``start:stop`` of the codes."""
        if start >= stop:
            self.key_code = self.value_code = None
        else:
            self.key_code = _map_fields(self.key_code, lambda t: t[:, :, start:stop])
            self.value_code = _map_fields(self.value_code, lambda t: t[:, :, start:stop])

    def _drop_front(self, n: int) -> None:
        """Drop the ``n`` oldest tokens held: codes first, then the window."""
        from_codes = min(n, self.code_length)
        if from_codes:
            self._slice_codes(from_codes, self.code_length)
        if n > from_codes:
            rest = n - from_codes
            self.keys, self.values = _owned(self.keys[..., rest:, :]), _owned(self.values[..., rest:, :])

    def _drop_back(self, n: int) -> None:
        """Drop the ``n`` newest tokens held: the window first, then the codes."""
        from_window = min(n, self.window_length)
        if from_window:
            keep = self.window_length - from_window
            self.keys, self.values = _owned(self.keys[..., :keep, :]), _owned(self.values[..., :keep, :])
        if n > from_window:
            self._slice_codes(0, self.code_length - (n - from_window))

    def _fit(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Per-sequence, per-head calibrations from the prompt; quantizers that hold them."""
        kq, vq = self.key_quantizer, self.value_quantizer
        key_cal = calibrate(keys, kq.params, axis=2, center=True, prior=PREFILL_PRIOR)
        value_cal = calibrate(values, vq.params, axis=2, prior=PREFILL_PRIOR)
        self._use(key_cal, value_cal)
        self.fitted_length = keys.shape[-2]

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
        if self.key_code is None:
            self.key_code, self.value_code = _map_fields(new_k, lambda t: t), _map_fields(new_v, lambda t: t)
        else:
            self.key_code, self.value_code = _concat(self.key_code, new_k), _concat(self.value_code, new_v)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a count <= 0, as transformers passes it): codes,
        window and sequence length; under past recording, then compress and drop as ``update`` would."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(f"crop: expected the number of tokens to remove as an int, got {tokens_to_remove!r}")
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop: expected the number of tokens to remove as a negative int, got {tokens_to_remove} "
                "(cropping to an absolute length is not supported)"
            )
        if not self.is_initialized:
            return
        n, held = -tokens_to_remove, self.code_length + self.window_length
        if n > held:
            raise ValueError(f"crop: expected at most the {held} tokens held to be removed, got {n}")
        if n and self.cumulative_length - n < self.fitted_length:
            raise ValueError(
                f"crop: the calibration='prefill' statistics were fitted on the first {self.fitted_length} tokens; "
                f"cropping {n} of {self.cumulative_length} would keep statistics of removed tokens"
            )
        self._drop_back(n)
        self.cumulative_length -= n
        self._restrict()

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
        return self.keys.nbytes + self.values.nbytes

    def nbytes(self) -> int:
        """Every byte the layer holds between steps: codes, window and calibration statistics."""
        return self.code_nbytes() + self.window_nbytes() + self.calibration_nbytes()

    def reset(self) -> None:
        super().reset()
        self.key_code = self.value_code = None
        self.key_quantizer, self.value_quantizer = self._uncalibrated  # the next prompt fits anew
        self.fitted_length = 0

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: bool = False) -> None:
        """Apply ``fn`` to every held tensor (results owned); ``batch=True`` (a reindexing of the batch axis) also
        to the fitted per-sequence statistics, which live on the host."""
        if self.is_initialized:
            self.keys, self.values = _owned(fn(self.keys)), _owned(fn(self.values))
        if self.key_code is not None:
            self.key_code, self.value_code = _map_fields(self.key_code, fn), _map_fields(self.value_code, fn)
        if batch and self.fitted_length:
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

    def _state(self, prefix: str) -> tuple[dict[str, Compressed], dict[str, torch.Tensor], dict]:
        """What `RotorQuantCache.save` writes for this layer: codes (calibrations stored once, as arrays), arrays
        and the lengths."""
        entries, arrays = {}, {}
        if self.is_initialized:
            arrays[f"{prefix}.window.keys"], arrays[f"{prefix}.window.values"] = self.keys, self.values
        if self.key_code is not None:
            entries[f"{prefix}.keys"] = dataclasses.replace(self.key_code, calibration=None)
            entries[f"{prefix}.values"] = dataclasses.replace(self.value_code, calibration=None)
        if self.fitted_length:
            for side, cal in (("keys", self.key_quantizer.calibration), ("values", self.value_quantizer.calibration)):
                arrays[f"{prefix}.calibration.{side}.scale"] = cal.scale
                if cal.center is not None:
                    arrays[f"{prefix}.calibration.{side}.center"] = cal.center
        info = {
            "initialized": self.is_initialized,
            "cumulative_length": self.cumulative_length,
            "fitted_length": self.fitted_length,
            "record_past": self.record_past,
        }
        return entries, arrays, info

    def _restore(self, prefix: str, found: files.Contents, info: dict, fail: Callable[[str], ValueError]) -> None:
        """Put back what `_state` wrote, checked against this layer's specs and lengths."""
        if not info["initialized"]:
            return
        keys, values = (found.arrays.get(f"{prefix}.window.{side}") for side in ("keys", "values"))
        codes = [found.entries.get(f"{prefix}.{side}") for side in ("keys", "values")]
        specs = (self.key_quantizer.spec, self.value_quantizer.spec)
        dim = specs[0].dim
        if (keys is None or values is None or keys.ndim != 4 or keys.shape != values.shape or keys.shape[-1] != dim
                or keys.dtype != values.dtype or not keys.is_floating_point()):
            got = [None if a is None else tuple(a.shape) for a in (keys, values)]
            raise fail(
                f"{prefix}: expected key and value windows of one floating dtype and shape (batch, heads, tokens, {dim}), "
                f"got {got} of {[None if a is None else a.dtype for a in (keys, values)]}"
            )
        for code, spec in zip(codes, specs):
            if (code is None) != (codes[0] is None) or (code is not None and code.spec != spec):
                raise fail(f"{prefix}: expected key and value codes made with {specs}, got {codes}")
            if code is not None and code.shape[:2] != tuple(keys.shape[:2]):
                raise fail(f"{prefix}: codes of leading shape {code.shape} do not fit windows {tuple(keys.shape)}")
            if code is not None and code.dtype != dtype_name(keys.dtype):
                raise fail(f"{prefix}: codes of vectors of dtype {code.dtype} do not fit windows of {keys.dtype}")
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.key_code, self.value_code = codes
        self.cumulative_length, self.fitted_length = info["cumulative_length"], info["fitted_length"]
        self.record_past = info["record_past"]
        if self.fitted_length:
            cals = []
            for side, spec in zip(("keys", "values"), specs):
                stats = [found.arrays.get(f"{prefix}.calibration.{side}.{s}") for s in ("scale", "center")]
                try:
                    cals.append(Calibration(build_params(spec), *stats))
                except (TypeError, ValueError) as exc:
                    raise fail(f"{prefix}: calibration of the {side}: {exc}") from None
            self._use(*cals)
        held = self.code_length + self.window_length
        expected = self.cumulative_length if self.held_limit is None else min(self.cumulative_length, self.held_limit)
        if held > self.cumulative_length or (not self.record_past and held != expected):
            raise fail(f"{prefix}: {held} tokens held do not fit a sequence of {self.cumulative_length}")


class RotorQuantSlidingLayer(RotorQuantLayer):
    """One sliding-window layer's cache: a `RotorQuantLayer` that holds at most ``sliding_window - 1`` tokens.

    The window semantics are those of transformers' ``DynamicSlidingWindowLayer``: ``update`` returns every held
    token and the new ones, then drops the oldest past ``sliding_window - 1``; ``get_mask_sizes`` reports
    ``(min(seen, sliding_window - 1) + query_length, max(seen - sliding_window + 1, 0))``; once the window is
    full, ``crop`` needs past recording (the dropped tokens cannot come back) and a count <= 0.
    """

    is_sliding = True

    def __init__(
        self,
        key_quantizer: Quantizer,
        value_quantizer: Quantizer,
        residual_length: int = 0,
        calibration: str = "none",
        *,
        sliding_window: int,
    ):
        super().__init__(key_quantizer, value_quantizer, residual_length, calibration)
        self.sliding_window = sliding_window
        self.held_limit = sliding_window - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys ``update`` returns for ``query_length`` new tokens."""
        seen = self.cumulative_length
        return min(seen, self.held_limit) + query_length, max(seen - self.held_limit, 0)

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if self.cumulative_length >= self.sliding_window:
            if not self.record_past:
                raise RuntimeError(
                    f"crop: this sliding-window layer has dropped the tokens that left its window of "
                    f"{self.sliding_window}; call activate_past_recording() before the forward passes to undo"
                )
            if tokens_to_remove > 0:
                raise RuntimeError(
                    f"crop: expected the number of tokens to remove as an int <= 0 once the window is full, "
                    f"got {tokens_to_remove}"
                )
        super().crop(tokens_to_remove)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer is stored.

    Attributes:
        kind: its layer type, one of `KINDS`.
        key_spec, value_spec: the quantizers of its keys and values.
        residual_length: tokens it keeps in full precision.
        sliding_window: the attention span of a sliding layer (it holds ``sliding_window - 1`` tokens), else None.
    """

    kind: str
    key_spec: QuantizerSpec
    value_spec: QuantizerSpec
    residual_length: int
    sliding_window: int | None = None


def _config_layers(config) -> list[tuple[str, object]]:
    """``(layer type, layer config)`` per decoder layer, layer types read or inferred as transformers does; a
    type the cache cannot store raises ``ValueError`` naming it and the layer."""
    if not callable(getattr(config, "get_text_config", None)):
        raise TypeError(f"config: expected a transformers PretrainedConfig (model.config), got {type(config).__name__}")
    config = config.get_text_config(decoder=True)
    count = config.num_hidden_layers
    per_layer = list(getattr(config, "per_layer_config", None) or [config] * count)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [
            "sliding_attention" if getattr(c, "sliding_window", None) is not None
            else "chunked_attention" if getattr(c, "attention_chunk_size", None) is not None
            else "full_attention"
            for c in per_layer
        ]  # fmt: skip
    sharing = getattr(config, "kv_sharing_modes", None) or [None] * count
    latent = getattr(config, "kv_lora_rank", None)
    for i, (kind, mode) in enumerate(zip(types, sharing)):
        why = None
        if kind not in KINDS:
            why = f"has layer type {kind!r}"
        elif latent is not None:
            why = f"({kind!r}) uses multi-head latent attention (kv_lora_rank={latent}; keys and values of two widths)"
        elif mode == "reuse":
            why = f"({kind!r}) reuses another layer's keys and values (kv_sharing_modes)"
        if why:
            raise ValueError(f"config: layer {i} {why}, which RotorQuantCache cannot store; it stores {KINDS} layers")
    return list(zip(types, per_layer))


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _specs(options: dict, dim: int, seed: int) -> tuple[QuantizerSpec, QuantizerSpec]:
    """``(key spec, value spec)``: the preset's (`rotorquant.presets.Preset.specs`), with every explicit option
    applied over it."""
    name = DEFAULT_PRESET if options["preset"] is None else options["preset"]
    key, value = named_preset(name).specs(dim, seed, options["norm_dtype"])
    out = []
    for spec, side in ((key, "key"), (value, "value")):
        changes = {"qjl": options[f"{side}_qjl"], "norm_correction": options["norm_correction"]}
        if options[f"{side}_bits"] is not None:
            changes["bits"] = options[f"{side}_bits"]
        if options["rotation"] is not None:
            changes.update(rotation=options["rotation"], stages=None)
        if options["stages"] is not None:
            changes["stages"] = options["stages"]
        bits = changes.get("bits", spec.bits)
        changes["packing"] = packing_for(dim, bits - 1 if changes["qjl"] else bits)
        try:
            out.append(dataclasses.replace(spec, **changes))
        except ValueError as exc:
            raise ValueError(f"{side}s: {exc}") from None
    return out[0], out[1]


def plan_layers(config, options: dict, per_kind: dict | None = None, seed: int = 0) -> list[LayerPlan]:
    """One `LayerPlan` per decoder layer of ``config``: ``options`` (every name of `OPTIONS`), with the
    ``per_kind[layer type]`` ones replacing them for the layers of that type."""
    per_kind = per_kind or {}
    if not isinstance(per_kind, dict):
        raise TypeError(f"per_kind: expected a dict of layer type -> options, got {type(per_kind).__name__}")
    for kind, changes in per_kind.items():
        if kind not in KINDS:
            raise ValueError(f"per_kind: expected layer types among {KINDS}, got {kind!r}")
        if not isinstance(changes, dict) or not set(changes) <= set(OPTIONS):
            got = sorted(changes) if isinstance(changes, dict) else type(changes).__name__
            raise ValueError(f"per_kind[{kind!r}]: expected a dict of options among {OPTIONS}, got {got}")
    plans, resolved = [], {}
    for kind, layer_config in _config_layers(config):
        window = getattr(layer_config, "sliding_window", None) if kind == "sliding_attention" else None
        if kind == "sliding_attention" and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
            raise ValueError(f"config: expected an int sliding_window >= 2 for sliding layers, got {window!r}")
        key = (kind, _head_dim(layer_config), window)
        if key not in resolved:
            merged = {**options, **per_kind.get(kind, {})}
            where = f"per_kind[{kind!r}]: " if kind in per_kind else ""
            residual = merged["residual_length"]
            if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
                raise ValueError(f"{where}residual_length: expected an int >= 0, got {residual!r}")
            try:
                specs = _specs(merged, key[1], seed)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
            resolved[key] = LayerPlan(kind, *specs, residual, window)
        plans.append(resolved[key])
    return plans


class RotorQuantCache(Cache):
    """A transformers ``Cache`` of `RotorQuantLayer` s and `RotorQuantSlidingLayer` s, one per decoder layer.

    Args:
        config: the model's config (``model.config``); its text config gives the layers, their types
            (``"full_attention"``, ``"sliding_attention"``) and ``head_dim``.
        preset: a name in `rotorquant.presets.PRESETS` (None: ``DEFAULT_PRESET``): the bits of keys and values
            and the rotation; every explicit argument below overrides it.
        key_bits: bits per coordinate of keys (1..8; 2..8 with QJL).
        value_bits: bits per coordinate of values (1..8; 2..8 with QJL).
        rotation: ``"rotor"`` (RotorQuant), ``"hadamard"`` or ``"dense"`` (TurboQuant), keys and values.
        stages: rotor butterfly stages (``rotation`` rotor; None: ``ceil(log3 head_dim)``, see
            `rotorquant.QuantizerSpec`).
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
        seed: the quantizers' seed (keys ``seed``, values ``seed + 1``, as `rotorquant.presets.Preset.specs`).
        tier: ``"auto"`` (torch on CPU, Triton on CUDA), ``"torch"`` or ``"triton"``.
        per_kind: options that differ for one layer type, ``{"sliding_attention": {"key_bits": 8,
            "residual_length": 0}}``; any of `OPTIONS`, replacing the arguments above of the same name for
            those layers (so a per-kind ``preset`` does not undo cache-wide explicit bits or rotation).

    Attributes:
        plans: one `LayerPlan` per layer (kind, key and value specs, window, sliding window).
        options: the arguments above but ``tier``, as `save` stores them.
    """

    def __init__(
        self,
        config,
        preset: str | None = None,
        *,
        key_bits: int | None = None,
        value_bits: int | None = None,
        rotation: str | None = None,
        stages: int | None = None,
        residual_length: int = 0,
        key_qjl: bool = False,
        value_qjl: bool = False,
        norm_correction: bool | None = None,
        norm_dtype: str = "float32",
        calibration: str = "none",
        seed: int = 0,
        tier: str = "auto",
        per_kind: dict | None = None,
    ):
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration: expected one of {CALIBRATIONS}, got {calibration!r}")
        if tier not in (Tier.AUTO, Tier.TORCH, Tier.TRITON):
            raise ValueError(f"tier: expected one of 'auto', 'torch', 'triton', got {tier!r}")
        layer_options = dict(
            preset=preset, key_bits=key_bits, value_bits=value_bits, rotation=rotation, stages=stages,
            residual_length=residual_length, key_qjl=key_qjl, value_qjl=value_qjl,
            norm_correction=norm_correction, norm_dtype=norm_dtype,
        )  # fmt: skip
        self.plans = plan_layers(config, layer_options, per_kind, seed)
        per_kind = {kind: dict(changes) for kind, changes in (per_kind or {}).items()}
        self.options = {**layer_options, "calibration": calibration, "seed": seed, "per_kind": per_kind}
        quantizers: dict[QuantizerSpec, Quantizer] = {}

        def quantizer(spec: QuantizerSpec) -> Quantizer:
            return quantizers.setdefault(spec, Quantizer(spec, tier=tier))

        layers = []
        for plan in self.plans:
            args = (quantizer(plan.key_spec), quantizer(plan.value_spec), plan.residual_length, calibration)
            if plan.sliding_window is None:
                layers.append(RotorQuantLayer(*args))
            else:
                layers.append(RotorQuantSlidingLayer(*args, sliding_window=plan.sliding_window))
        super().__init__(layers=layers)

    def _layers(self, kind: str | None) -> list[RotorQuantLayer]:
        if kind is None:
            return self.layers
        if kind not in KINDS:
            raise ValueError(f"kind: expected None or one of {KINDS}, got {kind!r}")
        return [layer for layer, plan in zip(self.layers, self.plans) if plan.kind == kind]

    def code_nbytes(self, kind: str | None = None) -> int:
        """Bytes held as packed codes (keys and values; all layers, or those of layer type ``kind``)."""
        return sum(layer.code_nbytes() for layer in self._layers(kind))

    def window_nbytes(self, kind: str | None = None) -> int:
        """Bytes held in the full-precision windows (keys and values; all layers, or those of ``kind``)."""
        return sum(layer.window_nbytes() for layer in self._layers(kind))

    def calibration_nbytes(self, kind: str | None = None) -> int:
        """Bytes of calibration statistics (0 with ``calibration="none"``; all layers, or those of ``kind``)."""
        return sum(layer.calibration_nbytes() for layer in self._layers(kind))

    def nbytes(self, kind: str | None = None) -> int:
        """Every byte held between steps: codes, windows and calibration statistics, of every layer or of the
        layers of type ``kind`` (``"full_attention"``, ``"sliding_attention"``)."""
        return sum(layer.nbytes() for layer in self._layers(kind))

    def save(self, path: str | os.PathLike) -> None:
        """Write every layer's codes, window, statistics and lengths to ``path`` (`rotorquant.save`'s format,
        content ``"cache"``); `load` gives back a cache that continues exactly as this one would."""
        entries, arrays, layers = {}, {}, []
        for i, layer in enumerate(self.layers):
            layer_entries, layer_arrays, info = layer._state(f"layers.{i}")
            entries.update(layer_entries)
            arrays.update(layer_arrays)
            layers.append(info)
        plans = [_plan_fields(plan) for plan in self.plans]
        info = {"options": self.options, "plans": plans, "layers": layers}
        files.write(path, entries, content="cache", arrays=arrays, info=info)

    @classmethod
    def load(cls, path: str | os.PathLike, config, *, tier: str = "auto", device=None) -> RotorQuantCache:
        """The cache `save` wrote to ``path``, for the model of ``config``, with its tensors on ``device``
        (default CPU). Raises ``ValueError`` naming the file if it is not such a file, is damaged, or was saved
        for layers other than ``config`` gives."""
        found = files.read(path, like=torch.empty(0), device=device or "cpu")
        name = os.fspath(path)

        def fail(problem: str) -> ValueError:
            return ValueError(f"{name}: {problem}")

        if found.content != "cache":
            raise fail(
                f"expected a RotorQuantCache file, got one holding {found.content} (read it with rotorquant.load)"
            )
        info = found.info
        if sorted(info) != ["layers", "options", "plans"]:
            raise fail(f"expected cache info with layers, options and plans, got {sorted(info)}")
        try:
            cache = cls(config, **info["options"], tier=tier)
        except (TypeError, ValueError) as exc:
            raise fail(f"the saved options do not make a cache for this config: {exc}") from None
        saved = info["plans"]
        ours = [_plan_fields(plan) for plan in cache.plans]
        if saved != ours:
            diff = next((i for i, (a, b) in enumerate(zip(saved, ours)) if a != b), min(len(saved), len(ours)))
            raise fail(
                f"the file holds a cache of {len(saved)} layers and config gives {len(ours)}; layer {diff} differs: "
                f"saved {saved[diff] if diff < len(saved) else None}, config {ours[diff] if diff < len(ours) else None}"
            )
        states = info["layers"]
        if not isinstance(states, list) or len(states) != len(cache.layers):
            got = f"{len(states)} entries" if isinstance(states, list) else type(states).__name__
            raise fail(f"expected the states of {len(cache.layers)} layers, got {got}")
        used_entries, used_arrays = set(), set()
        for i, (layer, state) in enumerate(zip(cache.layers, states)):
            prefix = f"layers.{i}"
            _check_layer_state(prefix, state, fail)
            layer._restore(prefix, found, state, fail)
            entries, arrays, restored = layer._state(prefix)
            if restored != state:
                raise fail(f"{prefix}: the saved state {state} does not match its tensors (restored {restored})")
            used_entries |= set(entries)
            used_arrays |= set(arrays)
        unused = sorted((set(found.entries) - used_entries) | (set(found.arrays) - used_arrays))
        if unused:
            raise fail(f"expected only tensors of the saved layers, got unused ones: {unused}")
        return cache

    def __repr__(self) -> str:
        kinds = {}
        for plan in self.plans:
            kinds.setdefault(plan.kind, [plan, 0])[1] += 1
        parts = [
            f"{kind} x{count}: key_spec={plan.key_spec}, value_spec={plan.value_spec}, "
            f"residual_length={plan.residual_length}, sliding_window={plan.sliding_window}"
            for kind, (plan, count) in kinds.items()
        ]
        return f"RotorQuantCache({'; '.join(parts)}; calibration={self.options['calibration']!r})"


LAYER_STATE = {"initialized": bool, "cumulative_length": int, "fitted_length": int, "record_past": bool}
"""The fields of one layer's saved state (`RotorQuantLayer._state`) and their types."""


def _check_layer_state(prefix: str, state, fail: Callable[[str], ValueError]) -> None:
    """A saved layer state is a dict of exactly `LAYER_STATE`'s fields, of their types (lengths ints >= 0)."""
    if not isinstance(state, dict) or sorted(state) != sorted(LAYER_STATE):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise fail(f"{prefix}: expected a state with fields {sorted(LAYER_STATE)}, got {got}")
    for field, kind in LAYER_STATE.items():
        value = state[field]
        exact = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not exact or (kind is int and value < 0):
            raise fail(f"{prefix}.{field}: expected {'a bool' if kind is bool else 'an int >= 0'}, got {value!r}")


def _plan_fields(plan: LayerPlan) -> dict:
    """A `LayerPlan` as JSON values (its specs field by field)."""
    return {
        "kind": plan.kind,
        "key_spec": files.spec_fields(plan.key_spec),
        "value_spec": files.spec_fields(plan.value_spec),
        "residual_length": plan.residual_length,
        "sliding_window": plan.sliding_window,
    }
