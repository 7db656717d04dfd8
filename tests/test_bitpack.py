import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rotorquant.format import pack_codes, packed_length, unpack_codes


def test_layout_example():
    # codes 1, 2, 3 at 3 bits: stream bits 0-2 = 1, 3-5 = 2, 6-8 = 3 (low bit first)
    packed = pack_codes(np.array([1, 2, 3]), 3)
    assert packed.tolist() == [1 | 2 << 3 | (3 & 0b11) << 6, 3 >> 2]


def test_one_bit_is_little_endian_bit_order():
    assert pack_codes(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 8),
    dim=st.sampled_from([2, 3, 5, 67, 127, 128, 130]) | st.integers(1, 300),
    lead=st.lists(st.integers(0, 4), max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(bits, dim, lead, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(*lead, dim), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (*lead, packed_length(dim, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, dim), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unused_high_bits_are_zero(bits):
    dim = 5
    packed = pack_codes(np.full(dim, 2**bits - 1), bits)
    used = dim * bits
    assert int.from_bytes(packed.tobytes(), "little") == (1 << used) - 1
