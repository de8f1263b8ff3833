"""keras_norm: normalization layers for Keras 3 on the TensorFlow backend.

Importing keras_norm changes no global state: it checks that Keras runs on TensorFlow and
registers its layers as Keras serializables (package "keras_norm").
"""

__version__ = "0.1.0"

from keras_norm._backend import check_backend as _check_backend

_check_backend()

from keras_norm import stats  # noqa: E402
from keras_norm.layers import BatchNormalization  # noqa: E402
from keras_norm.convert import convert  # noqa: E402
from keras_norm.registry import available, get, register, spec  # noqa: E402
from keras_norm.statistics import batch_statistics, recompute_statistics  # noqa: E402

__all__ = [
    "BatchNormalization",
    "available",
    "batch_statistics",
    "convert",
    "get",
    "recompute_statistics",
    "register",
    "spec",
    "stats",
]
