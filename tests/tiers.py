"""The tier registry: every implementation present on this machine, with adapters to NumPy.

- ``numpy``: the reference (clifford), always present.
- ``torch-cpu``: always present when torch imports; ``torch-cuda`` when ``torch.cuda.is_available()``.
- ``triton``: picked up automatically when ``rotorquant.tiers.triton`` imports and either CUDA is
  available (runs on ``cuda``) or ``TRITON_INTERPRET=1`` (runs under the interpreter on ``cpu``).
  Marked ``slow`` either way, so suites give it a smaller subset of cases: under the interpreter
  every case is slow, on a GPU every new kernel variant costs a compilation.

Every adapter turns test data (float64 NumPy) into the tier's input in a given dtype, and the
tier's outputs back into float64 NumPy, so one check compares any tier with the reference.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

import rotorquant as rq
from rotorquant.tiers import numpy as numpy_tier

try:
    import torch
except ImportError:  # pragma: no cover - the torch extra is part of the test environment
    torch = None

DTYPES = ("float16", "bfloat16", "float32", "float64")
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


@dataclass(frozen=True)
class Tier:
    """One implementation of the five functions, on one device.

    Attributes:
        name: pytest id, e.g. ``"torch-cpu"``.
        module: the tier module (``quantize``, ``quantize_into``, ``dequantize``, ``scores``, ``attention``).
        device: torch device string, or None for the NumPy tier.
        dtypes: input dtype names the tier accepts.
        slow: True for Triton (interpreted or compiled per variant): suites run a smaller subset of cases.
    """

    name: str
    module: ModuleType
    device: str | None
    dtypes: tuple[str, ...]
    slow: bool = False

    def array(self, x64: np.ndarray, dtype: str):
        """Test data ``x64`` as this tier's input in ``dtype`` (values rounded to ``dtype``)."""
        if self.device is None:
            return np.asarray(x64, dtype=dtype)
        return torch.tensor(x64, dtype=getattr(torch, dtype), device=self.device)

    def code(self, code: rq.Compressed, dtype: str | None = None) -> rq.Compressed:
        """A code of any tier with its payload moved into this tier (``dtype``: override ``code.dtype``)."""
        fields = ("codes", "norms", "qjl_signs", "residual_norms")
        moved = {f: self._payload(getattr(code, f)) for f in fields}
        return replace(code, dtype=dtype or code.dtype, **moved)

    def _payload(self, a):
        if a is None:
            return None
        a = to_numpy(a, keep_dtype=True)
        return a if self.device is None else torch.from_numpy(np.array(a)).to(self.device)


def to_numpy(a, keep_dtype: bool = False) -> np.ndarray:
    """A NumPy array or torch tensor as NumPy (float64 unless ``keep_dtype``)."""
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if not keep_dtype and a.dtype == torch.bfloat16:
            a = a.to(torch.float64)
        a = a.numpy()
    return np.asarray(a) if keep_dtype else np.asarray(a, dtype=np.float64)


def exact_float64(x) -> np.ndarray:
    """The exact values of a tier input (any dtype) as float64: the reference's input."""
    return to_numpy(x)


def code_to_numpy(code: rq.Compressed) -> rq.Compressed:
    """A code with its payload as NumPy arrays (dtypes kept), for byte-level comparisons."""
    return NUMPY.code(code)


NUMPY = Tier("numpy", numpy_tier, None, ("float16", "float32", "float64"))


def _triton_tier() -> Tier | None:
    cuda = torch is not None and torch.cuda.is_available()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if torch is None or not (cuda or interpreted):
        return None
    try:
        module = importlib.import_module("rotorquant.tiers.triton")
    except ImportError:
        return None
    return Tier("triton", module, "cuda" if cuda else "cpu", DTYPES, slow=True)


def _discover() -> list[Tier]:
    tiers = [NUMPY]
    if torch is not None:
        torch_tier = importlib.import_module("rotorquant.tiers.torch")
        tiers.append(Tier("torch-cpu", torch_tier, "cpu", DTYPES))
        if torch.cuda.is_available():
            tiers.append(Tier("torch-cuda", torch_tier, "cuda", DTYPES))
    triton = _triton_tier()
    if triton is not None:
        tiers.append(triton)
    return tiers


TIERS = _discover()
TORCH_TIERS = [t for t in TIERS if t.name.startswith("torch")]


def split_attention(q, k_code, v_code, kp, vp, *, scale, lengths, splits, causal=False, block_table=None,
                    int32_offsets=2**31 - 1, subsplits=None):  # fmt: skip
    """The Triton tier's checked attention with the number of key splits forced
    (`rotorquant.tiers.triton.launch.LaunchConfig.splits`; ``int32_offsets`` and ``subsplits``, its
    ``attention_subsplits``, as that config takes them)."""
    from rotorquant.engine import attention as engine_attention
    from rotorquant.tiers import triton as tt
    from rotorquant.tiers.triton import launch

    r = engine_attention.prepare(
        tt.TENSORS, q, k_code, v_code, kp, vp, scale=scale, lengths=lengths, causal=causal, validate=True,
        block_table=block_table,
    )  # fmt: skip
    return launch.attention(
        r.q, r.k_code, r.v_code, kp, vp, scale=r.scale, lengths=r.lengths, causal=r.causal, table=r.table,
        config=launch.LaunchConfig(splits=splits, int32_offsets=int32_offsets, attention_subsplits=subsplits),
    )  # fmt: skip
