"""RotorQuantCache on a tiny randomly initialized Llama (built from a config, nothing downloaded)."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import rotorquant as rq  # noqa: E402
from rotorquant.format import PAYLOAD_FIELDS  # noqa: E402
from rotorquant.integrations.transformers import (  # noqa: E402
    PREFILL_PRIOR,
    RotorQuantCache,
    RotorQuantLayer,
    RotorQuantSlidingLayer,
)
from rotorquant.presets import DEFAULT_PRESET, PRESETS  # noqa: E402

PROMPT = 12


def tiny_llama(head_dim=32, dtype=torch.float32, kv_heads=2):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=4 * head_dim,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


MODEL = tiny_llama()


def prompt(batch=2):
    return torch.randint(0, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def generate(model, cache, new_tokens=10, inputs=None, **kwargs):
    with torch.no_grad():
        return model.generate(
            prompt() if inputs is None else inputs, max_new_tokens=new_tokens, do_sample=False, cache=cache,
            pad_token_id=0, **kwargs,
        )  # fmt: skip


def dense_nbytes(cache):
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def held_bytes(cache):
    """The bytes really allocated for what the layers hold (windows, code fields, fitted statistics): every
    distinct tensor storage counted whole, so a view into a larger buffer counts the whole buffer."""
    storages, host = {}, 0
    for layer in cache.layers:
        tensors = [layer.keys, layer.values] if layer.is_initialized else []
        for code in (layer.key_code, layer.value_code):
            if code is not None:
                tensors += [getattr(code, f) for f in PAYLOAD_FIELDS if getattr(code, f) is not None]
        for t in tensors:
            storage = t.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        for cal in (layer.key_quantizer.calibration, layer.value_quantizer.calibration):
            for a in () if cal is None else (cal.scale, cal.center):
                host += 0 if a is None else (a if a.base is None else a.base).nbytes
    return sum(storages.values()) + host


def decode_logits(model, cache, tokens, start=PROMPT):
    """Logits of every decode step when ``tokens`` (prompt, then continuation) are fed one at a time."""
    with torch.no_grad():
        model(tokens[:, :start], cache=cache, use_cache=True)
        steps = [model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(start, tokens.shape[1])]
    return torch.cat(steps, dim=1)


def forward(model, cache, tokens):
    with torch.no_grad():
        return model(tokens, cache=cache, use_cache=True).logits


def test_generation_runs_and_stores_packed_codes_with_gqa():
    cache = RotorQuantCache(MODEL.config, key_bits=3, value_bits=3)
    out = generate(MODEL, cache)
    assert out.shape == (2, PROMPT + 10)
    seen = PROMPT + 10 - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == seen
    spec = cache.plans[0].key_spec
    for layer in cache.layers:
        assert layer.key_code.shape == (2, 2, seen)  # 2 KV heads for 4 query heads
        assert layer.key_code.codes.dtype == torch.uint8
        assert layer.key_code.codes.shape[-1] == spec.code_bytes == 12
        assert layer.keys.shape == (2, 2, 0, 32)
    assert cache.window_nbytes() == 0
    # layers x (K, V) x batch x KV heads x tokens x bytes per vector
    assert cache.code_nbytes() == 2 * 2 * 2 * 2 * seen * spec.bytes_per_vector
    assert cache.nbytes() == cache.nbytes("full_attention") == held_bytes(cache) and cache.nbytes("sliding_attention") == 0


def test_three_bits_is_at_least_4_5x_smaller_than_dynamic_cache():
    model = tiny_llama(head_dim=64, dtype=torch.bfloat16)
    dense, ours = DynamicCache(config=model.config), RotorQuantCache(model.config, key_bits=3, value_bits=3)
    generate(model, dense)
    generate(model, ours)
    assert ours.window_nbytes() == 0
    ratio = dense_nbytes(dense) / ours.nbytes()
    assert ratio >= 4.5, ratio


def test_residual_window_keeps_recent_tokens_exact():
    cache = RotorQuantCache(MODEL.config, key_bits=2, value_bits=2, residual_length=8)
    generate(MODEL, cache)
    seen = PROMPT + 10 - 1
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8 and layer.key_code.shape[-1] == seen - 8
    assert cache.window_nbytes() == 2 * 2 * 2 * 2 * 8 * 32 * 4  # layers x (K, V) x batch x heads x 8 x d x fp32
    assert cache.nbytes() == held_bytes(cache)
    # a window longer than the whole sequence never quantizes: exactly DynamicCache
    reference = generate(MODEL, DynamicCache(config=MODEL.config))
    wide = RotorQuantCache(MODEL.config, key_bits=2, value_bits=2, residual_length=64)
    assert torch.equal(generate(MODEL, wide), reference)
    assert wide.code_nbytes() == 0


def test_presets_and_explicit_options():
    default, named = PRESETS[DEFAULT_PRESET], PRESETS["k3v3"]
    plan = RotorQuantCache(MODEL.config).plans[0]
    assert (plan.key_spec, plan.value_spec) == default.specs(32)
    plan = RotorQuantCache(MODEL.config, "k3v3").plans[1]
    assert (plan.key_spec, plan.value_spec) == named.specs(32)
    plan = RotorQuantCache(MODEL.config, "k3v3", key_bits=8, rotation="rotor", seed=5).plans[0]
    assert (plan.key_spec.bits, plan.value_spec.bits) == (8, named.value_bits)
    assert plan.key_spec.rotation == plan.value_spec.rotation == "rotor" and plan.key_spec.stages is not None
    assert (plan.key_spec.seed, plan.value_spec.seed) == (5, 6)  # keys and values never share a rotation
    with pytest.raises(ValueError, match="preset: expected one of"):
        RotorQuantCache(MODEL.config, "k9v9")


def test_separate_key_and_value_settings():
    cache = RotorQuantCache(MODEL.config, key_bits=4, value_bits=2, rotation="dense", value_qjl=True)
    generate(MODEL, cache, new_tokens=4)
    layer = cache.layers[0]
    assert layer.key_code.spec.bits == 4 and layer.key_code.spec.norm_correction
    assert layer.value_code.spec.qjl and not layer.value_code.spec.norm_correction
    assert layer.key_code.codes.shape[-1] == 16 and layer.value_code.codes.shape[-1] == 4
    assert layer.value_code.qjl_signs.shape[-1] == 4


def test_beam_search_reorders_codes():
    reference = generate(MODEL, DynamicCache(config=MODEL.config), new_tokens=6, num_beams=2)
    ours = generate(MODEL, RotorQuantCache(MODEL.config, key_bits=8, value_bits=8), new_tokens=6, num_beams=2)
    assert ours.shape == reference.shape
    assert (ours == reference).float().mean().item() >= 0.9


def test_batch_selection_with_a_slice_frees_what_it_drops():
    cache = RotorQuantCache(MODEL.config, key_bits=3, value_bits=3, residual_length=3, calibration="prefill")
    generate(MODEL, cache, new_tokens=4)
    before = cache.nbytes()
    assert before == held_bytes(cache)
    cache.batch_select_indices(slice(0, 1))
    assert cache.nbytes() == held_bytes(cache) == before // 2
    cache.batch_repeat_interleave(3)
    assert cache.nbytes() == held_bytes(cache) == 3 * before // 2


def test_prefill_calibration_generates_and_counts_its_bytes():
    cache = RotorQuantCache(MODEL.config, key_bits=3, value_bits=3, calibration="prefill")
    generate(MODEL, cache)
    for layer in cache.layers:
        kcal, vcal = layer.key_quantizer.calibration, layer.value_quantizer.calibration
        assert layer.key_code.calibration is kcal and layer.value_code.calibration is vcal
        assert kcal.scale.shape == kcal.center.shape == vcal.scale.shape == (2, 2, 1, 32) and vcal.center is None
        assert layer.fitted_length == PROMPT
    # layers x (key scale + key center + value scale) x batch x KV heads x d x float32
    assert cache.calibration_nbytes() == 2 * 3 * 2 * 2 * 32 * 4
    assert cache.nbytes() == cache.code_nbytes() + cache.calibration_nbytes() == held_bytes(cache)
    # greedy tokens of this random model sit on near-ties, so compare teacher-forced logits instead
    tokens = generate(MODEL, DynamicCache(config=MODEL.config), new_tokens=8)
    exact = decode_logits(MODEL, DynamicCache(config=MODEL.config), tokens)
    for calibration in ("none", "prefill"):
        cache = RotorQuantCache(MODEL.config, key_bits=8, value_bits=8, calibration=calibration)
        err = (decode_logits(MODEL, cache, tokens) - exact).norm() / exact.norm()
        assert err < 0.01, (calibration, err)


def _uneven(batch=2, tokens=64, seed=0):
    """Keys with uneven channels and an offset, as real post-RoPE keys have: ``(batch, 2, tokens, 32)``."""
    g = torch.Generator().manual_seed(seed)
    channel = torch.logspace(-1, 0.6, 32)[torch.randperm(32, generator=g)]
    return torch.randn(batch, 2, tokens, 32, generator=g) * channel + 0.5


def _layer(calibration, bits=3):
    spec = rq.QuantizerSpec(dim=32, bits=bits, norm_correction=True)
    return RotorQuantLayer(rq.Quantizer(spec, "torch"), rq.Quantizer(spec, "torch"), 0, calibration)


def test_prefill_calibration_fits_the_prompt_and_lowers_the_error():
    prompt_k, prompt_v = _uneven(seed=0), _uneven(seed=1)
    step_k, step_v = _uneven(tokens=1, seed=2), _uneven(tokens=1, seed=3)
    errors = {}
    for calibration in ("none", "prefill"):
        layer = _layer(calibration)
        layer.update(prompt_k, prompt_v)
        keys, _ = layer.update(step_k, step_v)  # returns the prompt read back from its codes
        errors[calibration] = float(((keys[..., :-1, :] - prompt_k) ** 2).sum() / (prompt_k**2).sum())
    want = rq.calibrate(prompt_k, layer.key_quantizer.params, axis=2, center=True, prior=PREFILL_PRIOR)
    np.testing.assert_array_equal(layer.key_quantizer.calibration.scale, want.scale)
    assert errors["prefill"] < 0.9 * errors["none"], errors


def test_prefill_calibration_follows_batch_reindexing_and_reset():
    layer = _layer("prefill", bits=8)
    k, v = _uneven(seed=0), _uneven(seed=1)
    layer.update(k, v)
    scale = layer.key_quantizer.calibration.scale.copy()
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.key_code.calibration is layer.key_quantizer.calibration
    assert (layer.key_quantizer.calibration.scale == scale[[1, 0]]).all()
    keys, values = layer.update(k[:, :, :1], v[:, :, :1])
    torch.testing.assert_close(keys[:, :, :-1], k[[1, 0]], atol=0.05, rtol=0.05)
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.key_quantizer.calibration.scale.shape == (1, 2, 1, 32)
    assert (layer.key_quantizer.calibration.scale == scale[:1]).all()  # [1, 0] then [1]: sequence 0
    layer.reset()
    assert layer.calibration_nbytes() == 0 and layer.key_quantizer.calibration is None and layer.fitted_length == 0
    new_k, new_v = _uneven(batch=1, tokens=4, seed=5), _uneven(batch=1, tokens=4, seed=6)
    layer.update(new_k, new_v)  # a new prompt: a new fit
    want = rq.calibrate(new_k, layer.key_quantizer.params, axis=2, center=True, prior=PREFILL_PRIOR)
    np.testing.assert_array_equal(layer.key_quantizer.calibration.scale, want.scale)


def test_layer_with_a_model_calibration_keeps_it_through_batch_operations():
    spec = rq.QuantizerSpec(dim=32, bits=4)
    k = _uneven(seed=0)
    cal = rq.calibrate(k, rq.build_params(spec), axis=(0, 2))  # per head, the same for every sequence
    quantizer = rq.Quantizer(spec, "torch", cal)
    layer = RotorQuantLayer(quantizer, quantizer, 0, "none")
    layer.update(k, k)
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.batch_select_indices(torch.tensor([1]))
    keys, _ = layer.update(k[1:, :, :1], k[1:, :, :1])
    assert layer.key_quantizer is quantizer and keys.shape == (1, 2, 65, 32)

    def rel_err(x):
        return float(((keys[:, :, :-1] - x) ** 2).sum() / (x**2).sum())

    assert rel_err(k[:1]) < 0.02 < 0.5 < rel_err(k[1:])  # [1, 0] then [1]: sequence 0, read back at 4 bits


TOKENS = torch.randint(0, 128, (2, PROMPT + 8), generator=torch.Generator().manual_seed(2))


def _state_of(layer):
    """A layer's lengths, codes, window and statistics, as bytes."""
    codes = [getattr(c, f) for c in (layer.key_code, layer.value_code) if c is not None for f in PAYLOAD_FIELDS]
    cals = [layer.key_quantizer.calibration, layer.value_quantizer.calibration]
    stats = [None if c is None else (c.scale.tobytes(), None if c.center is None else c.center.tobytes()) for c in cals]
    return (
        layer.cumulative_length, layer.fitted_length, [None if a is None else a.numpy().tobytes() for a in codes],
        layer.keys.numpy().tobytes(), layer.values.numpy().tobytes(), stats,
    )  # fmt: skip


