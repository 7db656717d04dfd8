"""RotorQuantCache on tiny random-weight models built from real architectures' configs (nothing downloaded).

- Llama with grouped-query attention (4 query heads, 2 KV heads, head_dim 32);
- Gemma 3 (text) with its sliding/full layer pattern and head_dim 256 (sliding window 6, so tokens leave it);
- Qwen2 with its attention bias (q/k/v projections with bias).
"""

import functools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from rotorquant.integrations.transformers import RotorQuantCache, RotorQuantSlidingLayer  # noqa: E402
from test_transformers_cache import _state, decode_logits, forward, held_bytes  # noqa: E402

PROMPT, NEW, WINDOW = 12, 10, 6
SEEN = PROMPT + NEW - 1  # the last generated token is never fed back

CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ),
    "gemma3-hybrid": lambda: transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, sliding_window=WINDOW, max_position_embeddings=128,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "qwen2-bias": lambda: transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ),
}  # fmt: skip
MODEL_CLASSES = {
    "llama-gqa": "LlamaForCausalLM",
    "gemma3-hybrid": "Gemma3ForCausalLM",
    "qwen2-bias": "Qwen2ForCausalLM",
}


@functools.cache
def model(name):
    torch.manual_seed(0)
    return getattr(transformers, MODEL_CLASSES[name])(CONFIGS[name]()).eval()


