"""CIFAR models whose normalization is chosen by registry name and placement.

Three functional Keras models, each a stack of "norm positions" (a convolution that may be
followed by a normalization):

- ``resnet20``: the CIFAR ResNet of He et al. 2016 (arXiv:1512.03385, section 4.2): a 3x3
  16-channel stem, then 3 stages of 3 basic blocks (two 3x3 convolutions each) with 16, 32 and
  64 channels, global average pooling and a dense classifier; 19 norm positions, 0.27 M
  parameters. Shortcuts that change shape are the paper's parameter-free option A (stride-2
  subsampling and zero-padded channels), so every normalization sits in the residual branch.
- ``mn_cnn``: the 5-layer CNN of the Mixture Normalization experiments (Kalayeh & Shah 2018,
  arXiv:1806.02892, as in docs/algorithms.md section 7): 5x5 convolutions with 64, 128, 128 and 256
  channels, each followed by norm + ReLU, max pooling (3x3, stride 2) after the first three
  and 4x4 average pooling after the fourth, then a dense layer; 4 norm positions. The layer
  sizes and pooling follow the public Keras reproduction cited there (b-faye), in which the
  Mixture Normalization replaces the batch norm of the second convolution.
- ``small_cnn``: a small fast CNN for quick runs and tests: 3x3 convolutions with 32, 64 and
  128 channels, each followed by norm + ReLU, max pooling after the first two, global average
  pooling and a dense layer; 3 norm positions, 0.1 M parameters.

Where a normalization goes, by its registry kind (``keras_norm.spec(name).kind``):

- ``"norm"``: ``conv(use_bias=False) -> norm -> ReLU``; the conv is the spec's own class
  (``spec.conv``, e.g. a weight-standardized conv) or ``keras.layers.Conv2D``.
- ``"norm_act"``: ``conv(use_bias=False) -> norm_act``: the layer replaces the norm and the
  ReLU after it. In a ResNet block the second norm has no activation after it (the ReLU
  follows the addition); there the norm_act layer is still used whole, and the ReLU after the
  addition, part of the architecture, is kept.
- ``"conv_wrapper"``: ``spec.build(channels, layer=conv(use_bias=False)) -> ReLU`` (the
  wrapper, e.g. Cross-Iteration BN, owns the convolution).

A position without a normalization is ``Conv2D(use_bias=True) -> ReLU``.

Head normalization (``head_norm``): a normalization of the classifier's output, between the
last Dense and the softmax (``Dense -> norm -> logits``), e.g. ``head_norm="batch"``. With
batch norm there, each class's logit is standardized across the batch, so the scores of a
batch's images are ranked against each other class by class; on class-balanced batches that
is what lets batch statistics carry the class structure (experiment 1 of EXPERIMENTS.md).
Only layers that accept a ``(batch, classes)`` input fit there (kinds ``"norm"`` and
``"norm_act"``); the default ``None`` adds no layer at all.

Placement (``placement``): ``"all"`` puts the norm at every position, ``"first"`` at the first
position only (one normalization early, the "too much BN may hurt" question), ``"none"``
nowhere; a list of 1-based positions (``[2]`` or ``"2,4"``) puts it exactly there. Positions
without ``norm`` get ``other_norm`` (default: no normalization), so ``norm="mixture",
placement=[2], other_norm="batch"`` is the MN paper's setting.
"""

import keras

import keras_norm

MODELS = ("resnet20", "mn_cnn", "small_cnn")
PLACEMENTS = ("all", "first", "none")


def _relu(name):
    return keras.layers.ReLU(name=name)


class _NormPlan:
    """Decides, position by position, which normalization (if any) follows a convolution.

    Positions are numbered from 1 in the order the model builder asks for them; after the model
    is built, `check_complete` verifies that every requested position existed.
    """

    def __init__(self, norm, norm_kwargs, placement, other_norm, other_norm_kwargs):
        self.main = self._resolve(norm, norm_kwargs)
        self.other = self._resolve(other_norm, other_norm_kwargs)
        self.placement = placement
        self.positions = canonical_placement(placement)
        self.count = 0

    @staticmethod
    def _resolve(name, kwargs):
        spec = keras_norm.spec(name)
        return None if spec.name == "none" else (spec, dict(kwargs or {}))

    def next(self):
        """The `(spec, kwargs)` for the next position, or None for no normalization."""
        self.count += 1
        if self.positions == "all":
            chosen = True
        elif self.positions == "none":
            chosen = False
        else:
            chosen = self.count in self.positions
        return self.main if chosen else self.other

    def check_complete(self, model_name):
        _check_range(model_name, self.placement, self.positions, self.count)


def _check_range(model_name, placement, positions, count):
    if isinstance(positions, frozenset) and max(positions) > count:
        raise ValueError(
            f"build_model: `placement` names position {max(positions)}, but {model_name!r} "
            f"has {count} norm positions (1..{count}). Received: placement={placement!r}"
        )


