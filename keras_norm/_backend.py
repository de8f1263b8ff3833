"""Checks that Keras runs on the TensorFlow backend, without changing any global state."""

import keras


def check_backend():
    """Raises `ImportError` unless Keras's active backend is TensorFlow.

    keras_norm never switches the backend itself: doing so behind the user's back would change
    the behaviour of every other Keras model in the process.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            "keras_norm requires Keras 3 on the TensorFlow backend, but the active Keras "
            f"backend is {backend!r}. Set the environment variable KERAS_BACKEND=tensorflow "
            "before importing keras (or set it in ~/.keras/keras.json). "
            f"Received: keras.backend.backend()={backend!r}"
        )
