"""keras_norm's layers, one family per module."""

from keras_norm.layers.batch_norm import BatchNormalization

__all__ = ["BatchNormalization"]
