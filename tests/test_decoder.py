"""`rotorquant.bench.decoder` and the bench's llm section: the offline text, the perplexity protocol, bytes
held, per-layer analysis. Runs a tiny random-weight Llama (2 layers, head_dim 16) with SmolLM2's tokenizer,
saved to a folder as a user's own model would be (``--model PATH``); the real SmolLM2 is loaded once."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from rotorquant.bench import cli, decoder  # noqa: E402
from rotorquant.presets import preset  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random-weight Llama (2 layers, 4 query heads on 2 KV heads, head_dim 16) and SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _, _ = decoder.load_model()
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_smollm2_loads_offline_from_its_wheel():
    _, model, name = decoder.load_model()
    config = model.config
    assert "SmolLM2-135M-Instruct" in name and next(model.parameters()).dtype == torch.float32
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size // config.num_attention_heads == 64


def test_evaluation_text_is_the_pinned_file():
    text, origin = decoder.evaluation_text()
    assert origin["sha256"] == decoder.TEXT_SHA256 and origin["characters"] == len(text) > 200_000
    assert "Shakespeare" in text and "###" not in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "Protocol.window: expected an int >= 1, got 0"),
        (dict(window=10, prefill=9), "Protocol.prefill: expected at most window - 2 = 8, got 9"),
        (dict(chunk=True), "Protocol.chunk: expected an int >= 1, got True"),
    ],
)
def test_protocol_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoder.Protocol(**kwargs)


def test_reference_and_methods_on_a_tiny_model(tiny_model_dir):
    """The exact cache reproduces the reference exactly; RotorQuant holds exactly its preset's bytes per token
    and layer; HQQ's bytes come from its tensors; a text shorter than the windows is refused."""
    tokenizer, model, name = decoder.load_model(tiny_model_dir)
    assert name == os.path.basename(tiny_model_dir)
    text, _ = decoder.evaluation_text()
    ids = tokenizer(text[:20_000]).input_ids
    protocol = decoder.Protocol(window=64, prefill=40, windows=2, chunk=8)
    ref = decoder.Reference(model, ids, protocol)
    assert math.isfinite(ref.ppl) and ref.ppl > 1
    exact = ref.run("exact", lambda: decoder.Method("exact").cache(model.config), decoder.held_bytes)
    assert exact.dppl_pct == 0.0 and exact.kl == 0.0
    assert exact.bytes_per_token_layer == 2 * 2 * 16 * 4  # fp32 keys and values of 2 KV heads
    k4v2 = ref.run("rotor k4v2", lambda: decoder.Method("rotorquant", "k4v2", "rotor").cache(model.config),
                   decoder.held_bytes)  # fmt: skip
    assert k4v2.bytes_per_token_layer == preset("k4v2").bytes_per_token(16, 2)
    seeded = decoder.Method("rotorquant", "k4v2", "rotor", seed=5).cache(model.config).plans[0]
    assert (seeded.key_spec.seed, seeded.value_spec.seed) == (5, 6)
    assert k4v2.kl > 0 and len(k4v2.per_window) == 2 and k4v2.sem_pct > 0
    hqq = ref.run("hqq", lambda: decoder.Method("hqq", bits=4, group=16, residual=16).cache(model.config),
                  decoder.held_bytes)  # fmt: skip
    assert 0 < hqq.bytes_per_token_layer < exact.bytes_per_token_layer and math.isfinite(hqq.ppl)
    with pytest.raises(ValueError, match=r"Protocol: expected a text of at least 128 tokens, got 100"):
        decoder.Reference(model, ids[:100], protocol)


def test_per_layer_analysis(tiny_model_dir):
    """Captured queries, keys and values have the model's shapes; 8-bit codes keep attention outputs at cosine
    > 0.999 and 2-bit codes below them; isotropic Gaussian channels have anisotropy near 1."""
    tokenizer, model, _ = decoder.load_model(tiny_model_dir)
    layers = decoder.capture_qkv(model, tokenizer("A line of English text, long enough to attend over.").input_ids)
    assert len(layers) == 2 and layers[0][0].shape[0] == 4 and layers[0][1].shape[0] == 2
    assert layers[0][1].shape[-1] == 16
    fine = decoder.layer_cosines(layers, *preset("k4v4").specs(16))
    import rotorquant as rq

    eight = decoder.layer_cosines(layers, rq.QuantizerSpec(dim=16, bits=8), rq.QuantizerSpec(dim=16, bits=8, seed=1))
    coarse = decoder.layer_cosines(layers, *preset("k2v2").specs(16))
    assert all(c > 0.999 for c in eight) and all(c < e for c, e in zip(coarse, eight))
    assert all(0 < c <= 1 for c in fine)
    g = torch.Generator().manual_seed(3)
    iso = [(torch.zeros(4, 200, 16), torch.randn(2, 4000, 16, generator=g), torch.randn(2, 4000, 16, generator=g))]
    (ka, va), = decoder.anisotropy(iso)
    assert 1.0 <= ka < 1.2 and 1.0 <= va < 1.2


def test_llm_section_of_the_bench(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``rotorquant bench --sections llm --model PATH``: one row per rotation and preset plus the reference
    and the peers, a per-layer table, JSON with every number, and the four-panel plot."""
    monkeypatch.setattr(cli, "LLM_PEERS", (("hqq", 4),))  # quanto builds a C++ extension on first use
    monkeypatch.setattr(cli, "llm_protocol", lambda config: decoder.Protocol(window=48, prefill=32, windows=2, chunk=8))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = cli.main(["bench", "--sections", "llm", "--model", tiny_model_dir, "--json", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert code == 0 and "## A real decoder LLM" in printed and "SHA-256 d73c37c56dd1c0e3" in printed
    llm = json.loads(out.read_text())["llm"]
    labels = [r["label"] for r in llm["rows"]]
    assert labels[0] == "fp32 (exact)" and "hqq int4 g64 R128" in labels
    assert {f"{r} {p}" for r in cli.LLM_ROTATIONS for p in ("K4V4", "K4V3", "K4V2", "K3V3", "K2V2")} <= set(labels)
    assert len(llm["cosines"]) == 6 and all(len(c) == 2 for c in llm["cosines"].values())
    assert len(llm["anisotropy"]) == 2 and png.stat().st_size > 10_000
    assert printed.count("| 0 |") == 1 and "| mean |" in printed


def test_model_path_is_checked_before_the_run(capsys, tmp_path):
    code = cli.main(["bench", "--sections", "llm", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "--model: expected the folder of a local transformers causal LM" in err
