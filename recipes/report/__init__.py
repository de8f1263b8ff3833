"""Every results file and figure the recipes write, with one matplotlib set-up.

- `recipes.report.runs`: what a CIFAR run leaves behind (`results.json`, `report.md`,
  `curves.png`, `evaluation.png`, the printed summary).
- `recipes.report.search`: a KerasTuner search's `results.csv`, `results.md` and
  `accuracy_vs_batch_size.png`.
- `recipes.report.experiments`: the tables of EXPERIMENTS.md and their figures.

Figures go through :func:`pyplot` (the non-interactive Agg backend, so that runs on machines
without a display never open a window), :func:`label` and :func:`save`. The run report's
functions are importable from here too (`report.write`, `report.summary`, ...).
"""

from recipes.report.figures import label, pyplot, save
from recipes.report.runs import MODE_LABELS, markdown, plot_curves, plot_evaluation, summary, write

__all__ = ["pyplot", "label", "save", "MODE_LABELS", "write", "plot_curves", "plot_evaluation",
           "markdown", "summary"]
