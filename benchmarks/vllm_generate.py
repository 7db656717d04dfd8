"""End-to-end generation in vLLM: RotorQuant KV-cache dtypes against ``auto`` and vLLM's TurboQuant.

    python benchmarks/vllm_generate.py --model Qwen/Qwen3-4B
    python benchmarks/vllm_generate.py --model /path/to/model --dtypes rotorquant_k4v2 rotorquant_k3v3 --max-tokens 256

Each KV-cache dtype runs in its own process (a fresh ``vllm.LLM``, so GPU memory is released between
them) with the same prompts, greedy decoding and ``gpu_memory_utilization``. Printed per dtype:
generated tokens per second over the whole ``generate`` call (prefill included), the KV cache vLLM
allocated (blocks, and capacity in tokens as vLLM counts it across KV-cache groups), both as ratios
to ``auto`` measured in the same run, how many prompts' outputs equal ``auto``'s, and the first
prompt's generated text. rotorquant dtypes run through the ``ROTORQUANT`` backend, with the first and
last two layers at the model's precision (``rotorquant.integrations.vllm``).

Needs vLLM >= 0.33 with its CUDA dependencies and a CUDA GPU; without them it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time

PROMPTS = [
    "Explain why the sky is blue in three sentences.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "A train leaves at 3:40 pm and arrives at 6:15 pm. How long is the trip? Show the steps.",
    "List five prime numbers greater than 100 and say how you checked them.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
    "What is the derivative of x^3 * sin(x)? Explain each rule you use.",
    "Translate 'The library opens at nine and closes at five' into French and German.",
    "Give three arguments for and three against remote work.",
]
DEFAULT_DTYPES = ["auto", "turboquant_k3v4_nc", "rotorquant_k4v2", "rotorquant_k4v4", "rotorquant_k3v3"]


def missing_requirement() -> str | None:
    """Why this benchmark cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    try:
        importlib.import_module("vllm")
    except ImportError:
        return "vLLM is not installed (pip install 'vllm>=0.33' with its CUDA dependencies)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def run_one(args) -> dict:
    """Generate with one KV-cache dtype in this process; returns the measurements."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model, kv_cache_dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=0,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = PROMPTS * args.repeat
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up: compilation, graphs
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "dtype": args.dtype,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "seconds": elapsed,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_cache_size_tokens": cache.kv_cache_size_tokens,
        "skip_layers": list(cache.kv_cache_dtype_skip_layers),
        "texts": [o.outputs[0].text for o in outputs[: len(PROMPTS)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen3-4B")
    parser.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the prompt set in the timed batch")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--dtype", help=argparse.SUPPRESS)  # one dtype, in a child process
    args = parser.parse_args()

    if args.dtype is not None:
        print(json.dumps(run_one(args)))
        return
    reason = missing_requirement()
    if reason is not None:
        print(f"vllm_generate: skipped: {reason}")
        return

    results = {}
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--dtype", dtype]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{dtype}: failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            continue
        results[dtype] = json.loads(done.stdout.strip().splitlines()[-1])

    base = results.get("auto")
    print(f"model {args.model}, {len(PROMPTS) * args.repeat} prompts x {args.max_tokens} tokens, greedy")
    print(f"{'dtype':<22}{'tok/s':>9}{'x auto':>8}{'KV blocks':>11}{'KV tokens':>11}{'x auto':>8}{'same text':>11}")
    for dtype, r in results.items():
        rate = r["tokens"] / r["seconds"]
        speed = f"{rate / (base['tokens'] / base['seconds']):.2f}" if base else "-"
        capacity = f"{r['kv_cache_size_tokens'] / base['kv_cache_size_tokens']:.2f}" if base else "-"
        same = f"{sum(a == b for a, b in zip(r['texts'], base['texts']))}/{len(r['texts'])}" if base else "-"
        blocks, tokens = r["num_gpu_blocks"], r["kv_cache_size_tokens"]
        print(f"{dtype:<22}{rate:>9.1f}{speed:>8}{blocks:>11}{tokens:>11}{capacity:>8}{same:>11}")
    for dtype, r in results.items():
        print(f"\n--- {dtype} (native layers: {r['skip_layers'] or 'none'}) ---\n{r['texts'][0]}")


if __name__ == "__main__":
    main()
