"""One map from names to normalization layers: `get`, `available`, `register`, `spec`.

Every lookup (models, recipes, the tuner, `convert`) goes through `_REGISTRY`. Each entry
records, besides how to build the layer, where it goes in a network:

- `"norm"`: placed after a convolution, before the activation (batch, group, ...);
- `"norm_act"`: replaces both the norm and the activation (FRN+TLU, EvoNorm);
- `"conv_wrapper"`: wraps the convolution itself (Cross-Iteration BN).

and which convolution it pairs with (`conv`), e.g. Moving Average BN with `CenteredConv2D`.
"""

import dataclasses
import difflib
from typing import Callable, Optional

import keras

KINDS = ("norm", "norm_act", "conv_wrapper")
GHOST_BATCH_SIZE = 32
MAX_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A registry entry.

    Attributes:
        name: The canonical (lowercase, `_`-separated) name.
        factory: `(**kwargs) -> keras.layers.Layer` (a layer class or a function).
        kind: `"norm"`, `"norm_act"` or `"conv_wrapper"` (see the module docstring).
        conv: The convolution class the norm pairs with, or None for `keras.layers.Conv2D`.
        defaults: `(channels) -> dict` of keyword arguments that depend on the channel count
            (e.g. an adapted group count); the caller's own arguments always win.
        batch_dependent: Whether training outputs depend on other examples of the batch.
        description: One line for tables and `--help`.
    """

    name: str
    factory: Callable
    kind: str = "norm"
    conv: Optional[type] = None
    defaults: Optional[Callable] = None
    batch_dependent: bool = False
    description: str = ""

    def build(self, channels=None, **kwargs):
        """A new layer: channel-dependent defaults, overridden by `kwargs`."""
        options = {}
        if self.defaults is not None and channels is not None:
            options.update(self.defaults(channels))
        options.update(kwargs)
        return self.factory(**options)


_REGISTRY = {}


def canonical_name(name):
    """Registry names ignore case and treat `-` like `_`."""
    return name.strip().lower().replace("-", "_")


def register(name, factory, *, kind="norm", conv=None, defaults=None, batch_dependent=False,
             description="", overwrite=False):
    """Registers a normalization under `name` so that `get(name)` builds it.

    Args:
        name: The name (case and `-`/`_` insensitive).
        factory: A layer class or a function `(**kwargs) -> keras.layers.Layer`.
        kind: Where it goes in a network: `"norm"`, `"norm_act"` or `"conv_wrapper"`.
            Defaults to `"norm"`.
        conv: The convolution class it pairs with, or None. Defaults to `None`.
        defaults: Optional `(channels) -> dict` of channel-dependent default arguments.
        batch_dependent: Whether its training output depends on the batch. Defaults to False.
        description: One-line description. Defaults to `""`.
        overwrite: Allow replacing an existing entry. Defaults to `False`.

    Returns:
        The `NormSpec` stored.

    Example:

    >>> import keras, keras_norm
    >>> _ = keras_norm.register("my_ln", keras.layers.LayerNormalization, overwrite=True)
    >>> type(keras_norm.get("My-LN")).__name__
    'LayerNormalization'
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register: `name` must be a non-empty string. Received: name={name!r}")
    if not callable(factory):
        raise TypeError(f"register: `factory` must be a layer class or a callable. "
                        f"Received: factory={factory!r}")
    if kind not in KINDS:
        raise ValueError(f"register: `kind` must be one of {list(KINDS)}. Received: kind={kind!r}")
    key = canonical_name(name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"register: the name {key!r} is already registered; pass "
                         f"overwrite=True to replace it. Received: name={name!r}")
    entry = NormSpec(key, factory, kind, conv, defaults, batch_dependent, description)
    _REGISTRY[key] = entry
    return entry


def available():
    """The registered names, sorted (plus `"none"`, which builds an identity layer)."""
    return sorted(_REGISTRY)


def _unknown(identifier):
    names = available() + ["none"]
    close = difflib.get_close_matches(canonical_name(identifier), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown normalization {identifier!r}.{hint} Valid names: "
                      f"{', '.join(names)}.")


def spec(identifier):
    """The `NormSpec` of a registered name (`None`/"none" give the identity entry)."""
    if identifier is None or (isinstance(identifier, str)
                              and canonical_name(identifier) == "none"):
        return NormSpec("none", lambda **kwargs: keras.layers.Identity(**kwargs),
                        description="no normalization")
    if not isinstance(identifier, str):
        raise TypeError(f"spec: expected a registered name. Received: {identifier!r}")
    key = canonical_name(identifier)
    if key not in _REGISTRY:
        raise _unknown(identifier)
    return _REGISTRY[key]


