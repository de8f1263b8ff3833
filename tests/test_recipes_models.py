"""Tests for recipes/models.py: every model builds with every kind of norm and placement.

Norm kinds are exercised with the names registered when the test runs (`keras_norm.available()`)
plus small stand-in entries for each kind (`norm`, `norm_act`, `conv_wrapper`), added to the
registry for the duration of a test only.
"""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_norm
from keras_norm import registry

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import models  # noqa: E402

POSITIONS = {"resnet20": 19, "mn_cnn": 4, "small_cnn": 3}
KINDS = ("norm", "norm_act", "conv_wrapper")
IMAGES = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")


class _StandInNormAct(keras.layers.Layer):
    """A norm + activation in one layer (like FRN + TLU): layer norm, then ReLU."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization()

    def call(self, inputs):
        return keras.ops.relu(self.norm(inputs))


class _StandInConvWrapper(keras.layers.Wrapper):
    """A wrapper that owns its convolution (like Cross-Iteration BN): conv, then batch norm."""

    def __init__(self, layer, **kwargs):
        super().__init__(layer, **kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs, training=None):
        return self.norm(self.layer(inputs), training=training)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


@pytest.fixture
def stand_ins(monkeypatch):
    """Registers one stand-in per kind for this test; returns {kind: (name, layer class)}."""
    entries = {
        "norm": ("test_norm", keras.layers.LayerNormalization),
        "norm_act": ("test_norm_act", _StandInNormAct),
        "conv_wrapper": ("test_conv_wrapper", _StandInConvWrapper),
    }
    for kind, (name, factory) in entries.items():
        monkeypatch.setitem(registry._REGISTRY, name,
                            registry.NormSpec(name, factory, kind=kind, batch_dependent=False))
    return entries


def _norm_layers(model):
    return [layer for layer in model.layers if layer.name.endswith("_norm")]


def _check_outputs(model, num_classes=10):
    for training in (True, False):
        logits = model(IMAGES, training=training)
        assert tuple(logits.shape) == (2, num_classes)
        assert np.all(np.isfinite(np.asarray(logits)))


def test_every_registered_norm_builds_and_runs():
    """Each registered name, at every position of the small CNN (the other models are covered
    per kind below: the registry call is the same for all of them)."""
    norms = keras_norm.available()
    assert {keras_norm.spec(norm).kind for norm in norms} == set(KINDS), norms
    for norm in norms:
        model = models.build_model("small_cnn", norm=norm)
        _check_outputs(model)
        layers = _norm_layers(model)
        assert len(layers) == POSITIONS["small_cnn"], norm
        spec = keras_norm.spec(norm)
        extra = {"layer": keras.layers.Conv2D(16, 3)} if spec.kind == "conv_wrapper" else {}
        expected = type(spec.build(channels=16, **extra))
        assert all(type(layer) is expected for layer in layers), norm


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("kind", ["norm", "norm_act", "conv_wrapper"])
def test_each_kind_and_placement(name, kind, stand_ins):
    norm, layer_class = stand_ins[kind]
    for placement, count in (("all", POSITIONS[name]), ("first", 1), ("none", 0), ("2,3", 2)):
        model = models.build_model(name, norm=norm, placement=placement, num_classes=7)
        assert tuple(model.output.shape) == (None, 7)
        layers = _norm_layers(model)
        assert len(layers) == count, (name, kind, placement)
        assert all(isinstance(layer, layer_class) for layer in layers)
        if placement == "all":
            _check_outputs(model, num_classes=7)
    assert models.norm_positions(name) == POSITIONS[name]
    models.check_placement(name, POSITIONS[name])
    with pytest.raises(ValueError, match=f"has {POSITIONS[name]} norm positions"):
        models.check_placement(name, POSITIONS[name] + 1)


def test_kinds_wire_conv_norm_and_activation(stand_ins):
    """norm: conv(no bias) -> norm -> ReLU; norm_act: no extra ReLU; conv_wrapper owns its
    conv; a position without a norm keeps the conv's bias."""
    by_name = {}
    for kind, (norm, _) in stand_ins.items():
        model = models.build_model("small_cnn", norm=norm, placement="first")
        by_name[kind] = {layer.name: layer for layer in model.layers}
    norm_model = by_name["norm"]
    assert norm_model["conv1"].use_bias is False
    assert isinstance(norm_model["conv1_relu"], keras.layers.ReLU)
    assert norm_model["conv2"].use_bias is True  # no norm at position 2
    assert "conv1_relu" not in by_name["norm_act"]
    wrapper = by_name["conv_wrapper"]["conv1_norm"]
    assert isinstance(wrapper.layer, keras.layers.Conv2D) and wrapper.layer.use_bias is False
    assert isinstance(by_name["conv_wrapper"]["conv1_relu"], keras.layers.ReLU)


def test_other_norm_fills_the_remaining_positions(stand_ins):
    model = models.build_model("mn_cnn", norm="test_norm", placement=[2], other_norm="batch")
    kinds = {layer.name: type(layer) for layer in _norm_layers(model)}
    assert kinds == {"conv1_norm": keras_norm.BatchNormalization,
                     "conv2_norm": keras.layers.LayerNormalization,
                     "conv3_norm": keras_norm.BatchNormalization,
                     "conv4_norm": keras_norm.BatchNormalization}


