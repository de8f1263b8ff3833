"""Old import paths of public names (renamed after 0.1.0) keep working for one release and warn."""

import importlib
import sys
import warnings

import pytest

import keras_norm
from keras_norm import _deprecated, population


@pytest.mark.parametrize("old, name, new", [
    ("keras_norm.stats", "set_xla_kernels", keras_norm.set_xla_kernels),
    ("keras_norm.stats", "xla_kernels_enabled", keras_norm.xla_kernels_enabled),
    ("keras_norm.statistics", "batch_statistics", population.batch_statistics),
    ("keras_norm.statistics", "recompute_statistics", population.recompute_statistics),
    ("keras_norm.statistics", "batch_dependent_layers", population.batch_dependent_layers),
])
def test_old_path_warns_and_gives_the_same_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is deprecated.*use "):
        assert getattr(module, name) is new
    # `from old import name` goes through the same module __getattr__.
    with pytest.warns(DeprecationWarning):
        namespace = {}
        exec(f"from {old} import {name}", namespace)
    assert namespace[name] is new


def test_every_moved_name_exists_at_its_new_home():
    for names in _deprecated.MOVED.values():
        for name, new_module in names.items():
            assert hasattr(importlib.import_module(new_module), name), (new_module, name)


def test_internal_names_of_old_modules_are_not_forwarded():
    stats = importlib.import_module("keras_norm.stats")
    with pytest.raises(AttributeError, match="renamed: its public names are"):
        stats.standardize  # noqa: B018 (internal before the rename too)


def test_package_attribute_of_old_module_name_still_resolves():
    # `keras_norm.stats` without importing it first: the package's __getattr__ imports it.
    for name in ("stats", "statistics"):
        sys.modules.pop(f"keras_norm.{name}", None)
        keras_norm.__dict__.pop(name, None)
        module = getattr(keras_norm, name)
        assert module is sys.modules[f"keras_norm.{name}"]
    with pytest.warns(DeprecationWarning, match="keras_norm.stats.set_xla_kernels is deprec"):
        assert keras_norm.stats.set_xla_kernels is keras_norm.set_xla_kernels
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        keras_norm.nothing  # noqa: B018


def test_new_paths_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from keras_norm import batch_statistics, set_xla_kernels  # noqa: F401
        from keras_norm.population import recompute_statistics  # noqa: F401


def _old_recipes_paths():
    """`{short module name: (full name, its moved names)}` of the recipes modules that lost
    names (their `MOVED`)."""
    from recipes import experiments, training, tuning

    return {module.__name__.rsplit(".", 1)[1]: (module.__name__, set(module.MOVED))
            for module in (training, tuning, experiments)}


def test_recipes_moved_names_forward_through_the_shared_mechanism():
    for short, (old, names) in _old_recipes_paths().items():
        module = importlib.import_module(old)
        for name in names:
            with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is deprecated.*use "):
                value = getattr(module, name)
            assert value is getattr(importlib.import_module(module.MOVED[name]), name)
        with pytest.raises(AttributeError, match=rf"module '{old}' has no attribute 'nothing'$"):
            module.nothing  # noqa: B018


def test_recipes_code_uses_no_old_path():
    """The recipes reach every moved name at its new home, so they warn about nothing."""
    import ast
    from pathlib import Path

    old_paths = _old_recipes_paths()
    full_names = {old: names for old, names in old_paths.values()}
    root = Path(__file__).resolve().parent.parent / "recipes"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in old_paths
                    and node.attr in old_paths[node.value.id][1]):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module in full_names:
                found += [f"{path.name}:{node.lineno}: from {node.module} import {alias.name}"
                          for alias in node.names if alias.name in full_names[node.module]]
    assert not found, found
