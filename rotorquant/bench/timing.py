"""Wall-clock timing for benchmarks: a median after warm-up, and the CPU speed table of the tiers.

The speed table times, in one run and on one machine, ``quantize`` and ``dequantize`` of
``n x dim`` float32 vectors with the torch tier (rotor and dense) and the NumPy reference,
against ``x.clone()`` of the same tensor: reading and writing every byte once, the
memory-traffic floor. Every time is reported with its ratio to that clone, so tables from
different machines compare by ratio; the rotor/dense ratios of the torch tier follow the table.

Used by ``benchmarks/cpu_speed.py`` and by ``rotorquant bench`` (its speed section).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

def interleaved_seconds(fns: list[tuple[Callable[[], object], int]], *, warmup: int = 1) -> list[list[float]]:
    """Wall times of several ``(fn, repeat)``, after ``warmup`` untimed calls of each, measured in
    rounds: round ``r`` times each ``fn`` with ``repeat > r`` once, so a slow spell of a shared
    machine hits all of them alike. Returns each ``fn``'s list of times (take the median)."""
    for fn, _ in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(max(reps for _, reps in fns)):
        for (fn, reps), out in zip(fns, times):
            if r < reps:
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return times


def speed_table_rows(
    quick: bool = False,
    *,
    n: int | None = None,
    dim: int = 128,
    bits: int = 3,
    repeat: int | None = None,
    threads: int | None = None,
    numpy_tier: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Rows ``{op, impl, ms, vs_clone, n, dim, bits, threads, repeat}`` of the CPU speed table.

    ``n`` defaults to 65536 vectors (8192 with ``quick``); ``repeat`` (median of) to 7 (3 with
    ``quick``) for torch and the clone, 3 (1) for the much slower NumPy tier; ``threads`` sets
    torch's intra-op threads for the run (default: torch's current setting).
    """
    import torch

    from rotorquant import QuantizerSpec, build_params
    from rotorquant.tiers import numpy as ref
    from rotorquant.tiers import torch as tt

    n = n or (8192 if quick else 65536)
    repeat = repeat or (3 if quick else 7)
    numpy_repeat = 1 if quick else 3
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        x_np = x.numpy()
        params = {r: build_params(QuantizerSpec(dim=dim, bits=bits, rotation=r)) for r in ("rotor", "dense")}
        torch_codes = {r: tt.quantize(x, p) for r, p in params.items()}
        numpy_codes = {r: ref.quantize(x_np, p) for r, p in params.items()} if numpy_tier else {}
        timed = [("quantize", "x.clone() (floor)", x.clone, repeat)]
        for r, p in params.items():
            timed.append(("quantize", f"torch {r}", lambda p=p: tt.quantize(x, p), repeat))
        for r, p in params.items() if numpy_tier else ():
            timed.append(("quantize", f"numpy {r}", lambda p=p: ref.quantize(x_np, p), numpy_repeat))
        timed.append(("dequantize", "x.clone() (floor)", x.clone, repeat))
        for r, p in params.items():
            timed.append(("dequantize", f"torch {r}", lambda p=p, c=torch_codes[r]: tt.dequantize(c, p), repeat))
        for r, p in params.items() if numpy_tier else ():
            timed.append(("dequantize", f"numpy {r}", lambda p=p, c=numpy_codes[r]: ref.dequantize(c, p), numpy_repeat))
        times = interleaved_seconds([(fn, reps) for _, _, fn, reps in timed])
        common = dict(n=n, dim=dim, bits=bits, threads=torch.get_num_threads())
        rows = []
        clones = {op: t for (op, impl, _, _), t in zip(timed, times) if impl.startswith("x.clone")}
        for (op, impl, _, reps), t in zip(timed, times):
            clone = clones[op]
            ratio = statistics.median(a / b for a, b in zip(t, clone))  # same-round ratios
            rows.append(dict(op=op, impl=impl, ms=1e3 * statistics.median(t), vs_clone=ratio, repeat=reps, **common))
        return rows
    finally:
        torch.set_num_threads(previous)


def _row(rows: list[dict], op: str, impl: str) -> dict | None:
    return next((r for r in rows if r["op"] == op and r["impl"] == impl), None)


def ratio_lines(rows: list[dict]) -> list[str]:
    """Rotor against dense in the torch tier, per op, from the medians in ``rows``."""
    lines = []
    for op in ("quantize", "dequantize"):
        rotor, dense = _row(rows, op, "torch rotor"), _row(rows, op, "torch dense")
        if rotor and dense:
            lines.append(f"torch {op}: rotor / dense = {rotor['ms'] / dense['ms']:.2f}")
    return lines


def speed_table_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (one line per op and implementation), then `ratio_lines`."""
    if not rows:
        return "_no speed rows measured_"
    head = rows[0]
    lines = [
        f"{head['n']} x {head['dim']} float32 vectors, {head['bits']} bits, torch threads {head['threads']}, "
        f"{os.cpu_count()} CPUs; medians of interleaved repetitions after warm-up, ratios taken round by round",
        "",
        "| op | implementation | ms | x clone |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['impl']} | {r['ms']:.1f} | {r['vs_clone']:.2f} |")
    lines.append("")
    lines.extend(f"- {line}" for line in ratio_lines(rows))
    return "\n".join(lines)
