"""The unpacked-archive cache: a ``.tar.gz`` of images is unpacked once and then reused.

Cache scheme: ``<cache>/<archive name>-<first 16 hex digits of its sha256>/``, where ``<cache>``
is :func:`default_cache_dir` (``$KERAS_NORM_CACHE``, else ``$XDG_CACHE_HOME/keras_norm`` or
``~/.cache/keras_norm``, else ``<system temp dir>/keras_norm-cache``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from recipes.datasets.base import HOW_TO_POINT, DataNotFoundError, sha256

CACHE_ENV_VAR = "KERAS_NORM_CACHE"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Partial unpack folders older than this are assumed to be left over from a killed process.
_STALE_PARTIAL_S = 3600.0

logger = logging.getLogger(__name__)


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
        return _writable_folder(*explicit[0])

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


def _writable_folder(label: str, value) -> Path:
    """The folder ``value`` (named ``label`` in errors), created; an error if not writable."""
    path = Path(value).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{label}={str(value)!r} cannot be created: {err}") from err
    if not os.access(path, os.W_OK):
        raise ValueError(f"{label}={str(value)!r} is not writable")
    return path


def is_archive_name(path: Path) -> bool:
    """Whether ``path``'s name ends in one of :data:`ARCHIVE_SUFFIXES` (any case)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
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
            # tarfile's own safety net on top of the checks above (permissions, devices).
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

    The folder is ``<cache>/<archive name>-<first 16 hex digits of its sha256>/``, where
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
        raise DataNotFoundError(f"archive={str(archive)!r} does not exist. {HOW_TO_POINT}")
    archive = archive.resolve()
    cache = default_cache_dir(cache_dir)
    final = cache / f"{_archive_stem(archive)}-{sha256(archive)[:16]}"
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