def _state(cache):
    return [_state_of(layer) for layer in cache.layers]


@pytest.mark.parametrize("sliding_window", [None, 9], ids=["full", "sliding"])
@pytest.mark.parametrize("residual_length, calibration", [(0, "none"), (4, "none"), (4, "prefill")])
def test_crop_leaves_a_layer_as_the_shorter_sequence_left_it(residual_length, calibration, sliding_window):
    """6 tokens stored under past recording (as assisted generation runs a forward pass), then ``crop(-4)``:
    the same codes, window, statistics and lengths as a layer given only the first 2 of them, so the next
    ``update`` returns the same keys and values, bit for bit."""
    k, v = _uneven(tokens=20, seed=0), _uneven(tokens=20, seed=1)
    spec = rq.QuantizerSpec(dim=32, bits=3)

    def layer():
        args = (rq.Quantizer(spec, "torch"), rq.Quantizer(spec, "torch"), residual_length, calibration)
        return RotorQuantLayer(*args) if sliding_window is None else RotorQuantSlidingLayer(*args, sliding_window=9)

    cropped, shorter = layer(), layer()
    cropped.update(k[:, :, :PROMPT], v[:, :, :PROMPT])
    cropped.activate_past_recording()
    cropped.update(k[:, :, PROMPT : PROMPT + 6], v[:, :, PROMPT : PROMPT + 6])
    cropped.crop(-4)
    shorter.update(k[:, :, :PROMPT], v[:, :, :PROMPT])
    shorter.update(k[:, :, PROMPT : PROMPT + 2], v[:, :, PROMPT : PROMPT + 2])
    assert _state_of(cropped) == _state_of(shorter)
    assert cropped.get_mask_sizes(1) == shorter.get_mask_sizes(1)
    nxt = (k[:, :, PROMPT + 2 : PROMPT + 3], v[:, :, PROMPT + 2 : PROMPT + 3])
    for a, b in zip(cropped.update(*nxt), shorter.update(*nxt)):
        assert torch.equal(a, b)


