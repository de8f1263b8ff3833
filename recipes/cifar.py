"""Train and evaluate a CIFAR model with any keras_norm normalization: `python -m recipes.cifar`.

The command line only: argument parsing and presets. The work is done by `recipes.datasets`
(data), `recipes.models` (models), `recipes.training` (the training loop, resume, evaluation
modes) and `recipes.report` (results.json, report.md, plots).
"""

import argparse
import json
import os
import sys

from recipes import cli
from recipes.config import ConfigError

DEFAULT_TRAIN_SIZE = 10000
DEFAULT_EPOCHS = 5

PRESETS = {
    # Mixture Normalization's CIFAR setting (docs/algorithms.md section 7, the public Keras
    # reproduction): the 5-layer CNN with MN replacing the batch norm of its second
    # convolution, AdamW at 1e-3 (= 5e-4 x 256/128) with weight decay 1e-4, batch 256,
    # 100 epochs on all training images.
    "mn_cnn": dict(model="mn_cnn", norm="mixture", placement="2", other_norm="batch",
                   optimizer="adamw", lr=5e-4, weight_decay=1e-4, schedule="constant",
                   batch_size=256, epochs=100, train_size="all"),
    # Hajaj & Gillies 2018 (batch structure): balanced batches of one image per class,
    # evaluated with population statistics, random-batch statistics, balanced test batches
    # ("conditional") and label-free pseudo-balanced batches.
    "balanced": dict(batch_structure="balanced",
                     eval="population,batch,balanced,pseudo_balanced"),
}

DESCRIPTION = f"""\
Train a CIFAR model with a keras_norm normalization and compare evaluation modes.

With no arguments: a small CNN with batch norm after every convolution, trained with SGD for
{DEFAULT_EPOCHS} epochs on {DEFAULT_TRAIN_SIZE:,} training images (class-balanced subset) of the
local CIFAR-10 copy and tested on all 10,000 test images; a few minutes on a 2-core CPU.
Outputs (checkpoints, logs, results.json, report.md, plots) go to --output.

Data is found, in order: --data / --dataset, $KERAS_NORM_DATA, the shared copy
../shared/data/cifar10-jpg.tar.gz beside the project, an already prepared TFDS cifar10, a
CIFAR-10 download in the Keras cache (~/.keras/datasets); failing those, CIFAR-10 (163 MB) is
downloaded there (not with --no-download or KERAS_NORM_DOWNLOAD=0).
"""

EPILOG = """\
examples:
  python -m recipes.cifar                                   # the quick default
  python -m recipes.cifar --model resnet20 --train-size all --epochs 30
  python -m recipes.cifar --norm group --placement first    # one norm, after the first conv
  python -m recipes.cifar --norm batch --norm-kwargs '{"momentum": 0.9}'
  python -m recipes.cifar --preset balanced                 # balanced batches, 1 per class
  python -m recipes.cifar --preset balanced --head-norm batch --eval population,assignment
  python -m recipes.cifar --preset mn_cnn                   # Mixture Normalization setting
  python -m recipes.cifar --strategy mirrored --cpu-replicas 2 --norm sync_batch
  TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]},
              "task": {"type": "worker", "index": 0}}' \\
    python -m recipes.cifar --strategy multiworker --norm sync_batch --output /shared/run1

resuming: a run killed part-way continues from its last finished epoch when started again
with the same command (same --output); --epochs may be raised to train longer.

evaluation modes (--eval):
  population       moving (population) statistics: the usual inference
  batch            random test batches of --batch-size, each normalized with its own statistics
  balanced         test batches with k images of every class (built with the test labels),
                   normalized with their own statistics: the "conditional" evaluation of
                   Hajaj & Gillies 2018; k = --examples-per-class, or batch-size / classes
  pseudo_balanced  the same, balanced by the model's own predicted labels (no test labels)
  assignment       the same, balanced by an optimal class-prior assignment of all test images
                   (every class gets its share; no test labels)
  recomputed       population statistics recomputed after training as the equal-weight
                   average over --recompute-steps training batches ("precise BN")
  auto (default)   population; plus batch and recomputed for batch-dependent norms; plus
                   balanced and pseudo_balanced when training on balanced batches

exit status: 0 done, 2 bad arguments or data (one line on stderr), 1 other failures.
"""


def _eval_modes(text):
    from recipes.config import EVAL_MODES

    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    if modes == ["auto"]:
        return ("auto",)
    unknown = [mode for mode in modes if mode not in EVAL_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown or text!r}; choose from {', '.join(EVAL_MODES)} or auto")
    return tuple(dict.fromkeys(modes))