def canonical_placement(placement):
    """`"all"`, `"none"`, or a frozenset of 1-based positions (`"first"` is `{1}`).

    Accepts the names in `PLACEMENTS`, an int, a list/tuple of ints, or a comma-separated
    string of ints (`"2"`, `"1,3"`).
    """
    if isinstance(placement, str):
        text = placement.strip().lower()
        if text in ("all", "none"):
            return text
        if text == "first":
            return frozenset({1})
        try:
            placement_list = [int(item) for item in text.split(",")]
        except ValueError:
            raise ValueError(
                f"build_model: `placement` must be one of {list(PLACEMENTS)} or 1-based "
                f"positions such as '2' or '1,3'. Received: placement={placement!r}"
            ) from None
    elif isinstance(placement, bool):
        raise TypeError(f"build_model: `placement` must be a string or ints, not a bool. "
                        f"Received: placement={placement!r}")
    elif isinstance(placement, int):
        placement_list = [placement]
    elif isinstance(placement, (list, tuple)) and placement and all(
            isinstance(p, int) and not isinstance(p, bool) for p in placement):
        placement_list = list(placement)
    else:
        raise TypeError(
            f"build_model: `placement` must be one of {list(PLACEMENTS)}, an int or a list of "
            f"ints. Received: placement={placement!r}"
        )
    if not placement_list or min(placement_list) < 1:
        raise ValueError(f"build_model: `placement` positions are numbered from 1. "
                         f"Received: placement={placement!r}")
    return frozenset(placement_list)


class _Builder:
    """Adds `conv [-> norm] [-> activation]` units according to a `_NormPlan`."""

    def __init__(self, plan):
        self.plan = plan

    def conv_unit(self, x, filters, kernel_size, strides=1, activate=True, name="conv"):
        """One norm position: a convolution, its normalization (per the plan) and a ReLU.

        With `activate=False` the ReLU is left out (a ResNet block's second unit), except that
        a `norm_act` layer always applies its own activation.
        """
        choice = self.plan.next()
        conv_args = dict(filters=filters, kernel_size=kernel_size, strides=strides,
                         padding="same", kernel_initializer="he_normal")
        if choice is None:
            x = keras.layers.Conv2D(use_bias=True, name=name, **conv_args)(x)
            return _relu(f"{name}_relu")(x) if activate else x
        spec, kwargs = choice
        conv_class = spec.conv or keras.layers.Conv2D
        if spec.kind == "conv_wrapper":
            conv = conv_class(use_bias=False, name=f"{name}_inner", **conv_args)
            x = spec.build(channels=filters, layer=conv, name=f"{name}_norm", **kwargs)(x)
            return _relu(f"{name}_relu")(x) if activate else x
        x = conv_class(use_bias=False, name=name, **conv_args)(x)
        x = spec.build(channels=filters, name=f"{name}_norm", **kwargs)(x)
        if spec.kind == "norm_act" or not activate:
            return x
        return _relu(f"{name}_relu")(x)


def _classifier(x, num_classes, head=None):
    x = keras.layers.Dense(num_classes, name="logits")(x)
    if head is not None:
        spec, kwargs = head
        x = spec.build(channels=num_classes, name="logits_norm", **kwargs)(x)
    # Logits in float32 under a mixed-precision policy, so the softmax loss is computed stably.
    return keras.layers.Activation("linear", dtype="float32", name="logits_float32")(x)