def test_norm_kwargs_reach_every_layer():
    model = models.build_model("small_cnn", norm="batch", norm_kwargs={"momentum": 0.5})
    assert [layer.momentum for layer in _norm_layers(model)] == [0.5, 0.5, 0.5]


def test_norm_none_builds_plain_convolutions():
    model = models.build_model("resnet20", norm="none")
    assert _norm_layers(model) == []
    assert all(layer.use_bias for layer in model.layers
               if isinstance(layer, keras.layers.Conv2D))


def test_resnet20_matches_the_paper():
    """He et al.: 0.27 M parameters, 19 conv (+ norm) layers and one dense layer."""
    model = models.build_model("resnet20", norm="batch")
    assert 0.26e6 < model.count_params() < 0.28e6
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 19
    assert model.get_layer("stage3_block1_shortcut_fold").output.shape[1:] == (8, 8, 64)


def test_model_round_trips_through_keras_saving(tmp_path):
    model = models.build_model("resnet20", norm="batch")
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(restored(IMAGES, training=False), model(IMAGES, training=False),
                               rtol=1e-5, atol=1e-5)


def test_mixed_precision_logits_are_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = models.build_model("small_cnn", norm="batch")
    assert model.layers[1].compute_dtype == "float16"
    assert model(IMAGES).dtype == "float32"


@pytest.mark.parametrize("placement, error, match", [
    ("sideways", ValueError, "must be one of .*Received: placement='sideways'"),
    ("0", ValueError, "numbered from 1"),
    (True, TypeError, "not a bool"),
    (2.5, TypeError, "an int or a list of ints"),
    ("4", ValueError, "position 4, but 'small_cnn' has 3 norm positions"),
])
def test_bad_placement(placement, error, match):
    with pytest.raises(error, match=match):
        models.build_model("small_cnn", placement=placement)


def test_bad_model_and_norm_names():
    with pytest.raises(ValueError, match="unknown model 'resnet50'. Valid names: resnet20"):
        models.build_model("resnet50")
    with pytest.raises(ValueError, match="Unknown normalization 'btach'. Did you mean 'batch'"):
        models.build_model("small_cnn", norm="btach")
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("small_cnn", num_classes=0)


# ------------------------------------------------------------------------------ head norm
@pytest.mark.parametrize("name", models.MODELS)
def test_head_norm_normalizes_each_class_logit_across_the_batch(name):
    """Dense -> head norm -> logits: in training mode, batch norm there gives every class's
    logit mean 0 and variance 1 over the batch (gamma 1, beta 0 at initialization)."""
    model = models.build_model(name, norm="batch", head_norm="batch")
    order = [layer.name for layer in model.layers]
    assert order[-3:] == ["logits", "logits_norm", "logits_float32"]
    assert isinstance(model.get_layer("logits_norm"), keras_norm.BatchNormalization)
    assert len(_norm_layers(model)) == POSITIONS[name] + 1
    images = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype("float32")
    logits = np.asarray(model(images, training=True))
    dense = np.asarray(keras.Model(model.input, model.get_layer("logits").output)(
        images, training=True))
    epsilon = model.get_layer("logits_norm").epsilon
    expected = (dense - dense.mean(axis=0)) / np.sqrt(dense.var(axis=0) + epsilon)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(logits.mean(axis=0), 0, atol=1e-4)
    # The plain model's logits are not standardized per class.
    plain = np.asarray(models.build_model(name, norm="batch")(images, training=True))
    assert np.abs(plain.mean(axis=0)).max() > 1e-3 or np.abs(plain.var(axis=0) - 1).max() > 0.1


def test_no_head_norm_adds_no_layer():
    names = [layer.name for layer in models.build_model("small_cnn").layers]
    for head in (None, "none", "None"):
        model = models.build_model("small_cnn", head_norm=head)
        assert [layer.name for layer in model.layers] == names
    assert models.build_model("small_cnn", head_norm="batch").name == "small_cnn_batch_head_batch"


def test_every_norm_kind_fits_the_head_except_conv_wrappers():
    norms = keras_norm.available()
    assert {keras_norm.spec(norm).kind for norm in norms} == set(KINDS), norms  # each branch
    for norm in norms:
        spec = keras_norm.spec(norm)
        if spec.kind == "conv_wrapper":
            with pytest.raises(ValueError, match=f"'{spec.name}' is a 'conv_wrapper' and needs "
                                                 "a convolution"):
                models.build_model("small_cnn", head_norm=norm)
            continue
        model = models.build_model("small_cnn", norm="none", head_norm=norm)
        assert type(model.get_layer("logits_norm")) is type(spec.build(channels=10)), norm
        _check_outputs(model)


def test_head_norm_kwargs_and_bad_names():
    model = models.build_model("small_cnn", head_norm="batch",
                               head_norm_kwargs={"momentum": 0.5})
    assert model.get_layer("logits_norm").momentum == 0.5
    with pytest.raises(ValueError, match="Unknown normalization 'btach'. Did you mean 'batch'"):
        models.build_model("small_cnn", head_norm="btach")


def test_head_norm_under_mixed_precision_gives_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model("small_cnn", norm="batch", head_norm="batch")
        assert model.get_layer("logits_norm").compute_dtype == "float16"
        assert model(IMAGES, training=True).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
