"""Triton kernels behind `rotorquant.tiers.triton` (one concept per module).

- `bitpack`: ``@triton.jit`` helpers that read and write the packed code format of
  `rotorquant.format` inside a kernel.
- `quantize`: fused norm -> rotation -> nearest centroid -> bit-pack (-> QJL sketch).
- `dequantize`: fused unpack -> centroids -> inverse rotation -> scale (+ QJL term).
- `scores`: ``q . x_hat`` straight from packed codes, in the rotated domain.
- `attention`: split-K decode attention over a compressed K/V cache.

Importing this package needs ``triton``; `rotorquant.tiers.triton` turns its absence into
an ``ImportError`` with the install hint.
"""