def test_crop_of_a_full_sliding_window_needs_past_recording():
    spec = rq.QuantizerSpec(dim=32, bits=3)
    layer = RotorQuantSlidingLayer(rq.Quantizer(spec, "torch"), rq.Quantizer(spec, "torch"), 0, sliding_window=9)
    k = _uneven(tokens=12)
    layer.update(k, k)
    assert (layer.code_length, layer.get_seq_length(), layer.get_mask_sizes(1)) == (8, 12, (9, 4))
    with pytest.raises(RuntimeError, match="dropped the tokens that left its window of 9; call activate_past_recording"):
        layer.crop(-1)
    layer.activate_past_recording(recurrent_states_to_keep=2)  # what transformers 5.25's Cache hands every layer
    with pytest.raises(RuntimeError, match="expected the number of tokens to remove as an int <= 0"):
        layer.crop(2)
    layer.update(k[:, :, :3], k[:, :, :3])
    assert layer.code_length == 8 and layer.window_length == 3  # held until the crop
    layer.crop(0)
    assert (layer.code_length, layer.window_length, layer.get_seq_length()) == (8, 0, 15)


@pytest.mark.parametrize("residual_length, calibration", [(0, "none"), (4, "none"), (4, "prefill")])
def test_crop_gives_the_next_logits_of_the_shorter_sequence(residual_length, calibration):
    """On the model: a 6-token forward pass under past recording, ``crop(-4)``, then the next token's logits
    equal those of a cache fed the first 2 tokens, up to float rounding (the two forward passes of different
    lengths round differently); without the crop they differ by about 28%."""
    options = dict(residual_length=residual_length, calibration=calibration)
    cropped, shorter = RotorQuantCache(MODEL.config, **options), RotorQuantCache(MODEL.config, **options)
    forward(MODEL, cropped, TOKENS[:, :PROMPT])
    cropped.activate_past_recording()
    forward(MODEL, cropped, TOKENS[:, PROMPT : PROMPT + 6])
    cropped.crop(-4)
    forward(MODEL, shorter, TOKENS[:, :PROMPT])
    forward(MODEL, shorter, TOKENS[:, PROMPT : PROMPT + 2])
    assert cropped.get_seq_length() == shorter.get_seq_length() == PROMPT + 2
    for a, b in zip(cropped.layers, shorter.layers):
        assert (a.code_length, a.window_length) == (b.code_length, b.window_length)
    nxt = TOKENS[:, PROMPT + 2 : PROMPT + 3]
    got, want = forward(MODEL, cropped, nxt), forward(MODEL, shorter, nxt)
    assert (got - want).norm() / want.norm() < 1e-5
    assert cropped.nbytes() == held_bytes(cropped)


