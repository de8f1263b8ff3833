"""Finding the data: explicit sources, discovery, TFDS status and the CIFAR-10 download.

Discovery order (``load_data()`` / :func:`find_source` with no source)
------------------------------------------------------------------------
1. ``$KERAS_NORM_DATA``, a path (or TFDS name) as ``load_data`` accepts. If it is set but does
   not exist, that is an error; discovery does not silently move on.
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

Environment variables: ``KERAS_NORM_DATA`` (the default source), ``KERAS_NORM_DOWNLOAD``
(``0``, ``false``, ``no``, ``off`` turn discovery's download off; ``1``, ``true``, ``yes``,
``on`` or unset allow it), ``KERAS_HOME`` (the Keras cache folder downloads go to, Keras's own
variable) and ``KERAS_NORM_CACHE`` (see `recipes.datasets.cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

from recipes.datasets import readers
from recipes.datasets.base import (
    DATA_ENV_VAR,
    HOW_TO_POINT,
    DataNotFoundError,
    ImageData,
    one_line,
    sha256,
)
from recipes.datasets.cache import ARCHIVE_SUFFIXES, is_archive_name, unpack_archive

DOWNLOAD_ENV_VAR = "KERAS_NORM_DOWNLOAD"
#: TFDS data sets that ``load_data`` accepts by bare name.
TFDS_NAMES = ("cifar10", "cifar100")

SHARED_FULL_NAME = "cifar10-jpg.tar.gz"
SHARED_SMALL_NAME = "cifar10-small.npz"

#: CIFAR-10's python-pickle release, the file ``keras.datasets.cifar10`` downloads, and its
#: SHA-256 (the value Keras checks).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
# The name keras.datasets.cifar10 saves that download under in <Keras cache>/datasets/ (its
# get_file(fname="cifar-10-batches-py-target", extract=True) in Keras 3.10 to 3.15): using the
# same name means one download serves both.
CIFAR10_CACHE_NAME = "cifar-10-batches-py-target_archive"
# Seconds a download may wait for the server (to connect, or for the next block) before it
# counts as failed.
_DOWNLOAD_TIMEOUT_S = 60.0
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def project_root() -> Path:
    """The project root: the folder that contains ``recipes/`` (found from this file).

    Returns:
        An absolute ``Path``.
    """
    return Path(__file__).resolve().parents[2]


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


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


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
            raise DataNotFoundError(f"{DATA_ENV_VAR}={env!r} does not exist. {HOW_TO_POINT}")
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
    if cached.is_file() and sha256(cached) == CIFAR10_SHA256:
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
            looked.append(f"the download failed: {one_line(err)}")
    raise DataNotFoundError(
        "No image data found. Looked at: "
        + "; ".join(f"({i}) {item}" for i, item in enumerate(looked, 1))
        + ". "
        + HOW_TO_POINT
    )


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


def load_data(source=None, *, small: bool = False, cache_dir=None, tfds_data_dir=None,
              download=None) -> ImageData:
    """Loads an image classification data set into memory.

    Args:
        source: a TFDS name (``"cifar10"``, ``"cifar100"``, ``"tfds:cifar10"``), or a path
            (str or ``os.PathLike``) to a class-folder tree, a ``.tar.gz``/``.tgz``/``.tar`` of
            one, an ``.npz`` file, or CIFAR-10's python release (archive or folder). None:
            discover it, downloading CIFAR-10 if need be (see :func:`find_source`).
        small: with ``source=None``, prefer the shared ``cifar10-small.npz``. Ignored otherwise
            (use ``subset`` to shrink any source).
        cache_dir: where archives are unpacked (see ``default_cache_dir``).
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
        raise DataNotFoundError(f"source={str(source)!r} does not exist. {HOW_TO_POINT}")
    return _read_path(path.resolve(), str(source), cache_dir)


def _read_path(path: Path, source: str, cache_dir) -> ImageData:
    """Picks the reader for an existing path: by folder layout, file suffix or archive
    members (CIFAR-10's python release is recognized whatever its file name)."""
    if path.is_dir():
        if readers.cifar_python_root(path) is not None:
            return readers.read_cifar_python(path)
        return readers.read_folder_tree(path, source=str(path))
    if path.name.lower().endswith(".npz"):
        return readers.read_npz(path)
    if readers.is_cifar_python_archive(path):
        return readers.read_cifar_python(path)
    if is_archive_name(path):
        tree = unpack_archive(path, cache_dir=cache_dir)
        return readers.read_folder_tree(tree, source=str(path))
    raise ValueError(
        f"source={source!r}: unsupported file type; expected a folder, an .npz, "
        f"CIFAR-10's python release, or one of {ARCHIVE_SUFFIXES}"
    )


def _load_tfds(name: str, data_dir=None) -> ImageData:
    """Reads a TFDS data set, or says clearly that it is not prepared (never downloads)."""
    prepared, description = _tfds_status(name, data_dir)
    if not prepared:
        raise DataNotFoundError(
            f"TFDS data set {name!r} is {description}; a TFDS name is only read once prepared "
            f"(tfds.load({name!r}) prepares it, online). Without a source, the recipes "
            f"download CIFAR-10 themselves; or: {HOW_TO_POINT}"
        )
    return readers.read_tfds(name, data_dir)
