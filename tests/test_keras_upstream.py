"""Keras's own tests of the layers keras_norm replaces, run against keras_norm's layers.

keras_norm's BatchNormalization, GroupNormalization, LayerNormalization and RMSNormalization
are drop-in replacements for Keras's. This module takes the installed Keras's test files for
them (`keras/src/layers/normalization/{batch,group,layer,rms}_normalization_test.py`), copies
each into a temporary directory, points the layer under test at keras_norm
(`layers.BatchNormalization` -> `keras_norm.BatchNormalization`, ...; everything else, e.g.
`layers.Masking` or `layers.Input`, stays Keras's), runs it with pytest in a subprocess and
asserts that every test passes. So every Keras upgrade re-checks compatibility automatically.

- Nothing is modified but the layer references: no test is deselected and no assertion is
  rewritten. Where Keras's tests match error messages (`assertRaisesRegex`), keras_norm's
  messages contain Keras's wording; the error classes are Keras's (or subclasses of them, see
  `keras_norm.layers.base.ArgumentTypeError`).
- The rewrite is checked: it must replace at least one reference per layer and leave no other
  reference to Keras's layer of that name, so a change in how Keras's tests import the layers
  fails here instead of silently testing Keras against itself.
- Only some wheels ship the test files (keras 3.15.1 does; 3.15.0, older wheels and the
  sdists do not) and nothing may be downloaded at test time: where the installed Keras lacks a
  file, its test is skipped with the Keras version in the reason. CI's newest environment
  ships them, so there they always run.
- Keras's own skips (e.g. backend-specific tests) stay skips; they are counted in the report.

Run time: about 10-20 s per file (a subprocess each, so one file's state cannot leak into
another and a crash is reported, not fatal to the suite).
"""

import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import keras
import pytest

import keras_norm

# Keras test file (under keras/src/layers/normalization/) -> the layers it tests.
UPSTREAM_TESTS = {
    "batch_normalization_test.py": ("BatchNormalization",),
    "group_normalization_test.py": ("GroupNormalization",),
    "layer_normalization_test.py": ("LayerNormalization",),
    "rms_normalization_test.py": ("RMSNormalization",),
}
RELATIVE_DIR = os.path.join("src", "layers", "normalization")
# Registers the marks Keras's tests use (Keras's own conftest.py is not in the wheel).
PYTEST_INI = """[pytest]
markers =
    requires_trainable_backend: Keras's mark (every test here runs on TensorFlow)
filterwarnings =
    ignore::DeprecationWarning
    ignore::FutureWarning
"""
TIMEOUT_S = 600


def keras_test_file(name):
    """Path of Keras's test file `name` next to the installed keras package."""
    spec = importlib.util.find_spec("keras")
    package_dir = os.path.dirname(spec.origin)
    return os.path.join(package_dir, RELATIVE_DIR, name)


def point_at_keras_norm(source, layer_names):
    """Keras's test source with `layers.<Name>` replaced by `keras_norm.<Name>`.

    Keras's normalization tests do `from keras.src import layers` and construct
    `layers.BatchNormalization(...)`. Raises `AssertionError` if a layer is not referenced that
    way or is still referenced another way (an import of the class, `keras.layers.<Name>`),
    so an upstream change in style cannot make this module test Keras against itself.
    """
    for name in layer_names:
        source, count = re.subn(rf"(?<![\w.])layers\.{name}\b", f"keras_norm.{name}", source)
        assert count > 0, f"Keras's test does not construct `layers.{name}`: update the rewrite"
        leftover = [line.strip() for line in source.splitlines()
                    if re.search(rf"(?<!keras_norm\.)\b{name}\b", line)
                    and not line.lstrip().startswith(("#", "class "))]
        assert not leftover, (
            f"Keras's test still refers to its own {name} after the rewrite: {leftover[:3]}")
    return "import keras_norm  # the layers under test (rewritten by test_keras_upstream)\n" + (
        source)


