"""Options of RotorQuantCache on a real decoder, under the main job's protocol: butterfly stages, a recent-token
window in full precision, a per-sequence calibration fitted on the prompt, and the first and last two layers
kept exact (as vLLM's TurboQuant backend keeps them at native precision).

    python benchmarks/decoder_sweeps.py                 # SmolLM2-135M-Instruct, K4V2 and K3V3
    python benchmarks/decoder_sweeps.py --model PATH    # any local transformers causal LM

Prints one Markdown table: per cache, the bytes per token per layer it holds, the perplexity change
against the exact cache, its standard error over the windows, and the mean KL divergence
(`rotorquant.bench.decoder`; the same 6 windows of 640 tokens, 512 prefilled, as ``rotorquant bench``).
"""

from __future__ import annotations

import argparse

import torch

from transformers.cache_utils import DynamicLayer

from rotorquant.bench import decoder
from rotorquant.integrations.transformers import RotorQuantCache, RotorQuantLayer
from rotorquant.integrations.vllm import boundary_layers
from rotorquant.math.rotations import default_stages


def variants(dim: int) -> list[tuple[str, dict]]:
    """``(label, options of `make_cache`)`` for K4V2 and K3V3: 1 to ceil(log3 d) + 1 butterfly stages, a 16- and
    a 64-token window, the prompt calibration with one stage and with the butterfly, and 2 exact boundary
    layers at each end."""
    out = []
    for preset in ("k4v2", "k3v3"):
        for stages in range(1, default_stages(dim) + 2):
            out.append((f"rotor {preset.upper()}, {stages} stage{'s' * (stages > 1)}", dict(preset=preset, stages=stages)))
        for window in (16, 64):
            out.append((f"rotor {preset.upper()}, last {window} tokens exact", dict(preset=preset, residual_length=window)))
        for stages in (1, None):
            name = "1 stage" if stages else "butterfly"
            out.append((f"rotor {preset.upper()}, {name}, prompt calibration", dict(preset=preset, stages=stages, calibration="prefill")))
        out.append((f"rotor {preset.upper()}, first and last 2 layers exact", dict(preset=preset, exact_boundary_layers=2)))
    return out


def make_cache(config, options: dict) -> RotorQuantCache:
    """``RotorQuantCache(config, **options)`` on the torch tier; ``exact_boundary_layers=n`` replaces the first
    and last ``n`` layers by transformers' exact ``DynamicLayer`` (`rotorquant.integrations.vllm.boundary_layers`)."""
    options = dict(options)
    exact = options.pop("exact_boundary_layers", 0)
    cache = RotorQuantCache(config, tier="torch", **options)
    for i in boundary_layers(config.num_hidden_layers, exact):
        cache.layers[int(i)] = DynamicLayer()
    return cache


def held_bytes(cache) -> int:
    """What every layer holds: `RotorQuantLayer.nbytes` for compressed layers, the keys and values of exact ones."""
    return sum(
        layer.nbytes() if isinstance(layer, RotorQuantLayer)
        else sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        for layer in cache.layers
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder of a local transformers causal LM (default SmolLM2)")
    parser.add_argument("--windows", type=int, default=6, help="windows of 640 tokens (default 6)")
    parser.add_argument("--rows", default="", help="run only the caches whose label contains this text")
    args = parser.parse_args()
    tokenizer, model, name = decoder.load_model(args.model)
    text, origin = decoder.evaluation_text()
    protocol = decoder.Protocol(windows=args.windows)
    reference = decoder.Reference(model, tokenizer(text).input_ids, protocol)
    dim = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads
    print(f"# RotorQuantCache options on {name}, {protocol.windows} windows of {protocol.window} tokens "
          f"({protocol.prefill} prefilled), torch {torch.__version__}; fp32 perplexity {reference.ppl:.3f}\n")  # fmt: skip
    print("| cache | bytes/token/layer | change vs fp32 | +- (s.e.) | KL |")
    print("|---|---:|---:|---:|---:|")
    for label, options in [v for v in variants(dim) if args.rows in v[0]]:
        result = reference.run(label, lambda o=options: make_cache(model.config, o), held_bytes)
        print(f"| {label} | {result.bytes_per_token_layer:.0f} | {result.dppl_pct:+.2f}% | {result.sem_pct:.2f}% "
              f"| {result.kl:.4f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
