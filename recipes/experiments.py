"""The CPU-scale reproductions of EXPERIMENTS.md: one command per experiment.

    python -m recipes.experiments batch_structure     # 1. random vs balanced batches
    python -m recipes.experiments mixture             # 2. BN vs Mixture Normalization
    python -m recipes.experiments small_batch         # 3. BN, renorm, GN, CBN, MABN at batch 2, 4
    python -m recipes.experiments placement           # 4. norm everywhere vs once vs never
    python -m recipes.experiments population          # 5. EMA vs recomputed statistics
    python -m recipes.experiments all                 # the five, one after another

Each experiment is a fixed list of `python -m recipes.cifar` runs (the flags are in `EXPERIMENTS`
below and printed by `--dry-run`). The runs go to `runs/experiments/<experiment>/<run>/`, at most
`--jobs` at a time (each process gets `cpu_count // jobs` TensorFlow threads). A run whose
`results.json` exists is not repeated, and a run that was killed resumes from its last finished
epoch (recipes.cifar's own resume), so a killed experiment loses at most the epochs in flight.
When every run has finished, the experiment's table (mean and spread over seeds) and plot are
written: the table between the experiment's `<!-- name:begin -->` / `<!-- name:end -->` markers
in EXPERIMENTS.md, the plot as `docs/experiments/<name>.png`.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recipes.report import experiments as experiment_report

#: Names that moved out of this module -> their module now (see `__getattr__`).
MOVED = {"BATCH_STRUCTURE_MODES": "recipes.report.experiments",
         "write_section": "recipes.report.experiments"}


def __getattr__(name):
    """The old path of a moved name (`MOVED`) still works, with a DeprecationWarning."""
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Imported here, not at the top: keras_norm imports TensorFlow.
    from keras_norm import _deprecated

    return _deprecated.forward(__name__, name, MOVED)


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("runs/experiments")
MARKDOWN = experiment_report.MARKDOWN
PLOTS = ROOT / "docs" / "experiments"


@dataclasses.dataclass(frozen=True)
class Run:
    """One `recipes.cifar` run: its folder name, its flags, and the fields tables group by."""

    name: str
    args: tuple
    fields: dict


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A named list of runs and the function that turns their results into a table and plot.

    `summarize(results, plot_path)` gets `[(run, results.json dict)]` in run order, writes the
    plot and returns the Markdown (table plus a line of scale and timing)."""

    name: str
    title: str
    runs: tuple
    summarize: callable


def _flags(**kwargs):
    """`recipes.cifar` flags from keyword arguments (`train_size=5000` -> `--train-size 5000`)."""
    args = []
    for key, value in kwargs.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return tuple(args)


# ------------------------------------------------------------------------ the five experiments
# Scale: CPU-sized subsets of the shared CIFAR-10 JPEG copy (class-balanced training subsets;
# 2,000 class-balanced test images), stated beside every table.

BATCH_STRUCTURE_SEEDS = (0, 1)
# The recipe of issue #16's measurement: no augmentation, SGD at a constant 0.02 (--lr is the
# rate at batch 128: 0.256 x 10/128 = 0.02) with momentum 0.9 and no weight decay.
BATCH_STRUCTURE_RECIPE = dict(augment=False, lr=0.256, schedule="constant", weight_decay=0.0)
# The earlier recipe of this experiment (augmentation, lr 0.1 x 10/128 = 0.0078 with a cosine
# decay, weight decay 5e-4): the ablations swap its settings in one at a time.
BATCH_STRUCTURE_ABLATIONS = (
    ("cosine", "+ cosine decay of the lr", dict(schedule="cosine")),
    ("augment", "+ augmentation", dict(augment=True)),
    ("earlier-recipe", "earlier recipe (augmentation, lr 0.0078 cosine, wd 5e-4)",
     dict(augment=True, lr=0.1, schedule="cosine", weight_decay=5e-4)),
    ("lr0.0078", "lr 0.0078 instead of 0.02", dict(lr=0.1)),
    ("5000-images", "5,000 training images", dict(train_size=5000)),
)


def _batch_structure_flags(recipe, seed, training, head):
    recipe = dict(BATCH_STRUCTURE_RECIPE, **recipe)
    args = _flags(model="small_cnn", train_size=recipe.pop("train_size", 10000),
                  test_size=2000, epochs=10, batch_size=10, seed=seed, head_norm=head,
                  eval="population,recomputed,batch,balanced,pseudo_balanced,assignment")
    if not recipe.pop("augment"):
        args += ("--no-augment",)
    args += _flags(**recipe)
    if training == "balanced":
        args += _flags(batch_structure="balanced", examples_per_class=1)
    return args


