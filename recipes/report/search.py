"""What a KerasTuner search leaves behind: `results.csv`, `results.md` and
`accuracy_vs_batch_size.png`, from one row per trial (`recipes.tuning.trial_rows`)."""

import csv
from pathlib import Path

from recipes.report.figures import label, pyplot, save

#: The score of a trial: the name of the metric the KerasTuner search maximises
#: (`kt.Objective` of `recipes.tuning`) and of its column in the results.
OBJECTIVE = "val_accuracy"
#: Columns of `results.csv`, in order: the keys of a trial row.
RESULT_FIELDS = ("trial", "status", "norm", "batch_size", "model", "placement", "lr",
                 "learning_rate", "epochs", OBJECTIVE, "best_epoch", "val_loss",
                 "accuracy", "steps", "replicas", "seconds", "worker", "attempts")
# Column headings of results.md.
_HEADERS = {"trial": "trial", "status": "status", "norm": "norm", "batch_size": "batch",
            "model": "model", "placement": "placement", "lr": "lr @128",
            "learning_rate": "lr", "epochs": "epochs", OBJECTIVE: "val acc (%)",
            "best_epoch": "best epoch", "val_loss": "val loss", "accuracy": "train acc (%)",
            "steps": "steps", "replicas": "replicas", "seconds": "s", "worker": "worker",
            "attempts": "runs"}
_TEXT_COLUMNS = ("status", "norm", "model", "placement", "worker")


def best_row(rows):
    """The completed row with the highest validation accuracy.

    Args:
        rows: trial rows (dicts with the `RESULT_FIELDS`).

    Returns:
        That row, or None when no trial has completed with a score.
    """
    done = [row for row in rows if row["status"] == "COMPLETED" and row[OBJECTIVE] is not None]
    return max(done, key=lambda row: row[OBJECTIVE]) if done else None


def _format(name, value):
    """A cell of results.md: accuracies in percent, empty for a missing value."""
    if value is None:
        return ""
    if name in (OBJECTIVE, "accuracy"):
        return f"{100 * value:.2f}"
    if name == "val_loss":
        return f"{value:.4f}"
    if name == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def write_results(rows, output, title="KerasTuner search: normalization x batch size",
                  settings=None):
    """Writes `results.csv`, `results.md` and `accuracy_vs_batch_size.png` into `output`.

    Args:
        rows: `trial_rows(tuner)`.
        output: The folder.
        title: Heading of `results.md`.
        settings: Optional dict of search settings listed in `results.md`.

    Returns:
        A dict of the paths written.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output / "results.csv", "markdown": output / "results.md",
             "plot": output / "accuracy_vs_batch_size.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, RESULT_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in RESULT_FIELDS})
    plot_accuracy_vs_batch_size(rows, paths["plot"])
    paths["markdown"].write_text(markdown(rows, paths, title, settings))
    return paths


def markdown(rows, paths, title, settings=None):
    """The results page: settings, the best configuration, the picture, a row per trial.

    Args:
        rows: trial rows.
        paths: `write_results`' paths (the picture is linked by its name).
        title: the page's heading.
        settings: optional dict of search settings, listed first.

    Returns:
        The Markdown text.
    """
    lines = [f"# {title}", ""]
    if settings:
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in settings.items()]
        lines.append("")
    best = best_row(rows)
    if best is not None:
        lines += [f"**Best:** {describe(best)}.", ""]
    lines += [f"![validation accuracy vs batch size]({paths['plot'].name})", "",
              f"{len(rows)} trial(s); `val acc` is the best validation accuracy over the "
              "trial's epochs, `lr` the learning rate used (`lr @128` scaled by batch / 128), "
              "`steps` the optimizer steps of the trial (a Hyperband continuation counts only "
              "its own), `s` its training wall time, `worker` the tuner that ran it and `runs` "
              "how many times it was started (more than once after an interruption or a lost "
              "worker).", "",
              "| " + " | ".join(_HEADERS[key] for key in RESULT_FIELDS) + " |",
              "| " + " | ".join("---" if key in _TEXT_COLUMNS else "---:"
                                for key in RESULT_FIELDS) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_format(key, row[key]) for key in RESULT_FIELDS) + " |")
    lines.append("")
    return "\n".join(lines)


def describe(row):
    """One line for a trial: its hyperparameters and validation accuracy."""
    return (f"norm={row['norm']}, batch_size={row['batch_size']}, model={row['model']}, "
            f"placement={row['placement']}, lr={row['lr']:g} at batch 128 "
            f"({row['learning_rate']:g} used) -> validation accuracy "
            f"{100 * row[OBJECTIVE]:.2f}% (trial {row['trial']})")


def plot_accuracy_vs_batch_size(rows, path):
    """Validation accuracy against batch size (log2 axis), one line per norm.

    Where several trials share a norm and batch size (other hyperparameters, or Hyperband's
    longer runs), the best of them is drawn.

    Args:
        rows: trial rows; only completed trials with a score are drawn.
        path: the PNG to write.
    """
    best = {}
    for row in rows:
        if row["status"] != "COMPLETED" or row[OBJECTIVE] is None:
            continue
        key = (row["norm"], row["batch_size"])
        best[key] = max(best.get(key, -1.0), row[OBJECTIVE])
    figure, axis = pyplot().subplots(figsize=(6.4, 4.4))
    norms = sorted({norm for norm, _ in best})
    for norm in norms:
        points = sorted((size, 100 * acc) for (name, size), acc in best.items() if name == norm)
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=norm)
    sizes = sorted({size for _, size in best})
    axis.set_xscale("log", base=2)
    if sizes:
        axis.set_xticks(sizes)
        axis.set_xticklabels([str(size) for size in sizes])
    label(axis, "batch size (log2 scale)", "Validation accuracy vs batch size",
          ylabel="validation accuracy (%)", legend_title="normalization", legend=bool(norms))
    save(figure, path)
