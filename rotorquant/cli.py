"""The ``rotorquant`` command. ``rotorquant bench`` is the project's main job."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import QuantizerSpec, build_params
from .tiers import numpy as ref


def isotropic_mse_table(dim: int = 128, n: int = 4000, seed: int = 0) -> str:
    """Markdown table: measured MSE of unit vectors, rotor vs dense, next to the Lloyd-Max distortion."""
    # The data stream must differ from build_params' stream for the same seed: a dense rotation
    # built from the very Gaussian draws it is tested on is not independent of them.
    x = np.random.default_rng([seed, 2026]).standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    lines = [f"| bits | rotor MSE | dense MSE | Lloyd-Max d*D (d={dim}) |", "|---:|---:|---:|---:|"]
    for bits in range(1, 5):
        row = []
        for rotation in ("rotor", "dense"):
            params = build_params(QuantizerSpec(dim=dim, bits=bits, rotation=rotation))
            x_hat = ref.dequantize(ref.quantize(x, params), params)
            row.append(float(np.mean(np.sum((x - x_hat) ** 2, axis=-1))))
        lines.append(f"| {bits} | {row[0]:.4f} | {row[1]:.4f} | {dim * params.distortion:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rotorquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="print the benchmark tables as Markdown")
    args = parser.parse_args(argv)
    if args.command == "bench":
        print(isotropic_mse_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
