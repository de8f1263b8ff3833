"""Readers: each turns one kind of stored data set into an :class:`ImageData` in memory.

* :func:`read_npz`: an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
  optionally ``class_names``.
* :func:`read_cifar_python`: CIFAR-10's "python version" release, archive or folder, read
  without unpacking, with an unpickler that accepts only NumPy arrays.
* :func:`read_folder_tree`: ``<root>/{train,test}/<class>/*.jpg|*.jpeg|*.png``, decoded with
  ``tf.io.decode_image`` in a parallel ``tf.data`` map.
* :func:`read_tfds`: a TFDS data set already prepared locally.

None of them looks for data or downloads it: `recipes.datasets.sources` does that.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from recipes.datasets.base import ImageData, one_line

IMAGE_SIZE = (32, 32)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CIFAR_PY_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_PY_META = "batches.meta"

logger = logging.getLogger(__name__)


def _image_data(arrays: dict, class_names, source: str) -> ImageData:
    """An :class:`ImageData` from ``{"train": (x, y), "test": (x, y)}``."""
    return ImageData(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        class_names=tuple(class_names),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# .npz and TFDS
# --------------------------------------------------------------------------------------------


def read_npz(path: Path) -> ImageData:
    """Reads an ``.npz`` data set (classes numbered when it has no ``class_names``).

    Args:
        path: the ``.npz`` file.

    Returns:
        An :class:`ImageData` whose ``source`` is ``str(path)``.

    Raises:
        ValueError: if one of the four arrays is missing or malformed.
    """
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
        if missing:
            raise ValueError(
                f"source={str(path)!r}: the .npz lacks arrays {sorted(missing)} "
                f"(it has {sorted(npz.files)})"
            )
        arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        names = npz["class_names"] if "class_names" in npz.files else None
    if names is None:
        num = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1
        names = [str(i) for i in range(num)]
    return ImageData(class_names=tuple(str(n) for n in names), source=str(path), **arrays)


def read_tfds(name: str, data_dir=None) -> ImageData:
    """Reads the train and test splits of a TFDS data set that is already prepared.

    Args:
        name: the TFDS name, e.g. ``"cifar10"``.
        data_dir: TFDS data folder (default: TFDS's own default).

    Returns:
        An :class:`ImageData` whose ``source`` is ``"tfds:<name>"``.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    arrays = {}
    for split in ("train", "test"):
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        chunks = list(tfds.as_numpy(ds.batch(10000)))
        arrays[split] = (
            np.concatenate([x for x, _ in chunks]).astype(np.uint8, copy=False),
            np.concatenate([y for _, y in chunks]).astype(np.int32),
        )
    return _image_data(arrays, builder.info.features["label"].names, f"tfds:{name}")


# --------------------------------------------------------------------------------------------
# CIFAR-10's python release
# --------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Loads pickles of dicts, lists, bytes and NumPy arrays, and refuses anything else: a
    pickle can otherwise run arbitrary code, and downloads are data, not programs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # How Python 3 writes bytes at pickle protocol 2 (Python 2's, CIFAR's): a pure function.
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # NumPy 2 moved numpy.core to numpy._core (the old name warns); pickles of NumPy 1
            # arrays, like CIFAR-10's, still name it.
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def cifar_python_root(path: Path):
    """The folder holding CIFAR-10's python batches: ``path`` or its one sub-folder, or None.

    Args:
        path: a folder.

    Returns:
        A ``Path``, or None when neither holds ``data_batch_1``.
    """
    if (path / _CIFAR_PY_BATCHES[0]).is_file():
        return path
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / _CIFAR_PY_BATCHES[0]).is_file():
        return subdirs[0]
    return None


def is_cifar_python_archive(path: Path) -> bool:
    """Whether ``path`` is a tar archive of CIFAR-10's python batches.

    Judged by its first few members (the real archive's second member is a batch), so a large
    archive of another kind is not read through; any file name is accepted.

    Args:
        path: a file.

    Returns:
        A bool; False for a file that is not a readable tar archive.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            for _, member in zip(range(4), tar):
                if member.isfile() and Path(member.name).name in _CIFAR_PY_BATCHES:
                    return True
    except (tarfile.TarError, EOFError, OSError):
        return False
    return False


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        # encoding="bytes": the batches were pickled by Python 2; their keys stay bytes.
        value = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"{where}: not a CIFAR-10 python batch: {one_line(err)}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{where}: not a CIFAR-10 python batch: a {type(value).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in value.items()}


def _cifar_batch_arrays(batch: dict, where: str):
    """(uint8 images (N, 32, 32, 3), int32 labels (N,)) of one unpickled CIFAR batch."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"{where}: a CIFAR-10 python batch needs 'data' and 'labels' entries, "
                         f"got {sorted(batch)}")
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: 'data' must be uint8 (N, 3072), got {data.dtype} "
                         f"{data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: 'labels' must be {len(data)} integers, got {labels.dtype} "
                         f"{labels.shape}")
    # Each row is the red plane, then green, then blue, each 32x32 in row-major order.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _cifar_python_blobs(path: Path) -> dict:
    """The raw bytes of the batches and meta file, by file name, from a folder or archive."""
    wanted = set(_CIFAR_PY_BATCHES) | {_CIFAR_PY_META}
    blobs = {}
    if path.is_dir():
        root = cifar_python_root(path)
        for name in wanted:
            if (root / name).is_file():
                blobs[name] = (root / name).read_bytes()
        return blobs
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in wanted and name not in blobs:
                    blobs[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"source={str(path)!r} could not be read: {one_line(err)}") from err
    return blobs


