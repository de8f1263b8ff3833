"""Deprecated: renamed (see CHANGELOG.md). `set_xla_kernels` and `xla_kernels_enabled` are
`keras_norm.set_xla_kernels` / `keras_norm.xla_kernels_enabled`; the shared math is the private
package `keras_norm._math`. Importing a name from here warns (DeprecationWarning) and still works
until the next release."""

from keras_norm import _deprecated

__all__ = sorted(_deprecated.MOVED[__name__])
__getattr__ = _deprecated.module_getattr(__name__)