def run_copied_tests(tmp_path, name, source):
    """Runs the rewritten test file in a fresh interpreter; returns (cases, output)."""
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    (tmp_path / name).write_text(source)
    report = tmp_path / "report.xml"
    repository = os.path.dirname(os.path.dirname(os.path.abspath(keras_norm.__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(
                   [repository] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    command = [sys.executable, "-m", "pytest", name, "-q", "-p", "no:cacheprovider",
               "-p", "no:xdist", "-p", "no:randomly", f"--junitxml={report}",
               "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=TIMEOUT_S)
    output = completed.stdout + completed.stderr
    assert report.exists(), f"pytest wrote no report (exit {completed.returncode}):\n{output}"
    cases = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = child.get("message", "")
                break
        else:
            message = ""
        cases.append((case.get("name"), outcome, message))
    return cases, output


#: Set to 1 where Keras's test files must be found (CI's newest pair, `.ci/run`).
REQUIRE_VARIABLE = "KERAS_NORM_REQUIRE_KERAS_TESTS"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UPSTREAM_TESTS))
def test_keras_own_tests_pass_against_keras_norm(name, tmp_path):
    path = keras_test_file(name)
    if not os.path.exists(path):
        reason = (
            f"keras {keras.__version__} does not ship {os.path.join('keras', RELATIVE_DIR, name)}"
            " (the keras 3.15.1 wheel does; 3.15.0, older wheels and the sdists do not, and "
            "nothing is downloaded at test time)")
        # CI's newest pair sets this: there the files must be present, so a pin moved to a
        # wheel without them fails instead of silently skipping Keras's checks.
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(f"{REQUIRE_VARIABLE}=1 but {reason}")
        pytest.skip(reason)
    with open(path, encoding="utf-8") as handle:
        source = point_at_keras_norm(handle.read(), UPSTREAM_TESTS[name])
    cases, output = run_copied_tests(tmp_path, name, source)
    counts = {outcome: sum(1 for _, o, _ in cases if o == outcome)
              for outcome in ("passed", "failed", "error", "skipped")}
    summary = f"keras {keras.__version__} {name} against keras_norm: {counts}"
    print(summary)
    failures = [f"{test}: {outcome}: {message[:300]}" for test, outcome, message in cases
                if outcome in ("failed", "error")]
    assert cases, f"{summary}: no test collected\n{output[-3000:]}"
    assert not failures, summary + "\n" + "\n".join(failures) + "\n" + output[-6000:]
    assert counts["passed"] > 0, summary


# ------------------------------------------------------------------ argument error classes
# (layer, bad arguments, input shape to build on or None). Each row is tried on Keras's layer
# and on ours: construction, then (with a shape) a call on ones or on a symbolic input.
KERAS_ARGUMENT_ERRORS = [
    ("BatchNormalization", dict(axis="a"), None),          # Keras: int("a") -> ValueError
    ("BatchNormalization", dict(axis=None), None),         # Keras: int(None) -> TypeError
    ("BatchNormalization", dict(axis=[1]), None),
    ("BatchNormalization", dict(axis=5), (2, 3)),           # Keras: IndexError in build
    ("BatchNormalization", dict(axis=-3), (2, 3)),
    ("BatchNormalization", dict(momentum="x"), None),
    ("BatchNormalization", dict(momentum=None), None),
    ("BatchNormalization", dict(epsilon="x"), None),
    ("BatchNormalization", dict(epsilon=None), None),
    ("BatchNormalization", dict(renorm=True, renorm_clipping={"bad": 1.0}), None),
    ("BatchNormalization", dict(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 1.0}),
     None),
    ("BatchNormalization", dict(renorm=True, renorm_clipping={"dmax": -1.0}), None),
    ("BatchNormalization", dict(renorm=True, renorm_clipping=[1.0]), None),
    ("BatchNormalization", dict(moving_mean_initializer="bogus"), None),
    ("BatchNormalization", dict(gamma_regularizer="bogus"), None),
    ("BatchNormalization", dict(beta_constraint="bogus"), None),
    ("BatchNormalization", dict(), (2, None)),              # unknown channel size
    ("BatchNormalization", dict(momentum=1.5), None),       # Keras does not check these
    ("BatchNormalization", dict(epsilon=-1.0), None),
    ("BatchNormalization", dict(center="yes"), None),
    ("BatchNormalization", dict(synchronized="yes"), None),
    ("BatchNormalization", dict(renorm_momentum="x"), None),
    ("GroupNormalization", dict(groups=1.5), None),         # issue #15: was TypeError
    ("GroupNormalization", dict(groups="32"), None),
    ("GroupNormalization", dict(groups=None), None),
    ("GroupNormalization", dict(groups=0), None),
    ("GroupNormalization", dict(groups=-2), None),
    ("GroupNormalization", dict(groups=5), (2, 4)),
    ("GroupNormalization", dict(groups=3), (2, 4)),
    ("GroupNormalization", dict(groups=2, axis=5), (2, 4)),
    ("GroupNormalization", dict(groups=2, axis="a"), (2, 4)),
    ("GroupNormalization", dict(groups=2, axis=None), (2, 4)),
    ("GroupNormalization", dict(groups=2, axis=[1]), (2, 4)),
    ("GroupNormalization", dict(groups=2, epsilon=None), (2, 4)),
    ("GroupNormalization", dict(groups=2, epsilon="x"), (2, 4)),
    ("GroupNormalization", dict(groups=2, gamma_initializer="bogus"), None),
    ("GroupNormalization", dict(), (2, None)),
    ("LayerNormalization", dict(axis={"axis": -1}), None),
    ("LayerNormalization", dict(axis="a"), None),
    ("LayerNormalization", dict(axis=None), None),
    ("LayerNormalization", dict(axis=1.5), None),
    ("LayerNormalization", dict(axis=["a"]), (2, 3)),
    ("LayerNormalization", dict(axis=5), (2, 3)),
    ("LayerNormalization", dict(axis=[1, 5]), (2, 3)),
    ("LayerNormalization", dict(epsilon=None), (2, 3)),
    ("LayerNormalization", dict(epsilon="x"), (2, 3)),
    ("LayerNormalization", dict(beta_initializer="bogus"), None),
    ("LayerNormalization", dict(), (2, None)),
    ("RMSNormalization", dict(axis=5), (2, 3)),
    ("RMSNormalization", dict(axis="a"), (2, 3)),
    ("RMSNormalization", dict(axis=None), (2, 3)),
    ("RMSNormalization", dict(axis={"a": 1}), (2, 3)),
    ("RMSNormalization", dict(epsilon=None), (2, 3)),
    ("RMSNormalization", dict(epsilon="x"), (2, 3)),
    ("RMSNormalization", dict(), (2, None)),
]
# The classes Keras raises on purpose for a bad argument (its checks, `int()`/`float()` of the
# argument, indexing the shape with it). Anything else (e.g. TensorFlow's InvalidArgumentError
# from an op at call time, for an epsilon Keras never checked) means Keras does not validate
# the argument: ours must then raise a `ValueError`, keras_norm's class for bad arguments.
KERAS_ARGUMENT_CLASSES = (TypeError, ValueError, IndexError)


def _error_class(factory, kwargs, shape):
    """The class of the exception constructing (and building/calling) the layer raises."""
    import numpy as np

    try:
        layer = factory(**kwargs)
        if shape is not None:
            if None in shape:
                layer(keras.Input(batch_shape=shape))
            else:
                layer(np.ones(shape, "float32"), training=True)
    except Exception as error:  # noqa: BLE001 - the class is what is compared
        return type(error)
    return None


def _without_the_bad_argument(kwargs, shape, valid=None):
    """The row made valid: its last argument (the bad one) dropped, or replaced by what
    `valid[that argument]()` returns, and an unknown channel size (a `None` in `shape`, the
    bad input of the rows without arguments) made known."""
    control = dict(kwargs)
    if control:
        bad = list(control)[-1]
        del control[bad]
        replacement = (valid or {}).get(bad)
        if replacement is not None:
            control.update(replacement())
    return control, None if shape is None else tuple(4 if d is None else d for d in shape)


def _row_id(row):
    """A test id that is the same in every process (pytest-xdist compares them): callables by
    name, not by their address."""
    name, kwargs, shape = row
    arguments = ",".join(f"{k}={getattr(v, '__name__', repr(v))}" for k, v in kwargs.items())
    return f"{name}({arguments})-{shape}"


@pytest.mark.parametrize("name, kwargs, shape", KERAS_ARGUMENT_ERRORS,
                         ids=[_row_id(row) for row in KERAS_ARGUMENT_ERRORS])
def test_argument_error_classes_match_keras(name, kwargs, shape):
    """User code catches Keras's class: ours must be it or a subclass of it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _error_class(getattr(keras.layers, name), kwargs, shape)
        ours = _error_class(getattr(keras_norm, name), kwargs, shape)
        # The control: where Keras accepts the row without its bad argument, ours must too, so
        # that the error below comes from that argument, not from the layer or the rest of it.
        control = _without_the_bad_argument(kwargs, shape)
        if _error_class(getattr(keras.layers, name), *control) is None:
            control_error = _error_class(getattr(keras_norm, name), *control)
            assert control_error is None, (
                f"keras_norm.{name}{control} raised {control_error.__name__} (Keras: accepted)")
    assert ours is not None, f"keras_norm.{name}({kwargs}) accepted it (Keras: {theirs})"
    if theirs is not None and issubclass(theirs, KERAS_ARGUMENT_CLASSES):
        assert issubclass(ours, theirs), (
            f"keras_norm.{name}({kwargs}) raised {ours.__name__}, Keras {theirs.__name__}")
    else:
        assert issubclass(ours, ValueError), (
            f"keras_norm.{name}({kwargs}) raised {ours.__name__} (Keras: no check)")


def _conv():
    return keras.layers.Conv2D(4, 3)


# Layers Keras does not have: every bad argument raises a ValueError (wrong types also a
# TypeError, out-of-range axes also an IndexError), as the Keras-compatible layers do.
OTHER_ARGUMENT_ERRORS = [
    ("BatchNormalization", dict(virtual_batch_size=0), None),
    ("BatchNormalization", dict(virtual_batch_size=1.5), None),
    ("BatchNormalization", dict(virtual_batch_size=2, synchronized=True), None),
    ("BatchNormalization", dict(inference_statistics="population"), None),
    ("BatchNormalization", dict(renorm_clipping={"rmax": 2.0}), None),  # without renorm=True
    ("InstanceNormalization", dict(groups=2), None),
    ("InstanceNormalization", dict(axis="a"), None),
    ("InstanceNormalization", dict(axis=4), (2, 3, 3)),
    ("InstanceNormalization", dict(epsilon=0.0), None),
    ("FilterResponseNormalization", dict(learned_epsilon="yes"), None),
    ("FilterResponseNormalization", dict(use_tlu=1), None),
    ("FilterResponseNormalization", dict(axis=[1]), None),
    ("FilterResponseNormalization", dict(axis=0), (2, 3, 3, 4)),
    ("EvoNormB0", dict(momentum=2.0), None),
    ("EvoNormB0", dict(synchronized="yes"), None),
    ("EvoNormB0", dict(axis=7), (2, 3, 3, 4)),
    ("EvoNormS0", dict(groups=0), None),
    ("EvoNormS0", dict(groups=1.5), None),
    ("EvoNormS0", dict(groups=3), (2, 3, 3, 4)),
    ("MixtureNormalization", dict(num_components=0), None),
    ("MixtureNormalization", dict(num_components="2"), None),
    ("MixtureNormalization", dict(mixture_axes="spatial"), None),
    ("MixtureNormalization", dict(em_iterations=0), None),
    ("MixtureNormalization", dict(warm_start="cold"), None),
    ("MixtureNormalization", dict(min_weight=-1.0), None),
    ("MixtureNormalization", dict(axis=None), None),
    ("MovingAverageBatchNormalization", dict(buffer_size=0), None),
    ("MovingAverageBatchNormalization", dict(r_max=0.5), None),
    ("MovingAverageBatchNormalization", dict(warmup_steps=-1), None),
    ("MovingAverageBatchNormalization", dict(momentum="x"), None),
    ("CrossIterationBatchNormalization", dict(layer="conv"), None),
    ("CrossIterationBatchNormalization", dict(layer=_conv, window_size=0), None),
    ("CrossIterationBatchNormalization", dict(layer=_conv, window_size=2.0), None),
    ("WeightStandardizedConv2D", dict(filters=4, kernel_size=3, epsilon=0.0), None),
    ("WeightStandardizedConv2D", dict(filters=4, kernel_size=3, epsilon="x"), None),
]


# Where dropping a row's bad argument leaves an invalid layer (a required argument, a default
# that does not fit the input), the valid value its control uses instead.
OTHER_VALID = {
    "EvoNormS0": {"groups": lambda: {"groups": 2}},
    "CrossIterationBatchNormalization": {"layer": lambda: {"layer": _conv()}},
}


@pytest.mark.parametrize("name, kwargs, shape", OTHER_ARGUMENT_ERRORS,
                         ids=[_row_id(row) for row in OTHER_ARGUMENT_ERRORS])
def test_other_argument_errors_are_value_errors(name, kwargs, shape):
    kwargs = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
    error = _error_class(getattr(keras_norm, name), kwargs, shape)
    # The control: the row without its bad argument is accepted, so the error comes from it.
    control = _without_the_bad_argument(kwargs, shape, OTHER_VALID.get(name))
    control_error = _error_class(getattr(keras_norm, name), *control)
    assert control_error is None, f"keras_norm.{name}{control} raised {control_error}"
    assert error is not None, f"keras_norm.{name}({kwargs}) accepted it"
    assert issubclass(error, ValueError), f"keras_norm.{name}({kwargs}): {error.__name__}"


def test_argument_error_classes():
    """Wrong types are TypeError and ValueError; out-of-range axes ValueError and IndexError."""
    from keras_norm.layers.base import ArgumentTypeError, AxisError

    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    assert issubclass(AxisError, ValueError) and issubclass(AxisError, IndexError)
    with pytest.raises(AxisError, match=r"axis 3 is out of range for an input of rank 2"):
        keras_norm.LayerNormalization(axis=3).build((2, 5))
