"""Which normalization for my batch size? A KerasTuner search: `python -m recipes.tune`.

The command line only: argument parsing, the `--quick` preset, checks, resume bookkeeping and
the printed summary. The search itself (hypermodel, oracles, tuners) is `recipes.tuning`; a
trial is trained as the same `recipes.cifar` run would be, by `recipes.training` (which also
holds the validation split, the resume check and the output clean-up shared with
`recipes.cifar`), from the `RunConfig` of `recipes.config.from_args`.
"""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from recipes import cli
from recipes.cifar import DEFAULT_TRAIN_SIZE
from recipes.config import ConfigError

PROG = "python -m recipes.tune"
DEFAULT_NORMS = ("batch", "group")
DEFAULT_BATCH_SIZES = (2, 8, 32, 128)
DEFAULT_VAL_SIZE = 2000
DEFAULT_EPOCHS = 5
#: Distributed search (kept equal to `recipes.tuning`'s, which imports Keras).
DEFAULT_WORKER_TIMEOUT = 60.0
HEARTBEAT_SECONDS = 2.0
MIN_WORKER_TIMEOUT = 5 * HEARTBEAT_SECONDS
SEARCH_CONFIG_NAME = "search_config.json"
#: What a search writes into its output folder (`--overwrite` deletes them).
SEARCH_FOLDERS = ("search",)
SEARCH_FILES = (SEARCH_CONFIG_NAME, "results.csv", "results.md", "accuracy_vs_batch_size.png")
#: Settings a resumed search must keep (the others, such as --max-trials, may change).
RESUME_KEYS = ("tuner", "norms", "batch_sizes", "models", "placements", "lrs", "norm_kwargs",
               "epochs", "source", "train_size", "val_size", "augment", "optimizer",
               "weight_decay", "schedule", "warmup_epochs", "seed", "initial_points",
               "hyperband_factor")

#: `--quick`: a few hundred images, 1 epoch, every pair of 2 norms x 2 batch sizes.
QUICK = dict(tuner="grid", norms="batch,group", batch_sizes="2,32", epochs=1, train_size=400,
             val_size=200)

DESCRIPTION = f"""\
Search normalization type x batch size (and optionally model, placement, learning rate) with
KerasTuner, on the models and data of `python -m recipes.cifar`.

Each trial is the `recipes.cifar` run of its norm, batch size, ... (the same model, learning
rate scaled linearly from its value at batch 128, schedule over the trial's epochs, optimizer,
augmentation, training loop and checkpoints, in OUTPUT/search/trial_<id>/), trained on the
training images and scored by its best validation accuracy over its epochs. Validation
images are held out of the training split (class-stratified, never the
test split). At the end it writes OUTPUT/results.csv and OUTPUT/results.md (one row per trial)
and OUTPUT/accuracy_vs_batch_size.png (validation accuracy vs batch size, one line per norm),
and prints the best configuration.

With no arguments: random search, 10 trials of {DEFAULT_EPOCHS} epochs, norms \
{",".join(DEFAULT_NORMS)} x batch sizes
{",".join(map(str, DEFAULT_BATCH_SIZES))}, small_cnn, \
{DEFAULT_TRAIN_SIZE:,} training + {DEFAULT_VAL_SIZE:,} validation images of the local CIFAR-10.
A GPU is used when present; --strategy mirrored uses all of a machine's GPUs in each trial.
"""

