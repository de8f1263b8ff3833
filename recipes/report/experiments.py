"""The tables and figures of EXPERIMENTS.md, from the `results.json` of each experiment's runs.

A summarizer gets `[(run, results)]` in run order (`run.fields` holds what the tables group
by: norm, batch, seed, ...), writes its figure and returns the Markdown lines of its table;
it works on whatever runs have finished. :func:`summarize` adds the scale and timing line and
writes the section of EXPERIMENTS.md between the experiment's markers.
"""

import os
import platform
import statistics
from pathlib import Path

from recipes.report.figures import label, pyplot, save

#: The project's EXPERIMENTS.md (`write_section`'s default).
MARKDOWN = Path(__file__).resolve().parents[2] / "EXPERIMENTS.md"


def mean_spread(values):
    """`"mean ± std"` over seeds (sample std; `± 0` for one value), in percent."""
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def _accuracy(results, mode="population"):
    return results["evaluation"][mode]["accuracy"]


def run_minutes(results):
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


def _seeds(pairs):
    """The seeds of the runs at hand, as "1, 2, 3"."""
    return ", ".join(map(str, sorted({run.fields["seed"] for run, _ in pairs})))


# ------------------------------------------------------------------------ batch structure

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
    return mean_spread(values) if values else "—"


def _percent_or_dash(value):
    return f"{100 * value:.2f}" if value is not None else "—"


def _batch_structure_grid(grid_pairs):
    """The table of the grid (head norm x training batches) and its bars' data."""
    modes = [mode for mode, _ in BATCH_STRUCTURE_MODES]
    header = ("| head norm | training batches | seeds | " + " | ".join(
        text for _, text in BATCH_STRUCTURE_MODES)
        + " | conditional gain over population | over recomputed |")
    lines = [header, "| --- | --- | ---: |" + " ---: |" * (len(modes) + 2)]
    grid, rows = {}, []
    for run, results in grid_pairs:
        grid.setdefault((run.fields["head"], run.fields["training"]), []).append(results)
    for (head, training), runs in grid.items():
        accuracies = {m: [_batch_structure_accuracy(r, m) for r in runs] for m in modes}
        gains = [[b - a for a, b in zip(accuracies[base], accuracies["balanced"])
                  if a is not None and b is not None] for base in ("population", "recomputed")]
        batches = "balanced, k=1" if training == "balanced" else "random"
        lines.append(f"| {head} | {batches} | {len(runs)} | "
                     + " | ".join(_cell(accuracies[m]) for m in modes)
                     + " | " + " | ".join(_cell(g) for g in gains) + " |")
        rows.append((f"head {head}\n{batches}", accuracies))
    lines += ["", f"Test accuracy (%), mean ± sample std over seeds {_seeds(grid_pairs)} "
              "(± 0.00: one seed). Batch 10 in training and in "
              "every batch-statistics evaluation (balanced: one image per class). "
              + _scale(grid_pairs) + "; no augmentation, SGD at a constant 0.02 with momentum "
              "0.9, no weight decay. Recomputed: the moving averages replaced after training "
              "by the equal-weight average over 200 training batches (`--eval recomputed`). The "
              "conditional gain is conditional minus population accuracy (moving or "
              "recomputed statistics), in points."]
    return lines, rows


