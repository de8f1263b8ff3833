"""Argument types and the one-line-error parser shared by the recipes' command lines."""

import argparse
import importlib.util
import json
import sys

#: The modules of the `recipes` extra (pyproject.toml) that the recipes import, and the pip
#: distribution each comes from. keras_norm itself needs none of them.
RECIPES_EXTRA = {
    "keras_tuner": "keras-tuner",
    "tensorflow_datasets": "tensorflow-datasets",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "scipy": "scipy",
}
INSTALL_RECIPES = 'pip install "keras-norm[recipes]"'


def missing_recipes_extra():
    """The distributions of the `recipes` extra whose modules cannot be found (none imported)."""
    missing = []
    for module, distribution in RECIPES_EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # e.g. a module set to None in sys.modules
            found = False
        if not found:
            missing.append(distribution)
    return missing


def require_recipes_extra(prog):
    """Exits with status 2 and one line on stderr if the `recipes` extra is not installed.

    Called first by every recipe's `main`, so that a lean `pip install keras-norm` meets a
    line naming the extra rather than an ImportError deep inside a run.
    """
    missing = missing_recipes_extra()
    if missing:
        print(f"{prog}: error: the recipes need the recipes extra ({', '.join(missing)} "
              f"missing): {INSTALL_RECIPES}", file=sys.stderr)
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text):
    try:
        value = non_negative_int(text)
    except argparse.ArgumentTypeError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def size(text):
    """A positive int, or "all"/0 for no subset."""
    if str(text).lower() in ("all", "0"):
        return "all"
    return positive_int(text)


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text):
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def norm_kwargs(text):
    """A JSON object, or comma-separated key=value pairs with JSON (or bare string) values."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return value
    result = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(
                f"expected key=value pairs or a JSON object, got {text!r}")
        try:
            result[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            result[key.strip()] = raw.strip()
    return result


def add_data_source_arguments(group):
    """`--data` and `--dataset`, the data sources every recipe reads."""
    group.add_argument("--data", metavar="PATH",
                       help="class-folder tree (train/<class>/*.jpg, test/<class>/*.jpg), a "
                            ".tar.gz of one, or an .npz with x_train, y_train, x_test, y_test")
    group.add_argument("--dataset", choices=("cifar10", "cifar100"),
                       help="a TFDS data set already prepared on this machine")


def add_optimization_arguments(group, span="the run"):
    """`--optimizer`, `--weight-decay`, `--schedule` and `--warmup-epochs`: settings of
    `recipes.config.OptimizationConfig` that `recipes.cifar` gives its run and `recipes.tune`
    every trial, under the same names (`recipes.config.from_args` reads them by name).

    Args:
        group: The argument group to add them to.
        span: What the cosine schedule decays over, for the help.
    """
    from recipes.config import OPTIMIZERS, SCHEDULES

    group.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                       help="sgd (momentum 0.9, default) or adamw")
    group.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                       help="decoupled weight decay of conv and dense kernels. Default: 5e-4")
    group.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                       help=f"cosine decay to 0 over {span} (default) or constant")
    group.add_argument("--warmup-epochs", type=non_negative_float, default=0.0,
                       help="linear warm-up epochs before the cosine decay. Default: 0")


def add_cpu_replicas_argument(group):
    """`--cpu-replicas`: logical CPU devices for mirrored runs on a CPU."""
    group.add_argument("--cpu-replicas", type=positive_int, default=None, metavar="N",
                       help="split the CPU into N logical devices (mirrored runs on a CPU)")
