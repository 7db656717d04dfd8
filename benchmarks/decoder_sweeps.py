"""Options of RotorQuantCache on a real decoder, under the main job's protocol: butterfly stages, a recent-token
window in full precision, and a per-sequence calibration fitted on the prompt.

    python benchmarks/decoder_sweeps.py                 # SmolLM2-135M-Instruct, K4V2 and K3V3
    python benchmarks/decoder_sweeps.py --model PATH    # any local transformers causal LM

Prints one Markdown table: per cache, the bytes per token per layer it holds, the perplexity change
against the exact cache, its standard error over the windows, and the mean KL divergence
(`rotorquant.bench.decoder`; the same 6 windows of 640 tokens, 512 prefilled, as ``rotorquant bench``).
"""

from __future__ import annotations

import argparse

import torch

from rotorquant.bench import decoder
from rotorquant.integrations.transformers import RotorQuantCache
from rotorquant.math.rotations import default_stages


def variants(dim: int) -> list[tuple[str, dict]]:
    """``(label, RotorQuantCache options)`` for K4V2 and K3V3: 1 to ceil(log3 d) + 1 butterfly stages, a
    16- and a 64-token window, and the prompt calibration with one stage and with the butterfly."""
    out = []
    for preset in ("k4v2", "k3v3"):
        for stages in range(1, default_stages(dim) + 2):
            out.append((f"rotor {preset.upper()}, {stages} stage{'s' * (stages > 1)}", dict(preset=preset, stages=stages)))
        for window in (16, 64):
            out.append((f"rotor {preset.upper()}, last {window} tokens exact", dict(preset=preset, residual_length=window)))
        for stages in (1, None):
            name = "1 stage" if stages else "butterfly"
            out.append((f"rotor {preset.upper()}, {name}, prompt calibration", dict(preset=preset, stages=stages, calibration="prefill")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder of a local transformers causal LM (default SmolLM2)")
    parser.add_argument("--windows", type=int, default=6, help="windows of 640 tokens (default 6)")
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
    for label, options in variants(dim):
        result = reference.run(label, lambda o=options: RotorQuantCache(model.config, tier="torch", **o), decoder.held_bytes)
        print(f"| {label} | {result.bytes_per_token_layer:.0f} | {result.dppl_pct:+.2f}% | {result.sem_pct:.2f}% "
              f"| {result.kl:.4f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
