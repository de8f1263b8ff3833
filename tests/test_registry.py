"""The registry (get/available/register/spec) and convert()."""

import keras
import numpy as np
import pytest

import keras_norm
from keras_norm import registry

REQUIRED_NAMES = {"batch", "sync_batch", "ghost_batch", "batch_renorm"}


def test_required_names_are_registered():
    assert REQUIRED_NAMES <= set(keras_norm.available())
    assert keras_norm.available() == sorted(keras_norm.available())


@pytest.mark.parametrize("name", ["Sync-Batch", "sync_batch", " SYNC_BATCH "])
def test_names_ignore_case_and_dashes(name):
    layer = keras_norm.get(name, momentum=0.5)
    assert isinstance(layer, keras_norm.BatchNormalization)
    assert layer.synchronized and layer.momentum == 0.5


def test_defaults_can_be_overridden():
    assert keras_norm.get("ghost_batch").virtual_batch_size == registry.GHOST_BATCH_SIZE
    assert keras_norm.get("ghost_batch", virtual_batch_size=4).virtual_batch_size == 4
    assert keras_norm.get("batch_renorm").renorm


def test_get_returns_a_new_instance_each_time():
    assert keras_norm.get("batch") is not keras_norm.get("batch")


@pytest.mark.parametrize("identifier", [None, "none", "None"])
def test_none_is_identity(identifier):
    layer = keras_norm.get(identifier)
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(layer(x), x)


def test_class_callable_and_serialized_dict():
    assert isinstance(keras_norm.get(keras.layers.LayerNormalization),
                      keras.layers.LayerNormalization)
    layer = keras_norm.get(lambda **kw: keras_norm.BatchNormalization(**kw), epsilon=0.1)
    assert layer.epsilon == 0.1
    config = keras.saving.serialize_keras_object(keras_norm.BatchNormalization(momentum=0.7))
    rebuilt = keras_norm.get(config, epsilon=0.2)
    assert isinstance(rebuilt, keras_norm.BatchNormalization)
    assert rebuilt.momentum == 0.7 and rebuilt.epsilon == 0.2


def test_unknown_name_lists_names_and_suggests():
    with pytest.raises(ValueError, match=r"Unknown normalization 'bach'\. Did you mean "
                                         r"'batch'\? Valid names: batch, "):
        keras_norm.get("bach")


@pytest.mark.parametrize("identifier, error, fragment", [
    (3, TypeError, r"`identifier` must be a name"),
    ({"config": {}}, ValueError, r"'class_name' and 'config'"),
    (lambda: "not a layer", TypeError, r"did not build a keras Layer \(got str\)"),
])
def test_bad_identifiers(identifier, error, fragment):
    with pytest.raises(error, match=fragment):
        keras_norm.get(identifier)


def test_register_and_errors():
    entry = keras_norm.register("Test-Norm", keras.layers.LayerNormalization, kind="norm",
                                overwrite=True)
    try:
        assert entry.name == "test_norm" and "test_norm" in keras_norm.available()
        assert isinstance(keras_norm.get("test-norm"), keras.layers.LayerNormalization)
        with pytest.raises(ValueError, match=r"already registered.*overwrite=True"):
            keras_norm.register("test_norm", keras.layers.LayerNormalization)
    finally:
        registry._REGISTRY.pop("test_norm")
    with pytest.raises(ValueError, match=r"`kind` must be one of"):
        keras_norm.register("x", keras.layers.LayerNormalization, kind="activation")
    with pytest.raises(TypeError, match=r"`factory` must be a layer class or a callable"):
        keras_norm.register("x", 3)


@pytest.mark.parametrize("channels, groups", [(64, 32), (24, 24), (16, 16), (40, 20), (7, 7),
                                              (96, 32)])
def test_adapted_groups(channels, groups):
    assert registry.adapted_groups(channels) == groups


def test_every_entry_records_a_kind():
    for name in keras_norm.available():
        entry = keras_norm.spec(name)
        assert entry.kind in registry.KINDS, name
        assert entry.description, name


# ----------------------------------------------------------------------------------- convert
def _keras_bn_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-4)(x)
    x = keras.layers.ReLU()(x)
    inner = keras.Sequential([keras.Input((6, 6, 8)), keras.layers.Conv2D(4, 1),
                              keras.layers.BatchNormalization()])
    x = inner(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(2, 3, (16, 8, 8, 3)).astype("float32")
    for _ in range(3):
        model(x, training=True)  # move the moving statistics
    return model, x


@pytest.mark.parametrize("norm", ["sync_batch", "ghost_batch", "batch_renorm", "batch"])
def test_convert_batch_norm_variants_keep_weights_and_outputs(norm):
    model, x = _keras_bn_model()
    converted = keras_norm.convert(model, norm)
    norms = [layer for layer in converted._flatten_layers()
             if isinstance(layer, keras_norm.BatchNormalization)]
    assert len(norms) == 2
    assert norms[0].momentum == 0.8 and norms[0].epsilon == 1e-4
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False),
                               atol=1e-5)
    assert not any(isinstance(layer, keras_norm.BatchNormalization)
                   for layer in model._flatten_layers())


def test_convert_to_a_layer_without_moving_statistics_keeps_gamma_beta():
    model, _ = _keras_bn_model()
    first_bn = model.layers[2]
    first_bn.gamma.assign(np.linspace(0.5, 1.5, 8))
    converted = keras_norm.convert(model, keras.layers.LayerNormalization)
    ln = converted.layers[2]
    assert isinstance(ln, keras.layers.LayerNormalization)
    np.testing.assert_array_equal(ln.gamma.numpy(), first_bn.gamma.numpy())


def test_convert_keras_application():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=10)
    # Weights and statistics away from their initial values: a conversion that did not copy
    # them would then change the outputs.
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in layer.get_weights()])
    converted = keras_norm.convert(model, "sync_batch")
    before = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    after = [layer for layer in converted.layers
             if isinstance(layer, keras_norm.BatchNormalization)]
    assert before == len(after) > 10 and all(layer.synchronized for layer in after)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(converted(x), model(x), atol=1e-5)


def test_convert_errors():
    model, _ = _keras_bn_model()
    with pytest.raises(ValueError, match=r"Unknown normalization 'bogus'"):
        keras_norm.convert(model, "bogus")

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match=r"Sequential or Functional.*Subclassed"):
        keras_norm.convert(Subclassed(), "batch")
