"""Static instruction counts of the attention key loop and of quantize, compiled for an sm_90 GPU without one.

Run from the repository root on any machine with Triton's bundled ptxas (no GPU needed, and not
under ``TRITON_INTERPRET``):

    PYTHONPATH=. python benchmarks/sass_count.py            # bits 2, 3, 4

The tier's real launches for the GPU benchmark's settings are recorded instead of run, compiled
ahead of time for sm_90 with the same constexprs, and disassembled with Triton's nvdisasm:

- `rotorquant.kernels.attention.attention_split_kernel` (batch 8, 32 query heads, 8 KV heads,
  head_dim 128, float16 queries, K and V at the same bits). The key loop is the body between the
  loop label and its backward branch; one pass handles ``BLOCK_N`` keys x 128 coordinates of K and
  of V, so ``per code = loop instructions x threads / (2 x BLOCK_N x 128)`` is what each unpacked
  code costs in issued instructions.
- `rotorquant.kernels.quantize.quantize_kernel` (16384 float16 vectors, d = 128, 3 bits): the
  instructions up to the kernel's last ``EXIT`` (the out-of-line slow paths of division and square
  root are not counted), and ``per coordinate = instructions x threads / (BLOCK_N x 128)``; also its
  variant that writes into a paged cache at slots (the unchecked ``quantize_into``).

These are counts, not times: they say nothing about latency, memory stalls or occupancy.
`benchmarks/gpu_speed.py` measures time on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("sass_count.py: unset TRITON_INTERPRET (it compiles for a GPU, it runs nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.disasm import get_sass  # noqa: E402

import rotorquant as rq  # noqa: E402
from rotorquant.tiers import triton as tt  # noqa: E402

CONTEXT = 4096  # keys per sequence (the loop body does not depend on it)


class Launch(NamedTuple):
    """One recorded launch: what `compile_for_sm90` needs to build the variant the JIT would build."""

    sig: dict
    constexprs: dict
    attrs: dict
    options: dict


def _specialize(v, param) -> tuple[str, str]:
    """``(type, attribute)`` of a runtime argument as Triton's JIT specializes it: an int equal to 1 becomes
    the constant 1, ints and pointers divisible by 16 get ``"D"`` (a divisibility hint)."""
    if isinstance(v, float):
        return "fp32", ""
    return native_specialize_impl(
        BaseBackend, v, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
    )


class Recorder:
    """Stands in for a kernel: keeps the specialized signature and options of every launch instead of
    running it (``tests/test_triton_tier.py`` uses it to compile every kernel variant the tier launches)."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages=None, enable_fp_fusion=True, **kwargs):
            bound = {**dict(zip(self.fn.arg_names, args)), **kwargs}
            sig, constexprs, attrs = {}, {}, {}
            for i, p in enumerate(self.fn.params):
                v = bound[p.name]
                kind, attr = ("constexpr", v) if p.is_constexpr else _specialize(v, p)
                sig[p.name] = kind
                if kind == "constexpr":
                    constexprs[(i,)] = attr
                elif attr:
                    attrs[(i,)] = BaseBackend.parse_attr(attr)
            options = {"num_warps": num_warps, "enable_fp_fusion": enable_fp_fusion}
            options.update({"num_stages": num_stages} if num_stages else {})
            self.launches.append(Launch(sig, constexprs, attrs, options))

        return launch


def compile_for_sm90(fn, launch: Launch):
    """``fn`` compiled ahead of time for an sm_90 GPU with Triton's bundled ptxas."""
    source = ASTSource(fn=fn, signature=launch.sig, constexprs=launch.constexprs, attrs=launch.attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch.options)


def record_attention(bits: int) -> Launch:
    """The split kernel's launch for the benchmark's shapes
    (CPU tensors stand in for CUDA ones; nothing runs)."""
    params = rq.build_params(rq.QuantizerSpec(dim=128, bits=bits))
    spec = params.spec
    code = rq.Compressed(
        codes=torch.zeros(8, 8, CONTEXT, spec.code_bytes, dtype=torch.uint8),
        norms=torch.ones(8, 8, CONTEXT),
        spec=spec,
        dtype="float16",
    )
    q = torch.zeros(8, 32, 1, 128, dtype=torch.float16)
    lens = torch.full((8,), CONTEXT, dtype=torch.int32)
    query, split, combine = tt.attention_query_kernel, tt.attention_split_kernel, tt.attention_combine_kernel
    sms, recorder = tt._multiprocessors, Recorder(split)
    tt.attention_query_kernel, tt.attention_split_kernel = Recorder(query), recorder
    tt.attention_combine_kernel = Recorder(combine)
    tt._multiprocessors = lambda device: 132  # an H100/H200
    try:
        tt._attention_launch(q, code, code, params, params, scale=None, lens=lens)
    finally:
        tt.attention_query_kernel, tt.attention_split_kernel, tt.attention_combine_kernel = query, split, combine
        tt._multiprocessors = sms
    return recorder.launches[0]


