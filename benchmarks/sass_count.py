"""Static instruction counts of the attention key loop and of quantize, compiled for an sm_90 GPU without one.

Run from the repository root on any machine with Triton's bundled ptxas (no GPU needed, and not
under ``TRITON_INTERPRET``):

    PYTHONPATH=. python benchmarks/sass_count.py            # bits 2, 3, 4; head dims 64, 128, 256; both packings

The tier's real launches for the GPU benchmark's settings are recorded instead of run, compiled
ahead of time for sm_90 with the same constexprs, and disassembled with Triton's nvdisasm:

- `rotorquant.kernels.attention.attention_split_kernel` (batch 8, 32 query heads, 8 KV heads,
  float16 queries, K and V at the same bits and packing, at each head dim d). The key loop is the loop over
  the key blocks every query row sees whole (`loop_body`); one pass handles ``BLOCK_N`` keys x
  d coordinates of K and of V, so ``per code = loop instructions x threads / (2 x BLOCK_N x d)`` is
  what each unpacked code costs in issued instructions.
- `rotorquant.kernels.quantize.quantize_kernel` (16384 float16 vectors, d = 128, 3 bits): the
  instructions up to the kernel's last ``EXIT`` (the out-of-line slow paths of division and square
  root are not counted), and ``per coordinate = instructions x threads / (BLOCK_N x 128)``, for every
  rotation; also its rotor variants that write into a paged cache at slots (the unchecked
  ``quantize_into``) and that write the interleaved packing.

These are counts, not times: they say nothing about latency, memory stalls or occupancy.
`benchmarks/gpu_speed.py` measures time on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("sass_count.py: unset TRITON_INTERPRET (it compiles for a GPU, it runs nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402
from triton.tools.disasm import get_sass  # noqa: E402

import rotorquant as rq  # noqa: E402
from rotorquant.spec import Rotation  # noqa: E402
from rotorquant.tiers.triton import launch as tl_launch  # noqa: E402

CONTEXT = 4096  # keys per sequence (the loop body does not depend on it)
SM90 = GPUTarget("cuda", 90, 32)
KERNELS = ("quantize_kernel", "dequantize_kernel", "scores_kernel", "attention_query_kernel",
           "attention_split_kernel", "attention_combine_kernel")  # fmt: skip


class Launch(NamedTuple):
    """One recorded launch: what `compile_for_sm90` needs to build the variant the JIT would build."""

    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


class Recorder:
    """Stands in for a kernel: keeps the specialized signature and options of every launch instead of
    running it, specialized by Triton's own binder for an sm_90 target, as its JIT would (ints equal to 1
    become constants, ints and pointers divisible by 16 get a divisibility hint, tuples element by
    element). ``tests/test_triton_tier.py`` uses it to compile every kernel variant the tier launches."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []
        self._backend = make_backend(SM90)
        self._binder = create_function_from_signature(fn.signature, fn.params, self._backend)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound, specialization, options = self._binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.fn._pack_args(
                self._backend, kwargs, bound, specialization, options
            )
            self.launches.append(Launch(self.fn, signature, constexprs, attrs, options.__dict__))

        return launch


@contextlib.contextmanager
def recording():
    """Inside the block every kernel of `rotorquant.tiers.triton.launch` is a `Recorder` (yielded by name):
    launches record what they would compile and nothing runs, so CPU tensors stand in for CUDA ones."""
    recorders = {name: Recorder(getattr(tl_launch, name)) for name in KERNELS}
    saved = {name: getattr(tl_launch, name) for name in KERNELS}
    try:
        for name, recorder in recorders.items():
            setattr(tl_launch, name, recorder)
        yield recorders
    finally:
        for name, kernel in saved.items():
            setattr(tl_launch, name, kernel)


def compile_for_sm90(launch: Launch):
    """The recorded variant compiled ahead of time for an sm_90 GPU with Triton's bundled ptxas."""
    source = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    return triton.compile(source, target=SM90, options=launch.options)


def record_attention(bits: int, dim: int = 128, packing: str = "contiguous") -> Launch:
    """The split kernel's launch for the GPU benchmark's shapes (batch 8, 32 query heads on 8 KV heads,
    float16 queries; CPU tensors stand in for CUDA ones, nothing runs) at head dim ``dim``, with K and V
    codes in ``packing``."""
    params = rq.build_params(rq.QuantizerSpec(dim=dim, bits=bits, packing=packing))
    spec = params.spec
    code = rq.Compressed(
        codes=torch.zeros(8, 8, CONTEXT, spec.code_bytes, dtype=torch.uint8),
        norms=torch.ones(8, 8, CONTEXT),
        spec=spec,
        dtype="float16",
    )
    q = torch.zeros(8, 32, 1, dim, dtype=torch.float16)
    lengths = torch.full((8,), CONTEXT, dtype=torch.int32)
    with recording() as kernels:  # planned for an H100/H200: 132 multiprocessors
        tl_launch.attention(q, code, code, params, params, scale=dim**-0.5, lengths=lengths,
                            config=tl_launch.LaunchConfig(multiprocessors=132))  # fmt: skip
    return kernels["attention_split_kernel"].launches[0]


