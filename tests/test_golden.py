"""Golden digests: `build_params` and the codes of fixed inputs are the same bytes on every machine.

Stored in ``tests/golden/digests.json``: per spec, the SHA-256 of every array `build_params` returns and
of the packed codes and norms the NumPy reference makes of fixed inputs. What is pinned, and why:

- codebooks: levels rounded to float32 values (`rotorquant.math.codebook.lloyd_max`), immune to the last
  bits that math libraries differ in;
- rotor butterflies and Hadamard signs: uniform doubles, integers and correctly rounded arithmetic only
  (`rotorquant.math.rotations`);
- codes of fixed inputs: the inputs are uniform doubles (no libm), and the test checks every rotated
  coordinate lies at least `MARGIN` from a decision boundary, far beyond any rounding difference of the
  float64 arithmetic between machines, so no code can flip.

Not pinned: dense rotations and QJL projections. numpy's Gaussian sampler calls ``exp``/``log`` of the C
math library in its rare tails, and the dense rotation's QR runs in LAPACK, whose blocking and SIMD depend
on the build; for those specs only the codebook is pinned. To regenerate after an intended change:
``python tests/test_golden.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import rotorquant as rq
from rotorquant.tiers import numpy as ref

GOLDEN = Path(__file__).parent / "golden" / "digests.json"
MARGIN = 1e-9
SPECS = {
    "rotor-d64-b3": dict(dim=64, bits=3),
    "rotor-d67-b2-fp16norms": dict(dim=67, bits=2, norm_dtype="float16"),
    "rotor-d128-b4-stages1": dict(dim=128, bits=4, stages=1),
    "rotor-d32-b3-seed7": dict(dim=32, bits=3, seed=7),
    "hadamard-d64-b3": dict(dim=64, bits=3, rotation="hadamard"),
    "hadamard-d80-b4": dict(dim=80, bits=4, rotation="hadamard"),
    "dense-d64-b3": dict(dim=64, bits=3, rotation="dense"),
}
PINNED_FIELDS = ("centroids", "boundaries", "rotors", "blocks", "permutations", "signs")


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _inputs(dim: int) -> np.ndarray:
    """``(16, dim)`` fixed inputs: uniform doubles of a fixed generator (integer bits, no libm)."""
    return np.random.Generator(np.random.PCG64(2026)).random((16, dim)) - 0.5


def digests(name: str) -> dict:
    spec = rq.QuantizerSpec(**SPECS[name])
    params = rq.build_params(spec)
    out = {f: _sha(getattr(params, f)) for f in PINNED_FIELDS if getattr(params, f) is not None}
    if spec.rotation.value != "dense":
        x = _inputs(spec.dim)
        code = ref.quantize(x, params)
        out["codes"] = _sha(code.codes, code.norms)
    return out


def test_inputs_keep_clear_of_decision_boundaries():
    """No rotated coordinate of the fixed inputs lies within MARGIN of a boundary, so rounding differences
    between machines (about 1e-16 here) cannot flip a code."""
    for name, kw in SPECS.items():
        params = rq.build_params(rq.QuantizerSpec(**kw))
        x = _inputs(params.spec.dim)
        y = ref.rotate(x / np.linalg.norm(x, axis=-1, keepdims=True), params)
        gap = np.abs(y[..., None] - params.boundaries).min()
        assert gap > MARGIN, f"{name}: a coordinate lies {gap:.3g} from a boundary"


def test_build_params_and_codes_match_the_golden_digests():
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(SPECS), "tests/golden/digests.json: regenerate with python tests/test_golden.py --write"
    for name in SPECS:
        assert digests(name) == golden[name], f"{name}: build_params or the codes changed"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({name: digests(name) for name in SPECS}, indent=1, sort_keys=True) + "\n")