def record_quantize(rotation: str, into: bool = False) -> Launch:
    """`quantize_kernel`'s launch for 16384 float16 vectors, d = 128, 3 bits; ``into``: the unchecked
    `quantize_into` of those vectors, as 2048 tokens x 8 KV heads, into a paged cache of 16-token blocks
    stored the vLLM way, ``(num_blocks, page, Hkv)``, read as ``(num_blocks, Hkv, page)``."""
    params = rq.build_params(rq.QuantizerSpec(dim=128, bits=3, rotation=rotation))
    kernel, check_device = tt.quantize_kernel, tt._check_device
    tt.quantize_kernel = recorder = Recorder(kernel)
    tt._check_device = lambda *args: None  # CPU tensors stand in for CUDA ones
    x = torch.zeros(16384, 128, dtype=torch.float16)
    try:
        if into:
            spec = params.spec
            pool = rq.Compressed(
                codes=torch.zeros(1024, 16, 8, spec.code_bytes, dtype=torch.uint8).transpose(1, 2),
                norms=torch.ones(1024, 16, 8).transpose(1, 2),
                spec=spec,
                dtype="float16",
            )
            slots = torch.arange(16384).reshape(2048, 8)
            tt.quantize_into(x.reshape(2048, 8, 128), params, pool, slots, validate=False)
        else:
            tt._quantize_rows(x, params)
    finally:
        tt.quantize_kernel, tt._check_device = kernel, check_device
    return recorder.launches[0]


def kernel_body(sass: str) -> list[str]:
    """Instructions up to the last ``EXIT`` (what follows are out-of-line subroutines)."""
    lines = [line for line in sass.splitlines() if ";" in line]
    last = max(i for i, line in enumerate(lines) if re.search(r"\bEXIT\b", line))
    return lines[: last + 1]


def loop_body(sass: str) -> list[str]:
    """Instructions between the label of the longest backward branch and that branch."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\w+:", line)}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA (\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > len(best):
            best = [x for x in lines[labels[m.group(1)] + 1 : i + 1] if ";" in x]
    return best


def opcode(line: str) -> str:
    text = line.split("\t")[-1]
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0].rstrip(";")


def _common(body: list[str]) -> str:
    """The five most frequent opcodes of ``body`` with their counts."""
    return ", ".join(f"{op} {n}" for op, n in collections.Counter(map(opcode, body)).most_common(5))


def _constexpr(launch: Launch, name: str):
    """The value of the launch's constexpr ``name``."""
    return launch.constexprs[(list(launch.sig).index(name),)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="2,3,4", help="comma-separated bit widths for attention (default 2,3,4)")
    args = parser.parse_args()
    print("Attention key loop (attention_split_kernel)\n")
    print("| bits | BLOCK_N | warps | loop instructions | per code (K and V) | most frequent |")
    print("|---:|---:|---:|---:|---:|---|")
    for bits in (int(b) for b in args.bits.split(",")):
        launch = record_attention(bits)
        body = loop_body(get_sass(compile_for_sm90(tt.attention_split_kernel, launch).asm["cubin"]))
        block_n, warps = _constexpr(launch, "BLOCK_N"), launch.options["num_warps"]
        per_code = len(body) * warps * 32 / (2 * block_n * 128)
        print(f"| {bits} | {block_n} | {warps} | {len(body)} | {per_code:.1f} | {_common(body)} |")
    print("\nQuantize (quantize_kernel), 3 bits\n")
    print("| rotation | vectors per program | warps | instructions | per coordinate | most frequent |")
    print("|---|---:|---:|---:|---:|---|")
    for rotation, into in (("rotor", False), ("dense", False), ("rotor", True)):
        launch = record_quantize(rotation, into)
        body = kernel_body(get_sass(compile_for_sm90(tt.quantize_kernel, launch).asm["cubin"]))
        block_n, warps = _constexpr(launch, "BLOCK_N"), launch.options["num_warps"]
        per_coord = len(body) * warps * 32 / (block_n * 128)
        name = f"{rotation}, into a paged cache" if into else rotation
        print(f"| {name} | {block_n} | {warps} | {len(body)} | {per_coord:.1f} | {_common(body)} |")


if __name__ == "__main__":
    main()