def test_crop_without_past_recording_keeps_compressed_tokens_compressed():
    """Without past recording, tokens already compressed stay codes: the cache holds the right tokens (the next
    logits close to those of the shorter cache) and its window refills."""
    cropped, shorter = (RotorQuantCache(MODEL.config, key_bits=8, value_bits=8, residual_length=4) for _ in range(2))
    forward(MODEL, cropped, TOKENS[:, : PROMPT + 6])
    cropped.crop(-4)
    layer = cropped.layers[0]
    assert (layer.code_length, layer.window_length, cropped.get_seq_length()) == (PROMPT + 2, 0, PROMPT + 2)
    forward(MODEL, shorter, TOKENS[:, : PROMPT + 2])
    nxt = TOKENS[:, PROMPT + 2 : PROMPT + 3]
    got, want = forward(MODEL, cropped, nxt), forward(MODEL, shorter, nxt)
    assert (got - want).norm() / want.norm() < 0.01
    assert (layer.code_length, layer.window_length) == (PROMPT + 2, 1)


def test_crop_refuses_what_it_cannot_undo():
    cache = RotorQuantCache(MODEL.config, calibration="prefill")
    forward(MODEL, cache, TOKENS[:, :PROMPT])
    forward(MODEL, cache, TOKENS[:, PROMPT : PROMPT + 2])
    with pytest.raises(ValueError, match="crop: expected the number of tokens to remove as a negative int, got 3"):
        cache.crop(3)
    with pytest.raises(ValueError, match=r"crop: expected at most the 14 tokens held to be removed, got 15"):
        cache.crop(-15)
    with pytest.raises(ValueError, match="fitted on the first 12 tokens; cropping 3 of 14"):
        cache.crop(-3)
    cache.crop(-2)
    assert cache.get_seq_length() == PROMPT
    RotorQuantCache(MODEL.config).crop(-1)  # nothing held yet: nothing to do


