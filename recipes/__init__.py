"""Training recipes for keras_norm, run from the project root (`python -m recipes.cifar`)."""
