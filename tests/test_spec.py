import pytest

import rotorquant as rq


def test_defaults_and_sizes():
    spec = rq.QuantizerSpec(dim=128, bits=3)
    assert spec.rotation is rq.Rotation.ROTOR and spec.rotation == "rotor"
    assert spec.qjl_dim == 128 and spec.mse_bits == 3
    assert (spec.code_bytes, spec.norm_bytes, spec.bytes_per_vector) == (48, 4, 52)
    fp16_norms = rq.QuantizerSpec(dim=128, bits=3, norm_dtype="float16")
    assert 2 * 128 / fp16_norms.bytes_per_vector == pytest.approx(5.12)


def test_qjl_sizes():
    spec = rq.QuantizerSpec(dim=130, bits=4, qjl=True, qjl_dim=67)
    assert spec.mse_bits == 3
    assert spec.code_bytes == 49  # ceil(130 * 3 / 8)
    assert spec.sign_bytes == 9  # ceil(67 / 8)
    assert spec.bytes_per_vector == 49 + 4 + 9 + 4


def test_spec_is_hashable_and_normalizes_strings():
    a = rq.QuantizerSpec(dim=8, bits=2, rotation="dense", norm_dtype="float16")
    b = rq.QuantizerSpec(dim=8, bits=2, rotation=rq.Rotation.DENSE, norm_dtype=rq.NormDtype.FLOAT16)
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        (dict(dim=1, bits=3), "dim", "1"),
        (dict(dim=2.0, bits=3), "dim", "2.0"),
        (dict(dim=True, bits=3), "dim", "True"),
        (dict(dim=8, bits=0), "bits", "0"),
        (dict(dim=8, bits=9), "bits", "9"),
        (dict(dim=8, bits=3, rotation="givens"), "rotation", "'givens'"),
        (dict(dim=8, bits=1, qjl=True), "bits", "1"),
        (dict(dim=8, bits=3, qjl=1), "qjl", "1"),
        (dict(dim=8, bits=3, qjl=True, qjl_dim=0), "qjl_dim", "0"),
        (dict(dim=8, bits=3, seed=-1), "seed", "-1"),
        (dict(dim=8, bits=3, norm_dtype="bfloat16"), "norm_dtype", "'bfloat16'"),
        (dict(dim=8, bits=3, qjl=True, norm_correction=True), "norm_correction", "True"),
    ],
)
def test_invalid_values_name_the_field_range_and_value(kwargs, field, shown):
    with pytest.raises(ValueError) as info:
        rq.QuantizerSpec(**kwargs)
    message = str(info.value)
    assert f"QuantizerSpec.{field}" in message and "expected" in message and shown in message


@pytest.mark.parametrize("kv_heads", [0, -2, 1.5, True, "3"])
def test_preset_bytes_per_token_refuses_bad_kv_heads(kv_heads):
    with pytest.raises(ValueError, match=rf"kv_heads: expected an int >= 1, got {kv_heads!r}"):
        rq.preset("k4v2").bytes_per_token(64, kv_heads)


def test_preset_bytes_per_token_counts_keys_and_values_of_every_head():
    key, value = rq.preset("k4v2").specs(64)
    assert rq.preset("k4v2").bytes_per_token(64, 3) == 3 * (key.bytes_per_vector + value.bytes_per_vector) == 168


@pytest.mark.parametrize("name, error", [(4, TypeError), (None, TypeError), ("k9v9", ValueError)])
def test_preset_names_the_argument(name, error):
    with pytest.raises(error, match="preset: expected"):
        rq.preset(name)


def test_preset_specs_with_a_non_int_dim_fail_in_the_spec():
    with pytest.raises(ValueError, match="QuantizerSpec.dim"):
        rq.preset("k4v2").specs(64.0)