def record_quantize(rotation: str, into: bool = False, packing: str = "contiguous") -> Launch:
    """`quantize_kernel`'s launch for 16384 float16 vectors, d = 128, 3 bits, codes in ``packing``; ``into``:
    the unchecked `quantize_into` of those vectors, as 2048 tokens x 8 KV heads, into a paged cache of
    16-token blocks stored the vLLM way, ``(num_blocks, page, Hkv)``, read as ``(num_blocks, Hkv, page)``."""
    params = rq.build_params(rq.QuantizerSpec(dim=128, bits=3, rotation=rotation, packing=packing))
    spec = params.spec
    x = torch.zeros(16384, 128, dtype=torch.float16)
    with recording() as kernels:
        if into:
            pool = rq.Compressed(
                codes=torch.zeros(1024, 16, 8, spec.code_bytes, dtype=torch.uint8).transpose(1, 2),
                norms=torch.ones(1024, 16, 8).transpose(1, 2),
                spec=spec,
                dtype="float16",
            )
            tl_launch.quantize(x, params, cap_norms=True, into=(pool, torch.arange(16384)))
        else:
            tl_launch.quantize(x, params)
    return kernels["quantize_kernel"].launches[0]


def kernel_body(sass: str) -> list[str]:
    """Instructions up to the last ``EXIT`` (what follows are out-of-line subroutines)."""
    lines = [line for line in sass.splitlines() if ";" in line]
    last = max(i for i, line in enumerate(lines) if re.search(r"\bEXIT\b", line))
    return lines[: last + 1]


def loop_body(sass: str) -> list[str]:
    """The key loop: of the loops (instructions between a backward branch's label and the branch) with the most
    tensor-core instructions, the shortest, which is the pass over key blocks that every query row sees whole
    (the masked pass after it runs only a split's last, partial block at decode)."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\w+:", line)}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA (\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append([x for x in lines[labels[m.group(1)] + 1 : i + 1] if ";" in x])
    mma = max(sum(opcode(x) in ("HMMA", "HGMMA") for x in body) for body in loops)
    return min((body for body in loops if sum(opcode(x) in ("HMMA", "HGMMA") for x in body) == mma), key=len)


def opcode(line: str) -> str:
    text = line.split("\t")[-1]
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0].rstrip(";")


def _common(body: list[str]) -> str:
    """The five most frequent opcodes of ``body`` with their counts."""
    return ", ".join(f"{op} {n}" for op, n in collections.Counter(map(opcode, body)).most_common(5))


def _constexpr(launch: Launch, name: str):
    """The value of the launch's constexpr ``name``."""
    return launch.constexprs[(list(launch.signature).index(name),)]


def attention_per_code(bits: int, dim: int, packing: str = "contiguous") -> tuple[float, Launch, list[str]]:
    """Instructions per cached code of the attention key loop: ``loop x threads / (2 x BLOCK_N x dim)``."""
    launch = record_attention(bits, dim, packing)
    body = loop_body(get_sass(compile_for_sm90(launch).asm["cubin"]))
    block_n, warps = _constexpr(launch, "BLOCK_N"), launch.options["num_warps"]
    return len(body) * warps * 32 / (2 * block_n * dim), launch, body


def quantize_per_coordinate(rotation: str, into: bool = False, packing: str = "contiguous") -> tuple:
    """``(per coordinate, launch, body)``: instructions per coordinate of the quantize kernel, ``instructions x
    threads / (BLOCK_N x 128)``."""
    launch = record_quantize(rotation, into, packing)
    body = kernel_body(get_sass(compile_for_sm90(launch).asm["cubin"]))
    block_n, warps = _constexpr(launch, "BLOCK_N"), launch.options["num_warps"]
    return len(body) * warps * 32 / (block_n * 128), launch, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="2,3,4", help="comma-separated bit widths for attention (default 2,3,4)")
    parser.add_argument("--dims", default="64,128,256", help="comma-separated head dims for attention")
    parser.add_argument("--packings", default="contiguous,interleaved", help="comma-separated code packings for attention")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, compiled for sm_90")
    for packing in args.packings.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            for bits in (int(b) for b in args.bits.split(",")):
                per_code, launch, body = attention_per_code(bits, dim, packing)
                print(f"sass: attention loop, bits={bits}, head_dim={dim}, packing={packing}: {per_code:.1f} "
                      f"instructions per code (BLOCK_N {_constexpr(launch, 'BLOCK_N')}, "
                      f"{launch.options['num_warps']} warps, {len(body)} loop instructions; {_common(body)})")  # fmt: skip
    quantized = [(r.value, False, "contiguous") for r in Rotation]
    quantized += [("rotor", True, "contiguous"), ("rotor", False, "interleaved")]
    for rotation, into, packing in quantized:
        per_coord, launch, body = quantize_per_coordinate(rotation, into, packing)
        name = "quantize into a paged cache" if into else "quantize"
        layout = ", packing=interleaved" if packing == "interleaved" else ""
        print(f"sass: {name}, bits=3, head_dim=128, rotation={rotation}{layout}: {per_coord:.1f} instructions per "
              f"coordinate ({_constexpr(launch, 'BLOCK_N')} vectors per program, {launch.options['num_warps']} "
              f"warps, {len(body)} instructions; {_common(body)})")  # fmt: skip


if __name__ == "__main__":
    main()