def _batch_structure_runs():
    # The grid (head norm x training batches x seed) first, then the ablations (seed 0, no
    # head norm, balanced training), so an interrupted experiment has the grid.
    runs = []
    for seed in BATCH_STRUCTURE_SEEDS:
        for head in ("none", "batch"):
            for training in ("balanced", "random"):
                runs.append(Run(f"{training}-head_{head}-seed{seed}",
                                _batch_structure_flags({}, seed, training, head),
                                {"training": training, "head": head, "seed": seed,
                                 "recipe": "issue"}))
    for name, label, change in BATCH_STRUCTURE_ABLATIONS:
        runs.append(Run(f"ablation-{name}-balanced-head_none-seed0",
                        _batch_structure_flags(change, 0, "balanced", "none"),
                        {"training": "balanced", "head": "none", "seed": 0, "recipe": label}))
    return tuple(runs)


MIXTURE_SEEDS = (1, 2, 3)


def _mixture_runs():
    # The MN paper's 5-layer CNN and optimizer (--preset mn_cnn: AdamW, constant learning rate,
    # MN replacing the BN of the second convolution) on 5,000 training images, batch 64, with a
    # test evaluation every 40 updates (640 updates: BN's accuracy has to level off for
    # "updates to reach BN's best" to mean anything).
    common = _flags(preset="mn_cnn", train_size=5000, test_size=2000, batch_size=64,
                    steps_per_epoch=40, epochs=16, eval="population")
    runs = []
    for seed in MIXTURE_SEEDS:
        runs.append(Run(f"batch-seed{seed}",
                        common + _flags(norm="batch", placement="all", seed=seed),
                        {"norm": "BN", "seed": seed}))
        runs.append(Run(f"mixture-seed{seed}", common + _flags(seed=seed),
                        {"norm": "MN (K=3, conv 2)", "seed": seed}))
    return tuple(runs)


SMALL_BATCH_NORMS = (("batch", "BN"), ("batch_renorm", "BN + renorm"), ("group", "GN"),
                     ("cross_iteration", "CBN"), ("moving_average", "MABN"))
SMALL_BATCH_SEEDS = (2, 4)


LONG_BN = "BN, 4x the epochs"


def _small_batch_runs():
    common = _flags(model="small_cnn", train_size=4000, test_size=2000, epochs=4,
                    eval="population")
    runs = []
    for seed in SMALL_BATCH_SEEDS:
        runs.append(Run(f"batch-b64-seed{seed}",
                        common + _flags(norm="batch", batch_size=64, seed=seed),
                        {"norm": "BN", "batch": 64, "seed": seed}))
        # Same epochs leave batch 64 with 1/16 of batch 4's updates; this reference trains
        # batch 64 for 4x the epochs (the last --epochs flag wins).
        runs.append(Run(f"batch-b64-16epochs-seed{seed}",
                        common + _flags(norm="batch", batch_size=64, seed=seed, epochs=16),
                        {"norm": LONG_BN, "batch": 64, "seed": seed}))
        for norm, label in SMALL_BATCH_NORMS:
            for batch in (2, 4):
                runs.append(Run(f"{norm}-b{batch}-seed{seed}",
                                common + _flags(norm=norm, batch_size=batch, seed=seed),
                                {"norm": label, "batch": batch, "seed": seed}))
    return tuple(runs)


PLACEMENTS = (("all", "after every conv"), ("first", "after the first conv only"),
              ("none", "none (conv bias instead)"))


def _placement_runs():
    # The small CNN (3 convs) and ResNet-20 (19 norm positions, where "too much BN" would
    # show first) with batch norm everywhere, once after the first convolution, or nowhere.
    # ResNet-20 with fewer than all its norms diverges at the default learning rate (0.1), so
    # it also runs at 0.02, where all three placements train.
    runs = []
    for model, train_size, lr in (("small_cnn", 10000, None), ("resnet20", 5000, None),
                                  ("resnet20", 5000, 0.02)):
        common = _flags(model=model, norm="batch", train_size=train_size, test_size=2000,
                        epochs=5, seed=4, eval="population")
        prefix = "placement" if model == "small_cnn" else model
        label = model
        if lr is not None:
            common += _flags(lr=lr)
            prefix, label = f"{prefix}-lr{lr}", f"{model}, lr {lr}"
        runs += [Run(f"{prefix}-{placement}", common + _flags(placement=placement),
                     {"model": label, "placement": text}) for placement, text in PLACEMENTS]
    return tuple(runs)


def _population_runs():
    common = _flags(model="small_cnn", norm="batch", train_size=5000, test_size=2000,
                    epochs=5, seed=4, eval="population,recomputed", recompute_steps=200)
    settings = ((128, 0.99), (128, 0.999), (4, 0.99), (4, 0.999))
    return tuple(Run(f"b{batch}-momentum{momentum}",
                     common + _flags(batch_size=batch, norm_kwargs=f"momentum={momentum}"),
                     {"batch": batch, "momentum": momentum})
                 for batch, momentum in settings)


