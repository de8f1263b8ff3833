"""Data loading for the keras_norm recipes: CIFAR-style 32x32 RGB image classification data.

Everything is loaded into memory as uint8 NumPy arrays (CIFAR fits comfortably) and wrapped in an
:class:`ImageData`; :func:`make_dataset` turns arrays into a ``tf.data`` input pipeline.

Modules: ``sources`` (finding the data: ``load_data``, discovery, TFDS, the download),
``readers`` (npz, CIFAR-10's python release, class-folder trees), ``cache`` (unpacked
archives), ``pipeline`` (subsets, normalization, augmentation, ``make_dataset``), ``base``
(``ImageData``, ``DataNotFoundError``). Every public name is importable from here.

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

With no source, :func:`find_source` discovers one: ``$KERAS_NORM_DATA``, the shared data folder
beside the project, a prepared TFDS ``cifar10``, an earlier download in the Keras cache, then a
download of CIFAR-10 (unless ``$KERAS_NORM_DOWNLOAD=0``); `recipes.datasets.sources` describes
each step and the environment variables.
"""

from recipes.datasets.base import DATA_ENV_VAR, DataNotFoundError, ImageData
from recipes.datasets.cache import CACHE_ENV_VAR, default_cache_dir, unpack_archive
from recipes.datasets.pipeline import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    make_dataset,
    normalize_images,
    subset,
)
from recipes.datasets.readers import IMAGE_SIZE
from recipes.datasets.sources import (
    CIFAR10_CACHE_NAME,
    CIFAR10_SHA256,
    CIFAR10_URL,
    DOWNLOAD_ENV_VAR,
    SHARED_FULL_NAME,
    SHARED_SMALL_NAME,
    TFDS_NAMES,
    download_cifar10,
    download_enabled,
    find_source,
    keras_cache_dir,
    load_data,
    project_root,
    shared_data_dir,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "DOWNLOAD_ENV_VAR",
    "CIFAR10_URL",
    "CIFAR10_SHA256",
    "CIFAR10_CACHE_NAME",
    "TFDS_NAMES",
    "SHARED_FULL_NAME",
    "SHARED_SMALL_NAME",
    "IMAGE_SIZE",
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