EPILOG = """\
examples:
  python -m recipes.tune --quick                         # 2 norms x 2 batch sizes, minutes on CPU
  python -m recipes.tune --grid --norms batch,group,layer --batch-sizes 2,8,32,128 --epochs 10
  python -m recipes.tune --tuner bayesian --max-trials 20 --lrs 0.025,0.05,0.1,0.2
  python -m recipes.tune --tuner hyperband --epochs 27 --norms batch,group,frn,evonorm_s0
  python -m recipes.tune --grid --norms sync_batch,group --strategy mirrored   # all GPUs

tuners:
  random     random combinations, never the same one twice; --max-trials (default 10)
  bayesian   Gaussian-process Bayesian optimization after --initial-points random trials;
             never proposes a combination already tried; --max-trials (default 10)
  hyperband  successive halving (Li et al. 2018): --epochs is the most epochs a model gets,
             --hyperband-factor the reduction factor; the number of trials follows from those,
             the size of the search space and --hyperband-iterations (KerasTuner's Hyperband
             has no max_trials), and is printed at the start; --max-trials, if given, caps it
             (the last bracket may then be cut short). Each bracket tries a combination at
             most once in its first round; brackets (different budgets) may repeat one
  grid       (--grid) every combination exactly once, in order; --max-trials caps it

resuming: run the same command again (same --output) to continue a stopped or killed search;
finished trials are never run again, an interrupted one is rerun first. --max-trials and
--hyperband-iterations may be raised on resume; other search settings may not (use another
--output, or --overwrite to start again).

distributed search (several machines or GPUs): KerasTuner's chief/worker mode. With
KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, the process whose KERASTUNER_TUNER_ID
contains "chief" serves the search and writes the results; every other process (its own
KERASTUNER_TUNER_ID, the same arguments) runs the trials the chief gives it. A worker
restarted with its id gets its unfinished trial back; the trial of a worker silent for
--worker-timeout seconds goes to another worker. On one machine:
  python -m recipes.launch --recipe tune --workers 2 -- --quick

exit status: 0 done, 2 bad arguments or data (one line on stderr), 130 interrupted,
1 other failures.
"""


# ------------------------------------------------------------------------------ arguments
def _items(text):
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _unique(values):
    return list(dict.fromkeys(values))


def _norm_list(text):
    """Registered names (canonical form), or "none"."""
    import keras_norm

    names = []
    for item in _items(text):
        try:
            names.append(keras_norm.spec(item).name)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return _unique(names)


def _parsed_list(text, parse, what):
    """The sorted distinct values of a comma/space-separated list, each parsed by `parse`."""
    values = []
    for item in _items(text):
        try:
            values.append(parse(item))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{what}, got {item!r} in {text!r}") from None
    return sorted(set(values))


def _batch_size_list(text):
    return _parsed_list(text, cli.positive_int, "batch sizes must be positive integers")


def _lr_list(text):
    return _parsed_list(text, cli.positive_float, "learning rates must be numbers > 0")


def _model_list(text):
    from recipes.models import MODELS

    names = _items(text)
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return _unique(names)