def get(identifier, channels=None, **kwargs):
    """Returns a new normalization layer.

    Args:
        identifier: A registered name (case and `-`/`_` insensitive, see `available()`), a
            layer class, a callable returning a layer, a serialized layer dict
            (`keras.saving.serialize_keras_object(layer)`, i.e. with `"class_name"` and
            `"config"`), or `None`/`"none"` for an identity layer (no normalization).
        channels: Optional channel count of the input, used by registered names to adapt
            their defaults (e.g. the group count of `"group"` when channels < 32). Never
            overrides an argument given in `kwargs`.
        **kwargs: Forwarded to the layer's constructor (or override the dict's config).

    Returns:
        A `keras.layers.Layer`.

    Example:

    >>> import keras_norm
    >>> keras_norm.get("sync-batch", momentum=0.9).synchronized
    True
    """
    if isinstance(identifier, str) or identifier is None:
        return spec(identifier).build(channels, **kwargs)
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise ValueError("get: a dict identifier must be a serialized layer with "
                             "'class_name' and 'config' (keras.saving.serialize_keras_object). "
                             f"Received: identifier={identifier!r}")
        config = dict(identifier)
        config["config"] = {**identifier.get("config", {}), **kwargs}
        layer = keras.saving.deserialize_keras_object(config)
    elif callable(identifier):
        layer = identifier(**kwargs)
    else:
        raise TypeError("get: `identifier` must be a name, a layer class, a callable, a "
                        f"serialized layer dict or None. Received: identifier={identifier!r}")
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(f"get: {identifier!r} did not build a keras Layer (got "
                        f"{type(layer).__name__}).")
    return layer


# ------------------------------------------------------------------- channel-dependent defaults
def adapted_groups(channels, max_groups=MAX_GROUPS):
    """The largest divisor of `channels` that is at most `max_groups` (32 in Wu & He)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _group_defaults(channels):
    return {"groups": adapted_groups(channels)}


# -------------------------------------------------------------------------------- built-ins
def _register_builtins():
    from keras_norm import layers

    bn = layers.BatchNormalization
    register("batch", bn, batch_dependent=True,
             description="batch norm (Ioffe & Szegedy 2015), a superset of Keras's")
    register("sync_batch", lambda **kw: bn(**{"synchronized": True, **kw}),
             batch_dependent=True,
             description="batch norm with exact cross-replica statistics")
    register("ghost_batch", lambda **kw: bn(**{"virtual_batch_size": GHOST_BATCH_SIZE, **kw}),
             batch_dependent=True,
             description=f"ghost batch norm, groups of {GHOST_BATCH_SIZE} (Hoffer et al. 2017)")
    register("batch_renorm",
             lambda **kw: bn(**{"renorm": True,
                                "renorm_clipping": {"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0},
                                **kw}),
             batch_dependent=True,
             description="batch renormalization, rmax=3, dmax=5 (Ioffe 2017)")
    register("layer", layers.LayerNormalization,
             description="layer norm over the channel axis (Ba et al. 2016)")
    register("group", layers.GroupNormalization, defaults=_group_defaults,
             description="group norm, 32 groups or the largest divisor below (Wu & He 2018)")
    register("group_ws", layers.GroupNormalization, defaults=_group_defaults,
             conv=layers.WeightStandardizedConv2D,
             description="group norm after weight-standardized convs (Qiao et al. 2019)")
    register("instance", layers.InstanceNormalization,
             description="instance norm (Ulyanov et al. 2016)")
    register("rms", layers.RMSNormalization,
             description="RMS norm over the channel axis (Zhang & Sennrich 2019)")
    register("frn", layers.FilterResponseNormalization, kind="norm_act",
             description="filter response norm + TLU (Singh & Krishnan 2019)")
    register("evonorm_b0", layers.EvoNormB0, kind="norm_act", batch_dependent=True,
             description="EvoNorm-B0, batch-dependent (Liu et al. 2020)")
    register("mixture", layers.MixtureNormalization, batch_dependent=True,
             description="mixture normalization, K=3 (Kalayeh & Shah 2018)")
    register("moving_average", layers.MovingAverageBatchNormalization,
             conv=layers.CenteredConv2D, batch_dependent=True,
             description="moving average batch norm + centered conv (Yan et al. 2020)")
    register("cross_iteration", layers.CrossIterationBatchNormalization, kind="conv_wrapper",
             batch_dependent=True,
             description="cross-iteration batch norm, window 4, wraps the conv (Yao et al. 2020)")
    register("evonorm_s0", layers.EvoNormS0, kind="norm_act", defaults=_group_defaults,
             description="EvoNorm-S0, group-based (Liu et al. 2020)")


_register_builtins()
