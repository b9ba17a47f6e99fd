"""Twins-PCPVT and Twins-SVT vision transformers for Keras 3."""

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
