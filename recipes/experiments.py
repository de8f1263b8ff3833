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
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("runs/experiments")
MARKDOWN = ROOT / "EXPERIMENTS.md"
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


# --------------------------------------------------------------------------------- summaries

def _mean_spread(values):
    """`"mean ± std"` over seeds (sample std; `± 0` for one value), in percent."""
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def _accuracy(results, mode="population"):
    return results["evaluation"][mode]["accuracy"]


def _run_minutes(results):
    """Minutes a run spent training, testing each epoch and evaluating, over all the
    processes that made it (a resumed run's `seconds` covers only its last process)."""
    epochs = sum(row.get("seconds", 0.0) for row in results["training"]["history"])
    evaluation = sum(m.get("seconds", 0.0) for m in results["evaluation"].values())
    return (epochs + evaluation) / 60


def _scale(pairs):
    """A line with the data scale and schedule shared by an experiment's runs."""
    config, data = pairs[0][1]["config"], pairs[0][1]["data"]
    return (f"{config['model']}, {data['train_images']:,} training / {data['test_images']:,} "
            f"test images (class-balanced subsets of the CIFAR-10 JPEG copy), "
            f"{config['epochs']} epochs")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(axis, xlabel, title, ylabel="test accuracy (%)", grid="both", legend_title=None):
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis=grid, alpha=0.3)
    axis.legend(title=legend_title, fontsize=8)


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)


BATCH_STRUCTURE_MODES = (
    ("population", "population statistics"),
    ("recomputed", "population statistics recomputed after training"),
    ("batch", "random test batches, own statistics"),
    ("balanced", "conditional: balanced by the labels, own statistics"),
    ("pseudo_balanced", "pseudo-balanced by argmax, own statistics"),
    ("assignment:alone", "class-prior assignment alone (no batch statistics)"),
    ("assignment", "assignment batches, own statistics"),
)


def _batch_structure_accuracy(results, mode):
    """Test accuracy of a mode; `"assignment:alone"` is the assignment's own accuracy."""
    evaluation = results["evaluation"]
    if mode == "assignment:alone":
        return evaluation.get("assignment", {}).get("assignment_accuracy")
    return evaluation.get(mode, {}).get("accuracy")


def _cell(values):
    values = [v for v in values if v is not None]
    return _mean_spread(values) if values else "—"


