"""Triton kernels behind `rotorquant.tiers.triton` (one concept per module).

- `bitstream`: ``@triton.jit`` helpers that read and write the packed code format of
  `rotorquant.format` (either packing) inside a kernel.
- `levels`: packed codes to the centroid levels and QJL signs they stand for (float16 levels of
  interleaved rows by byte-permute table lookups).
- `quantize`: fused norm -> rotation -> nearest centroid -> bit-pack (-> QJL sketch).
- `dequantize`: fused unpack -> centroids -> inverse rotation -> scale (+ QJL term).
- `scores`: ``q . x_hat`` straight from packed codes, in the rotated domain.
- `attention`: split-K decode attention over a compressed K/V cache.

Importing this package needs ``triton``; `rotorquant.tiers.triton` turns its absence into
an ``ImportError`` with the install hint.
"""
