"""What a CIFAR run leaves behind: `results.json`, `report.md`, PNG plots, a printed summary.

- `results.json`: the settings, data, model, per-epoch history and every evaluation mode.
- `curves.png`: accuracy and loss per epoch, training and test (population statistics).
- `evaluation.png`: a bar chart of the test accuracy of each evaluation mode.
- `report.md`: the same in a page a person reads, linking the plots.
"""

import json
from pathlib import Path

from recipes.report.figures import label, pyplot, save

MODE_LABELS = {
    "population": "population statistics (moving averages)",
    "batch": "random test batches, own statistics",
    "balanced": "class-balanced test batches (labels), own statistics",
    "pseudo_balanced": "balanced by predicted labels, own statistics",
    "assignment": "balanced by a class-prior assignment (no labels), own statistics",
    "recomputed": "population statistics recomputed after training",
}


def write(results, output):
    """Writes `results.json`, `report.md` and the plots of one run into `output`.

    Args:
        results: the run's results dict (`recipes.training`'s).
        output: the run's folder (created if need be).

    Returns:
        A dict of the paths written: `results`, `report`, `curves`, `evaluation`.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"results": output / "results.json", "report": output / "report.md",
             "curves": output / "curves.png", "evaluation": output / "evaluation.png"}
    paths["results"].write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    history = results["training"]["history"]
    plot_curves(history, paths["curves"])
    plot_evaluation(results["evaluation"], paths["evaluation"])
    paths["report"].write_text(markdown(results, paths))
    return paths


def plot_curves(history, path):
    """Accuracy and loss per epoch, train and test, side by side.

    Args:
        history: the run's per-epoch rows (``epoch``, ``accuracy``, ``loss``,
            ``test_accuracy``, ``test_loss``).
        path: the PNG to write.
    """
    from matplotlib.ticker import MaxNLocator

    figure, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.plot(epochs, [row[metric] for row in history], "o-", label="train")
        axis.plot(epochs, [row[f"test_{metric}"] for row in history], "s-", label="test")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        label(axis, "epoch", f"{metric} per epoch", ylabel=metric)
    save(figure, path)


def plot_evaluation(evaluation, path):
    """Test accuracy of each evaluation mode as bars.

    Args:
        evaluation: ``{mode: {"accuracy": ...}}`` from the run's results.
        path: the PNG to write.
    """
    modes = list(evaluation)
    accuracies = [100 * evaluation[mode]["accuracy"] for mode in modes]
    figure, axis = pyplot().subplots(figsize=(max(4, 1.6 * len(modes) + 1), 4))
    bars = axis.bar(modes, accuracies, color="tab:blue")
    for bar, value in zip(bars, accuracies):
        axis.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value),
                      ha="center", va="bottom")
    axis.set_ylim(0, 105)
    label(axis, "", "evaluation modes", grid="y", legend=False)
    save(figure, path)


def _percent(value):
    """A fraction as a percentage with two decimals, without the % sign."""
    return f"{100 * value:.2f}"


def markdown(results, paths):
    """The run's `report.md`: settings, a row per evaluation mode, the training history.

    Args:
        results: the run's results dict.
        paths: `write`'s paths (the plots are linked by their names).

    Returns:
        The Markdown text.
    """
    config, data, model = results["config"], results["data"], results["model"]
    training = results["training"]
    norm = config["norm"] + (f" {json.dumps(config['norm_kwargs'])}" if config["norm_kwargs"]
                             else "")
    if config["other_norm"]:
        norm += f" (elsewhere: {config['other_norm']})"
    # Older results.json files have no head_norm: they had none.
    head = config.get("head_norm") or "none"
    lines = [
        f"# CIFAR run: {config['model']} with {config['norm']}",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| model | {config['model']} ({model['parameters']:,} parameters, "
        f"{len(model['norm_layers'])} norm layers) |",
        f"| normalization | {norm}, placement {config['placement']}; head norm (after the "
        f"classifier's Dense) {head} |",
        f"| data | {data['source']}: {data['train_images']:,} train / {data['test_images']:,} "
        f"test images, {data['num_classes']} classes |",
        f"| batches | {config['batch_structure']}, global batch {training['global_batch_size']}"
        f" on {training['replicas']} replica(s) ({training['strategy']} strategy), "
        f"augmentation {'on' if config['augment'] else 'off'} |",
        f"| optimizer | {config['optimizer']}, lr {training['learning_rate']:g} (= {config['lr']:g}"
        f" x {training['global_batch_size']}/128), {config['schedule']} schedule, weight decay "
        f"{config['weight_decay']:g} |",
        f"| run | {config['epochs']} epochs x {training['steps_per_epoch']} steps, seed "
        f"{config['seed']}, XLA {'on' if config['jit'] else 'off'}, mixed precision "
        f"{'on' if config['mixed_precision'] else 'off'}, {results['seconds']:.0f} s |",
        "",
        "## Test results by evaluation mode",
        "",
        "| mode | what normalizes the test images | accuracy (%) | loss |",
        "| --- | --- | ---: | ---: |",
    ]
    for mode, metrics in results["evaluation"].items():
        what = MODE_LABELS.get(mode, mode)
        if "coverage" in metrics:
            what += f" ({_percent(metrics['coverage'])}% of the test images fill such batches)"
        if "assignment_accuracy" in metrics:
            what += (f"; the assignment alone is {_percent(metrics['assignment_accuracy'])}% "
                     "correct")
        lines.append(f"| {mode} | {what} | {_percent(metrics['accuracy'])} | "
                     f"{metrics['loss']:.4f} |")
    for mode, reason in results.get("skipped_evaluation", {}).items():
        lines.append(f"| {mode} | skipped: {reason} | - | - |")
    lines += [
        "",
        f"![evaluation modes]({paths['evaluation'].name})",
        "",
        "## Training history",
        "",
        "| epoch | loss | accuracy (%) | test loss | test accuracy (%) | learning rate | s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in training["history"]:
        lines.append(f"| {row['epoch']} | {row['loss']:.4f} | {_percent(row['accuracy'])} | "
                     f"{row['test_loss']:.4f} | {_percent(row['test_accuracy'])} | "
                     f"{row['learning_rate']:.4g} | {row['seconds']:.1f} |")
    if training.get("diverged_at_epoch"):
        lines += ["", f"**Training diverged in epoch {training['diverged_at_epoch']}** (the "
                      "training loss became NaN or infinite) and stopped; the results above are "
                      "those of the last finished epoch's weights, or of the diverged weights "
                      "if none finished."]
    if training["resumed_at_epoch"]:
        lines += ["", f"This run resumed from its checkpoint after epoch "
                      f"{training['resumed_at_epoch']}."]
    lines += [
        "",
        f"![accuracy and loss per epoch]({paths['curves'].name})",
        "",
        f"TensorFlow {results['versions']['tensorflow']}, Keras {results['versions']['keras']}. "
        "Logs: `training_log.csv`, TensorBoard `logs/`; checkpoints: `checkpoints/`; "
        "final model: `model.keras` (load it after `import keras_norm`).",
        "",
    ]
    return "\n".join(lines)


def summary(results, paths=None):
    """A few lines for the terminal: the run, its test accuracy per mode, where the report is.

    Args:
        results: the run's results dict.
        paths: `write`'s paths, to name the report; None leaves that line out.

    Returns:
        The text.
    """
    config = results["config"]
    head = f", head norm {config['head_norm']}" if config.get("head_norm") else ""
    lines = [f"{config['model']} + {config['norm']} ({config['placement']}{head}) on "
             f"{results['data']['train_images']:,} images, {config['epochs']} epochs, "
             f"{results['seconds']:.0f} s"]
    for mode, metrics in results["evaluation"].items():
        lines.append(f"  test accuracy, {mode}: {_percent(metrics['accuracy'])}%")
    for mode, reason in results.get("skipped_evaluation", {}).items():
        lines.append(f"  {mode}: skipped ({reason})")
    if paths:
        lines.append(f"Report: {paths['report']}  (results.json, curves.png, evaluation.png "
                     "beside it)")
    return "\n".join(lines)
