"""The one matplotlib set-up of the recipes' figures: backend, axis labelling, saving."""

DPI = 100


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed).

    Returns:
        The ``matplotlib.pyplot`` module.
    """
    import matplotlib

    # Before pyplot is imported: a run on a machine without a display must not try to open
    # a window (and the backend cannot be changed cheaply once figures exist).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(axis, xlabel, title, ylabel="test accuracy (%)", grid="both", legend_title=None,
          legend=True):
    """Labels an axis the same way in every figure: axis names, title, light grid, legend.

    Args:
        axis: a matplotlib ``Axes``.
        xlabel: the x-axis label ("" for none, as under named bars).
        title: the title above the axis.
        ylabel: the y-axis label.
        grid: which grid lines to draw, ``"both"``, ``"x"`` or ``"y"``.
        legend_title: a title for the legend.
        legend: draw the legend; False where the axis has no labelled lines.
    """
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis=grid, alpha=0.3)
    if legend:
        axis.legend(title=legend_title, fontsize=8)


def save(figure, path, dpi=DPI):
    """Lays the figure out tightly, writes it to ``path`` (PNG by its suffix) and closes it,
    so that a long search or experiment does not accumulate open figures.

    Args:
        figure: a matplotlib ``Figure``.
        path: the file to write.
        dpi: resolution; 100 by default.
    """
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
