"""Smoke tests of the CPU-side scripts of `benchmarks/`: each runs on tiny settings and prints what it
promises; the vLLM generation script says why it cannot run without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cpu_speed_prints_one_table_per_thread_count():
    done = _run("benchmarks/cpu_speed.py", "--quick", "--n", "512", "--repeat", "1", "--no-numpy", "--threads", "1", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| quantize | torch rotor |") == 2 and done.stdout.count("rotor / dense") == 4


def test_decoder_sweeps_cover_stages_windows_calibration_and_boundary_layers():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import decoder_sweeps
    finally:
        sys.path.pop(0)
    variants = dict(decoder_sweeps.variants(64))
    assert len(variants) == 2 * (5 + 2 + 2 + 1)  # per preset: 1..5 stages at d = 64, 2 windows, 2 calibrations, boundary
    assert "rotor K4V2, 4 stages" in variants and "rotor K3V3, last 16 tokens exact" in variants
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    cache = decoder_sweeps.make_cache(config, variants["rotor K4V2, first and last 2 layers exact"])
    k, v = torch.randn(2, 1, 5, 32), torch.randn(2, 1, 5, 32)
    for layer in range(6):
        cache.update(k, v, layer)
    exact = [i for i, layer in enumerate(cache.layers) if type(layer).__name__ == "DynamicLayer"]
    compressed = 2 * 5 * (cache.plans[2].key_spec.bytes_per_vector + cache.plans[2].value_spec.bytes_per_vector)
    assert exact == [0, 1, 4, 5] and decoder_sweeps.held_bytes(cache) == 4 * 2 * k.numel() * 4 + 2 * compressed


def test_vllm_generation_says_why_it_cannot_run_here():
    done = _run("benchmarks/vllm_generate.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"skipped: (no CUDA GPU|vLLM)", done.stdout + done.stderr), done.stdout + done.stderr
