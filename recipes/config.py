"""What a training run depends on: `RunConfig`, grouped by concern, built one way.

A `RunConfig` holds five groups: `data` (source, subset sizes, batches, augmentation),
`network` (model, norm and where it goes), `optimization` (optimizer, learning rate and
schedule, epochs), `evaluation` (evaluation modes) and `run` (seed, strategy, hardware,
output). `from_args` builds it from parsed command-line arguments, the same way for
`recipes.cifar`, for every trial of `recipes.tune` and for the runs of `recipes.experiments`.

Its flat form (`to_dict`, `from_dict`, and attribute names such as `config.lr`) names each
setting alone, without its group: `results.json` and `run_config.json` store that form, so
runs written before the settings were grouped still load and resume.
"""

import copy
import dataclasses

EVAL_MODES = ("population", "batch", "balanced", "pseudo_balanced", "assignment", "recomputed")
STRATEGIES = ("default", "mirrored", "multiworker")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BATCH_STRUCTURES = ("random", "balanced")
#: Settings older runs recorded that no longer exist; `from_dict` drops them.
RETIRED_SETTINGS = ("stop_after_epochs",)


class ConfigError(ValueError):
    """A bad setting: the command line reports it in one line and exits with status 2."""


@dataclasses.dataclass
class DataConfig:
    """The images and how they are batched.

    Args:
        source: Where the data is (`recipes.datasets.load_data`); None: found as documented.
        train_size: Class-balanced training subset; None: every training image.
        test_size: Class-balanced test subset; None: every test image.
        batch_size: Global batch size (over every replica).
        batch_structure: `"random"` or `"balanced"` (k images of every class per batch).
        examples_per_class: k of balanced batches; None: `batch_size / classes`.
        augment: Random 4-pixel-pad crop and horizontal flip of training images.
    """

    source: str = None
    train_size: int = None
    test_size: int = None
    batch_size: int = 128
    batch_structure: str = "random"
    examples_per_class: int = None
    augment: bool = True


@dataclasses.dataclass
class ModelConfig:
    """The model and its normalization (see `recipes.models.build_model`).

    Args:
        model: A name of `recipes.models.MODELS`.
        norm: A registered normalization name, or `"none"`.
        norm_kwargs: Constructor arguments of the norm layers.
        placement: `"all"`, `"first"`, `"none"` or 1-based positions such as `"2"`.
        other_norm: The norm at the positions `placement` leaves out, or None.
        head_norm: A norm between the classifier's Dense and the softmax, or None.
    """

    model: str = "small_cnn"
    norm: str = "batch"
    norm_kwargs: dict = dataclasses.field(default_factory=dict)
    placement: str = "all"
    other_norm: str = None
    head_norm: str = None


