"""Shared fixtures. ``tier``: every implementation present on this machine (see ``tests/tiers.py``)."""

import pytest

from tiers import TIERS


@pytest.fixture(params=TIERS, ids=lambda t: t.name)
def tier(request):
    """One `tiers.Tier`: numpy, torch-cpu, torch-cuda (with a GPU), triton (when it can run)."""
    return request.param
