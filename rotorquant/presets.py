"""Named K/V presets: the bits of keys and values and the rotation, as caches and engines take them.

A preset names one quantizer for keys and one for values of a given head dimension; `Preset.specs`
builds their `rotorquant.QuantizerSpec` s (keys with ``seed``, values with ``seed + 1``, so the two never
share a rotation). Keys get at least as many bits as values: at equal bytes that measured better on a
real decoder (``docs/benchmarks/decoder.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import INTERLEAVED_BITS, INTERLEAVED_CHUNK, Packing, QuantizerSpec, Rotation


@dataclass(frozen=True)
class Preset:
    """A named pair of K/V quantizers.

    Attributes:
        name: ``"k{key_bits}v{value_bits}"``.
        key_bits, value_bits: bits per coordinate of keys and of values.
        rotation: the rotation of both (see `rotorquant.Rotation`).
    """

    name: str
    key_bits: int
    value_bits: int
    rotation: Rotation

    def specs(self, dim: int, seed: int = 0, norm_dtype: str = "float32") -> tuple[QuantizerSpec, QuantizerSpec]:
        """``(key spec, value spec)`` for head dimension ``dim``: MSE codes with norm correction, no QJL, in the
        interleaved packing where it is defined (``dim`` a multiple of 32: the GPU's decode loop unpacks it in
        about a third of the instructions, ``docs/format.md``), else the contiguous one. The bytes are the same."""

        def spec(bits: int, s: int) -> QuantizerSpec:
            return QuantizerSpec(
                dim=dim, bits=bits, rotation=self.rotation, seed=s, norm_dtype=norm_dtype, packing=packing_for(dim, bits)
            )

        return spec(self.key_bits, seed), spec(self.value_bits, seed + 1)

    def bytes_per_token(self, dim: int, kv_heads: int, norm_dtype: str = "float32") -> int:
        """Bytes one token takes in one layer: keys and values of every KV head, norms included."""
        if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads < 1:
            raise ValueError(f"kv_heads: expected an int >= 1, got {kv_heads!r}")
        key, value = self.specs(dim, norm_dtype=norm_dtype)
        return kv_heads * (key.bytes_per_vector + value.bytes_per_vector)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("k4v4", 4, 4, Rotation.ROTOR),
        Preset("k4v3", 4, 3, Rotation.ROTOR),
        Preset("k4v2", 4, 2, Rotation.ROTOR),
        Preset("k3v3", 3, 3, Rotation.ROTOR),
        Preset("k2v2", 2, 2, Rotation.ROTOR),
    )
}
"""Every named preset."""

DEFAULT_PRESET = "k4v2"
"""The preset caches use when none is named."""


def packing_for(dim: int, mse_bits: int) -> Packing:
    """The packing caches and engines use: interleaved where it is defined (``dim`` a multiple of 32, 2 to 4
    codebook bits), contiguous elsewhere (where `QuantizerSpec` then refuses a ``dim`` that is no int)."""
    interleaved = isinstance(dim, int) and dim % INTERLEAVED_CHUNK == 0 and mse_bits in INTERLEAVED_BITS
    return Packing.INTERLEAVED if interleaved else Packing.CONTIGUOUS


def preset(name: str) -> Preset:
    """The preset called ``name`` (one of `PRESETS`)."""
    if not isinstance(name, str):
        raise TypeError(f"preset: expected a preset name (str), got {type(name).__name__}")
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