@dataclasses.dataclass
class OptimizationConfig:
    """The optimizer, the learning rate and how long to train (see `recipes.training`).

    Args:
        optimizer: `"sgd"` or `"adamw"`.
        lr: Learning rate at batch 128, scaled linearly with the global batch.
        momentum: SGD momentum.
        weight_decay: Decoupled weight decay of convolution and dense kernels.
        schedule: `"cosine"` (decay to 0 at the last step) or `"constant"`.
        warmup_epochs: Linear warm-up epochs before the cosine decay.
        epochs: Epochs to train.
        steps_per_epoch: Batches per epoch (the data wraps around); None: one pass.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    epochs: int = 5
    steps_per_epoch: int = None


@dataclasses.dataclass
class EvaluationConfig:
    """The evaluation after training.

    Args:
        eval_modes: Modes of `EVAL_MODES`, or `("auto",)`.
        recompute_steps: Training batches averaged by the `recomputed` mode.
    """

    eval_modes: tuple = ("auto",)
    recompute_steps: int = 200


@dataclasses.dataclass
class RunSettings:
    """Where and how the run executes.

    Args:
        seed: Seed of the subsets, the initialization and the data order.
        strategy: A name of `STRATEGIES`.
        cpu_replicas: Logical CPU devices to split the CPU into (mirrored runs on a CPU).
        jit: Compile the training and evaluation steps with XLA.
        mixed_precision: The `mixed_float16` policy with loss scaling.
        output: The output folder.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.
    """

    seed: int = 0
    strategy: str = "default"
    cpu_replicas: int = None
    jit: bool = False
    mixed_precision: bool = False
    output: str = None
    verbose: int = 1


#: The groups of a `RunConfig`, in order.
GROUPS = {"data": DataConfig, "network": ModelConfig, "optimization": OptimizationConfig,
          "evaluation": EvaluationConfig, "run": RunSettings}
#: Setting name -> the group holding it.
GROUP_OF = {field.name: group for group, cls in GROUPS.items()
            for field in dataclasses.fields(cls)}


@dataclasses.dataclass(init=False)
class RunConfig:
    """Everything a CIFAR run depends on, in five groups (see the module docstring).

    Each setting is also an attribute of its own name (`config.lr` is
    `config.optimization.lr`, for reading and assigning), as in `to_dict`, and a keyword of
    the constructor: `RunConfig(lr=0.1, epochs=3)` is `RunConfig()` with those two settings,
    and `dataclasses.replace(config, lr=0.2)` works too.

    Args:
        data, network, optimization, evaluation, run: The groups (`GROUPS`); a group not
            given has its defaults.
        **settings: Flat settings (`GROUP_OF`), applied after the groups (to a copy of a
            given group, which stays as it was).

    Raises:
        TypeError: For a keyword that is neither a group nor a setting.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    network: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimization: OptimizationConfig = dataclasses.field(default_factory=OptimizationConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    run: RunSettings = dataclasses.field(default_factory=RunSettings)

    def __init__(self, data=None, network=None, optimization=None, evaluation=None, run=None,
                 **settings):
        unknown = sorted(set(settings) - set(GROUP_OF))
        if unknown:
            raise TypeError(f"RunConfig: unknown setting(s) {unknown}; known: groups "
                            f"{', '.join(GROUPS)}; settings {', '.join(GROUP_OF)}")
        given = {"data": data, "network": network, "optimization": optimization,
                 "evaluation": evaluation, "run": run}
        changed = {GROUP_OF[name] for name in settings}
        for group, value in given.items():
            if value is None:
                value = GROUPS[group]()
            elif group in changed:  # e.g. dataclasses.replace, which passes the groups
                value = dataclasses.replace(value)
            object.__setattr__(self, group, value)
        for name, value in settings.items():
            setattr(self, name, value)

    def __getattr__(self, name):
        # Only called for names that are not attributes: the settings of the groups.
        group = GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"RunConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    def __setattr__(self, name, value):
        if name in GROUPS:
            object.__setattr__(self, name, value)
        elif name in GROUP_OF:
            setattr(getattr(self, GROUP_OF[name]), name, value)
        else:  # a typo would otherwise add a setting that nothing reads
            raise AttributeError(f"RunConfig has no setting {name!r}")

    def to_dict(self):
        """The flat form: `{setting: value}` (what results.json and run_config.json hold)."""
        return {name: value for group in GROUPS
                for name, value in dataclasses.asdict(getattr(self, group)).items()}

    @classmethod
    def from_dict(cls, values):
        """The `RunConfig` of a flat dict (`to_dict`'s form); missing settings keep their
        defaults, `RETIRED_SETTINGS` are dropped and any other unknown name is a
        `TypeError`."""
        unknown = sorted(set(values) - set(GROUP_OF) - set(RETIRED_SETTINGS))
        if unknown:
            raise TypeError(f"RunConfig: unknown setting(s) {unknown}; known: "
                            f"{', '.join(GROUP_OF)}")
        grouped = {group: {} for group in GROUPS}
        for name, value in copy.deepcopy(dict(values)).items():
            if name in GROUP_OF:
                grouped[GROUP_OF[name]][name] = value
        if "eval_modes" in grouped["evaluation"]:  # JSON has lists
            grouped["evaluation"]["eval_modes"] = tuple(grouped["evaluation"]["eval_modes"])
        return cls(**{group: GROUPS[group](**fields) for group, fields in grouped.items()})

    def replace(self, **changes):
        """A copy with the settings named in `changes` (flat names) changed."""
        return self.from_dict({**self.to_dict(), **changes})


#: Settings filled by a command-line argument of another name.
ARGUMENT_OF = {"eval_modes": "eval"}


def from_args(args, **overrides):
    """The `RunConfig` of parsed command-line arguments.

    Every setting takes the value of the argument of its name where the command line has
    one (`--batch-size` fills `batch_size`; `--eval` fills `eval_modes`, `--data` or
    `--dataset` fills `source`) and keeps its default otherwise; `overrides` (flat setting
    names) come last. Sizes given as `"all"` and a head norm `"none"` become None.

    Args:
        args: An `argparse.Namespace` (of `recipes.cifar` or `recipes.tune`).
        **overrides: Settings that the arguments do not give, or give for something else
            (a search's lists, a trial's hyperparameters).

    Raises:
        ConfigError: For both `--data` and `--dataset`.
    """
    values = {name: getattr(args, ARGUMENT_OF.get(name, name)) for name in GROUP_OF
              if hasattr(args, ARGUMENT_OF.get(name, name))}
    data, dataset = getattr(args, "data", None), getattr(args, "dataset", None)
    if data and dataset:
        raise ConfigError("give either --data or --dataset, not both")
    values["source"] = data or dataset
    for name in ("train_size", "test_size"):
        if values.get(name) == "all":
            values[name] = None
    head_norm = values.get("head_norm")
    if isinstance(head_norm, str) and head_norm.strip().lower() == "none":
        values["head_norm"] = None
    values.update(overrides)
    return RunConfig.from_dict(values)