def prompt(batch=2):
    return torch.randint(0, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def generate(m, cache, inputs=None, new_tokens=NEW, **kwargs):
    with torch.no_grad():
        return m.generate(
            prompt() if inputs is None else inputs, max_new_tokens=new_tokens, do_sample=False, cache=cache,
            pad_token_id=0, **kwargs,
        )  # fmt: skip


def test_the_models_are_what_they_claim():
    llama, gemma, qwen = (model(name) for name in CONFIGS)
    assert llama.config.num_attention_heads == 2 * llama.config.num_key_value_heads
    assert gemma.config.head_dim == 256 and gemma.config.layer_types.count("sliding_attention") == 2
    assert qwen.model.layers[0].self_attn.k_proj.bias is not None


@pytest.mark.parametrize("name", CONFIGS)
def test_a_cache_that_compresses_nothing_is_dynamic_cache_exactly(name):
    """A window longer than the sequence: every layer, sliding ones included, holds exactly the keys and values
    DynamicCache holds, and generation is identical."""
    m = model(name)
    reference, ours = DynamicCache(config=m.config), RotorQuantCache(m.config, residual_length=64)
    assert torch.equal(generate(m, ours), generate(m, reference))
    assert ours.code_nbytes() == 0 and ours.get_seq_length() == SEEN
    for a, b in zip(ours.layers, reference.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert isinstance(a, RotorQuantSlidingLayer) == b.is_sliding
        assert a.get_mask_sizes(1) == b.get_mask_sizes(1)


@pytest.mark.parametrize("name", CONFIGS)
def test_eight_bits_reproduce_the_greedy_tokens_of_dynamic_cache(name):
    """Fed DynamicCache's greedy continuation one token at a time, an 8-bit cache gives logits within 2% and
    picks the same next token at every step where the exact top-two gap exceeds twice its logit error there
    (random weights leave some logits nearly tied); at least half the steps are that decisive."""
    m = model(name)
    tokens = generate(m, DynamicCache(config=m.config))
    exact = decode_logits(m, DynamicCache(config=m.config), tokens)
    ours = decode_logits(m, RotorQuantCache(m.config, key_bits=8, value_bits=8), tokens)
    assert (ours - exact).norm() / exact.norm() < 0.02
    top2 = exact.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * (ours - exact).abs().amax(-1)
    assert decisive.float().mean().item() >= 0.5, decisive.float().mean().item()
    assert torch.equal(ours.argmax(-1)[decisive], exact.argmax(-1)[decisive])


@pytest.mark.parametrize("name", CONFIGS)
def test_three_bits_run_end_to_end_and_nbytes_is_the_storage(name):
    m = model(name)
    cache = RotorQuantCache(m.config, key_bits=3, value_bits=3)
    out = generate(m, cache)
    assert out.shape == (2, PROMPT + NEW) and cache.get_seq_length() == SEEN
    heads = m.config.num_key_value_heads
    for layer, plan in zip(cache.layers, cache.plans):
        held = SEEN if plan.sliding_window is None else WINDOW - 1
        assert layer.key_code.shape == (2, heads, held) and layer.window_length == 0
        assert layer.key_code.codes.dtype == torch.uint8 and layer.key_code.codes.shape[-1] == plan.key_spec.code_bytes
    kinds = {plan.kind for plan in cache.plans}
    assert cache.nbytes() == held_bytes(cache) == sum(cache.nbytes(kind) for kind in kinds)
    for kind in kinds:
        plans = [plan for plan in cache.plans if plan.kind == kind]
        held = SEEN if kind == "full_attention" else WINDOW - 1
        per_token = sum(plan.key_spec.bytes_per_vector + plan.value_spec.bytes_per_vector for plan in plans)
        assert cache.nbytes(kind) == 2 * heads * held * per_token


HYBRID = "gemma3-hybrid"


def test_hybrid_options_per_layer_kind():
    m = model(HYBRID)
    per_kind = {"sliding_attention": {"key_bits": 8, "value_bits": 8, "residual_length": 2}}
    cache = RotorQuantCache(m.config, "k3v3", per_kind=per_kind)
    sliding, full = cache.plans[0], cache.plans[2]
    assert (sliding.key_spec.bits, sliding.residual_length, sliding.sliding_window) == (8, 2, WINDOW)
    assert (full.key_spec.bits, full.residual_length, full.sliding_window) == (3, 0, None)
    assert full.key_spec.dim == sliding.key_spec.dim == 256
    generate(m, cache)
    layer = cache.layers[0]
    assert (layer.code_length, layer.window_length) == (WINDOW - 1 - 2, 2)
    assert cache.window_nbytes("sliding_attention") == cache.window_nbytes() == 2 * 2 * 2 * 1 * 2 * 256 * 4
    assert cache.nbytes() == held_bytes(cache)
    with pytest.raises(ValueError, match=r"per_kind: expected layer types among .*, got 'sliding'"):
        RotorQuantCache(m.config, per_kind={"sliding": {}})
    with pytest.raises(ValueError, match=r"per_kind\['sliding_attention'\]: expected a dict of options among"):
        RotorQuantCache(m.config, per_kind={"sliding_attention": {"bits": 3}})
    with pytest.raises(ValueError, match=r"per_kind\['sliding_attention'\]: keys: QuantizerSpec.bits"):
        RotorQuantCache(m.config, per_kind={"sliding_attention": {"key_bits": 0}})


def test_hybrid_beam_search_and_batch_selection():
    m = model(HYBRID)
    reference = generate(m, DynamicCache(config=m.config), new_tokens=6, num_beams=2)
    cache = RotorQuantCache(m.config, key_bits=8, value_bits=8, residual_length=2)
    ours = generate(m, cache, new_tokens=6, num_beams=2)
    assert ours.shape == reference.shape and (ours == reference).float().mean().item() >= 0.9
    before, beams = cache.nbytes(), cache.layers[0].keys.shape[0]
    cache.batch_select_indices(slice(1, 2))
    assert beams == 4 and cache.nbytes() == held_bytes(cache) == before // beams


def test_hybrid_crop_under_past_recording():
    m = model(HYBRID)
    tokens = torch.randint(0, 128, (2, PROMPT + 8), generator=torch.Generator().manual_seed(2))
    cropped, shorter = RotorQuantCache(m.config, residual_length=2), RotorQuantCache(m.config, residual_length=2)
    forward(m, cropped, tokens[:, :PROMPT])
    cropped.activate_past_recording()
    forward(m, cropped, tokens[:, PROMPT : PROMPT + 6])
    cropped.crop(-4)
    forward(m, shorter, tokens[:, :PROMPT])
    forward(m, shorter, tokens[:, PROMPT : PROMPT + 2])
    for a, b in zip(cropped.layers, shorter.layers):
        assert (a.code_length, a.window_length, a.get_mask_sizes(1)) == (b.code_length, b.window_length, b.get_mask_sizes(1))
    nxt = tokens[:, PROMPT + 2 : PROMPT + 3]
    got, want = forward(m, cropped, nxt), forward(m, shorter, nxt)
    assert (got - want).norm() / want.norm() < 1e-5


def test_hybrid_assisted_generation():
    """Assisted generation records past tokens and crops the rejected candidates after every step."""
    m = model(HYBRID)
    cache = RotorQuantCache(m.config, key_bits=8, value_bits=8)
    ours = generate(m, cache, prompt(batch=1), new_tokens=8, assistant_model=model(HYBRID))
    plain = generate(m, RotorQuantCache(m.config, key_bits=8, value_bits=8), prompt(batch=1), new_tokens=8)
    assert ours.shape == plain.shape and (ours[:, PROMPT:] == plain[:, PROMPT:]).float().mean().item() >= 0.75
    assert all(layer.record_past for layer in cache.layers) and cache.get_seq_length() == PROMPT + 8 - 1
    assert [layer.code_length for layer in cache.layers] == [WINDOW - 1, WINDOW - 1, PROMPT + 8 - 1]
    assert cache.nbytes() == held_bytes(cache)


def test_hybrid_save_and_load_continue_exactly(tmp_path):
    m = model(HYBRID)
    per_kind = {"sliding_attention": {"residual_length": 2}}
    original = RotorQuantCache(m.config, key_bits=4, value_bits=3, calibration="prefill", per_kind=per_kind)
    inputs = generate(m, original, new_tokens=3)
    original.save(tmp_path / "cache.safetensors")
    loaded = RotorQuantCache.load(tmp_path / "cache.safetensors", m.config)
    assert loaded.plans == original.plans and _state(loaded) == _state(original)
    assert torch.equal(generate(m, loaded, inputs, new_tokens=5), generate(m, original, inputs, new_tokens=5))
    assert _state(loaded) == _state(original) and loaded.nbytes() == held_bytes(loaded)