def _placement(text):
    from recipes import models

    try:
        models.canonical_placement(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip().lower()


def _norm_kwargs(text):
    """A JSON object mapping norm names to their constructor arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of objects, e.g. '{{\"group\": {{\"groups\": 8}}}}', "
            f"got {text!r}")
    return value


def build_parser():
    import keras_norm
    from recipes.models import MODELS
    from recipes.tuning import TUNERS

    parser = cli.Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes on a CPU: grid of norms {QUICK['norms']} x batch "
                             f"sizes {QUICK['batch_sizes']}, {QUICK['epochs']} epoch, "
                             f"{QUICK['train_size']} training + {QUICK['val_size']} validation "
                             "images (of the small shared copy when no --data); explicit "
                             "flags override it")

    group = parser.add_argument_group("search")
    group.add_argument("--tuner", choices=TUNERS, default=None,
                       help="random (default), bayesian, hyperband, or grid (= --grid)")
    group.add_argument("--grid", action="store_true",
                       help="every combination of the search space exactly once")
    group.add_argument("--max-trials", type=cli.positive_int, default=None, metavar="N",
                       help="trials at most. Default: 10 (random, bayesian), the whole grid "
                            "(grid), Hyperband's own plan (hyperband)")
    group.add_argument("--epochs", type=cli.positive_int, default=DEFAULT_EPOCHS,
                       help=f"epochs per trial (hyperband: at most). Default: {DEFAULT_EPOCHS}")
    group.add_argument("--initial-points", type=cli.positive_int, default=None, metavar="N",
                       help="bayesian: random trials before the Gaussian process. Default: "
                            "3 x the number of tuned hyperparameters")
    group.add_argument("--hyperband-factor", type=cli.positive_int, default=3, metavar="F",
                       help="hyperband: reduction factor (>= 2). Default: 3")
    group.add_argument("--hyperband-iterations", type=cli.positive_int, default=1, metavar="N",
                       help="hyperband: iterations of the whole algorithm. Default: 1")

    group = parser.add_argument_group("search space (comma-separated lists)")
    group.add_argument("--norms", type=_norm_list, default=None, metavar="LIST",
                       help=f"registered norms: {', '.join(keras_norm.available())}, or none. "
                            f"Default: {','.join(DEFAULT_NORMS)}")
    group.add_argument("--batch-sizes", type=_batch_size_list, default=None, metavar="LIST",
                       help="global batch sizes. Default: "
                            f"{','.join(map(str, DEFAULT_BATCH_SIZES))}")
    group.add_argument("--lrs", type=_lr_list, default=[0.1], metavar="LIST",
                       help="learning rates at batch 128 (scaled linearly with the batch "
                            "size). Default: 0.1")
    group.add_argument("--models", type=_model_list, default=["small_cnn"], metavar="LIST",
                       help=f"models: {', '.join(MODELS)}. Default: small_cnn")
    group.add_argument("--placements", type=_placement, nargs="+", default=["all"],
                       metavar="P",
                       help="norm placements, space-separated: all, first, none, or 1-based "
                            "positions such as 2 or 1,3. Default: all")
    group.add_argument("--norm-kwargs", type=_norm_kwargs, default={}, metavar="JSON",
                       help="constructor arguments per norm: '{\"group\": {\"groups\": 8}}'")

    group = parser.add_argument_group("data (as recipes.cifar)")
    cli.add_data_source_arguments(group)
    group.add_argument("--train-size", type=cli.size, default=None, metavar="N",
                       help=f"training images (class-balanced); 'all' for all the training "
                            f"split but the validation images. Default: {DEFAULT_TRAIN_SIZE:,} "
                            "(fewer if the split is smaller)")
    group.add_argument("--val-size", type=cli.positive_int, default=None, metavar="N",
                       help=f"validation images held out of the training split. Default: "
                            f"{DEFAULT_VAL_SIZE:,}, at most a fifth of the split")
    group.add_argument("--no-augment", dest="augment", action="store_false",
                       help="turn off the random crop and flip")

    group = parser.add_argument_group("optimization (as recipes.cifar)")
    cli.add_optimization_arguments(group, span="each trial")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the data split, initialization, data order and the "
                            "tuner. Default: 0")

    group = parser.add_argument_group("output and hardware")
    group.add_argument("--output", metavar="DIR",
                       help="output folder (tuner state, results). Default: runs/tune/<tuner>, "
                            "or runs/tune/quick with --quick")
    group.add_argument("--overwrite", action="store_true",
                       help="delete the search in --output and start again (distributed "
                            "search: done by the chief; workers ignore it)")
    group.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                       help="0 silent, 1 KerasTuner's trial tables and progress bars (default), "
                            "2 one line per epoch")
    group.add_argument("--strategy", choices=("default", "mirrored"), default="default",
                       help="default (one device) or mirrored (every trial on all local GPUs, "
                            "or the logical CPUs of --cpu-replicas)")
    cli.add_cpu_replicas_argument(group)

    group = parser.add_argument_group(
        "distributed search (KerasTuner's chief/worker mode, set by environment variables)")
    group.add_argument("--worker-timeout", type=_worker_timeout,
                       default=DEFAULT_WORKER_TIMEOUT, metavar="SECONDS",
                       help="chief: give the trial of a worker silent this long (dead, or cut "
                            "off) to the next worker that asks. Workers send a heartbeat every "
                            f"few seconds while they train. Default: {DEFAULT_WORKER_TIMEOUT:g}")
    return parser


def _worker_timeout(text):
    value = cli.positive_float(text)
    if value < MIN_WORKER_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"expected at least {MIN_WORKER_TIMEOUT:g} seconds (workers beat every "
            f"{HEARTBEAT_SECONDS:g} s), got {text!r}")
    return value


def parse_args(argv=None):
    """Parses `argv`, with the `--quick` values as defaults when it is given."""
    parser = build_parser()
    preliminary, _ = parser.parse_known_args(argv)
    if preliminary.quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    # set_defaults values are strings: run them through their types.
    if isinstance(args.norms, str):
        args.norms = _norm_list(args.norms)
    if isinstance(args.batch_sizes, str):
        args.batch_sizes = _batch_size_list(args.batch_sizes)
    if args.norms is None:
        args.norms = list(DEFAULT_NORMS)
    if args.batch_sizes is None:
        args.batch_sizes = list(DEFAULT_BATCH_SIZES)
    if args.grid:
        if args.tuner not in (None, "grid"):
            parser.error(f"--grid and --tuner {args.tuner} exclude each other")
        args.tuner = "grid"
    args.tuner = args.tuner or "random"
    if args.hyperband_factor < 2:
        parser.error(f"--hyperband-factor must be at least 2, got {args.hyperband_factor}")
    if args.data and args.dataset:
        parser.error("give either --data or --dataset, not both")
    unknown = sorted(set(args.norm_kwargs) - set(args.norms))
    if unknown:
        parser.error(f"--norm-kwargs names norms not searched: {unknown} (--norms "
                     f"{','.join(args.norms)})")
    args.placements = _unique(args.placements)
    if args.output is None:
        args.output = os.path.join("runs", "tune", "quick" if args.quick else args.tuner)
    return args


# ------------------------------------------------------------------------------ checks
def _check_norms(args):
    """Builds one layer of every norm, so that bad arguments fail before any data is read."""
    import keras
    import keras_norm

    for name in args.norms:
        spec = keras_norm.spec(name)
        kwargs = dict(args.norm_kwargs.get(name, {}))
        if spec.kind == "conv_wrapper":
            kwargs = {"layer": keras.layers.Conv2D(16, 3), **kwargs}
        try:
            spec.build(channels=16, **kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"norm {name!r}: {str(err).splitlines()[0]}") from None


def _check_models(args, data):
    """Builds every model x norm x placement once (no training): shape-dependent errors, such
    as a group count that does not divide a layer's channels or a placement position the
    model lacks, fail here in one line rather than in the middle of the search."""
    import keras

    from recipes import models

    for model, norm, placement in itertools.product(args.models, args.norms, args.placements):
        try:
            models.build_model(model, norm=norm, norm_kwargs=args.norm_kwargs.get(norm),
                               placement=placement, num_classes=data.num_classes,
                               input_shape=data.image_shape)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{model} with norm {norm!r}, placement {placement!r}: "
                              f"{str(err).splitlines()[0]}") from None
    keras.backend.clear_session(free_memory=False)


def _default_sizes(args, available):
    val_size = args.val_size or min(DEFAULT_VAL_SIZE, available // 5)
    if args.train_size == "all":
        train_size = None
    elif args.train_size is None:
        train_size = min(DEFAULT_TRAIN_SIZE, available - val_size)
    else:
        train_size = args.train_size
    return train_size, val_size


def _search_config(args, source, train_size, val_size):
    return {"tuner": args.tuner, "norms": args.norms, "batch_sizes": args.batch_sizes,
            "models": args.models, "placements": args.placements, "lrs": args.lrs,
            "norm_kwargs": args.norm_kwargs, "epochs": args.epochs, "source": source,
            "train_size": train_size, "val_size": val_size, "augment": args.augment,
            "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "schedule": args.schedule, "warmup_epochs": args.warmup_epochs, "seed": args.seed,
            "initial_points": args.initial_points, "hyperband_factor": args.hyperband_factor,
            "max_trials": args.max_trials, "hyperband_iterations": args.hyperband_iterations,
            "strategy": args.strategy}


def prepare(argv=None):
    """Parses and checks everything before the search; raises `ConfigError`.

    Returns:
        A dict with `args`, the search's settings (`config`), the data and its `split`
        (training images, and the validation images as test split), the distributed `role`
        and the strategy.
    """
    from recipes import datasets, distribution, outputs, training, tuning

    args = parse_args(argv)
    try:
        role = tuning.distributed_role()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    chief = role is not None and role[0] == "chief"
    if chief:
        _hide_gpus()
    if args.cpu_replicas:
        distribution.configure_cpu_replicas(args.cpu_replicas)
    if chief:  # the chief only serves the oracle: the strategy is the workers' business
        strategy, replicas = None, 1
    else:
        strategy, _, _ = distribution.create_strategy(args.strategy)
        replicas = strategy.num_replicas_in_sync
    _check_norms(args)
    source = args.data or args.dataset
    try:
        data = datasets.load_data(source, small=args.quick)
    except (ValueError, OSError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    _check_models(args, data)
    train_size, val_size = _default_sizes(args, len(data.y_train))
    split = training.split_validation(data, train_size, val_size, args.seed)
    too_big = [size for size in args.batch_sizes if size > len(split.y_train)]
    if too_big:
        raise ConfigError(f"--batch-sizes {too_big} exceed the {len(split.y_train)} "
                          "training images (an epoch would hold no batch)")
    uneven = [size for size in args.batch_sizes if size % replicas]
    if uneven:
        raise ConfigError(f"--batch-sizes {uneven} do not split evenly over the "
                          f"{replicas} replicas of --strategy {args.strategy}")
    config = _search_config(args, data.source if source is None else str(source),
                            len(split.y_train), len(split.y_test))
    recorded = Path(args.output) / SEARCH_CONFIG_NAME
    if role is None or chief:
        if args.overwrite:
            outputs.clear_outputs(args.output, folders=SEARCH_FOLDERS, files=SEARCH_FILES)
        outputs.check_resumable(recorded, config, RESUME_KEYS, "search")
    elif not args.overwrite:
        # A worker only checks its settings against the chief's, where --output is shared (the
        # chief records them; with --overwrite it is about to replace them).
        outputs.check_resumable(recorded, config, RESUME_KEYS, "search", write=False)
    return {"args": args, "config": config, "data": data, "role": role, "split": split,
            "strategy": strategy if args.strategy != "default" else None}


def _hide_gpus():
    """Keeps a distributed search's chief off the GPUs (TensorFlow would otherwise reserve
    their memory in a process that only serves the oracle, beside the workers)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TensorFlow already started: nothing to hide now
        pass


