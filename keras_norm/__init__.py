"""keras_norm: normalization layers for Keras 3 on the TensorFlow backend.

Importing keras_norm changes no global state: it checks that Keras runs on TensorFlow and
registers its layers as Keras serializables (package "keras_norm").
"""

__version__ = "0.1.0"

from keras_norm._backend import check_backend as _check_backend

_check_backend()

from keras_norm import data, evaluation, population  # noqa: E402
from keras_norm.layers import *  # noqa: E402,F401,F403
from keras_norm.layers import __all__ as _layer_names  # noqa: E402
from keras_norm.convert import convert  # noqa: E402
from keras_norm.registry import available, get, register, spec  # noqa: E402
from keras_norm._math.kernels import set_xla_kernels, xla_kernels_enabled  # noqa: E402
from keras_norm.population import batch_statistics, recompute_statistics  # noqa: E402

__all__ = list(_layer_names) + [
    "available",
    "batch_statistics",
    "convert",
    "data",
    "evaluation",
    "get",
    "population",
    "recompute_statistics",
    "register",
    "set_xla_kernels",
    "spec",
    "xla_kernels_enabled",
]


def __getattr__(name):
    # `keras_norm.stats` / `keras_norm.statistics` (renamed after 0.1.0): importing the old module
    # makes it an attribute; its names then warn when used (see keras_norm/_deprecated.py).
    if name in ("stats", "statistics"):
        import importlib

        return importlib.import_module(f"keras_norm.{name}")
    raise AttributeError(f"module 'keras_norm' has no attribute {name!r}")
