"""GPU speed table: fused Triton kernels vs the torch tier, and decode attention vs fp16 SDPA.

Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_speed.py

Every time is the median of per-call CUDA-event timings (after warm-up), in microseconds, and
every ratio divides two numbers measured in this same run. Quantize inputs are float16
``(n, 128)`` vectors, 3 bits. Columns:

- ``triton rotor kernel`` / ``triton dense kernel``: the fused quantize kernel alone
  (`rotorquant.tiers.triton._quantize_rows`: launch, no input checks);
- ``triton rotor API``: the public `quantize`, which adds one host synchronization to check
  that every norm is finite and fits the norm dtype;
- ``torch rotor`` / ``torch dense``: the torch tier's public `quantize` (dense = TurboQuant).

Attention: batch 8, 32 query heads, 8 KV heads, head_dim 128, one query token, K and V
compressed with 3-bit rotors, against `torch.nn.functional.scaled_dot_product_attention` on
float16 K/V. "MB read" counts the K/V payload each call must read.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import rotorquant as rq
from rotorquant.tiers import torch as torch_tier
from rotorquant.tiers import triton as triton_tier


def cuda_us(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median microseconds of ``fn()`` over ``reps`` calls, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def quantize_table(sizes: list[int], dim: int, bits: int) -> None:
    rotor = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor"))
    dense = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="dense"))
    print(f"\nquantize, d={dim}, {bits} bits, float16 input (median us, CUDA events)")
    head = ["n", "triton rotor kernel", "triton dense kernel", "triton rotor API", "torch rotor", "torch dense",
            "torch dense / triton rotor", "torch rotor / triton rotor", "triton dense / triton rotor"]  # fmt: skip
    print(" | ".join(head))
    for n in sizes:
        x = torch.randn(n, dim, device="cuda", dtype=torch.float16)
        t = {
            "tr": cuda_us(lambda: triton_tier._quantize_rows(x, rotor)),
            "td": cuda_us(lambda: triton_tier._quantize_rows(x, dense)),
            "api": cuda_us(lambda: triton_tier.quantize(x, rotor)),
            "qr": cuda_us(lambda: torch_tier.quantize(x, rotor), reps=20),
            "qd": cuda_us(lambda: torch_tier.quantize(x, dense), reps=20),
        }
        row = [f"{n}", *(f"{t[k]:.1f}" for k in ("tr", "td", "api", "qr", "qd"))]
        row += [f"{t['qd'] / t['tr']:.1f}x", f"{t['qr'] / t['tr']:.1f}x", f"{t['td'] / t['tr']:.1f}x"]
        print(" | ".join(row))


def _sdpa(q, k, v):
    """fp16 SDPA with grouped-query attention (``enable_gqa``), or K/V pre-expanded on older torch."""
    f = torch.nn.functional.scaled_dot_product_attention
    try:
        f(q, k, v, enable_gqa=True)
        return lambda: f(q, k, v, enable_gqa=True)
    except TypeError:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return lambda: f(q, k, v)


def attention_table(contexts: list[int], batch: int, q_heads: int, kv_heads: int, dim: int, bits: int) -> None:
    kp = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", seed=0))
    vp = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", seed=1))
    print(f"\ndecode attention, batch {batch}, {q_heads} q heads, {kv_heads} kv heads, head_dim {dim}, {bits}-bit K/V")
    print(" | ".join(["context", "triton compressed (us)", "MB read", "SDPA fp16 (us)", "MB read", "SDPA / triton",
                      "max |triton - SDPA(dequantized fp16)|"]))  # fmt: skip
    for n in contexts:
        k = torch.randn(batch, kv_heads, n, dim, device="cuda", dtype=torch.float16)
        v = torch.randn(batch, kv_heads, n, dim, device="cuda", dtype=torch.float16)
        q = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.float16)
        k_code, v_code = triton_tier.quantize(k, kp), triton_tier.quantize(v, vp)
        ours = cuda_us(lambda: triton_tier.attention(q, k_code, v_code, kp, vp))
        sdpa = _sdpa(q, k, v)
        base = cuda_us(sdpa)
        # same math on the dequantized cache, as a correctness spot check of the timed kernel
        check = _sdpa(q, triton_tier.dequantize(k_code, kp), triton_tier.dequantize(v_code, vp))()
        err = (triton_tier.attention(q, k_code, v_code, kp, vp).float() - check.float()).abs().max().item()
        ours_mb = (k_code.nbytes + v_code.nbytes) / 1e6
        base_mb = (k.numel() + v.numel()) * 2 / 1e6
        print(f"{n} | {ours:.1f} | {ours_mb:.1f} | {base:.1f} | {base_mb:.1f} | {base / ours:.2f}x | {err:.2e}")
        del k, v, k_code, v_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_speed.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    import triton

    print(f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    quantize_table(args.sizes, dim=128, bits=3)
    attention_table(args.contexts, batch=8, q_heads=32, kv_heads=8, dim=128, bits=3)


if __name__ == "__main__":
    main()