def build_parser():
    import keras_norm
    from recipes.models import MODELS
    from recipes.config import BATCH_STRUCTURES, STRATEGIES

    parser = cli.Parser(prog="python -m recipes.cifar", description=DESCRIPTION, epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a paper's setting; explicit flags override it. mn_cnn: "
                             "Mixture Normalization's 5-layer CNN (MN after conv 2, batch norm "
                             "elsewhere, AdamW, batch 256, 100 epochs). balanced: balanced "
                             "batches of 1 image per class and the balanced evaluation modes")

    group = parser.add_argument_group("model and normalization")
    group.add_argument("--model", choices=MODELS, default="small_cnn",
                       help="small_cnn: 3 convs, fast (default); resnet20: He et al.'s CIFAR "
                            "ResNet-20; mn_cnn: the 5-layer CNN of the MN experiments")
    group.add_argument("--norm", default="batch",
                       help=f"a registered normalization: {', '.join(keras_norm.available())} "
                            "or none. Default: batch")
    group.add_argument("--norm-kwargs", type=cli.norm_kwargs, default={}, metavar="ARGS",
                       help="constructor arguments of the norm layers: JSON ('{\"momentum\": "
                            "0.9}') or key=value,key=value")
    group.add_argument("--placement", default="all",
                       help="where the norm goes: all (after every conv, default), first (one "
                            "norm after the first conv only), none, or 1-based positions such "
                            "as 2 or 1,3")
    group.add_argument("--other-norm", default=None, metavar="NAME",
                       help="norm at the positions --placement leaves out (default: none)")
    group.add_argument("--head-norm", default="none", metavar="NAME",
                       help="a normalization after the classifier's Dense, before the softmax "
                            "(registry names as for --norm, e.g. batch: each class's logit is "
                            "normalized across the batch). Default: none")

    group = parser.add_argument_group("data")
    cli.add_data_source_arguments(group)
    group.add_argument("--no-download", action="store_true",
                       help="never download CIFAR-10 when no local copy is found (the same as "
                            "KERAS_NORM_DOWNLOAD=0): fail with the list of places looked at")
    group.add_argument("--train-size", type=cli.size, default=None, metavar="N",
                       help=f"train on a class-balanced subset of N images; 'all' for every "
                            f"image. Default: {DEFAULT_TRAIN_SIZE:,} (all if fewer)")
    group.add_argument("--test-size", type=cli.size, default="all", metavar="N",
                       help="test on a class-balanced subset of N images. Default: all")
    group.add_argument("--no-augment", dest="augment", action="store_false",
                       help="turn off the standard augmentation (4-pixel pad + random crop, "
                            "horizontal flip)")

    group = parser.add_argument_group("batches and optimization")
    group.add_argument("--batch-size", type=cli.positive_int, default=None, metavar="B",
                       help="global batch size. Default: 128, or k x classes with balanced "
                            "batches")
    group.add_argument("--batch-structure", choices=BATCH_STRUCTURES, default="random",
                       help="random: shuffled batches (default); balanced: every batch holds "
                            "k images of every class")
    group.add_argument("--examples-per-class", type=cli.positive_int, default=None, metavar="K",
                       help="k for balanced batches (batch size = k x classes). Default: 1")
    group.add_argument("--epochs", type=cli.positive_int, default=DEFAULT_EPOCHS,
                       help=f"Default: {DEFAULT_EPOCHS}")
    group.add_argument("--steps-per-epoch", type=cli.positive_int, default=None, metavar="S",
                       help="batches per epoch (the data wraps around). Default: one pass")
    group.add_argument("--lr", type=cli.positive_float, default=0.1,
                       help="learning rate at batch 128; scaled linearly with the global batch "
                            "size. Default: 0.1")
    cli.add_optimization_arguments(group)
    group.add_argument("--seed", type=int, default=0, help="Default: 0")

    group = parser.add_argument_group("evaluation and output")
    group.add_argument("--eval", type=_eval_modes, default=("auto",), metavar="MODES",
                       help="comma-separated evaluation modes (see below). Default: auto")
    group.add_argument("--recompute-steps", type=cli.positive_int, default=200, metavar="N",
                       help="training batches averaged by --eval recomputed. Default: 200")
    group.add_argument("--output", metavar="DIR",
                       help="output folder. Default: runs/cifar/<model>-<norm>-<placement>-"
                            "seed<seed>")
    group.add_argument("--overwrite", action="store_true",
                       help="delete what --output holds and start again instead of resuming")
    group.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                       help="0 silent, 1 progress bar (default), 2 one line per epoch")

    group = parser.add_argument_group("hardware")
    group.add_argument("--strategy", choices=STRATEGIES, default="default",
                       help="default (one device), mirrored (all local GPUs, or the logical "
                            "CPUs of --cpu-replicas) or multiworker (from TF_CONFIG)")
    cli.add_cpu_replicas_argument(group)
    group.add_argument("--jit", action="store_true",
                       help="compile the steps with XLA (on a CPU only with --strategy "
                            "default: TensorFlow has no XLA collectives there)")
    group.add_argument("--mixed-precision", action="store_true",
                       help="mixed_float16 policy with loss scaling")
    return parser


