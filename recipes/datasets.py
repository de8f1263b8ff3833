"""Data loading for the keras_norm recipes: CIFAR-style 32x32 RGB image classification data.

Everything is loaded into memory as uint8 NumPy arrays (CIFAR fits comfortably) and wrapped in an
:class:`ImageData`; :func:`make_dataset` turns arrays into a ``tf.data`` input pipeline.

Sources
-------
``load_data(source)`` accepts:

* a TFDS name, ``"cifar10"`` or ``"cifar100"`` (or ``"tfds:cifar10"``). It is only read if it is
  already prepared locally (``tfds.load`` prepares it): a data set named this way is never
  downloaded, and a missing one raises :class:`DataNotFoundError`. Use ``tfds_data_dir`` (or
  TFDS's own ``$TFDS_DATA_DIR``) to say where it lives. Use ``./cifar10`` to mean a local folder
  of that name.
* a class-folder tree: ``<root>/train/<class>/*.jpg|*.jpeg|*.png`` and
  ``<root>/test/<class>/...``. Class names are the sorted folder names under ``train/``, and
  labels are their indices (for CIFAR-10 that is the usual label order). A tree wrapped in one
  extra top-level folder (``<root>/<name>/train/...``) is accepted too. Images are decoded with
  TensorFlow in a parallel ``tf.data`` map (all 60,000 CIFAR-10 JPEGs: about 6-15 s on two
  busy CPU cores) and must all be 32x32.
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of such a tree (the layout of the shared
  ``cifar10-jpg.tar.gz``). It is unpacked once into a cache folder and reused; see
  :func:`unpack_archive` for the cache scheme.
* an ``.npz`` file with ``x_train`` (N, 32, 32, 3) uint8, ``y_train`` (N,), ``x_test``,
  ``y_test`` and optionally ``class_names`` (the layout of the shared ``cifar10-small.npz``).
* CIFAR-10's own "python version" release: ``cifar-10-python.tar.gz`` (any file name: it is
  recognized by its members), or the ``cifar-10-batches-py`` folder unpacked from it, holding
  the pickled batches ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
  ``batches.meta``. This is the file :func:`download_cifar10` (and ``keras.datasets.cifar10``)
  downloads. The archive is read directly, without unpacking, and its pickles are loaded with
  an unpickler that accepts only NumPy arrays.

Discovery order (``load_data()`` / :func:`find_source` with no source)
------------------------------------------------------------------------
1. ``$KERAS_NORM_DATA``, a path (or TFDS name) as above. If it is set but does not exist, that is
   an error; discovery does not silently move on.
2. The shared data folder next to the project, ``<project_root>/../shared/data/`` where
   ``<project_root>`` is the folder that contains ``recipes/`` (found from this file, never from
   the current working directory): ``cifar10-jpg.tar.gz`` (all 60,000 images), or
   ``cifar10-small.npz`` (2,000 train + 1,000 test images) when the caller passes
   ``small=True``.
3. TFDS ``cifar10``, if it is already prepared locally.
4. CIFAR-10 downloaded earlier into the Keras cache (``$KERAS_HOME/datasets``, by default
   ``~/.keras/datasets``), by this module or by ``keras.datasets.cifar10``: they share the
   file.
5. A download of CIFAR-10 into that cache with ``keras.utils.get_file`` (a progress bar, then a
   line saying where the file went; 163 MB, checked against its SHA-256), unless downloading
   is turned off with ``$KERAS_NORM_DOWNLOAD=0`` (``--no-download`` on ``recipes.cifar``).

If none of these gives data, :class:`DataNotFoundError` (a ``ValueError``) says what was looked
at, why the download failed (offline, say) or that it was turned off, and how to point at local
data: ``--data PATH`` on a recipe's command line, or ``KERAS_NORM_DATA=PATH`` in the
environment.

Environment variables
---------------------
``KERAS_NORM_DATA``: default data source (see above). ``KERAS_NORM_DOWNLOAD``: ``0`` (or
``false``, ``no``, ``off``) turns discovery's download off; ``1`` (or ``true``, ``yes``, ``on``)
or unset allows it. ``KERAS_HOME``: the Keras cache folder downloads go to (Keras's own
variable). ``KERAS_NORM_CACHE``: cache folder for unpacked archives (default
``$XDG_CACHE_HOME/keras_norm`` or ``~/.cache/keras_norm``, else
``<system temp dir>/keras_norm-cache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "DOWNLOAD_ENV_VAR",
    "CIFAR10_URL",
    "TFDS_NAMES",
    "DataNotFoundError",
    "ImageData",
    "project_root",
    "shared_data_dir",
    "find_source",
    "load_data",
    "download_enabled",
    "keras_cache_dir",
    "download_cifar10",
    "unpack_archive",
    "default_cache_dir",
    "subset",
    "normalize_images",
    "make_dataset",
]

logger = logging.getLogger(__name__)

#: Per-channel (R, G, B) mean of the 50,000 CIFAR-10 training images, pixel values scaled to
#: [0, 1], over all pixels of the original binary release (as in TFDS ``cifar10``). They are
#: used for every source, as fixed constants: the JPEG re-encoding in the shared
#: ``cifar10-jpg.tar.gz`` measures mean (0.4868, 0.4822, 0.4414) and std (0.2451, 0.2425,
#: 0.2605), and CIFAR-100 differs by about 0.02; either way the inputs stay close to zero
#: mean and unit variance.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
#: Per-channel (R, G, B) standard deviation over all pixels of the CIFAR-10 training images,
#: [0, 1] scale. (Not the often-copied (0.2023, 0.1994, 0.2010), which is not the pixel
#: standard deviation of the data set.)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DATA_ENV_VAR = "KERAS_NORM_DATA"
CACHE_ENV_VAR = "KERAS_NORM_CACHE"
DOWNLOAD_ENV_VAR = "KERAS_NORM_DOWNLOAD"
#: TFDS data sets that ``load_data`` accepts by bare name.
TFDS_NAMES = ("cifar10", "cifar100")

SHARED_FULL_NAME = "cifar10-jpg.tar.gz"
SHARED_SMALL_NAME = "cifar10-small.npz"

IMAGE_SIZE = (32, 32)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_HOW_TO_POINT = (
    "Point at local data with `--data PATH` (recipes' command line) or "
    f"`export {DATA_ENV_VAR}=PATH`, where PATH is a class-folder tree "
    "(<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg), a .tar.gz of such a tree "
    "(like shared/data/cifar10-jpg.tar.gz), or an .npz with x_train, y_train, x_test, y_test "
    "(like shared/data/cifar10-small.npz)."
)
#: CIFAR-10's python-pickle release, the file ``keras.datasets.cifar10`` downloads, and its
#: SHA-256 (the value Keras checks).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
# The name keras.datasets.cifar10 saves that download under in <Keras cache>/datasets/ (its
# get_file(fname="cifar-10-batches-py-target", extract=True) in Keras 3.10 to 3.15): using the
# same name means one download serves both.
CIFAR10_CACHE_NAME = "cifar-10-batches-py-target_archive"
_CIFAR_PY_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_PY_META = "batches.meta"
# Seconds a download may wait for the server (to connect, or for the next block) before it
# counts as failed.
_DOWNLOAD_TIMEOUT_S = 60.0
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
# Partial unpack folders older than this are assumed to be left over from a killed process.
_STALE_PARTIAL_S = 3600.0


class DataNotFoundError(ValueError):
    """No usable data source was found, and CIFAR-10 could not be downloaded."""


# --------------------------------------------------------------------------------------------
# The in-memory data set
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def project_root() -> Path:
    """The project root: the folder that contains ``recipes/`` (found from this file).

    Returns:
        An absolute ``Path``.
    """
    return Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The shared data folder beside the project, ``<project_root>/../shared/data``.

    Returns:
        An absolute ``Path`` (it may not exist).
    """
    return project_root().parent / "shared" / "data"