def _summarize_batch_structure(pairs, plot_path):
    modes = [mode for mode, _ in BATCH_STRUCTURE_MODES]
    header = ("| head norm | training batches | seeds | " + " | ".join(
        label for _, label in BATCH_STRUCTURE_MODES)
        + " | conditional gain over population | over recomputed |")
    lines = [header, "| --- | --- | ---: |" + " ---: |" * (len(modes) + 2)]
    grid, rows = {}, []
    for run, results in pairs:
        if run.fields["recipe"] == "issue":
            grid.setdefault((run.fields["head"], run.fields["training"]), []).append(results)
    for (head, training), runs in grid.items():
        accuracies = {m: [_batch_structure_accuracy(r, m) for r in runs] for m in modes}
        gains = [[b - a for a, b in zip(accuracies[base], accuracies["balanced"])
                  if a is not None and b is not None] for base in ("population", "recomputed")]
        label = "balanced, k=1" if training == "balanced" else "random"
        lines.append(f"| {head} | {label} | {len(runs)} | "
                     + " | ".join(_cell(accuracies[m]) for m in modes)
                     + " | " + " | ".join(_cell(g) for g in gains) + " |")
        rows.append((f"head {head}\n{label}", accuracies))
    seeds = sorted({run.fields["seed"] for run, _ in pairs if run.fields["recipe"] == "issue"})
    grid_pairs = [(run, r) for run, r in pairs if run.fields["recipe"] == "issue"]
    lines += ["", "Test accuracy (%), mean ± sample std over seeds "
              f"{', '.join(map(str, seeds))} (± 0.00: one seed). Batch 10 in training and in "
              "every batch-statistics evaluation (balanced: one image per class). "
              + _scale(grid_pairs) + "; no augmentation, SGD at a constant 0.02 with momentum "
              "0.9, no weight decay. Recomputed: the moving averages replaced after training "
              "by the equal-weight average over 200 training batches (`--eval recomputed`). The "
              "conditional gain is conditional minus population accuracy (moving or "
              "recomputed statistics), in points."]
    ablations = [(run, r) for run, r in pairs if run.fields["recipe"] != "issue"]
    if ablations:
        reference = [(run, r) for run, r in grid_pairs if run.fields["seed"] == 0
                     and run.fields["head"] == "none" and run.fields["training"] == "balanced"]
        lines += ["", "Why the earlier recipe showed less: seed 0, no head norm, balanced "
                  "training, one setting changed at a time (test accuracy, %):", "",
                  "| recipe | population | recomputed | random test batches | conditional | "
                  "conditional gain | pseudo-balanced (argmax) | assignment alone | assignment "
                  "batches |", "| --- |" + " ---: |" * 8]
        for run, results in reference + ablations:
            label = ("the recipe above" if run.fields["recipe"] == "issue"
                     else run.fields["recipe"])
            values = [_batch_structure_accuracy(results, m) for m in
                      ("population", "recomputed", "batch", "balanced")]
            gain = (f"{100 * (values[3] - values[0]):+.2f}" if None not in values[::3]
                    else "—")
            rest = [_batch_structure_accuracy(results, m) for m in
                    ("pseudo_balanced", "assignment:alone", "assignment")]
            lines.append(f"| {label} | " + " | ".join(
                f"{100 * v:.2f}" if v is not None else "—" for v in values)
                + f" | {gain} | " + " | ".join(
                f"{100 * v:.2f}" if v is not None else "—" for v in rest) + " |")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(modes)
    for index, (mode, label) in enumerate(BATCH_STRUCTURE_MODES):
        means, low, high = [], [], []
        for _, accuracies in rows:
            values = [100 * v for v in accuracies[mode] if v is not None]
            mean = statistics.mean(values) if values else 0.0
            means.append(mean)
            low.append(mean - min(values, default=mean))
            high.append(max(values, default=mean) - mean)
        axis.bar([i + index * width for i in range(len(rows))], means, width, label=label,
                 yerr=[low, high], capsize=2)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    axis.set_xticklabels([label for label, _ in rows])
    axis.set_ylim(0, 100)  # room for the legend above the bars
    _label(axis, "", "Batch structure: head norm x training batches x evaluation "
           "(bars: min-max over seeds)", grid="y", legend_title="evaluation")
    axis.legend(title="evaluation", fontsize=7, ncol=2, loc="upper left")
    _save(figure, plot_path)
    return lines


def _curve(results):
    """`(updates, test accuracy)` after each epoch of a run."""
    steps = results["training"]["steps_per_epoch"]
    history = results["training"]["history"]
    return [row["epoch"] * steps for row in history], [row["test_accuracy"] for row in history]


def _first_reaching(updates, accuracies, target):
    return next((u for u, a in zip(updates, accuracies) if a >= target), None)


def _summarize_mixture(pairs, plot_path):
    by_norm = {}
    for run, results in pairs:
        by_norm.setdefault(run.fields["norm"], []).append(results)
    curves = {norm: [_curve(r) for r in runs] for norm, runs in by_norm.items()}
    updates = curves["BN"][0][0]
    mean_curve = {norm: [statistics.mean(c[1][i] for c in cs) for i in range(len(updates))]
                  for norm, cs in curves.items()}
    target = max(mean_curve["BN"])
    lines = ["| norm | seeds | final test acc. (%) | best test acc. (%) | updates to BN's best "
             f"({100 * target:.2f}%), mean curve | per seed |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for norm, runs in by_norm.items():
        reached = _first_reaching(updates, mean_curve[norm], target)
        per_seed = [_first_reaching(*c, target) for c in curves[norm]]
        lines.append(
            f"| {norm} | {len(runs)} | {_mean_spread([_accuracy(r) for r in runs])} | "
            f"{_mean_spread([max(c[1]) for c in curves[norm]])} | "
            f"{reached if reached is not None else 'not reached'} | "
            + ", ".join(str(u) if u is not None else "not reached" for u in per_seed) + " |")
    config = pairs[0][1]["config"]
    lines += ["", f"Mean ± sample std over seeds {', '.join(map(str, MIXTURE_SEEDS))}; test "
              f"accuracy with population statistics after every {updates[0]} updates "
              f"(batch {config['batch_size']}). BN's best = the best point of BN's seed-mean "
              "curve. " + _scale(pairs) + f" of {updates[0]} updates ({updates[-1]} updates "
              "in all)."]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for norm, cs in curves.items():
        mean = [100 * a for a in mean_curve[norm]]
        low = [100 * min(c[1][i] for c in cs) for i in range(len(updates))]
        high = [100 * max(c[1][i] for c in cs) for i in range(len(updates))]
        axis.plot(updates, mean, "o-", label=f"{norm} (mean of {len(cs)} seeds)")
        axis.fill_between(updates, low, high, alpha=0.2)
    axis.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label="BN's best")
    _label(axis, "gradient updates",
           "Mixture Normalization vs BN, 5-layer CNN (band: min-max over seeds)")
    _save(figure, plot_path)
    return lines


