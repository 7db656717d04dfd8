import dataclasses
import doctest

import numpy as np
import pytest

import rotorquant as rq
import rotorquant.files
import rotorquant.quantizer
from rotorquant.tiers import numpy as ref


@pytest.mark.parametrize("module", [rq, rotorquant.quantizer, rotorquant.files])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_auto_tier_on_numpy_matches_reference():
    quantizer = rq.Quantizer(rq.QuantizerSpec(dim=10, bits=3))
    x = np.random.default_rng(0).standard_normal((4, 10))
    code = quantizer.quantize(x)
    np.testing.assert_array_equal(code.codes, ref.quantize(x, quantizer.params).codes)
    np.testing.assert_allclose(quantizer.scores(x[None], code)[0], x @ quantizer.dequantize(code).T)


def test_repr_and_bad_tier():
    quantizer = rq.Quantizer(rq.QuantizerSpec(dim=10, bits=3), tier="numpy")
    assert "rotation='rotor'" in repr(quantizer) and "tier='numpy'" in repr(quantizer)
    with pytest.raises(ValueError, match=r"tier: expected one of \['auto', 'numpy', 'torch', 'triton'\], got 'cuda'"):
        rq.Quantizer(rq.QuantizerSpec(dim=10, bits=3), tier="cuda")


def test_build_params_refuses_what_is_not_a_spec_with_its_own_message():
    for bad in ({"dim": 10, "bits": 3}, [10, 3], None):
        with pytest.raises(TypeError, match=f"build_params: expected spec to be a QuantizerSpec, got {type(bad).__name__}"):
            rq.build_params(bad)


@pytest.mark.parametrize(
    "spec",
    [
        rq.QuantizerSpec(dim=35, bits=3),
        rq.QuantizerSpec(dim=16, bits=2, rotation="dense", qjl=True),
        rq.QuantizerSpec(dim=16, bits=4, rotation="hadamard"),
    ],
    ids=["rotor", "dense-qjl", "hadamard"],
)
def test_unpickled_params_stay_read_only_and_equal(spec):
    import pickle

    params = rq.build_params(spec)
    params.matrix  # noqa: B018 - the cached whole-rotation matrix travels in the pickle too
    again = pickle.loads(pickle.dumps(params))
    arrays = {k: v for k, v in vars(again).items() if isinstance(v, np.ndarray)}
    assert {"centroids", "boundaries", "matrix"} <= set(arrays)
    for name, a in arrays.items():
        assert not a.flags.writeable, name
    with pytest.raises(ValueError, match="read-only"):
        again.centroids[0] = 0
    assert again is not params and again.same_as(params) and params.same_as(again)
    other = rq.build_params(dataclasses.replace(spec, seed=spec.seed + 1))
    assert not params.same_as(other) and not params.same_as(spec)
    changed = dataclasses.replace(params, centroids=params.centroids * 1.01)
    assert not params.same_as(changed)