def _batch_structure_ablations(grid_pairs, ablations):
    """The table of the ablations, each against the grid's seed-0 run they change."""
    reference = [(run, r) for run, r in grid_pairs if run.fields["seed"] == 0
                 and run.fields["head"] == "none" and run.fields["training"] == "balanced"]
    lines = ["", "Why the earlier recipe showed less: seed 0, no head norm, balanced "
             "training, one setting changed at a time (test accuracy, %):", "",
             "| recipe | population | recomputed | random test batches | conditional | "
             "conditional gain | pseudo-balanced (argmax) | assignment alone | assignment "
             "batches |", "| --- |" + " ---: |" * 8]
    for run, results in reference + ablations:
        recipe = "the recipe above" if run.fields["recipe"] == "issue" else run.fields["recipe"]
        values = [_batch_structure_accuracy(results, m) for m in
                  ("population", "recomputed", "batch", "balanced")]
        gain = f"{100 * (values[3] - values[0]):+.2f}" if None not in values[::3] else "—"
        rest = [_batch_structure_accuracy(results, m) for m in
                ("pseudo_balanced", "assignment:alone", "assignment")]
        lines.append(f"| {recipe} | " + " | ".join(map(_percent_or_dash, values))
                     + f" | {gain} | " + " | ".join(map(_percent_or_dash, rest)) + " |")
    return lines


def _plot_batch_structure(rows, plot_path):
    """Grouped bars: one group per grid cell, one bar per evaluation mode (min-max whiskers)."""
    figure, axis = pyplot().subplots(figsize=(11, 4.5))
    width = 0.8 / len(BATCH_STRUCTURE_MODES)
    for index, (mode, text) in enumerate(BATCH_STRUCTURE_MODES):
        means, low, high = [], [], []
        for _, accuracies in rows:
            values = [100 * v for v in accuracies[mode] if v is not None]
            mean = statistics.mean(values) if values else 0.0
            means.append(mean)
            low.append(mean - min(values, default=mean))
            high.append(max(values, default=mean) - mean)
        axis.bar([i + index * width for i in range(len(rows))], means, width, label=text,
                 yerr=[low, high], capsize=2)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    axis.set_xticklabels([name for name, _ in rows])
    axis.set_ylim(0, 100)  # room for the legend above the bars
    label(axis, "", "Batch structure: head norm x training batches x evaluation "
          "(bars: min-max over seeds)", grid="y", legend=False)
    axis.legend(title="evaluation", fontsize=7, ncol=2, loc="upper left")
    save(figure, plot_path)


def summarize_batch_structure(pairs, plot_path):
    """Experiment 1: the grid's table, the ablations' table, grouped bars."""
    grid_pairs = [(run, r) for run, r in pairs if run.fields["recipe"] == "issue"]
    lines, rows = _batch_structure_grid(grid_pairs)
    ablations = [(run, r) for run, r in pairs if run.fields["recipe"] != "issue"]
    if ablations:
        lines += _batch_structure_ablations(grid_pairs, ablations)
    _plot_batch_structure(rows, plot_path)
    return lines


# -------------------------------------------------------------------------------- mixture

def _curve(results):
    """`(updates, test accuracy)` after each epoch of a run."""
    steps = results["training"]["steps_per_epoch"]
    history = results["training"]["history"]
    return [row["epoch"] * steps for row in history], [row["test_accuracy"] for row in history]


def _first_reaching(updates, accuracies, target):
    return next((u for u, a in zip(updates, accuracies) if a >= target), None)


def summarize_mixture(pairs, plot_path):
    """Experiment 2: updates each norm needs to reach BN's best; seed-mean curves."""
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
            f"| {norm} | {len(runs)} | {mean_spread([_accuracy(r) for r in runs])} | "
            f"{mean_spread([max(c[1]) for c in curves[norm]])} | "
            f"{reached if reached is not None else 'not reached'} | "
            + ", ".join(str(u) if u is not None else "not reached" for u in per_seed) + " |")
    config = pairs[0][1]["config"]
    lines += ["", f"Mean ± sample std over seeds {_seeds(pairs)}; test "
              f"accuracy with population statistics after every {updates[0]} updates "
              f"(batch {config['batch_size']}). BN's best = the best point of BN's seed-mean "
              "curve. " + _scale(pairs) + f" of {updates[0]} updates ({updates[-1]} updates "
              "in all)."]
    figure, axis = pyplot().subplots(figsize=(7, 4))
    for norm, cs in curves.items():
        mean = [100 * a for a in mean_curve[norm]]
        low = [100 * min(c[1][i] for c in cs) for i in range(len(updates))]
        high = [100 * max(c[1][i] for c in cs) for i in range(len(updates))]
        axis.plot(updates, mean, "o-", label=f"{norm} (mean of {len(cs)} seeds)")
        axis.fill_between(updates, low, high, alpha=0.2)
    axis.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label="BN's best")
    label(axis, "gradient updates",
          "Mixture Normalization vs BN, 5-layer CNN (band: min-max over seeds)")
    save(figure, plot_path)
    return lines


