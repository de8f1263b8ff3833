"""Test-session set-up: split the CPU into logical devices once, before TensorFlow starts.

`MirroredStrategy` then runs for real on two (or more) replicas of this machine's CPU, so the
synchronized paths of every layer are tested without a GPU.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2


def _configure_logical_cpus():
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
        )
    except RuntimeError:
        # TensorFlow was already initialised by this process: keep what it has.
        pass


_configure_logical_cpus()


@pytest.fixture(scope="session")
def mirrored_strategy():
    """A `MirroredStrategy` over the logical CPU devices (two replicas)."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:NUM_LOGICAL_CPUS]
    assert len(devices) == NUM_LOGICAL_CPUS, f"expected {NUM_LOGICAL_CPUS} CPUs, got {devices}"
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts from float32 and fresh Keras name scopes."""
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")
    # free_memory=False: the forced garbage collection costs about a second per test.
    keras.backend.clear_session(free_memory=False)
