"""RotorQuantCache on a tiny randomly initialized Llama (built from a config, nothing downloaded)."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from rotorquant.integrations.transformers import RotorQuantCache  # noqa: E402

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


def test_bad_arguments():
    config = tiny_llama().config
    with pytest.raises(ValueError, match="residual_length: expected an int >= 0, got -1"):
        RotorQuantCache(config, residual_length=-1)
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
