"""Old import paths of public names, kept working for one release with a DeprecationWarning.

`keras_norm.stats` and `keras_norm.statistics` were renamed after 0.1.0 (see CHANGELOG.md): the
shared math moved to the private package `keras_norm._math`, the population-statistics tools
to `keras_norm.population`. The modules of those names forward each public name here.

Modules that keep their other names and only lost some (`recipes.training`, `recipes.tuning`,
`recipes.experiments`) forward those with `forward(module, name, moved)` or a `__getattr__`
built by `module_getattr(module, moved)`, `moved` being `{old name: "new.module"}`.
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


def forward(old_module, name, moved=None):
    """The object `old_module.name` now names, with a DeprecationWarning saying where it went.

    Call it from the module `__getattr__` of `old_module` (the warning points at the code that
    used the old path).

    Args:
        old_module: The old module's name.
        name: The name looked up.
        moved: `{name: "new.module"}` of the names that left `old_module`. Defaults to
            `MOVED[old_module]`: a module that was renamed as a whole.

    Raises:
        AttributeError: `name` is not a name that moved.
    """
    renamed = moved is None
    new_module = (MOVED[old_module] if renamed else moved).get(name)
    if new_module is None:
        if renamed:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r} (it was "
                                 f"renamed: its public names are {sorted(MOVED[old_module])})")
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
    warnings.warn(
        f"{old_module}.{name} is deprecated and will be removed in the next release: "
        f"use {new_module}.{name}.", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new_module), name)


def module_getattr(old_module, moved=None):
    """A module `__getattr__` for `old_module` that forwards its moved names (see `forward`).

    Usage, in the old module: `__getattr__ = module_getattr(__name__, {"name": "new.module"})`.
    """

    def __getattr__(name):
        return forward(old_module, name, moved)

    return __getattr__