def read_cifar_python(path: Path) -> ImageData:
    """Reads CIFAR-10's python release from its archive (without unpacking) or folder.

    Args:
        path: ``cifar-10-python.tar.gz`` (any name), or the ``cifar-10-batches-py`` folder or
            the folder holding it.

    Returns:
        An :class:`ImageData`; class names from ``batches.meta`` when present, else numbers.

    Raises:
        ValueError: if a batch is missing, unreadable or malformed, or a pickle holds anything
            but plain data.
    """
    blobs = _cifar_python_blobs(path)
    missing = [name for name in _CIFAR_PY_BATCHES if name not in blobs]
    if missing:
        raise ValueError(
            f"source={str(path)!r}: CIFAR-10's python release lacks {missing} (it has "
            f"{sorted(blobs)})"
        )
    parts = {
        name: _cifar_batch_arrays(_unpickle(blobs[name], f"{path}: {name}"), f"{path}: {name}")
        for name in _CIFAR_PY_BATCHES
    }
    train = [parts[name] for name in _CIFAR_PY_BATCHES[:-1]]
    num_classes = 1 + max(int(y.max(initial=0)) for _, y in parts.values())
    names = [str(i) for i in range(num_classes)]
    if _CIFAR_PY_META in blobs:
        meta = _unpickle(blobs[_CIFAR_PY_META], f"{path}: {_CIFAR_PY_META}")
        label_names = meta.get("label_names")
        if label_names:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in label_names]
    arrays = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": parts["test_batch"],
    }
    return _image_data(arrays, names, str(path))


# --------------------------------------------------------------------------------------------
# Class-folder trees
# --------------------------------------------------------------------------------------------
# Not keras.utils.image_dataset_from_directory: it resizes every image to `image_size` (a
# wrong-sized image would pass silently instead of being named in an error), yields float32
# batches that would have to go back to uint8, and needs one call per split with the class
# list passed in. A tf.data map of tf.io.decode_image over the sorted file list does the same
# decoding, with the checks below.


def _find_tree_root(root: Path) -> Path:
    """``root`` if it holds ``train/``, or its single sub-folder that does."""
    if (root / "train").is_dir():
        return root
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    raise ValueError(
        f"source={str(root)!r}: expected a class-folder tree <root>/train/<class>/*.jpg and "
        f"<root>/test/<class>/*.jpg, but there is no train/ folder"
    )


def _list_split(split_dir: Path, class_names: Sequence[str]):
    """Sorted (paths, labels) of the images under ``split_dir/<class>/``."""
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        if class_dir.name.startswith("."):
            continue
        if class_dir.name not in index:
            raise ValueError(
                f"{str(class_dir)!r}: class {class_dir.name!r} is not among the training "
                f"classes {list(class_names)}"
            )
        files = sorted(
            e.name
            for e in os.scandir(class_dir)
            if e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES)
        )
        paths.extend(str(class_dir / f) for f in files)
        labels.extend([index[class_dir.name]] * len(files))
    if not paths:
        raise ValueError(
            f"{str(split_dir)!r} has no images (*.jpg, *.jpeg, *.png) in class folders"
        )
    return paths, np.asarray(labels, np.int32)


def _decode_images(paths: Sequence[str], where: str) -> np.ndarray:
    """Decodes image files into a uint8 array (N, 32, 32, 3) with a parallel tf.data map."""
    import tensorflow as tf

    height, width = IMAGE_SIZE

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        shape = tf.shape(image)
        ok = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
        # A wrong-sized image becomes a blank placeholder here and an error below, which can
        # name the files (an error inside tf.data could not).
        image = tf.cond(ok, lambda: image, lambda: tf.zeros([height, width, 3], tf.uint8))
        return tf.ensure_shape(image, [height, width, 3]), ok

    ds = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(2048)
        .prefetch(2)
    )
    images, oks = [], []
    try:
        for image, ok in ds.as_numpy_iterator():
            images.append(image)
            oks.append(ok)
    except tf.errors.OpError as err:
        raise ValueError(f"could not read an image under {where!r}: {err.message}") from err
    ok = np.concatenate(oks)
    if not ok.all():
        bad = [paths[i] for i in np.flatnonzero(~ok)[:3]]
        raise ValueError(
            f"images under {where!r} must all be {height}x{width}; "
            f"{int((~ok).sum())} are not, e.g. {bad}"
        )
    return np.concatenate(images).astype(np.uint8, copy=False)


def read_folder_tree(root: Path, source: str) -> ImageData:
    """Reads ``<root>/{train,test}/<class>/*.jpg|*.jpeg|*.png`` (or the same tree wrapped in
    one extra folder). Class names are the sorted folder names under ``train/``.

    Args:
        root: the tree's folder.
        source: what to record as the data's ``source`` (the archive, for an unpacked one).

    Returns:
        An :class:`ImageData`.

    Raises:
        ValueError: if there is no ``train/`` or ``test/``, a test class is not a training
            class, a split has no images, or an image is unreadable or not 32x32.
    """
    root = _find_tree_root(root)
    if not (root / "test").is_dir():
        raise ValueError(f"source={source!r}: the class-folder tree {str(root)!r} has no test/")
    class_names = sorted(
        d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not class_names:
        raise ValueError(f"source={source!r}: {str(root / 'train')!r} has no class folders")
    start = time.perf_counter()
    arrays = {}
    for split in ("train", "test"):
        paths, labels = _list_split(root / split, class_names)
        arrays[split] = (_decode_images(paths, str(root / split)), labels)
    logger.info(
        "Decoded %d + %d images from %s in %.1f s",
        len(arrays["train"][1]),
        len(arrays["test"][1]),
        root,
        time.perf_counter() - start,
    )
    return _image_data(arrays, class_names, source)