# ---------------------------------------------------------------------------- small batch

def _small_batch_norms(grouped):
    """The norms in run order, those run only at batch 64 (the references) last."""
    norms = list(dict.fromkeys(norm for norm, _ in grouped))
    return sorted(norms, key=lambda norm: all(b == 64 for n, b in grouped if n == norm))


def summarize_small_batch(pairs, plot_path):
    """Experiment 3: accuracy per norm at batch 2, 4 and 64; the updates each run made."""
    grouped, updates, epochs = {}, {}, {}
    for run, results in pairs:
        key = (run.fields["norm"], run.fields["batch"])
        grouped.setdefault(key, []).append(_accuracy(results))
        updates[key] = results["training"]["steps_per_epoch"] * results["config"]["epochs"]
        epochs[key[0]] = results["config"]["epochs"]
    norms = _small_batch_norms(grouped)
    # The updates of the norms that also ran at batch 64: the fair-comparison references.
    at_64 = {norm for norm, batch in grouped if batch == 64}
    lines = ["| norm | batch 2 | batch 4 | batch 64 |", "| --- | ---: | ---: | ---: |"]
    for norm in norms:
        cells = [mean_spread(grouped[(norm, b)]) if (norm, b) in grouped else "—"
                 for b in (2, 4, 64)]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    scale_epochs = pairs[0][1]["config"]["epochs"]
    longer = "".join(f" (\"{norm}\": {count})" for norm, count in epochs.items()
                     if count != scale_epochs)
    lines += ["", "Test accuracy (%), population statistics, mean ± sample std over seeds "
              f"{_seeds(pairs)}; learning rate 0.1 x batch/128 "
              "(SGD, cosine). " + _scale(pairs) + f"{longer}. Updates per run: "
              + ", ".join(f"{count:,} for {norm} at batch {batch}"
                          for (norm, batch), count in updates.items() if norm in at_64) + "."]
    figure, axis = pyplot().subplots(figsize=(7, 4))
    for norm in norms:
        batches = [b for b in (2, 4, 64) if (norm, b) in grouped]
        means = [100 * statistics.mean(grouped[(norm, b)]) for b in batches]
        spreads = [100 * statistics.stdev(grouped[(norm, b)]) if len(grouped[(norm, b)]) > 1
                   else 0.0 for b in batches]
        axis.errorbar(batches, means, yerr=spreads, marker="o", capsize=3, label=norm)
    axis.set_xscale("log", base=2)
    axis.set_xticks([2, 4, 64])
    axis.set_xticklabels(["2", "4", "64"])
    label(axis, "batch size (log scale)",
          "Small batches: accuracy against batch size (bars: std over seeds)")
    save(figure, plot_path)
    return lines


# ------------------------------------------------------------------------------ placement