def _shortcut_option_a(x, filters, strides, name):
    """He et al.'s option A: subsample by `strides` and zero-pad the channels to `filters`."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    if strides > 1:
        x = keras.layers.MaxPooling2D(pool_size=1, strides=strides, name=f"{name}_subsample")(x)
    extra = filters - x.shape[-1]
    if extra:
        # Pad the channel axis with standard layers only (the model stays serializable):
        # view the channels as a third spatial axis, zero-pad it, and fold it back.
        height, width, channels = x.shape[1:]
        before = extra // 2
        x = keras.layers.Reshape((height, width, channels, 1), name=f"{name}_expand")(x)
        x = keras.layers.ZeroPadding3D(((0, 0), (0, 0), (before, extra - before)),
                                       name=f"{name}_pad")(x)
        x = keras.layers.Reshape((height, width, filters), name=f"{name}_fold")(x)
    return x


def _resnet20(inputs, builder, num_classes, head):
    x = builder.conv_unit(inputs, 16, 3, name="stem")
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            strides = 2 if stage > 1 and block == 1 else 1
            prefix = f"stage{stage}_block{block}"
            shortcut = _shortcut_option_a(x, filters, strides, f"{prefix}_shortcut")
            y = builder.conv_unit(x, filters, 3, strides, name=f"{prefix}_conv1")
            y = builder.conv_unit(y, filters, 3, activate=False, name=f"{prefix}_conv2")
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
            x = _relu(f"{prefix}_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return _classifier(x, num_classes, head)


def _mn_cnn(inputs, builder, num_classes, head):
    x = inputs
    for index, filters in enumerate((64, 128, 128, 256), start=1):
        x = builder.conv_unit(x, filters, 5, name=f"conv{index}")
        if index < 4:
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{index}")(x)
    # 4x4 average pooling of the 4x4 maps (for 32x32 inputs), as in the reproduction.
    x = keras.layers.GlobalAveragePooling2D(name="pool4")(x)
    return _classifier(x, num_classes, head)


def _small_cnn(inputs, builder, num_classes, head):
    x = inputs
    for index, filters in enumerate((32, 64, 128), start=1):
        x = builder.conv_unit(x, filters, 3, name=f"conv{index}")
        if index < 3:
            x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return _classifier(x, num_classes, head)


_BUILDERS = {"resnet20": _resnet20, "mn_cnn": _mn_cnn, "small_cnn": _small_cnn}
# Convolutions that may carry a norm, in order (tests check these against the built models).
_POSITIONS = {"resnet20": 19, "mn_cnn": 4, "small_cnn": 3}


def build_model(name, norm="batch", norm_kwargs=None, placement="all", num_classes=10,
                input_shape=(32, 32, 3), other_norm=None, other_norm_kwargs=None,
                head_norm=None, head_norm_kwargs=None):
    """Builds a functional CIFAR model with the chosen normalization.

    Args:
        name: One of `MODELS`: `"resnet20"`, `"mn_cnn"` or `"small_cnn"`.
        norm: A registered normalization name (`keras_norm.available()`), or `None`/`"none"`.
            Defaults to `"batch"`.
        norm_kwargs: Dict of keyword arguments for every `norm` layer (on top of the
            registry's channel-dependent defaults). Defaults to `None`.
        placement: `"all"`, `"first"`, `"none"`, or 1-based norm positions (an int, a list of
            ints or a string such as `"2,4"`). Defaults to `"all"`.
        num_classes: Number of output logits. Defaults to `10`.
        input_shape: Shape of one input image (channels last). Defaults to `(32, 32, 3)`.
        other_norm: Normalization at the positions `placement` does not select, or `None`
            for none. Defaults to `None`.
        other_norm_kwargs: Keyword arguments for `other_norm` layers. Defaults to `None`.
        head_norm: Normalization between the classifier's Dense and the logits (a registered
            name of kind `"norm"` or `"norm_act"`), or `None`/`"none"` for none. Defaults to
            `None`.
        head_norm_kwargs: Keyword arguments for the `head_norm` layer. Defaults to `None`.

    Returns:
        A `keras.Model` from images to float32 logits, named after its configuration. Norm
        layers are named `<position>_norm` (the head norm `logits_norm`).

    Example:

    >>> from recipes.models import build_model
    >>> model = build_model("small_cnn", norm="batch", head_norm="batch")
    >>> [layer.name for layer in model.layers if layer.name.endswith("_norm")]
    ['conv1_norm', 'conv2_norm', 'conv3_norm', 'logits_norm']

    Raises:
        ValueError: For an unknown model or normalization name (the registry's message lists
            the valid names) or a placement position the model does not have.
        TypeError: For a placement of the wrong type, or arguments a layer rejects.
    """
    if name not in _BUILDERS:
        raise ValueError(f"build_model: unknown model {name!r}. Valid names: "
                         f"{', '.join(MODELS)}. Received: name={name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_model: `num_classes` must be a positive int. "
                         f"Received: num_classes={num_classes!r}")
    plan = _NormPlan(norm, norm_kwargs, placement, other_norm, other_norm_kwargs)
    head = resolve_head_norm(head_norm, head_norm_kwargs)
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    outputs = _BUILDERS[name](inputs, _Builder(plan), num_classes, head)
    plan.check_complete(name)
    label = keras_norm.spec(norm).name
    if head is not None:
        label += f"_head_{head[0].name}"
    return keras.Model(inputs, outputs, name=f"{name}_{label}")


def resolve_head_norm(head_norm, head_norm_kwargs=None):
    """`(spec, kwargs)` of a head normalization name, or `None` for `None`/`"none"`.

    Raises:
        ValueError: For an unknown name (the registry's message lists the valid ones) or a
            `conv_wrapper` norm, which needs a convolution to wrap.
    """
    if head_norm is None:
        return None
    spec = keras_norm.spec(head_norm)
    if spec.name == "none":
        return None
    if spec.kind not in ("norm", "norm_act"):
        raise ValueError(f"build_model: `head_norm` must be a norm that takes the classifier's "
                         f"(batch, classes) output (kind 'norm' or 'norm_act'); {spec.name!r} "
                         f"is a {spec.kind!r} and needs a convolution. "
                         f"Received: head_norm={head_norm!r}")
    return spec, dict(head_norm_kwargs or {})


def norm_positions(name):
    """The number of norm positions of model `name` (19 for ResNet-20)."""
    return _POSITIONS[name]


def check_placement(name, placement):
    """Raises what `build_model(name, placement=placement)` would for a bad placement,
    without building the model."""
    _check_range(name, placement, canonical_placement(placement), norm_positions(name))
