"""Old import paths of public names, kept working for one release with a DeprecationWarning.

`keras_norm.stats` and `keras_norm.statistics` were renamed after 0.1.0 (see CHANGELOG.md): the
shared math moved to the private package `keras_norm._math`, the population-statistics tools
to `keras_norm.population`. The modules of those names forward each public name here.
"""

import importlib
import warnings

#: Old module -> {public name: "new.module"}.
MOVED = {
    "keras_norm.stats": {
        "set_xla_kernels": "keras_norm",
        "xla_kernels_enabled": "keras_norm",
    },
    "keras_norm.statistics": {
        "batch_statistics": "keras_norm.population",
        "recompute_statistics": "keras_norm.population",
        "batch_dependent_layers": "keras_norm.population",
    },
}


def forward(old_module, name):
    """The object `old_module.name` now names, with a DeprecationWarning saying where it went.

    Raises:
        AttributeError: `name` was not a public name of `old_module`.
    """
    new_module = MOVED[old_module].get(name)
    if new_module is None:
        raise AttributeError(f"module {old_module!r} has no attribute {name!r} (it was renamed: "
                             f"its public names are {sorted(MOVED[old_module])})")
    warnings.warn(
        f"{old_module}.{name} is deprecated and will be removed in the next release: "
        f"use {new_module}.{name}.", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new_module), name)
