"""Every tier present exposes the reference's public functions with the same parameters."""

import inspect

import pytest

from tiers import NUMPY, TIERS

PUBLIC = ("quantize", "quantize_into", "dequantize", "scores", "attention")


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("tier", [t for t in TIERS if t is not NUMPY], ids=lambda t: t.name)
@pytest.mark.parametrize("name", PUBLIC)
def test_same_parameters_as_the_reference(tier, name):
    assert _parameters(getattr(tier.module, name)) == _parameters(getattr(NUMPY.module, name))