# ------------------------------------------------------------------------------ running
def build_tuner(setup):
    """The hypermodel and tuner of a prepared command line."""
    from recipes import tuning

    from recipes import config

    args, data = setup["args"], setup["data"]
    # One run's settings from the search's arguments; the search's own lists (norms, sizes,
    # per-norm arguments) are the trials' business, and a trial trains the split as given.
    trial_base = config.from_args(args, train_size=None, test_size=None, norm_kwargs={},
                                  eval_modes=("population",), output=None)
    hypermodel = tuning.NormBatchHyperModel(
        norms=args.norms, batch_sizes=args.batch_sizes, num_classes=data.num_classes,
        input_shape=data.image_shape, model_names=args.models, placements=args.placements,
        learning_rates=args.lrs, norm_kwargs=args.norm_kwargs, config=trial_base)
    # KerasTuner treats seed 0 as "no seed".
    return tuning.make_tuner(
        args.tuner, hypermodel, directory=args.output, max_trials=args.max_trials,
        epochs=args.epochs, seed=args.seed + 1, distribution_strategy=setup["strategy"],
        num_initial_points=args.initial_points, hyperband_factor=args.hyperband_factor,
        hyperband_iterations=args.hyperband_iterations, worker_timeout=args.worker_timeout)


def _plan(tuner, args):
    from recipes import tuning

    done = sum(trial.status == "COMPLETED" for trial in tuner.oracle.trials.values())
    size = tuning.grid_size(tuner.hypermodel)
    if args.tuner == "hyperband":
        brackets, per_iteration = tuning.hyperband_plan(tuner.oracle)
        total = per_iteration * args.hyperband_iterations
        cap = f", capped at {args.max_trials} by --max-trials" if args.max_trials else ""
        budget = (f"Hyperband: {brackets} bracket(s), {per_iteration} trial(s) per iteration x "
                  f"{args.hyperband_iterations} iteration(s) = {total} trial(s){cap}")
    else:
        budget = f"{args.tuner} search, at most {tuner.oracle.max_trials} trial(s)"
    return (f"{budget}; search space of {size} combination(s); {done} trial(s) already "
            f"done in {args.output}")


