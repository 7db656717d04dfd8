"""RotorQuantCache on a tiny randomly initialized Llama (built from a config, nothing downloaded)."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import rotorquant as rq  # noqa: E402
from rotorquant.integrations.transformers import PREFILL_PRIOR, RotorQuantCache, RotorQuantLayer  # noqa: E402

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


def prompt(batch=2):
    return torch.randint(0, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def generate(model, cache, new_tokens=10, **kwargs):
    with torch.no_grad():
        return model.generate(
            prompt(), max_new_tokens=new_tokens, do_sample=False, cache=cache, pad_token_id=0, **kwargs
        )


def dense_nbytes(cache):
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_generation_runs_and_stores_packed_codes_with_gqa():
    model = tiny_llama()
    cache = RotorQuantCache(model.config, key_bits=3, value_bits=3)
    out = generate(model, cache)
    assert out.shape == (2, PROMPT + 10)
    seen = PROMPT + 10 - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == seen
    for layer in cache.layers:
        assert layer.key_code.shape == (2, 2, seen)  # 2 KV heads for 4 query heads
        assert layer.key_code.codes.dtype == torch.uint8
        assert layer.key_code.codes.shape[-1] == cache.key_spec.code_bytes == 12
        assert layer.keys.shape[-2] == 0
    assert cache.window_nbytes() == 0
    # layers x (K, V) x batch x KV heads x tokens x bytes per vector
    assert cache.code_nbytes() == 2 * 2 * 2 * 2 * seen * cache.key_spec.bytes_per_vector


def test_three_bits_is_at_least_4_5x_smaller_than_dynamic_cache():
    model = tiny_llama(head_dim=64, dtype=torch.bfloat16)
    dense, ours = DynamicCache(config=model.config), RotorQuantCache(model.config, key_bits=3, value_bits=3)
    generate(model, dense)
    generate(model, ours)
    assert ours.window_nbytes() == 0
    ratio = dense_nbytes(dense) / ours.nbytes()
    assert ratio >= 4.5, ratio


def test_eight_bits_greedy_tokens_match_dynamic_cache():
    model = tiny_llama()
    reference = generate(model, DynamicCache(config=model.config), new_tokens=16)
    ours = generate(model, RotorQuantCache(model.config, key_bits=8, value_bits=8), new_tokens=16)
    match = (ours[:, PROMPT:] == reference[:, PROMPT:]).float().mean().item()
    assert match >= 0.9, match


def test_residual_window_keeps_recent_tokens_exact():
    model = tiny_llama()
    cache = RotorQuantCache(model.config, key_bits=2, value_bits=2, residual_length=8)
    generate(model, cache)
    seen = PROMPT + 10 - 1
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8 and layer.key_code.shape[-1] == seen - 8
    assert cache.window_nbytes() == 2 * 2 * 2 * 2 * 8 * 32 * 4  # layers x (K, V) x batch x heads x 8 x d x fp32
    # a window longer than the whole sequence never quantizes: exactly DynamicCache
    reference = generate(model, DynamicCache(config=model.config))
    wide = RotorQuantCache(model.config, key_bits=2, value_bits=2, residual_length=64)
    assert torch.equal(generate(model, wide), reference)
    assert wide.code_nbytes() == 0


def test_separate_key_and_value_settings():
    model = tiny_llama()
    cache = RotorQuantCache(model.config, key_bits=4, value_bits=2, rotation="dense", value_qjl=True)
    generate(model, cache, new_tokens=4)
    layer = cache.layers[0]
    assert layer.key_code.spec.bits == 4 and layer.key_code.spec.norm_correction
    assert layer.value_code.spec.qjl and not layer.value_code.spec.norm_correction
    assert layer.key_code.codes.shape[-1] == 16 and layer.value_code.codes.shape[-1] == 4
    assert layer.value_code.qjl_signs.shape[-1] == 4


def test_beam_search_reorders_codes():
    model = tiny_llama()
    reference = generate(model, DynamicCache(config=model.config), new_tokens=6, num_beams=2)
    ours = generate(model, RotorQuantCache(model.config, key_bits=8, value_bits=8), new_tokens=6, num_beams=2)
    assert ours.shape == reference.shape
    assert (ours == reference).float().mean().item() >= 0.9


def test_prefill_calibration_generates_and_counts_its_bytes():
    model = tiny_llama()
    cache = RotorQuantCache(model.config, key_bits=3, value_bits=3, calibration="prefill")
    generate(model, cache)
    for layer in cache.layers:
        kcal, vcal = layer.key_quantizer.calibration, layer.value_quantizer.calibration
        assert layer.key_code.calibration is kcal and layer.value_code.calibration is vcal
        assert kcal.scale.shape == kcal.center.shape == vcal.scale.shape == (2, 2, 1, 32) and vcal.center is None
    # layers x (key scale + key center + value scale) x batch x KV heads x d x float32
    assert cache.calibration_nbytes() == 2 * 3 * 2 * 2 * 32 * 4
    assert cache.nbytes() == cache.code_nbytes() + cache.calibration_nbytes()
    # greedy tokens of this random model sit on near-ties, so compare teacher-forced logits instead
    tokens = generate(model, DynamicCache(config=model.config), new_tokens=8)
    exact = decode_logits(model, DynamicCache(config=model.config), tokens)
    for calibration in ("none", "prefill"):
        cache = RotorQuantCache(model.config, key_bits=8, value_bits=8, calibration=calibration)
        err = (decode_logits(model, cache, tokens) - exact).norm() / exact.norm()
        assert err < 0.01, (calibration, err)


def decode_logits(model, cache, tokens):
    """Logits of every decode step when ``tokens`` (prompt, then continuation) are fed one at a time."""
    with torch.no_grad():
        model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        steps = [model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(PROMPT, tokens.shape[1])]
    return torch.cat(steps, dim=1)


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
    assert errors["prefill"] < 0.7 * errors["none"], errors


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
    assert (layer.value_quantizer.calibration.scale == layer.value_quantizer.calibration.scale[:1]).all()
    assert layer.key_quantizer.calibration.scale.shape == (1, 2, 1, 32)
    assert (layer.key_quantizer.calibration.scale == scale[:1]).all()  # [1, 0] then [1]: sequence 0
    layer.reset()
    assert layer.calibration_nbytes() == 0 and layer.key_quantizer.calibration is None
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


def test_bad_arguments():
    config = tiny_llama().config
    with pytest.raises(ValueError, match="residual_length: expected an int >= 0, got -1"):
        RotorQuantCache(config, residual_length=-1)
    with pytest.raises(ValueError, match=r"calibration: expected one of \('none', 'prefill'\), got 'model'"):
        RotorQuantCache(config, calibration="model")
    with pytest.raises(ValueError, match="tier: expected one of 'auto', 'torch', 'triton', got 'numpy'"):
        RotorQuantCache(config, tier="numpy")
    with pytest.raises(ValueError, match="QuantizerSpec.bits"):
        RotorQuantCache(config, key_bits=9)
    sliding = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="config: expected only full-attention layers"):
        RotorQuantCache(sliding)


def test_integrations_package_imports_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import rotorquant.integrations; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr
