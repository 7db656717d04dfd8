import doctest

import numpy as np
import pytest

import rotorquant as rq
import rotorquant.quantizer
from rotorquant.tiers import numpy as ref


@pytest.mark.parametrize("module", [rq, rotorquant.quantizer])
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
