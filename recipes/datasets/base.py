"""What every part of `recipes.datasets` shares: the in-memory data set (`ImageData`), the
not-found error, and the hint on how to point the recipes at local data."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

DATA_ENV_VAR = "KERAS_NORM_DATA"

# The end of every "no data" error: what a user can do about it.
HOW_TO_POINT = (
    "Point at local data with `--data PATH` (recipes' command line) or "
    f"`export {DATA_ENV_VAR}=PATH`, where PATH is a class-folder tree "
    "(<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg), a .tar.gz of such a tree "
    "(like shared/data/cifar10-jpg.tar.gz), or an .npz with x_train, y_train, x_test, y_test "
    "(like shared/data/cifar10-small.npz)."
)


class DataNotFoundError(ValueError):
    """No usable data source was found, and CIFAR-10 could not be downloaded."""


@dataclasses.dataclass(frozen=True, repr=False)
class ImageData:
    """A train/test image classification data set held in memory.

    Attributes:
        x_train: uint8 array (N, 32, 32, 3).
        y_train: int32 array (N,) of class indices.
        x_test: uint8 array (M, 32, 32, 3).
        y_test: int32 array (M,).
        class_names: tuple of class names; ``class_names[i]`` is label ``i``.
        source: where the data came from (a path or ``"tfds:<name>"``), for reports.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str = ""

    def __post_init__(self):
        names = tuple(str(n) for n in self.class_names)
        if not names:
            raise ValueError("class_names must not be empty")
        object.__setattr__(self, "class_names", names)
        for split in ("train", "test"):
            x = np.asarray(getattr(self, f"x_{split}"))
            y = np.asarray(getattr(self, f"y_{split}"))
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(
                    f"x_{split} must be a uint8 array (N, H, W, 3), got {x.dtype} {x.shape}"
                )
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"y_{split} must be an integer array ({len(x)},), got {y.dtype} {y.shape}"
                )
            if len(y) and (y.min() < 0 or y.max() >= len(names)):
                raise ValueError(
                    f"y_{split} has labels in [{y.min()}, {y.max()}], outside "
                    f"[0, {len(names) - 1}] for {len(names)} class_names"
                )
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y.astype(np.int32, copy=False))

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple:
        """Shape of one image, e.g. ``(32, 32, 3)``."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self):
        return (
            f"ImageData(source={self.source!r}, x_train={self.x_train.shape}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes})"
        )


def one_line(err: BaseException) -> str:
    """``"<ErrorType>: <message>"`` on one line, for errors that quote another error."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
