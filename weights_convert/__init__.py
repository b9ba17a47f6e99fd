"""Converts timm and official Twins checkpoints to keras_twins weights.

    python -m weights_convert SRC --output DST.weights.h5 [--variant NAME]
"""

from weights_convert.checkpoint import read_checkpoint
from weights_convert.convert import build_model_for
from weights_convert.convert import convert
from weights_convert.convert import detect_variant
from weights_convert.convert import load_checkpoint_into_model
from weights_convert.errors import ConversionError
from weights_convert.mapping import assign_state_dict
from weights_convert.mapping import reference_key

__all__ = [
    "ConversionError",
    "assign_state_dict",
    "build_model_for",
    "convert",
    "detect_variant",
    "load_checkpoint_into_model",
    "read_checkpoint",
    "reference_key",
]
