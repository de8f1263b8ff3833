"""Every layer's docstring is complete: shared argument text filled in, every argument
documented, the example runs and prints what it shows."""

import doctest
import inspect
import re

import pytest

import keras_norm
from keras_norm.layers import docstrings

LAYERS = [getattr(keras_norm, name) for name in keras_norm.layers.__all__]


@pytest.mark.parametrize("cls", LAYERS, ids=lambda cls: cls.__name__)
def test_no_placeholder_left(cls):
    assert not docstrings.PLACEHOLDER.search(cls.__doc__), cls.__name__
    assert not re.search(r"\{\w+_args?\}", cls.__doc__), cls.__name__


@pytest.mark.parametrize("cls", LAYERS, ids=lambda cls: cls.__name__)
def test_every_argument_is_documented(cls):
    """Each `__init__` argument has its line in Args (filled fragments included)."""
    args = cls.__doc__.split("Args:", 1)[1].split("Call arguments:", 1)[0]
    parameters = [name for name in inspect.signature(cls.__init__).parameters
                  if name not in ("self", "args", "kwargs")]
    missing = [name for name in parameters
               if not re.search(rf"(^|\s|, ){re.escape(name)}[:,]", args)]
    assert not missing, f"{cls.__name__}: undocumented {missing}"


@pytest.mark.parametrize("cls", LAYERS, ids=lambda cls: cls.__name__)
def test_docstring_example_runs(cls, monkeypatch):
    """The docstring's example runs and prints what it shows (with or without the exports)."""
    monkeypatch.setattr(keras_norm, cls.__name__, cls, raising=False)
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner()
    for test in finder.find(cls, cls.__name__, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_document_fills_indented_fragments():
    @docstrings.document
    class Example:
        """Example.

        Args:
            {affine_args}
            other: Another argument.
        """

    lines = Example.__doc__.splitlines()
    start = lines.index("            center: If `True`, add the learned offset `beta`. "
                        "Defaults to `True`.")
    assert lines[start + 7].strip().startswith("gamma_constraint:")
    assert lines[start + 8] == "            other: Another argument."


def test_document_rejects_an_unknown_placeholder():
    with pytest.raises(KeyError, match="no_such_fragment"):
        @docstrings.document
        class Broken:
            """Broken.

            Args:
                {no_such_fragment}
            """