def _tfds_status(name: str, data_dir=None):
    """Returns ``(prepared, description)`` for TFDS data set ``name``; never downloads."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return False, "tensorflow_datasets is not installed"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        where = builder.data_dir
        if builder.is_prepared():
            return True, f"prepared at {where}"
        return False, f"not prepared at {where}"
    except Exception as err:  # any failure here just means "not available"
        return False, f"unavailable ({type(err).__name__}: {err})"


def find_source(small: bool = False, *, tfds_data_dir=None, download=None) -> str:
    """Finds the default data source, in the order described in the module docstring.

    Args:
        small: pick the shared ``cifar10-small.npz`` instead of ``cifar10-jpg.tar.gz`` in
            step 2 (the other steps are unaffected).
        tfds_data_dir: TFDS data folder for step 3 (default: TFDS's own default).
        download: allow step 5, the download; None: as ``$KERAS_NORM_DOWNLOAD`` says (see
            :func:`download_enabled`).

    Returns:
        A source string for :func:`load_data`: a path, or ``"tfds:cifar10"``.

    Raises:
        DataNotFoundError: if nothing is found and the download is off or fails, or
            ``$KERAS_NORM_DATA`` names a missing path.
        ValueError: if ``$KERAS_NORM_DOWNLOAD`` is neither a yes nor a no word.
    """
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        if _tfds_name(env) is None and not Path(env).expanduser().exists():
            raise DataNotFoundError(
                f"{DATA_ENV_VAR}={env!r} does not exist. {_HOW_TO_POINT}"
            )
        return env

    looked = [f"${DATA_ENV_VAR} is not set"]
    shared = shared_data_dir() / (SHARED_SMALL_NAME if small else SHARED_FULL_NAME)
    if shared.is_file():
        return str(shared)
    looked.append(f"shared copy {shared} not found")

    prepared, description = _tfds_status("cifar10", tfds_data_dir)
    if prepared:
        return "tfds:cifar10"
    looked.append(f"TFDS 'cifar10' {description}")

    cached = keras_cache_dir() / "datasets" / CIFAR10_CACHE_NAME
    if cached.is_file() and _sha256(cached) == CIFAR10_SHA256:
        return str(cached)
    looked.append(f"no CIFAR-10 download in the Keras cache ({cached})")

    if not download_enabled(download):
        looked.append(
            f"downloading is turned off (${DOWNLOAD_ENV_VAR}="
            f"{os.environ.get(DOWNLOAD_ENV_VAR, '')!r} or --no-download)"
            if download is None else "downloading is turned off (download=False)"
        )
    else:
        try:
            return str(download_cifar10())
        except Exception as err:  # offline, refused, corrupted: all end in the error below
            looked.append(f"the download failed: {_one_line(err)}")
    raise DataNotFoundError(
        "No image data found. Looked at: "
        + "; ".join(f"({i}) {item}" for i, item in enumerate(looked, 1))
        + ". "
        + _HOW_TO_POINT
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def download_enabled(download=None) -> bool:
    """Whether discovery may download CIFAR-10.

    Args:
        download: True or False decides; None reads ``$KERAS_NORM_DOWNLOAD`` (unset or empty:
            allowed).

    Returns:
        A bool.

    Raises:
        ValueError: if ``download`` is not a bool or None, or the variable holds neither a yes
            word (1, true, yes, on) nor a no word (0, false, no, off).
    """
    if download is not None:
        if not isinstance(download, bool):
            raise ValueError(f"download must be True, False or None, got {download!r}")
        return download
    value = os.environ.get(DOWNLOAD_ENV_VAR, "").strip().lower()
    if value in ("",) + _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ValueError(
        f"${DOWNLOAD_ENV_VAR}={os.environ[DOWNLOAD_ENV_VAR]!r}: expected one of "
        f"{', '.join(_TRUE_WORDS + _FALSE_WORDS)}"
    )


def keras_cache_dir(create: bool = False) -> Path:
    """The Keras cache folder, as ``keras.utils.get_file`` picks it: ``$KERAS_HOME``, else
    ``~/.keras``; ``/tmp/.keras`` when that is not a writable folder.

    Args:
        create: first try to create the ``$KERAS_HOME`` or ``~/.keras`` folder (Keras creates
            ``~/.keras`` on import, but not a new ``$KERAS_HOME``).

    Returns:
        A ``Path`` (it may not exist yet).
    """
    base = os.path.expanduser(
        os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    )
    if create:
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            pass  # then the same fallback as Keras's
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base)


def download_cifar10() -> Path:
    """Downloads CIFAR-10 (python version, 163 MB) into the Keras cache, with a progress bar.

    The file is :data:`CIFAR10_URL`, saved as ``<Keras cache>/datasets/`` + the name
    ``keras.datasets.cifar10`` uses, and checked against its SHA-256 (a file already there
    that passes the check is reused without a download). One line on stdout says where it
    went.

    Returns:
        The ``Path`` of the downloaded archive, a source for :func:`load_data`.

    Raises:
        Exception: whatever ``keras.utils.get_file`` raises when the download fails (offline:
            "URL fetch failure on ..."), or a ``ValueError`` when the file's hash is wrong.
            A failed download leaves no file behind.
    """
    import socket

    from keras.utils import get_file

    cache = keras_cache_dir(create=True)
    target = cache / "datasets" / CIFAR10_CACHE_NAME
    # get_file sets no timeout: on a network that drops packets it would wait forever.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        path = Path(get_file(
            fname=CIFAR10_CACHE_NAME, origin=CIFAR10_URL, file_hash=CIFAR10_SHA256,
            cache_subdir="datasets", cache_dir=str(cache),
        ))
    except BaseException:
        # get_file leaves a file whose hash failed in place; the next run would find it again.
        if target.is_file():
            target.unlink()
        raise
    finally:
        socket.setdefaulttimeout(previous_timeout)
    print(f"CIFAR-10 downloaded to {path} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _tfds_name(source: str):
    """The TFDS name if ``source`` names a TFDS data set, else None."""
    text = source.strip()
    if text.lower().startswith("tfds:"):
        name = text[len("tfds:"):].strip().lower()
        if name not in TFDS_NAMES:
            raise ValueError(
                f"source={source!r}: unsupported TFDS data set; expected one of {TFDS_NAMES}"
            )
        return name
    return text.lower() if text.lower() in TFDS_NAMES else None


def load_data(source=None, *, small: bool = False, cache_dir=None, tfds_data_dir=None,
              download=None):
    """Loads an image classification data set into memory.

    Args:
        source: a TFDS name (``"cifar10"``, ``"cifar100"``, ``"tfds:cifar10"``), or a path
            (str or ``os.PathLike``) to a class-folder tree, a ``.tar.gz``/``.tgz``/``.tar`` of
            one, an ``.npz`` file, or CIFAR-10's python release (archive or folder). None:
            discover it, downloading CIFAR-10 if need be (see :func:`find_source`).
        small: with ``source=None``, prefer the shared ``cifar10-small.npz``. Ignored otherwise
            (use :func:`subset` to shrink any source).
        cache_dir: where archives are unpacked (see :func:`default_cache_dir`).
        tfds_data_dir: TFDS data folder (default: TFDS's own default).
        download: with ``source=None``, allow the download (see :func:`find_source`); None:
            as ``$KERAS_NORM_DOWNLOAD`` says.

    Returns:
        An :class:`ImageData` with uint8 images and int32 labels.

    Raises:
        DataNotFoundError: if the source (or, with ``source=None``, any source) is missing, or
            a TFDS data set is not prepared locally.
        ValueError: if the source exists but has an unsupported type or layout.
    """
    if source is None:
        source = find_source(small=small, tfds_data_dir=tfds_data_dir, download=download)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a path, a TFDS name or None, got {type(source).__name__}: {source!r}"
        )
    if isinstance(source, str):
        name = _tfds_name(source)
        if name is not None:
            return _load_tfds(name, tfds_data_dir)

    path = Path(source).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"source={str(source)!r} does not exist. {_HOW_TO_POINT}")
    path = path.resolve()
    lower = path.name.lower()
    if path.is_dir():
        if _cifar_python_root(path) is not None:
            return _load_cifar_python(path)
        return _load_folder_tree(path, source=str(path))
    if lower.endswith(".npz"):
        return _load_npz(path)
    if _is_cifar_python_archive(path):
        return _load_cifar_python(path)
    if lower.endswith(_ARCHIVE_SUFFIXES):
        tree = unpack_archive(path, cache_dir=cache_dir)
        return _load_folder_tree(tree, source=str(path))
    raise ValueError(
        f"source={str(source)!r}: unsupported file type; expected a folder, an .npz, "
        f"CIFAR-10's python release, or one of {_ARCHIVE_SUFFIXES}"
    )


def _load_tfds(name: str, data_dir=None) -> ImageData:
    prepared, description = _tfds_status(name, data_dir)
    if not prepared:
        raise DataNotFoundError(
            f"TFDS data set {name!r} is {description}; a TFDS name is only read once prepared "
            f"(tfds.load({name!r}) prepares it, online). Without a source, the recipes "
            f"download CIFAR-10 themselves; or: {_HOW_TO_POINT}"
        )
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
    return ImageData(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        class_names=tuple(builder.info.features["label"].names),
        source=f"tfds:{name}",
    )


def _load_npz(path: Path) -> ImageData:
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


def _cifar_python_root(path: Path):
    """The folder holding CIFAR-10's python batches: ``path`` or its one sub-folder, or None."""
    if (path / _CIFAR_PY_BATCHES[0]).is_file():
        return path
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / _CIFAR_PY_BATCHES[0]).is_file():
        return subdirs[0]
    return None


def _is_cifar_python_archive(path: Path) -> bool:
    """Whether ``path`` is a tar archive of CIFAR-10's python batches, judged by its first
    few members (the real archive's second member is a batch), so a large archive of
    another kind is not read through."""
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
        raise ValueError(f"{where}: not a CIFAR-10 python batch: {_one_line(err)}") from err
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


def _load_cifar_python(path: Path) -> ImageData:
    """Reads CIFAR-10's python release from its archive (without unpacking) or folder."""
    wanted = set(_CIFAR_PY_BATCHES) | {_CIFAR_PY_META}
    blobs = {}
    if path.is_dir():
        root = _cifar_python_root(path)
        for name in wanted:
            if (root / name).is_file():
                blobs[name] = (root / name).read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in wanted and name not in blobs:
                        blobs[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"source={str(path)!r} could not be read: {_one_line(err)}") from err
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
    return ImageData(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=parts["test_batch"][0],
        y_test=parts["test_batch"][1],
        class_names=tuple(names),
        source=str(path),
    )


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


def _load_folder_tree(root: Path, source: str) -> ImageData:
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
    return ImageData(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        class_names=tuple(class_names),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# Archive cache
# --------------------------------------------------------------------------------------------


def default_cache_dir(cache_dir=None) -> Path:
    """The folder that archives are unpacked into, created if needed.

    Args:
        cache_dir: an explicit folder; it must be creatable and writable. None: use
            ``$KERAS_NORM_CACHE`` (same rule), else ``$XDG_CACHE_HOME/keras_norm`` or
            ``~/.cache/keras_norm``, else ``<system temp dir>/keras_norm-cache``, whichever is
            first writable.

    Returns:
        An absolute ``Path`` to an existing, writable folder.

    Raises:
        ValueError: if an explicit ``cache_dir`` or ``$KERAS_NORM_CACHE`` is not writable.
    """
    explicit = [("cache_dir", cache_dir)] if cache_dir is not None else []
    if not explicit and os.environ.get(CACHE_ENV_VAR, "").strip():
        explicit = [(f"${CACHE_ENV_VAR}", os.environ[CACHE_ENV_VAR].strip())]
    if explicit:
        label, value = explicit[0]
        path = Path(value).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{label}={str(value)!r} cannot be created: {err}") from err
        if not os.access(path, os.W_OK):
            raise ValueError(f"{label}={str(value)!r} is not writable")
        return path

    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    candidates = [Path(xdg) / "keras_norm"] if xdg else []
    candidates.append(Path.home() / ".cache" / "keras_norm")
    candidates.append(Path(tempfile.gettempdir()) / "keras_norm-cache")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path.resolve()
    raise ValueError(f"no writable cache folder among {[str(p) for p in candidates]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extracts the regular files and folders of ``archive`` into ``dest``, refusing paths that
    would leave ``dest`` (absolute, ``..``) and skipping links and special files."""
    with tarfile.open(archive, "r:*") as tar:
        members = []
        for member in tar.getmembers():
            if not (member.isfile() or member.isdir()):
                continue
            parts = Path(member.name).parts
            if Path(member.name).is_absolute() or ".." in parts:
                raise ValueError(f"{str(archive)!r}: unsafe member path {member.name!r}")
            members.append(member)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python without extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(dest, members=members)


def _remove_stale_partials(cache: Path, final_name: str) -> None:
    now = time.time()
    for partial in cache.glob(f".{final_name}.partial-*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


def unpack_archive(archive, cache_dir=None) -> Path:
    """Unpacks a tar archive once into the cache and returns the unpacked folder.

    Cache scheme: ``<cache>/<archive name>-<first 16 hex digits of its sha256>/``, where
    ``<cache>`` is :func:`default_cache_dir`. Keying by content means that a changed archive
    gets a new folder and an identical copy elsewhere reuses the old one (hashing the 20 MB
    CIFAR-10 archive takes a few hundredths of a second). The archive is extracted into a
    hidden ``.<name>.partial-XXXX`` folder beside the target, which is then renamed into place
    in one atomic step, so the target folder exists only when complete; a crash leaves a
    partial folder that is ignored (and removed after an hour). If two processes unpack at the
    same time, the first rename wins and the other discards its copy.

    Args:
        archive: path to a ``.tar.gz``, ``.tgz`` or ``.tar`` file.
        cache_dir: cache folder (see :func:`default_cache_dir`).

    Returns:
        The ``Path`` of the unpacked folder.

    Raises:
        DataNotFoundError: if ``archive`` does not exist.
        ValueError: if it is not a readable tar archive or has unsafe member paths.
    """
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise DataNotFoundError(f"archive={str(archive)!r} does not exist. {_HOW_TO_POINT}")
    archive = archive.resolve()
    cache = default_cache_dir(cache_dir)
    final = cache / f"{_archive_stem(archive)}-{_sha256(archive)[:16]}"
    if final.is_dir():
        return final

    _remove_stale_partials(cache, final.name)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache))
    start = time.perf_counter()
    logger.info("Unpacking %s into %s (once)", archive, final)
    try:
        try:
            _extract_tar(archive, partial)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(
                f"archive={str(archive)!r} could not be unpacked: {type(err).__name__}: {err}"
            ) from err
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("Unpacked %s in %.1f s", archive.name, time.perf_counter() - start)
    return final


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def _check_size(name: str, size, available: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {size!r}")
    if size > available:
        raise ValueError(f"{name}={size} is larger than the {available} examples available")


def _stratified_indices(labels: np.ndarray, size: int, num_classes: int, rng) -> np.ndarray:
    """Sorted indices of ``size`` examples with per-class counts as equal as possible."""
    available = np.bincount(labels, minlength=num_classes)
    take = np.zeros(num_classes, np.int64)
    remaining = size
    while remaining > 0:
        open_classes = np.flatnonzero(take < available)
        share = remaining // len(open_classes)
        if share == 0:  # fewer left than open classes: one more each for a seeded choice
            take[rng.choice(open_classes, size=remaining, replace=False)] += 1
            break
        add = np.minimum(share, available[open_classes] - take[open_classes])
        take[open_classes] += add
        remaining -= int(add.sum())
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=int(take[c]), replace=False)
        for c in range(num_classes)
        if take[c]
    ]
    return np.sort(np.concatenate(chosen))


def subset(data: ImageData, train_size=None, test_size=None, seed: int = 0) -> ImageData:
    """A deterministic, class-stratified subset, for quick runs and tests.

    Each class gets ``size // num_classes`` examples where it has enough, classes that run
    short give their share to the others, and the remainder goes one each to classes picked
    with ``seed``. Examples keep their original order.

    Args:
        data: the :class:`ImageData` to shrink.
        train_size: number of training examples to keep; None keeps all of them.
        test_size: number of test examples to keep; None keeps all of them.
        seed: integer seed; the same seed gives the same subset.

    Returns:
        A new :class:`ImageData` (same ``class_names``; ``source`` notes the subset).

    Raises:
        ValueError: if a size is not a positive integer or exceeds what the split holds.
    """
    if train_size is not None:
        _check_size("train_size", train_size, len(data.y_train))
    if test_size is not None:
        _check_size("test_size", test_size, len(data.y_test))
    arrays = {}
    for stream, (split, size) in enumerate((("train", train_size), ("test", test_size))):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if size is None:
            arrays[split] = (x, y)
            continue
        rng = np.random.default_rng([int(seed), stream])
        idx = _stratified_indices(y, int(size), data.num_classes, rng)
        arrays[split] = (x[idx], y[idx])
    return ImageData(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        class_names=data.class_names,
        source=f"{data.source} [subset: {len(arrays['train'][1])} train, "
        f"{len(arrays['test'][1])} test, seed {seed}]",
    )


# --------------------------------------------------------------------------------------------
# tf.data pipelines
# --------------------------------------------------------------------------------------------


def normalize_images(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """uint8 images to float32: scaled to [0, 1], then standardized per channel.

    Args:
        images: uint8 tensor or array (..., H, W, 3).
        mean: per-channel mean on the [0, 1] scale (default :data:`CIFAR10_MEAN`).
        std: per-channel standard deviation on the [0, 1] scale (default :data:`CIFAR10_STD`).

    Returns:
        A float32 tensor of the same shape, ``(images / 255 - mean) / std``.
    """
    import tensorflow as tf

    images = tf.cast(images, tf.float32) / 255.0
    return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _augment_batch(images, seed, pad: int, padding: str):
    """Random crop of the ``pad``-padded images back to their size, then random horizontal
    flip; one independent draw per image, vectorised over the batch; stateless in ``seed``."""
    import tensorflow as tf

    batch, height, width = tf.unstack(tf.shape(images)[:3])
    mode = "REFLECT" if padding == "reflect" else "CONSTANT"
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    dy = tf.random.stateless_uniform([batch], seeds[0], 0, 2 * pad + 1, dtype=tf.int32)
    dx = tf.random.stateless_uniform([batch], seeds[1], 0, 2 * pad + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(height)[None, :]
    cols = dx[:, None] + tf.range(width)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped)


def make_dataset(
    x,
    y,
    batch_size: int,
    *,
    training: bool,
    augment: bool = True,
    seed=None,
    structure: str = "random",
    examples_per_class=None,
    num_classes=None,
    drop_remainder=None,
    padding: str = "reflect",
    pad: int = 4,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_replicas: int = 1,
):
    """A ``tf.data`` pipeline of ``(images, labels)`` batches from in-memory uint8 arrays.

    Per batch: augmentation if ``training and augment`` (on the uint8 pixels: pad ``pad`` pixels
    per side, by reflection or with black, random crop back to 32x32, random horizontal flip;
    independent per image and per epoch, reproducible with ``seed``), then
    :func:`normalize_images` (float32, [0, 1], per-channel standardization with ``mean``/``std``,
    by default the CIFAR-10 training statistics). When training the examples are reshuffled
    every epoch. Labels are int32 class indices (for a sparse categorical loss). The pipeline
    ends with ``prefetch``.

    Args:
        x: uint8 array (N, H, W, 3).
        y: integer array (N,) of class indices.
        batch_size: examples per batch.
        training: shuffle every epoch and (with ``augment``) augment; False gives the
            examples once, in order, unaugmented.
        augment: apply the augmentation when ``training``; ignored otherwise.
        seed: integer seed for shuffling, augmentation and balanced batching; None draws
            fresh randomness (subject to ``tf.random.set_seed``).
        structure: ``"random"`` (plain shuffled batches) or ``"balanced"``: every batch holds
            exactly ``examples_per_class`` examples of each of ``num_classes`` classes, from
            ``keras_norm.data.balanced_batches(..., policy="drop")``.
        examples_per_class: k for ``"balanced"``; default ``batch_size // num_classes``.
            Must satisfy ``batch_size == k * num_classes``. Only valid with ``"balanced"``.
        num_classes: number of classes for ``"balanced"``; default ``max(y) + 1``.
        drop_remainder: drop a last, smaller batch; default ``training``. Balanced batches
            are always full, so it is ignored there.
        padding: ``"reflect"`` or ``"zero"`` (black) padding for the random crop.
        pad: padding per side in pixels for the random crop (4 is the standard CIFAR recipe);
            0 disables cropping (flips remain).
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale.
        num_replicas: ``"balanced"`` only: passed to ``balanced_batches`` so that each
            replica's consecutive slice of a global batch is balanced too (use
            ``strategy.num_replicas_in_sync``); must divide ``examples_per_class``.

    Returns:
        A ``tf.data.Dataset`` of ``(float32 (B, H, W, 3), int32 (B,))`` tuples.

    Raises:
        ValueError: for inconsistent or invalid arguments.
    """
    import tensorflow as tf

    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"x must be a uint8 array (N, H, W, 3), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be an integer array ({len(x)},), got {y.dtype} {y.shape}")
    n = len(x)
    if n == 0:
        raise ValueError("x must hold at least one example, got 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if structure not in ("random", "balanced"):
        raise ValueError(f"structure must be 'random' or 'balanced', got {structure!r}")
    if padding not in ("reflect", "zero"):
        raise ValueError(f"padding must be 'reflect' or 'zero', got {padding!r}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    if padding == "reflect" and pad >= min(x.shape[1], x.shape[2]):
        raise ValueError(f"pad={pad} is too large for reflect padding of {x.shape[1:3]} images")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)):
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
    if num_replicas <= 0 or (num_replicas != 1 and structure != "balanced"):
        raise ValueError(
            f"num_replicas={num_replicas!r} must be positive, and other than 1 only with "
            "structure='balanced'"
        )
    if drop_remainder is None:
        drop_remainder = bool(training)
    do_augment = bool(training and augment)

    x_t = tf.constant(x)
    y_t = tf.constant(y.astype(np.int32))

    def finish(images, labels, batch_seed):
        if do_augment:
            images = _augment_batch(images, batch_seed, int(pad), padding)
        return normalize_images(images, mean, std), labels

    def seeds():
        # One stateless seed (shape [2]) per batch, fresh every epoch, reproducible with `seed`.
        return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    if structure == "random":
        if examples_per_class is not None:
            raise ValueError(
                f"examples_per_class={examples_per_class!r} only applies to "
                "structure='balanced'"
            )
        if drop_remainder and batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} examples with drop_remainder=True: "
                "the dataset would be empty"
            )
        indices = tf.data.Dataset.range(n)
        if training:
            indices = indices.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        indices = indices.batch(int(batch_size), drop_remainder=bool(drop_remainder))
        ds = tf.data.Dataset.zip((indices, seeds())).map(
            lambda idx, s: finish(tf.gather(x_t, idx), tf.gather(y_t, idx), s),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.prefetch(tf.data.AUTOTUNE)

    # structure == "balanced"
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if num_classes <= 0 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"num_classes={num_classes!r} must be positive and cover the labels "
            f"(found labels in [{y.min()}, {y.max()}])"
        )
    if examples_per_class is None:
        if batch_size % num_classes:
            raise ValueError(
                f"structure='balanced' needs batch_size divisible by num_classes, got "
                f"batch_size={batch_size}, num_classes={num_classes}"
            )
        examples_per_class = batch_size // num_classes
    if (
        isinstance(examples_per_class, bool)
        or not isinstance(examples_per_class, (int, np.integer))
        or examples_per_class <= 0
    ):
        raise ValueError(
            f"examples_per_class must be a positive integer, got {examples_per_class!r}"
        )
    if examples_per_class * num_classes != batch_size:
        raise ValueError(
            f"structure='balanced' needs batch_size == examples_per_class * num_classes, got "
            f"batch_size={batch_size}, examples_per_class={examples_per_class}, "
            f"num_classes={num_classes}"
        )
    from keras_norm.data import balanced_batches  # lazy: optional for the other structures

    # Balance light (index, label) pairs (balanced_batches materialises its input and draws a
    # new balanced order every epoch), then gather the images of each batch.
    pairs = tf.data.Dataset.from_tensor_slices((tf.range(n, dtype=tf.int32), y_t))
    extra = {} if num_replicas == 1 else {"num_replicas": int(num_replicas)}
    batches = balanced_batches(
        pairs,
        int(num_classes),
        examples_per_class=int(examples_per_class),
        policy="drop",
        seed=seed,
        **extra,
    )
    ds = tf.data.Dataset.zip((batches, seeds())).map(
        lambda batch, s: finish(tf.gather(x_t, batch[0]), batch[1], s),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.prefetch(tf.data.AUTOTUNE)