def test_assisted_generation_runs_on_the_cache():
    assistant = tiny_llama()
    cache = RotorQuantCache(MODEL.config, key_bits=8, value_bits=8, residual_length=2)
    ours = generate(MODEL, cache, 8, prompt(batch=1), assistant_model=assistant)
    reference = generate(MODEL, DynamicCache(config=MODEL.config), 8, prompt(batch=1))
    assert ours.shape == reference.shape and (ours == reference).float().mean().item() >= 0.9


def test_save_and_load_continue_exactly(tmp_path):
    """A saved cache (codes, windows, prefill statistics, lengths) continues generation as the original."""
    path = tmp_path / "cache.safetensors"
    original = RotorQuantCache(MODEL.config, key_bits=4, value_bits=3, residual_length=3, calibration="prefill")
    forward(MODEL, original, TOKENS[:, :PROMPT])
    forward(MODEL, original, TOKENS[:, PROMPT : PROMPT + 2])
    original.save(path)
    loaded = RotorQuantCache.load(path, MODEL.config)
    assert loaded.plans == original.plans and _state(loaded) == _state(original)
    assert loaded.nbytes() == original.nbytes() == held_bytes(loaded)
    for a, b in zip(loaded.layers, original.layers):
        assert a.fitted_length == b.fitted_length and a.key_quantizer.calibration.same_as(b.key_quantizer.calibration)
    inputs = TOKENS[:, : PROMPT + 2]
    assert torch.equal(generate(MODEL, loaded, 6, inputs), generate(MODEL, original, 6, inputs))
    assert _state(loaded) == _state(original)
    # the file holds exactly what is held, plus a header
    empty = tmp_path / "empty.safetensors"
    RotorQuantCache(MODEL.config).save(empty)
    assert RotorQuantCache.load(empty, MODEL.config).get_seq_length() == 0