# ------------------------------------------------ the experiments (tables: recipes.report)

EXPERIMENTS = {
    experiment.name: experiment for experiment in (
        Experiment("batch_structure", "Batch structure", _batch_structure_runs(),
                   experiment_report.summarize_batch_structure),
        Experiment("mixture", "Mixture Normalization", _mixture_runs(),
                   experiment_report.summarize_mixture),
        Experiment("small_batch", "Small batches", _small_batch_runs(),
                   experiment_report.summarize_small_batch),
        Experiment("placement", "Placement", _placement_runs(),
                   experiment_report.summarize_placement),
        Experiment("population", "Population statistics", _population_runs(),
                   experiment_report.summarize_population),
    )
}


# ------------------------------------------------------------------------------- running them

def command(run, folder):
    """The `recipes.cifar` command line of `run` writing to `folder`."""
    return [sys.executable, "-m", "recipes.cifar", *run.args, "--output", str(folder),
            "--verbose", "2"]


def run_config(run):
    """The `RunConfig` that `recipes.cifar` builds from `run`'s flags (`recipes.config`)."""
    from recipes import cifar

    return cifar.to_config(cifar.parse_args(list(run.args))[1])


def _planned_epochs(run):
    return run_config(run).epochs


def _run_one(run, folder, threads):
    """Runs (or resumes) one run unless its results exist; returns `(results, trained)`,
    `trained` telling whether this call trained it.

    Results of fewer epochs than the run now asks for (its `--epochs` was raised) count as
    unfinished: the run resumes from its last checkpoint and trains the added epochs."""
    results_path = folder / "results.json"
    if results_path.exists():
        finished = json.loads(results_path.read_text())["config"]["epochs"]
        if finished != _planned_epochs(run):
            results_path.unlink()
    trained = not results_path.exists()
    if trained:
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads),
                   TF_NUM_INTEROP_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="2")
        with open(folder / "log.txt", "a") as log:
            process = subprocess.run(command(run, folder), cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        if process.returncode != 0:
            raise RuntimeError(f"run {run.name} failed (exit {process.returncode}); see "
                               f"{folder / 'log.txt'}")
    return json.loads(results_path.read_text()), trained


def run_experiment(experiment, output, jobs):
    """Runs every run of `experiment` (at most `jobs` at once); returns `([(run, results)],
    number of runs this call trained)`."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    folders = {run.name: output / experiment.name / run.name for run in experiment.runs}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {run.name: pool.submit(_run_one, run, folders[run.name], threads)
                   for run in experiment.runs}
        results, trained = {}, 0
        for run in experiment.runs:
            results[run.name], trained_now = futures[run.name].result()
            trained += trained_now
            minutes = experiment_report.run_minutes(results[run.name])
            print(f"  done: {run.name} ({minutes:.1f} min)", flush=True)
    return [(run, results[run.name]) for run in experiment.runs], trained


def summarize(experiment, pairs, jobs, wall_seconds=None, trained=0):
    """Writes the experiment's plot into `PLOTS` and its section of `MARKDOWN` (EXPERIMENTS.md);
    returns the section. See `recipes.report.experiments.summarize`."""
    return experiment_report.summarize(experiment, pairs, jobs, wall_seconds, trained,
                                       markdown=MARKDOWN, plots=PLOTS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m recipes.experiments", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time (default 2; each gets cpu_count // jobs threads)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the runs go (default {DEFAULT_OUTPUT})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the recipes.cifar commands and stop")
    parser.add_argument("--summarize-only", action="store_true",
                        help="rewrite table and plot from finished runs without training")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv=None):
    from recipes import cli

    cli.require_recipes_extra("python -m recipes.experiments")
    args = parse_args(argv)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        experiment = EXPERIMENTS[name]
        if args.dry_run:
            for run in experiment.runs:
                folder = args.output / name / run.name
                print(" ".join(command(run, folder)[1:]))
            continue
        started = time.time()
        print(f"{experiment.title}: {len(experiment.runs)} runs in {args.output / name}",
              flush=True)
        if args.summarize_only:
            paths = [(run, args.output / name / run.name / "results.json")
                     for run in experiment.runs]
            missing = [run.name for run, path in paths if not path.exists()]
            if missing:
                print(f"  not finished, left out: {', '.join(missing)}", flush=True)
            pairs = [(run, json.loads(path.read_text())) for run, path in paths
                     if path.exists()]
            wall, trained = None, 0
        else:
            pairs, trained = run_experiment(experiment, args.output, args.jobs)
            wall = time.time() - started
        print(summarize(experiment, pairs, args.jobs, wall, trained))
    return 0


if __name__ == "__main__":
    sys.exit(main())
