"""CPU speed of the torch tier against x.clone() (the memory-traffic floor) and the NumPy tier.

    python benchmarks/cpu_speed.py                    # 65536 x 128 float32, 3 bits, torch's threads
    python benchmarks/cpu_speed.py --threads 1 2      # one table per intra-op thread count
    python benchmarks/cpu_speed.py --quick            # 8192 vectors, fewer repetitions

Prints, per thread count, the Markdown table of `rotorquant.bench.timing.speed_table_rows` (quantize and
dequantize: clone, torch rotor/dense, NumPy rotor/dense; medians of interleaved repetitions after
warm-up; every ratio from the same run), then the torch tier's rotor / dense ratios.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from rotorquant.bench.timing import speed_table_markdown, speed_table_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="vectors (default 65536; 8192 with --quick)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 7; 3 with --quick)")
    parser.add_argument("--threads", type=int, nargs="*", default=[None], help="torch intra-op threads, one table each")
    parser.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy reference tier")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# CPU speed: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, load average {load:.2f} at start\n")
    for threads in args.threads:
        rows = speed_table_rows(
            args.quick, n=args.n, dim=args.dim, bits=args.bits, repeat=args.repeat, threads=threads,
            numpy_tier=not args.no_numpy,
        )
        print(speed_table_markdown(rows) + "\n")


if __name__ == "__main__":
    main()