def summarize_placement(pairs, plot_path):
    """Experiment 4: a row per model and placement; a panel of test curves per model."""
    lines = ["| model | batch norm | norm layers | final test acc. (%) | best test acc. (%) | "
             "final train loss |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    models = list(dict.fromkeys(run.fields["model"] for run, _ in pairs))
    figure, axes = pyplot().subplots(1, len(models), figsize=(6 * len(models), 4),
                                     squeeze=False)
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
        label(axis, "epoch", f"Placement of batch norm: {model}")
    save(figure, plot_path)
    return lines


# ----------------------------------------------------------------------------- population

def summarize_population(pairs, plot_path):
    """Experiment 5: EMA against recomputed population statistics, table and bars."""
    lines = ["| batch | momentum | updates | EMA statistics (%) | recomputed (%) | gain |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    names, ema, recomputed = [], [], []
    for run, results in pairs:
        updates = results["training"]["steps_per_epoch"] * results["config"]["epochs"]
        a, b = 100 * _accuracy(results), 100 * _accuracy(results, "recomputed")
        lines.append(f"| {run.fields['batch']} | {run.fields['momentum']} | {updates:,} | "
                     f"{a:.2f} | {b:.2f} | {b - a:+.2f} |")
        names.append(f"batch {run.fields['batch']}\nmomentum {run.fields['momentum']}")
        ema.append(a)
        recomputed.append(b)
    lines += ["", "Test accuracy with the moving (EMA) statistics and with population statistics "
              "recomputed after training (equal-weight average over 200 training batches of the "
              "training batch size, or one epoch if shorter); seed 4. " + _scale(pairs) + "."]
    figure, axis = pyplot().subplots(figsize=(8, 4))
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], ema, 0.4, label="EMA (moving) statistics")
    axis.bar([p + 0.2 for p in positions], recomputed, 0.4, label="recomputed after training")
    axis.set_xticks(list(positions))
    axis.set_xticklabels(names)
    axis.set_ylim(0, 1.3 * max(ema + recomputed))  # room for the legend above the bars
    label(axis, "", "Population statistics: EMA vs recomputed", grid="y")
    save(figure, plot_path)
    return lines


# ------------------------------------------------------------------------ EXPERIMENTS.md

def write_section(name, text, path=None):
    """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->` in `path`,
    or appends the block when the markers are not there.

    Args:
        name: the experiment's name, as in its markers.
        text: the new section.
        path: the Markdown file (created if missing). Defaults to the project's
            EXPERIMENTS.md (`MARKDOWN`).
    """
    path = Path(MARKDOWN if path is None else path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    document = path.read_text() if path.exists() else ""
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        tail = rest.split(end, 1)[1]
        document = f"{head}{begin}\n{text}\n{end}{tail}"
    else:
        document += f"\n{begin}\n{text}\n{end}\n"
    path.write_text(document)


def summarize(experiment, pairs, jobs, wall_seconds=None, trained=0, *, markdown, plots):
    """Writes the experiment's plot and its section of the Markdown file; returns the section.

    Args:
        experiment: a `recipes.experiments.Experiment` (its `summarize` makes the table).
        pairs: `[(run, results)]` of its finished runs, in run order.
        jobs: how many runs went at a time (stated with the timing).
        wall_seconds: how long this command took; None when it trained nothing.
        trained: how many of the runs this command trained (the rest were finished before).
        markdown: the Markdown file holding the experiment's section (EXPERIMENTS.md).
        plots: the folder of the figures (`<name>.png`, linked relative to `markdown`).

    Returns:
        The section's text.
    """
    plots = Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    plot = plots / f"{experiment.name}.png"
    lines = experiment.summarize(pairs, plot)
    total = sum(run_minutes(results) for _, results in pairs)
    wall = (f"; this command trained {trained} of them in {wall_seconds / 60:.0f} minutes "
            "wall-clock" if trained else "")
    link = Path(os.path.relpath(plot, Path(markdown).parent)).as_posix()
    lines += ["", f"Runs: {len(pairs)}, {total:.0f} run-minutes of training and evaluation in "
              f"all, {jobs} at a time on {os.cpu_count()} CPU cores ({platform.machine()}, "
              f"TensorFlow {pairs[0][1]['versions']['tensorflow']}){wall}.",
              "", f"![{experiment.title}]({link})"]
    text = "\n".join(lines)
    write_section(experiment.name, text, markdown)
    return text
