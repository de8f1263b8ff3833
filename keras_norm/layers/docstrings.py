"""Argument descriptions several layers share, written once and filled into their docstrings.

A class docstring holds a placeholder line such as `{affine_args}`, indented like the Args
around it; the `document` class decorator replaces it with `DOC_FRAGMENTS["affine_args"]`, so
`help(layer)` and the rendered documentation show every argument in full.
"""

import re

#: Argument descriptions several layers share, filled into class docstrings by `document`.
DOC_FRAGMENTS = {
    "affine_args": """\
center: If `True`, add the learned offset `beta`. Defaults to `True`.
scale: If `True`, multiply by the learned `gamma`. Defaults to `True`.
beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
beta_regularizer: Optional regularizer for `beta`. Defaults to `None`.
gamma_regularizer: Optional regularizer for `gamma`. Defaults to `None`.
beta_constraint: Optional constraint for `beta`. Defaults to `None`.
gamma_constraint: Optional constraint for `gamma`. Defaults to `None`.""",
    "moving_initializer_args": """\
moving_mean_initializer: Initializer for the moving mean. Defaults to `"zeros"`.
moving_variance_initializer: Initializer for the moving variance. Defaults to `"ones"`.""",
    "inference_statistics_arg": """\
inference_statistics: `"moving"` or `"batch"`: what to normalize with at inference.
    Defaults to `"moving"`.""",
    "v_args": """\
v_initializer: Initializer for `v`. Defaults to `"ones"`.
v_regularizer: Optional regularizer for `v`. Defaults to `None`.
v_constraint: Optional constraint for `v`. Defaults to `None`.""",
    "conv2d_args": """\
filters, kernel_size, strides, padding, data_format, dilation_rate, groups, activation,
    use_bias, kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
    activity_regularizer, kernel_constraint, bias_constraint: As for `keras.layers.Conv2D`
    (positional order included). Regularizers and constraints act on the raw kernel.""",
    "kwargs_arg": """\
**kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).""",
    "per_example_mask_arg": """\
mask: Optional boolean mask in Keras's layout: the input's shape without its last
    axis, or a shorter prefix of the input's shape (`(batch, time)`), broadcast over
    the remaining axes (see `keras_norm.layers.group_norm`).""",
}

#: A placeholder line: `{name}` alone on its line, indented like the text around it.
PLACEHOLDER = re.compile(r"^( *)\{(\w+)\}$", re.MULTILINE)


def document(cls):
    """Class decorator: replaces each `{name}` line of the docstring by `DOC_FRAGMENTS[name]`,
    indented as the placeholder, so `help()` shows every argument. An unknown name fails at
    import (a `KeyError`), so no placeholder can reach a rendered docstring."""
    def fill(match):
        indent, name = match.groups()
        return "\n".join(indent + line for line in DOC_FRAGMENTS[name].splitlines())

    if cls.__doc__:  # None under `python -OO`
        cls.__doc__ = PLACEHOLDER.sub(fill, cls.__doc__)
    return cls
