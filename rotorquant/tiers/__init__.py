"""The three implementations of one algorithm, with identical function signatures.

- `rotorquant.tiers.numpy`: the readable reference, rotating with the `clifford` package.
- `rotorquant.tiers.torch`: vectorized and batched, any device and dtype.
- `rotorquant.tiers.triton`: fused GPU kernels (also runs under ``TRITON_INTERPRET=1``).

Each exposes ``quantize(x, params)``, ``quantize_into(x, params, cache, slots)``,
``dequantize(code, params)``, ``scores(q, code, params)`` and
``attention(q, k_code, v_code, k_params, v_params, *, scale, lengths, causal, validate, block_table)``.
"""
