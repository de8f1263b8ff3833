"""Deprecated: renamed to `keras_norm.population` (see CHANGELOG.md). Importing a name from
here warns (DeprecationWarning) and still works until the next release."""

from keras_norm import _deprecated

__all__ = sorted(_deprecated.MOVED[__name__])
__getattr__ = _deprecated.module_getattr(__name__)