def _summarize_small_batch(pairs, plot_path):
    grouped, updates = {}, {}
    for run, results in pairs:
        key = (run.fields["norm"], run.fields["batch"])
        grouped.setdefault(key, []).append(_accuracy(results))
        if key[0] in ("BN", LONG_BN):
            updates[key] = results["training"]["steps_per_epoch"] * results["config"]["epochs"]
    labels = [label for _, label in SMALL_BATCH_NORMS] + [LONG_BN]
    lines = ["| norm | batch 2 | batch 4 | batch 64 |", "| --- | ---: | ---: | ---: |"]
    for label in labels:
        cells = [_mean_spread(grouped[(label, b)]) if (label, b) in grouped else "—"
                 for b in (2, 4, 64)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy (%), population statistics, mean ± sample std over seeds "
              f"{', '.join(map(str, SMALL_BATCH_SEEDS))}; learning rate 0.1 x batch/128 "
              "(SGD, cosine). " + _scale(pairs) + f" (\"{LONG_BN}\": 16). Updates per run: "
              + ", ".join(f"{count:,} for {label} at batch {batch}"
                          for (label, batch), count in updates.items()) + "."]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for label in labels:
        batches = [b for b in (2, 4, 64) if (label, b) in grouped]
        means = [100 * statistics.mean(grouped[(label, b)]) for b in batches]
        spreads = [100 * statistics.stdev(grouped[(label, b)]) for b in batches]
        axis.errorbar(batches, means, yerr=spreads, marker="o", capsize=3, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks([2, 4, 64])
    axis.set_xticklabels(["2", "4", "64"])
    _label(axis, "batch size (log scale)",
           "Small batches: accuracy against batch size (bars: std over seeds)")
    _save(figure, plot_path)
    return lines


def _summarize_placement(pairs, plot_path):
    lines = ["| model | batch norm | norm layers | final test acc. (%) | best test acc. (%) | "
             "final train loss |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    plt = _pyplot()
    models = list(dict.fromkeys(run.fields["model"] for run, _ in pairs))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for run, results in pairs:
        history = results["training"]["history"]
        diverged = results["training"].get("diverged_at_epoch")
        final = (f"diverged in epoch {diverged}" if diverged else
                 f"{100 * _accuracy(results):.2f}")
        best = max((r["test_accuracy"] for r in history), default=float("nan"))
        loss = f"{history[-1]['loss']:.3f}" if history else "—"
        lines.append(f"| {run.fields['model']} | {run.fields['placement']} | "
                     f"{len(results['model']['norm_layers'])} | {final} | {100 * best:.2f} | "
                     f"{loss} |")
        axis = axes[0][models.index(run.fields["model"])]
        axis.plot([r["epoch"] for r in history], [100 * r["test_accuracy"] for r in history],
                  "o-", label=run.fields["placement"])
    scales = {}
    for run, results in pairs:
        scales.setdefault(run.fields["model"], _scale([(run, results)]))
    lines += ["", "Seed 4, one run each; SGD at batch 128 (learning rate 0.1 unless the model "
              "column says otherwise), 5 epochs. " + "; ".join(dict.fromkeys(scales.values()))
              + "."]
    for axis, model in zip(axes[0], models):
        _label(axis, "epoch", f"Placement of batch norm: {model}")
    _save(figure, plot_path)
    return lines


def _summarize_population(pairs, plot_path):
    lines = ["| batch | momentum | updates | EMA statistics (%) | recomputed (%) | gain |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    labels, ema, recomputed = [], [], []
    for run, results in pairs:
        updates = results["training"]["steps_per_epoch"] * results["config"]["epochs"]
        a, b = 100 * _accuracy(results), 100 * _accuracy(results, "recomputed")
        lines.append(f"| {run.fields['batch']} | {run.fields['momentum']} | {updates:,} | "
                     f"{a:.2f} | {b:.2f} | {b - a:+.2f} |")
        labels.append(f"batch {run.fields['batch']}\nmomentum {run.fields['momentum']}")
        ema.append(a)
        recomputed.append(b)
    lines += ["", "Test accuracy with the moving (EMA) statistics and with population statistics "
              "recomputed after training (equal-weight average over 200 training batches of the "
              "training batch size, or one epoch if shorter); seed 4. " + _scale(pairs) + "."]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], ema, 0.4, label="EMA (moving) statistics")
    axis.bar([p + 0.2 for p in positions], recomputed, 0.4, label="recomputed after training")
    axis.set_xticks(list(positions))
    axis.set_xticklabels(labels)
    axis.set_ylim(0, 1.3 * max(ema + recomputed))  # room for the legend above the bars
    _label(axis, "", "Population statistics: EMA vs recomputed", grid="y")
    _save(figure, plot_path)
    return lines


EXPERIMENTS = {
    experiment.name: experiment for experiment in (
        Experiment("batch_structure", "Batch structure", _batch_structure_runs(),
                   _summarize_batch_structure),
        Experiment("mixture", "Mixture Normalization", _mixture_runs(), _summarize_mixture),
        Experiment("small_batch", "Small batches", _small_batch_runs(),
                   _summarize_small_batch),
        Experiment("placement", "Placement", _placement_runs(), _summarize_placement),
        Experiment("population", "Population statistics", _population_runs(),
                   _summarize_population),
    )
}


# ------------------------------------------------------------------------------- running them

def command(run, folder):
    """The `recipes.cifar` command line of `run` writing to `folder`."""
    return [sys.executable, "-m", "recipes.cifar", *run.args, "--output", str(folder),
            "--verbose", "2"]


def _planned_epochs(run):
    from recipes import cifar

    return cifar.parse_args(list(run.args))[1].epochs


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
            print(f"  done: {run.name} ({_run_minutes(results[run.name]):.1f} min)", flush=True)
    return [(run, results[run.name]) for run in experiment.runs], trained


def write_section(name, text, path=None):
    """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->` in `path`
    (default: EXPERIMENTS.md)."""
    path = MARKDOWN if path is None else path
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    document = path.read_text() if path.exists() else ""
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        tail = rest.split(end, 1)[1]
        document = f"{head}{begin}\n{text}\n{end}{tail}"
    else:
        document += f"\n{begin}\n{text}\n{end}\n"
    path.write_text(document)


def summarize(experiment, pairs, jobs, wall_seconds=None, trained=0):
    """Writes the experiment's plot and its section of EXPERIMENTS.md; returns the section.

    `wall_seconds` and `trained`: how long this command took and how many runs it trained
    (the rest were finished before)."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    plot = PLOTS / f"{experiment.name}.png"
    lines = experiment.summarize(pairs, plot)
    total = sum(_run_minutes(results) for _, results in pairs)
    wall = (f"; this command trained {trained} of them in {wall_seconds / 60:.0f} minutes "
            "wall-clock" if trained else "")
    lines += ["", f"Runs: {len(pairs)}, {total:.0f} run-minutes of training and evaluation in "
              f"all, {jobs} at a time on {os.cpu_count()} CPU cores ({platform.machine()}, "
              f"TensorFlow {pairs[0][1]['versions']['tensorflow']}){wall}.",
              "", f"![{experiment.title}](docs/experiments/{experiment.name}.png)"]
    text = "\n".join(lines)
    write_section(experiment.name, text)
    return text


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
