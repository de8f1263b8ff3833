"""keras_norm's layers, one family per module."""

from keras_norm.layers.batch_norm import BatchNormalization
from keras_norm.layers.cross_iteration import CrossIterationBatchNormalization
from keras_norm.layers.evonorm import EvoNormB0, EvoNormS0
from keras_norm.layers.frn import FilterResponseNormalization
from keras_norm.layers.group_norm import (GroupNormalization, InstanceNormalization,
                                          LayerNormalization)
from keras_norm.layers.mixture_norm import MixtureNormalization
from keras_norm.layers.moving_average import MovingAverageBatchNormalization
from keras_norm.layers.rms_norm import RMSNormalization
from keras_norm.layers.weight_standardization import CenteredConv2D, WeightStandardizedConv2D

__all__ = [
    "BatchNormalization",
    "CenteredConv2D",
    "CrossIterationBatchNormalization",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "MixtureNormalization",
    "MovingAverageBatchNormalization",
    "RMSNormalization",
    "WeightStandardizedConv2D",
]
