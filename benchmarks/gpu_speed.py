"""GPU speed table: fused Triton kernels vs the torch tier, and decode attention vs fp16 SDPA.

Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_speed.py            # add --sweep to also time launch configurations

Every ratio divides two numbers measured in this same run, in microseconds. Two kinds of time:

- **GPU time** -- what the GPU spends, without Python's launch latency:
  ``graph``: the call (kernel launches only, no checks) is captured ``CALLS`` times in a
  ``torch.cuda.CUDAGraph``; the median over replays of (replay time between CUDA events) / ``CALLS``.
  ``busy``: the sum of the durations of every GPU kernel one call runs, from ``torch.profiler``
  (CUPTI), averaged over calls -- the only GPU time available for calls that synchronize the host
  (the torch tier checks its input on the host), so it is measured for both tiers alike.
- **API latency** -- the median wall time of one public call (``quantize``, ``attention``, SDPA)
  between CUDA events on an otherwise idle GPU: Python, input checks, launches, host syncs.
  ``unchecked``: the Triton call with ``validate=False`` (no host synchronization), as an inference
  engine's decode step would make it.

Quantize inputs are float16 ``(n, 128)`` vectors, 3 bits, the same tensor on every call (up to
about 16K rows it stays in the GPU's L2 cache between calls, as freshly computed keys would).
Attention: batch 8, 32 query heads, 8 KV heads, head_dim 128, one query token, K and V compressed
with the 3-bit rotor butterfly in the presets' packing (interleaved where the head dim allows it,
`rotorquant.presets.packing_for`), against `torch.nn.functional.scaled_dot_product_attention` on float16 K/V.
Append: a decode step's 8 tokens, and a 2048-token prefill chunk, of 8 KV heads written into a paged
pool, by `quantize_into` and by `quantize` plus indexed copies.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics

import torch
import triton

import rotorquant as rq
from rotorquant.format import PAYLOAD_FIELDS
from rotorquant.presets import packing_for
from rotorquant.tiers import torch as torch_tier
from rotorquant.tiers import triton as triton_tier
from rotorquant.tiers.triton import launch

CALLS = 20
DEVICE = "cuda"  # tests/test_triton_tier.py runs the tables on CPU tensors under the Triton interpreter


def graph_us(fn, reps: int = 15) -> float:
    """Median GPU microseconds per call of ``fn`` (launches only), replaying a CUDA graph of ``CALLS`` calls;
    NaN (with the reason printed) if ``fn`` cannot be captured."""
    try:
        return _graph_us(fn, reps)
    except Exception as err:
        print(f"  (CUDA graph timing failed: {type(err).__name__}: {str(err)[:160]})")
        torch.cuda.synchronize()
        return math.nan


def _graph_us(fn, reps: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, cached tables) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return statistics.median(times)


def busy_us(fn, reps: int = 10) -> float:
    """Mean summed duration (us) of the GPU kernels and copies one call of ``fn`` runs (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        total = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        if total <= 0:
            raise RuntimeError("no GPU activity recorded")
    except Exception as err:  # the profiler (CUPTI) is optional on a machine; say so, keep the table
        print(f"  (torch.profiler unavailable: {type(err).__name__}: {err})")
        return math.nan
    return total / reps


def api_us(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median microseconds of one call of ``fn`` between two CUDA events (includes Python and host syncs)."""
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


def _ratio(a: float, b: float, digits: int = 1) -> str:
    return f"{a / b:.{digits}f}x" if b > 0 and math.isfinite(a) and math.isfinite(b) else "n/a"


def _row(cells) -> str:
    return " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells)


def quantize_table(sizes: list[int], dim: int, bits: int) -> None:
    rotor = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor"))
    dense = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="dense"))
    print(f"\n## quantize, d={dim}, {bits} bits, float16 input (microseconds)")
    print("GPU time: triton = CUDA-graph replay of the fused kernel; busy = summed kernel time (profiler)")
    print("API latency: one public quantize() call on an idle GPU (Python, checks, launch, host sync)")
    print(_row(["n", "GPU triton rotor", "GPU triton dense", "busy triton rotor", "busy torch rotor",
                "busy torch dense", "busy torch dense / triton rotor", "API triton rotor",
                "API triton rotor unchecked", "API torch rotor", "API torch dense",
                "API torch dense / triton rotor"]))  # fmt: skip
    for n in sizes:
        x = torch.randn(n, dim, device=DEVICE, dtype=torch.float16)
        g_r = graph_us(lambda: launch.quantize(x, rotor))
        g_d = graph_us(lambda: launch.quantize(x, dense))
        b_r = busy_us(lambda: launch.quantize(x, rotor))
        b_tr = busy_us(lambda: torch_tier.quantize(x, rotor))
        b_td = busy_us(lambda: torch_tier.quantize(x, dense))
        a_r = api_us(lambda: triton_tier.quantize(x, rotor))
        a_ru = api_us(lambda: triton_tier.quantize(x, rotor, validate=False))
        a_tr = api_us(lambda: torch_tier.quantize(x, rotor))
        a_td = api_us(lambda: torch_tier.quantize(x, dense))
        print(_row([n, g_r, g_d, b_r, b_tr, b_td, _ratio(b_td, b_r), a_r, a_ru, a_tr, a_td, _ratio(a_td, a_r)]))


def quantize_sweep(n: int, dim: int, bits: int) -> None:
    """GPU time of the quantize kernel (the same for every rotation) for each (vectors per program, chunk,
    warps); the first is the default at d = 128, the fewest sm_90 instructions per coordinate."""
    rotor = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor"))
    x = torch.randn(n, dim, device=DEVICE, dtype=torch.float16)
    print(f"\n## sweep: quantize launch configurations, n={n}, d={dim}, {bits} bits (GPU us, graph)")
    print("BLOCK_N | BLOCK_C | num_warps | GPU us")
    for block_n, block_c, warps in ((64, 64, 4), (64, 128, 4), (64, 64, 8), (128, 64, 4), (128, 64, 8),
                                    (32, 64, 4), (32, 64, 8), (16, 64, 4)):  # fmt: skip
        config = launch.LaunchConfig(quantize_block_n=block_n, quantize_warps=warps, quantize_block_c=block_c)
        t = graph_us(functools.partial(launch.quantize, x, rotor, config=config), reps=7)
        print(f"{block_n} | {block_c} | {warps} | {t:.1f}")  # nan: the configuration failed (reason printed above)


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


def _cache(n: int, batch: int, q_heads: int, kv_heads: int, dim: int, kp, vp):
    k = torch.randn(batch, kv_heads, n, dim, device=DEVICE, dtype=torch.float16)
    v = torch.randn(batch, kv_heads, n, dim, device=DEVICE, dtype=torch.float16)
    q = torch.randn(batch, q_heads, 1, dim, device=DEVICE, dtype=torch.float16)
    return q, k, v, triton_tier.quantize(k, kp), triton_tier.quantize(v, vp)


def _paged(code: rq.Compressed, page: int, seed: int) -> tuple[rq.Compressed, torch.Tensor]:
    """``(pool, block_table)``: the cache ``(B, Hkv, N)`` cut into blocks of ``page`` keys, the blocks
    shuffled across a pool ``(B * N / page, Hkv, page)`` as an allocator would leave them, and the
    table that finds each sequence's blocks in it (so the paged cache holds the same keys)."""
    b, n = code.shape[0], code.shape[2]
    order = torch.randperm(b * (n // page), generator=torch.Generator().manual_seed(seed)).to(DEVICE)

    def pool(t):
        blocks = t.reshape(b, t.shape[1], n // page, page, *t.shape[3:]).transpose(1, 2)
        return blocks.reshape(b * (n // page), t.shape[1], page, *t.shape[3:])[order].contiguous()

    table = torch.argsort(order).reshape(b, n // page).to(torch.int32)  # logical block -> its pool slot
    moved = {f: pool(getattr(code, f)) for f in PAYLOAD_FIELDS if getattr(code, f) is not None}
    return dataclasses.replace(code, **moved), table


def attention_table(contexts: list[int], batch: int, q_heads: int, kv_heads: int, dim: int, bits: int) -> None:
    kp = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", seed=0, packing=packing_for(dim, bits)))
    vp = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", seed=1, packing=packing_for(dim, bits)))
    print(f"\n## decode attention, batch {batch}, {q_heads} q heads, {kv_heads} kv heads, head_dim {dim}, {bits}-bit K/V")
    print("GPU time: CUDA-graph replay (triton: its three kernels, query rotation, split, combine; SDPA: the fp16 kernel)")
    print("paged: the same cache as a shuffled pool of 16-key blocks read through a block table")
    print(_row(["context", "GPU triton compressed", "GPU triton paged", "GPU SDPA fp16", "SDPA / triton (GPU)", "API triton",
                "API triton unchecked", "API SDPA", "SDPA / triton (API)", "MB read triton", "MB read SDPA",
                "max |paged - contiguous|",
                "max |triton - SDPA(dequantized fp16)|"]))  # fmt: skip
    for n in contexts:
        q, k, v, k_code, v_code = _cache(n, batch, q_heads, kv_heads, dim, kp, vp)
        lens = torch.full((batch,), n, dtype=torch.int32, device=DEVICE)
        scale = dim**-0.5
        ours = graph_us(lambda: launch.attention(q, k_code, v_code, kp, vp, scale=scale, lengths=lens))
        paged, paged_err = math.nan, math.nan  # contexts not a multiple of the 16-key block are not paged
        if n % 16 == 0:
            (pool_k, table), (pool_v, _) = _paged(k_code, 16, seed=n), _paged(v_code, 16, seed=n)
            run = functools.partial(
                launch.attention, q, pool_k, pool_v, kp, vp, scale=scale, lengths=lens, table=table
            )
            paged = graph_us(run)
            paged_err = (run().float() - triton_tier.attention(q, k_code, v_code, kp, vp).float()).abs().max().item()
            del pool_k, pool_v, run
        sdpa = _sdpa(q, k, v)
        base = graph_us(sdpa)
        ours_api = api_us(lambda: triton_tier.attention(q, k_code, v_code, kp, vp))
        unchecked_api = api_us(lambda: triton_tier.attention(q, k_code, v_code, kp, vp, lengths=lens, validate=False))
        base_api = api_us(sdpa)
        # same math on the dequantized cache, as a correctness spot check of the timed kernels
        check = _sdpa(q, triton_tier.dequantize(k_code, kp), triton_tier.dequantize(v_code, vp))()
        err = (triton_tier.attention(q, k_code, v_code, kp, vp).float() - check.float()).abs().max().item()
        ours_mb = (k_code.nbytes + v_code.nbytes) / 1e6
        base_mb = (k.numel() + v.numel()) * 2 / 1e6
        print(_row([n, ours, paged, base, _ratio(base, ours, 2), ours_api, unchecked_api, base_api,
                    _ratio(base_api, ours_api, 2), ours_mb, base_mb, f"{paged_err:.2e}", f"{err:.2e}"]))  # fmt: skip
        del q, k, v, k_code, v_code


def append_table(steps: list[int], kv_heads: int, dim: int, bits: int, page: int = 16) -> None:
    """Appending ``tokens`` new keys (``(tokens, kv_heads, dim)`` float16) into a paged pool of ``page``-token
    blocks stored the vLLM way: `quantize_into` (one fused kernel) against `quantize` followed by one
    indexed copy per field, both unchecked, into pools of the same blocks."""
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", packing=packing_for(dim, bits)))
    print(f"\n## append to a paged cache, {kv_heads} kv heads, head_dim {dim}, {bits} bits, {page}-token blocks (microseconds)")
    print("GPU time: CUDA-graph replay; API latency: one call (or quantize + copies) on an idle GPU")
    print(_row(["tokens", "GPU quantize + copy", "GPU quantize_into", "copy / into (GPU)", "API quantize + copy",
                "API quantize_into unchecked", "API quantize_into checked", "copy / into (API)",
                "pools equal"]))  # fmt: skip
    for tokens in steps:
        blocks = 2 * triton.cdiv(tokens, page)
        x = torch.randn(tokens, kv_heads, dim, device=DEVICE, dtype=torch.float16)
        stored = triton_tier.quantize(torch.zeros(blocks, page, kv_heads, dim, device=DEVICE, dtype=torch.float16), params)
        pools = [dataclasses.replace(stored, **{f: getattr(stored, f).clone().transpose(1, 2) for f in PAYLOAD_FIELDS
                                               if getattr(stored, f) is not None}) for _ in range(2)]  # fmt: skip
        where = torch.randperm(blocks * page, generator=torch.Generator().manual_seed(tokens))[:tokens].to(DEVICE)
        block, slot = where // page, where % page
        slots = (block[:, None] * kv_heads + torch.arange(kv_heads, device=DEVICE)) * page + slot[:, None]

        def copy(pool=pools[0]):
            code = triton_tier.quantize(x, params, validate=False)
            for f in PAYLOAD_FIELDS:
                if getattr(code, f) is not None:
                    getattr(pool, f)[block, :, slot] = getattr(code, f)

        def into(pool=pools[1], validate=False):
            triton_tier.quantize_into(x, params, pool, slots, validate=validate)

        g_copy, g_into = graph_us(copy), graph_us(into)
        a_copy, a_into, a_checked = api_us(copy), api_us(into), api_us(lambda: into(validate=True))
        same = all(torch.equal(getattr(pools[0], f), getattr(pools[1], f)) for f in PAYLOAD_FIELDS if getattr(stored, f) is not None)
        print(_row([tokens, g_copy, g_into, _ratio(g_copy, g_into), a_copy, a_into, a_checked, _ratio(a_copy, a_into), same]))


def attention_sweep(n: int, batch: int, q_heads: int, kv_heads: int, dim: int, bits: int) -> None:
    """GPU time of compressed decode attention for each launch configuration of the split kernel."""
    kp = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", seed=0, packing=packing_for(dim, bits)))
    vp = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, rotation="rotor", seed=1, packing=packing_for(dim, bits)))
    q, k, v, k_code, v_code = _cache(n, batch, q_heads, kv_heads, dim, kp, vp)
    del k, v
    lens = torch.full((batch,), n, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    print(f"\n## sweep: attention launch configurations, context {n} (GPU us, graph)")
    print("sub-splits | keys per step of a sub-split | num_warps | num_stages | programs/SM | GPU us")
    # the first is the default at this shape (4 query rows per KV head: four sub-splits), the second the default
    # without sub-splits
    configs = [(4, 64, 4, 2, 4), (1, 128, 8, 2, 4), (4, 64, 4, 1, 4), (4, 64, 4, 3, 4), (4, 64, 4, 2, 8),
               (4, 32, 4, 2, 8), (4, 128, 8, 2, 4), (2, 64, 4, 2, 4), (1, 64, 8, 2, 8)]  # fmt: skip
    for subsplits, block_n, warps, stages, per_sm in configs:
        config = launch.LaunchConfig(attention_subsplits=subsplits, attention_block_n=block_n, attention_warps=warps,
                                     attention_stages=stages, programs_per_sm=per_sm)  # fmt: skip
        t = graph_us(
            lambda: launch.attention(q, k_code, v_code, kp, vp, scale=scale, lengths=lens, config=config),
            reps=7,
        )
        print(f"{subsplits} | {block_n} | {warps} | {stages} | {per_sm} | {t:.1f}")  # nan: failed (reason printed above)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 65536])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 2048], help="tokens appended per call")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations (BLOCK_N, warps, ...)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_speed.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    quantize_table(args.sizes, dim=128, bits=3)
    attention_table(args.contexts, batch=8, q_heads=32, kv_heads=8, dim=128, bits=3)
    append_table(args.steps, kv_heads=8, dim=128, bits=3)
    if args.sweep:
        quantize_sweep(16384, dim=128, bits=3)
        attention_sweep(max(args.contexts), batch=8, q_heads=32, kv_heads=8, dim=128, bits=3)


if __name__ == "__main__":
    main()