def parse_args(argv=None):
    """Parses `argv` with the preset's values as defaults; returns `(parser, namespace)`."""
    parser = build_parser()
    preliminary, _ = parser.parse_known_args(argv)
    if preliminary.preset:
        parser.set_defaults(**{key: (_eval_modes(value) if key == "eval" else value)
                               for key, value in PRESETS[preliminary.preset].items()})
    return parser, parser.parse_args(argv)


def to_config(args):
    """The `RunConfig` of parsed arguments (`recipes.config.from_args`), with the default
    output folder; sizes and batch size are not yet data-dependent (see `prepare`)."""
    from recipes import config

    output = args.output or os.path.join(
        "runs", "cifar", f"{args.model}-{args.norm}-{args.placement}-seed{args.seed}")
    return config.from_args(args, output=output)


def _check_norms(config):
    """Unknown names and bad layer arguments fail here, before any data is loaded."""
    import keras_norm
    from recipes import models

    models.check_placement(config.model, config.placement)
    models.resolve_head_norm(config.head_norm)
    for name, kwargs in ((config.norm, config.norm_kwargs), (config.other_norm, {}),
                         (config.head_norm, {})):
        if name is None:
            continue
        spec = keras_norm.spec(name)
        if spec.kind == "conv_wrapper":
            import keras

            kwargs = {"layer": keras.layers.Conv2D(16, 3), **kwargs}
        spec.build(channels=16, **kwargs)


def prepare(argv=None):
    """Parses and checks everything that can be wrong before training.

    Returns `(config, data, (strategy, is_chief, worker_id))`; raises `ConfigError`.
    """
    from recipes import distribution, evaluation_modes, outputs, training

    _, args = parse_args(argv)
    config = to_config(args)
    if config.cpu_replicas:
        distribution.configure_cpu_replicas(config.cpu_replicas)
    # Multi-worker collectives need the strategy before TensorFlow runs anything else.
    strategy, is_chief, worker_id = distribution.create_strategy(config.strategy, config.jit)
    try:
        _check_norms(config)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if args.no_download:  # read by recipes.datasets' discovery (and by any worker we start)
        os.environ["KERAS_NORM_DOWNLOAD"] = "0"
    data = training.load_images(config.source)
    if args.train_size is None and len(data.y_train) > DEFAULT_TRAIN_SIZE:
        config.train_size = DEFAULT_TRAIN_SIZE
    data = training.shrink(data, config)
    if config.batch_size is None:
        k = config.examples_per_class or 1
        config.batch_size = (k * data.num_classes if config.batch_structure == "balanced"
                             else training.REFERENCE_BATCH_SIZE)
    training.validate(config, data.num_classes)
    if config.eval_modes != ("auto",):
        evaluation_modes.resolve_eval_modes(config, batch_dependent=True)
    try:  # What only the input shapes reveal, e.g. more groups than a layer has channels.
        training.build_model(config, data)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if args.overwrite and is_chief:
        outputs.clear_outputs(config.output)
    return config, data, (strategy, is_chief, worker_id)


def main(argv=None):
    """Runs the command line; returns the exit status (0 done, 2 bad arguments or data)."""
    cli.require_recipes_extra("python -m recipes.cifar")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from recipes import report, training

    try:
        config, data, (strategy, is_chief, worker_id) = prepare(argv)
        if config.verbose and is_chief:
            print(f"Data: {data!r}", flush=True)
        results, target = training.train(config, data, strategy, is_chief, worker_id)
    except ConfigError as err:
        print(f"python -m recipes.cifar: error: {err}", file=sys.stderr)
        return 2
    if is_chief:
        paths = report.write(results, target)
        if config.verbose:
            print(report.summary(results, paths), flush=True)
    else:
        (target / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