def test_save_and_load_keep_bfloat16_windows_and_the_device(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    original = RotorQuantCache(model.config, residual_length=3)
    forward(model, original, TOKENS[:, :PROMPT])
    original.save(tmp_path / "cache.safetensors")
    loaded = RotorQuantCache.load(tmp_path / "cache.safetensors", model.config, device="cpu")
    for a, b in zip(loaded.layers, original.layers):
        assert a.keys.dtype == torch.bfloat16 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.key_code.dtype == "bfloat16" and torch.equal(a.key_code.codes, b.key_code.codes)
        assert a.device == torch.device("cpu")
    size = (tmp_path / "cache.safetensors").stat().st_size
    assert original.nbytes() < size < original.nbytes() + 4096  # the payload, windows and a header


def test_load_refuses_other_files_and_other_configs(tmp_path):
    path = tmp_path / "cache.safetensors"
    cache = RotorQuantCache(MODEL.config, key_bits=3, value_bits=3)
    forward(MODEL, cache, TOKENS[:, :PROMPT])
    cache.save(path)
    with pytest.raises(ValueError, match="expected a file of codes, got one holding a cache"):
        rq.load(path)
    wider = tiny_llama(head_dim=64).config
    with pytest.raises(ValueError, match=f"^{path}: the file holds a cache of 2 layers and config gives 2; layer 0 differs"):
        RotorQuantCache.load(path, wider)
    deeper = LlamaConfig(**{**MODEL.config.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="config gives 3"):
        RotorQuantCache.load(path, deeper)
    codes = tmp_path / "codes.safetensors"
    rq.save(codes, cache.layers[0].key_code)
    with pytest.raises(ValueError, match="expected a RotorQuantCache file, got one holding code"):
        RotorQuantCache.load(codes, MODEL.config)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        RotorQuantCache.load(path, MODEL.config)
    with pytest.raises(ValueError, match="device: expected a torch device available here"):
        RotorQuantCache.load(path, MODEL.config, device="nonsense")


def test_load_refuses_cache_files_whose_saved_state_does_not_fit_their_tensors(tmp_path):
    """Files with a valid hash around a tampered layer state: every saved tensor must be used, and every layer
    state must be one the cache could have written (they loaded with layers silently dropped)."""
    from test_files import _craft, _parts

    path = tmp_path / "cache.safetensors"
    cache = RotorQuantCache(MODEL.config, residual_length=2)
    forward(MODEL, cache, TOKENS[:, :PROMPT])
    cache.save(path)
    tensors, metadata = _parts(path)
    layers = metadata["info"]["layers"]

    def with_layers(states):
        return {**metadata, "info": {**metadata["info"], "layers": states}}

    def with_state(i, **changes):
        return with_layers([{**s, **changes} if j == i else s for j, s in enumerate(layers)])

    window = "layers.1.window.keys"
    cases = [
        (tensors, with_layers(layers[:1]), "expected the states of 2 layers, got 1 entries"),
        (tensors, with_layers({}), "expected the states of 2 layers, got dict"),
        (tensors, with_layers([layers[0], list(layers[1])]), r"layers.1: expected a state with fields .*, got list"),
        (tensors, with_layers([layers[0], {k: v for k, v in layers[1].items() if k != "record_past"}]),
         r"layers.1: expected a state with fields \['cumulative_length', 'fitted_length', 'initialized', 'record_past'\]"),
        (tensors, with_state(1, initialized=False), r"layers.1: the saved state .* does not match its tensors"),
        (tensors, with_state(1, initialized=False, cumulative_length=0), r"expected only tensors of the saved layers, got unused ones: \['layers.1.keys', 'layers.1.values'"),
        (tensors, with_state(0, cumulative_length="5"), r"layers.0.cumulative_length: expected an int >= 0, got '5'"),
        (tensors, with_state(0, cumulative_length=float(PROMPT)), rf"layers.0.cumulative_length: expected an int >= 0, got {float(PROMPT)}"),
        (tensors, with_state(0, record_past=1), "layers.0.record_past: expected a bool, got 1"),
        ({**tensors, window: tensors[window].astype(np.float16)}, metadata, "layers.1: expected key and value windows of one floating dtype"),
        ({**tensors, "layers.1.window.keys": tensors[window].astype(np.float16),
          "layers.1.window.values": tensors["layers.1.window.values"].astype(np.float16)}, metadata,
         "layers.1: codes of vectors of dtype float32 do not fit windows of torch.float16"),
    ]  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    for t, m, message in cases:
        _craft(bad, t, m)
        with pytest.raises(ValueError, match=f"^{bad}: {message}"):
            RotorQuantCache.load(bad, MODEL.config)
    _craft(bad, tensors, metadata)
    assert RotorQuantCache.load(bad, MODEL.config).get_seq_length() == PROMPT


def test_bad_arguments():
    config = MODEL.config
    with pytest.raises(ValueError, match="residual_length: expected an int >= 0, got -1"):
        RotorQuantCache(config, residual_length=-1)
    with pytest.raises(ValueError, match=r"calibration: expected one of \('none', 'prefill'\), got 'model'"):
        RotorQuantCache(config, calibration="model")
    with pytest.raises(ValueError, match="tier: expected one of 'auto', 'torch', 'triton', got 'numpy'"):
        RotorQuantCache(config, tier="numpy")
    with pytest.raises(ValueError, match="^keys: QuantizerSpec.bits: expected an int in 1..8, got 9"):
        RotorQuantCache(config, key_bits=9)
    with pytest.raises(ValueError, match=r"^values: QuantizerSpec.bits: expected an int in 2..8 when qjl=True \(1 bit goes to the QJL sign\), got 1"):
        RotorQuantCache(config, value_bits=1, value_qjl=True)
    with pytest.raises(TypeError, match="config: expected a transformers PretrainedConfig .model.config., got NoneType"):
        RotorQuantCache(None)
    for count in (1.5, "3", True):
        with pytest.raises(TypeError, match=f"crop: expected the number of tokens to remove as an int, got {count!r}"):
            RotorQuantCache(config).crop(count)
    with pytest.raises(ValueError, match="kind: expected None or one of"):
        RotorQuantCache(config).nbytes("sliding")


@pytest.mark.parametrize("residual_length", [0, 4])
def test_update_refuses_states_that_do_not_fit_the_layer(residual_length):
    """Keys and values of another shape than each other, the specs or what the layer holds are refused before
    anything is stored (they were concatenated into a corrupt cache, or failed inside torch)."""
    cache = RotorQuantCache(MODEL.config, residual_length=residual_length)

    def states(batch=2, heads=2, tokens=3, dim=32, dtype=torch.float32):
        return torch.randn(batch, heads, tokens, dim, dtype=dtype)

    with pytest.raises(ValueError, match=r"^key_states: expected shape \(batch, kv_heads, tokens, 32\), got \(2, 2, 3, 16\)"):
        cache.update(states(dim=16), states(dim=16), 0)
    with pytest.raises(ValueError, match=r"^value_states: expected the shape of key_states \(2, 2, 3, 32\), got \(2, 1, 3, 32\)"):
        cache.update(states(), states(heads=1), 0)
    with pytest.raises(TypeError, match="^value_states: expected a floating-point torch.Tensor, got ndarray"):
        cache.update(states(), states().numpy(), 0)
    assert cache.get_seq_length() == 0
    cache.update(states(tokens=6), states(tokens=6), 0)
    with pytest.raises(ValueError, match=r"^value_states: expected the shape of key_states \(2, 2, 2, 32\), got \(2, 2, 1, 32\)"):
        cache.update(states(tokens=2), states(tokens=1), 0)
    with pytest.raises(ValueError, match=r"^key_states, value_states: expected \(batch, kv_heads\) \(2, 2\), dtype torch.float32"):
        cache.update(states(batch=3), states(batch=3), 0)
    with pytest.raises(ValueError, match=r"got \(2, 2\), torch.float64/torch.float64"):
        cache.update(states(dtype=torch.float64), states(dtype=torch.float64), 0)
    layer = cache.layers[0]
    assert cache.get_seq_length() == layer.code_length + layer.window_length == 6


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("LlamaConfig", {"layer_types": ["full_attention", "chunked_attention"]}, "layer 1 has layer type 'chunked_attention'"),
        ("LlamaConfig", {"layer_types": ["full_attention", "moe"]}, "layer 1 has layer type 'moe'"),
        ("Llama4TextConfig", {}, "layer 0 has layer type 'chunked_attention'"),
        ("Qwen3NextConfig", {}, "layer 0 has layer type 'linear_attention'"),
        ("DeepseekV3Config", {}, r"layer 0 \('full_attention'\) uses multi-head latent attention \(kv_lora_rank=512"),
        ("LlamaConfig", {"layer_types": ["sliding_attention", "full_attention"]}, "expected an int sliding_window >= 2"),
    ],
)
def test_layer_types_the_cache_cannot_store_are_named(name, kwargs, message):
    config = getattr(transformers, name)(num_hidden_layers=2, **kwargs)
    with pytest.raises(ValueError, match=f"config: {message}"):
        RotorQuantCache(config)


def test_integrations_package_imports_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import rotorquant.integrations; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr
