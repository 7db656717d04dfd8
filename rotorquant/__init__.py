"""rotorquant: KV-cache compression with Clifford rotors (RotorQuant) and its dense baseline (TurboQuant).

    >>> import numpy as np, rotorquant as rq
    >>> from rotorquant.tiers import numpy as ref
    >>> params = rq.build_params(rq.QuantizerSpec(dim=128, bits=3))
    >>> code = ref.quantize(np.ones((4, 128)), params)
    >>> code.nbytes  # 4 vectors x (48 bytes of codes + a 4-byte norm)
    208
"""

from .calibration import Calibration, calibrate
from .files import load, save
from .format import Compressed
from .math.codebook import Codebook, lloyd_max
from .params import QuantParams, build_params
from .presets import DEFAULT_PRESET, PRESETS, Preset, preset
from .quantizer import Quantizer, Tier
from .spec import NormDtype, Packing, QuantizerSpec, Rotation

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "Codebook",
    "Compressed",
    "DEFAULT_PRESET",
    "NormDtype",
    "PRESETS",
    "Packing",
    "Preset",
    "QuantParams",
    "Quantizer",
    "QuantizerSpec",
    "Rotation",
    "Tier",
    "build_params",
    "calibrate",
    "lloyd_max",
    "load",
    "preset",
    "save",
]