def _settings(setup):
    config, args = setup["config"], setup["args"]
    lrs = ", ".join(f"{lr:g}" for lr in config["lrs"])
    return {
        "tuner": config["tuner"] + (f" (max trials {args.max_trials})" if args.max_trials
                                    else ""),
        "norms": ", ".join(config["norms"]),
        "batch sizes": ", ".join(map(str, config["batch_sizes"])),
        "models / placements": f"{', '.join(config['models'])} / "
                               f"{', '.join(config['placements'])}",
        "learning rate": f"{lrs} at batch 128, x batch / 128; {config['optimizer']}, "
                         f"{config['schedule']} schedule, weight decay "
                         f"{config['weight_decay']:g}",
        "epochs per trial": str(config["epochs"])
        + (" (at most)" if config["tuner"] == "hyperband" else ""),
        "data": f"{config['source']}: {config['train_size']:,} training + "
                f"{config['val_size']:,} validation images (held out of the training split), "
                f"augmentation {'on' if config['augment'] else 'off'}",
        "strategy": args.strategy,
    }


def main(argv=None):
    """Runs the command line; returns the exit status."""
    cli.require_recipes_extra("python -m recipes.tune")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from recipes import tuning
    from recipes.report import search as search_report

    try:
        setup = prepare(argv)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    args, role = setup["args"], setup["role"]
    tuner = build_tuner(setup)
    if args.verbose:
        if role is None or role[0] == "chief":
            print(_plan(tuner, args), flush=True)
        if role is not None:
            print(_role_line(role), flush=True)
    status, note = 0, None
    try:
        tuner.search(setup["split"], epochs=args.epochs, verbose=args.verbose)
    except KeyboardInterrupt:
        status, note = 130, "Interrupted; run the same command again to continue."
    except OSError as err:  # the chief cannot listen on its address
        print(f"{PROG}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. KerasTuner's "too many consecutive failed trials"
        status, note = 1, f"Search failed: {str(err).splitlines()[0]}"
    if role is not None and role[0] == "worker":
        print(f"Worker {role[1]}: {tuner._finished_here} trial(s) run here"
              + (f"; {note}" if note else "") + "; the chief writes the results.", flush=True)
        return status
    rows = tuning.trial_rows(tuner)
    paths = search_report.write_results(rows, args.output, settings=_settings(setup))
    best = search_report.best_row(rows)
    print(summary(rows, best, paths, note), flush=True)
    return status


def _role_line(role):
    from recipes import tuning

    kind, tuner_id = role
    if kind == "chief":
        return (f"Chief {tuner_id}: serving the search at {tuning.oracle_address()} until every "
                "trial is done; start the workers (same arguments, KERASTUNER_TUNER_ID of "
                "their own).")
    return f"Worker {tuner_id}: running the trials the chief at {tuning.oracle_address()} gives."


def summary(rows, best, paths, note=None):
    """The lines printed at the end."""
    from recipes.report import search as search_report

    done = sum(row["status"] == "COMPLETED" for row in rows)
    lines = [f"{len(rows)} trial(s), {done} completed."]
    failed = [row for row in rows if row["status"] in ("FAILED", "INVALID")]
    if failed:
        lines.append("Failed: " + ", ".join(f"trial {row['trial']} ({row['norm']}, batch "
                                            f"{row['batch_size']})" for row in failed))
    if note:
        lines.append(note)
    if best is not None:
        lines.append(f"Best: {search_report.describe(best)}")
    lines.append(f"Results: {paths['markdown']} ({paths['csv'].name}, {paths['plot'].name} "
                 "beside it)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
