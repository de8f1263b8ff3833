"""Every registered name passes the shared harness: a new registration cannot skip it.

Each name is built through `keras_norm.get` exactly as models and recipes build it (with the
channel count, so channel-dependent defaults apply) and checked against the NumPy reference of
its family, built from the layer's own config.
"""

import inspect

import harness
import keras
import pytest
from references.batch_norm import BatchNormReference
from references.cross_iteration import CrossIterationReference
from references.frn_evonorm import (EvoNormB0Reference, EvoNormS0Reference,
                                    FilterResponseNormReference)
from references.group_norm import GroupNormReference, LayerNormReference, RMSNormReference
from references.mixture_norm import MixtureNormReference
from references.moving_average import MovingAverageBatchNormReference

import keras_norm

SHAPE = (8, 4, 4, 12)  # 12 channels: group counts must adapt (32 does not divide 12)

# name -> (reference class, overrides of the config-derived reference arguments)
REFERENCES = {
    "batch": (BatchNormReference, {}),
    "sync_batch": (BatchNormReference, {}),
    "ghost_batch": (BatchNormReference, {"virtual_batch_size": 3}),
    "batch_renorm": (BatchNormReference, {}),
    "layer": (LayerNormReference, {}),
    "group": (GroupNormReference, {}),
    "group_ws": (GroupNormReference, {}),
    "instance": (GroupNormReference, {"groups": -1}),
    "rms": (RMSNormReference, {}),
    "frn": (FilterResponseNormReference, {}),
    "evonorm_b0": (EvoNormB0Reference, {}),
    "evonorm_s0": (EvoNormS0Reference, {}),
    "moving_average": (MovingAverageBatchNormReference, {}),
    "mixture": (MixtureNormReference, {}),
    "cross_iteration": (CrossIterationReference, {"conv": {"padding": "same"}}),
}
# Layer arguments that make 3 training steps informative (visible moving-average updates,
# several ghost batches in a batch of 8).
OVERRIDES = {"momentum": 0.5, "virtual_batch_size": 3, "warmup_steps": 1}


def _wrapped_conv():
    """What a "conv_wrapper" norm wraps in these checks: a 3x3 convolution, 12 -> 12."""
    return keras.layers.Conv2D(SHAPE[-1], 3, padding="same", use_bias=False)


def _build(entry, **kwargs):
    if entry.kind == "conv_wrapper":
        kwargs["layer"] = _wrapped_conv()
    return entry.build(SHAPE[-1], **kwargs)


def _layer_kwargs(name):
    entry = keras_norm.spec(name)
    probe = _build(entry)
    accepted = inspect.signature(type(probe).__init__).parameters
    return {k: v for k, v in OVERRIDES.items()
            if k in accepted and (k != "virtual_batch_size" or name == "ghost_batch")}


def make_case(name):
    entry = keras_norm.spec(name)
    kwargs = _layer_kwargs(name)
    reference_cls, reference_overrides = REFERENCES[name]

    def factory():
        return _build(entry, **kwargs)

    def reference(weights):
        config = factory().get_config()
        accepted = inspect.signature(reference_cls.__init__).parameters
        arguments = {k: v for k, v in config.items() if k in accepted and k != "weights"}
        return reference_cls(weights, **{**arguments, **reference_overrides})

    return harness.LayerCase(factory=factory, input_shape=SHAPE, reference=reference,
                             batch_dependent=entry.batch_dependent)


def test_every_registered_name_has_a_reference():
    missing = sorted(set(keras_norm.available()) - set(REFERENCES))
    assert not missing, f"registered without a harness reference: {missing}"


test_registered_name_matches_reference = harness.layer_test(
    harness.check_reference, make_case, sorted(REFERENCES))
test_registered_name_compiles_with_xla = harness.layer_test(
    harness.check_jit, make_case, sorted(REFERENCES))
test_registered_name_serializes = harness.layer_test(
    harness.check_serialization, make_case, sorted(REFERENCES))
test_registered_name_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case, sorted(REFERENCES))


# The names whose layers take `synchronized=True`, written out: deriving this list from which
# constructions succeed would silently drop a broken synchronized path out of the distributed
# test below. `test_synchronizable_names_are_exactly_these` keeps it complete.
SYNCHRONIZABLE = ("batch", "batch_renorm", "cross_iteration", "evonorm_b0", "mixture",
                  "moving_average", "sync_batch")


def test_synchronizable_names_are_exactly_these():
    for name in sorted(REFERENCES):
        if name in SYNCHRONIZABLE:
            assert _build(keras_norm.spec(name), synchronized=True).synchronized is True, name
        else:  # per-example norms have no batch statistics; ghost batches are per replica
            with pytest.raises(ValueError):
                _build(keras_norm.spec(name), synchronized=True)


@pytest.mark.parametrize("name", SYNCHRONIZABLE)
def test_registered_synchronized_name_equals_one_device(name, mirrored_strategy):
    case = make_case(name)
    kwargs = _layer_kwargs(name)
    case.factory = lambda: _build(keras_norm.spec(name), **{**kwargs, "synchronized": True})
    harness.check_distributed(case, mirrored_strategy)


def test_every_name_builds_a_keras_layer():
    for name in keras_norm.available():
        layer = _build(keras_norm.spec(name))
        assert isinstance(layer, keras.layers.Layer), name
