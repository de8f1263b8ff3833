"""keras_norm: normalization layers for Keras 3 on the TensorFlow backend."""

__version__ = "0.1.0"

from keras_norm._backend import check_backend as _check_backend

_check_backend()
