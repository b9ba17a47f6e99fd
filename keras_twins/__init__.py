"""Twins-PCPVT and Twins-SVT vision transformers for Keras 3."""

import contextlib
import os
import sys

from weights_convert.console import native_stderr_silenced


def _imported_by_the_command():
    """Whether this import starts `keras-twins` or `python -m keras_twins`."""
    argv = getattr(sys, "orig_argv", sys.argv)
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] if sys.argv else ""
    return module == "keras_twins" or script == "keras-twins"


# TensorFlow's C++ runtime writes start-up notices to stderr as it loads, and
# TF_CPP_MIN_LOG_LEVEL does not silence them (TensorFlow 2.21). The command
# loads it with them silenced, so that a bad argument's one-line error is all
# it writes there. As a library, keras_twins leaves stderr alone.
with native_stderr_silenced() if _imported_by_the_command() else contextlib.nullcontext():
    from keras_twins import layers
    from keras_twins.model import CONSTRUCTORS
    from keras_twins.model import Twins
    from keras_twins.model import TwinsModel
    from keras_twins.model import TwinsPCPVTBase
    from keras_twins.model import TwinsPCPVTLarge
    from keras_twins.model import TwinsPCPVTSmall
    from keras_twins.model import TwinsSVTBase
    from keras_twins.model import TwinsSVTLarge
    from keras_twins.model import TwinsSVTSmall
    from keras_twins.model import pyramid_outputs
    from keras_twins.segmentation import SemanticFPN
    from keras_twins.imagenet import decode_predictions
    from keras_twins.imagenet import preprocess_input
    from keras_twins.images import load_image
    from keras_twins.cpu_streams import use_cpu_streams
    from keras_twins.variants import VARIANTS
    from keras_twins.onnx_ops import register_erfc

    register_erfc()  # so that Keras' own model.export(format="onnx") converts the GELU

__version__ = "0.1.0"

__all__ = [
    "CONSTRUCTORS",
    "SemanticFPN",
    "Twins",
    "TwinsModel",
    "TwinsPCPVTBase",
    "TwinsPCPVTLarge",
    "TwinsPCPVTSmall",
    "TwinsSVTBase",
    "TwinsSVTLarge",
    "TwinsSVTSmall",
    "VARIANTS",
    "decode_predictions",
    "layers",
    "load_image",
    "preprocess_input",
    "pyramid_outputs",
    "use_cpu_streams",
]
