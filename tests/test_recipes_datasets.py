"""Tests for recipes/datasets/: sources, discovery, the archive cache, subsets, pipelines.

Everything here is small and offline: tiny image trees and archives are written into tmp_path,
and only the shared cifar10-small.npz (8.6 MB) is read from the shared data folder.
"""

import hashlib
import importlib.util
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

# `recipes` is not installed: it is imported from the project root, whatever the working folder.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import datasets  # noqa: E402

CLASSES = ("cat", "dog", "frog")
SMALL_NPZ = datasets.shared_data_dir() / datasets.SHARED_SMALL_NAME


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _smooth_image(rng):
    """A 32x32 RGB image that JPEG keeps almost exactly (a colour gradient)."""
    base = rng.integers(40, 200, size=3)
    ramp = np.linspace(0, 40, 32)
    image = base[None, None, :] + ramp[:, None, None] + 0.5 * ramp[None, :, None]
    return image.astype(np.uint8)


def _write_tree(root, fmt="png", n_train=(4, 3, 5), n_test=(2, 2, 1), seed=0):
    """Writes <root>/{train,test}/<class>/<i>.<fmt>; returns the expected arrays by split."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, counts in (("train", n_train), ("test", n_test)):
        xs, ys = [], []
        for label, (name, count) in enumerate(zip(CLASSES, counts)):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = _smooth_image(rng) if fmt == "jpg" else rng.integers(
                    0, 256, size=(32, 32, 3), dtype=np.uint8
                )
                encode = tf.io.encode_jpeg if fmt == "jpg" else tf.io.encode_png
                tf.io.write_file(str(folder / f"{i:04d}.{fmt}"), encode(image))
                xs.append(image)
                ys.append(label)
        expected[split] = (np.stack(xs), np.asarray(ys))
    return expected


def _write_tar(tree_root, archive, wrap=None):
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            arcname = f"{wrap}/{split}" if wrap else split
            tar.add(Path(tree_root) / split, arcname=arcname)
    return archive


def _synthetic(train_counts, test_counts, seed=0):
    rng = np.random.default_rng(seed)

    def split(counts):
        y = np.repeat(np.arange(len(counts)), counts)
        x = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
        return x, y

    x_train, y_train = split(train_counts)
    x_test, y_test = split(test_counts)
    names = [f"c{i}" for i in range(len(train_counts))]
    return datasets.ImageData(x_train, y_train, x_test, y_test, names, source="synthetic")


def _denormalize(images):
    pixels = (images * np.asarray(datasets.CIFAR10_STD) + np.asarray(datasets.CIFAR10_MEAN)) * 255
    return np.round(pixels).astype(np.uint8)


@pytest.fixture
def no_default_sources(monkeypatch, tmp_path):
    """No $KERAS_NORM_DATA, an empty shared folder, no tensorflow_datasets, an empty Keras
    cache, downloads turned off, and an origin that can only fail, without the network, should
    a test turn downloads on: no test here can download CIFAR-10 for real."""
    empty = tmp_path / "empty_shared"
    empty.mkdir()
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(datasets.sources, "shared_data_dir", lambda: empty)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    (tmp_path / "keras_home").mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv(datasets.DOWNLOAD_ENV_VAR, "0")
    monkeypatch.setattr(datasets.sources, "CIFAR10_URL",
                        (tmp_path / "no_such_origin.tar.gz").as_uri())
    return empty


def _fake_tfds_status(monkeypatch, status):
    """TFDS's answer to "is it prepared?" is ``status``, a (bool, description) pair."""
    monkeypatch.setattr(datasets.sources, "_tfds_status", lambda name, data_dir=None: status)


def _cifar_python_batches(counts=(3, 2, 4, 1, 2), test_count=3, seed=0):
    """Images, labels and pickles in the layout of CIFAR-10's python release: per batch a dict
    with bytes keys, b"data" uint8 (N, 3072) rows of R, G, B planes and b"labels" a list."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels, pickles = {}, {}, {}
    for name, count in zip(names, list(counts) + [test_count]):
        x = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=count)
        images[name], labels[name] = x, y
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                 b"data": x.transpose(0, 3, 1, 2).reshape(count, 3072),
                 b"filenames": [f"{i}.png".encode() for i in range(count)]}
        pickles[name] = pickle.dumps(batch, protocol=2)
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    pickles["batches.meta"] = pickle.dumps(meta, protocol=2)
    return images, labels, pickles


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def _write_cifar_python_archive(path, pickles, skip=()):
    """A cifar-10-python.tar.gz: its folder, then the batches in the real archive's order."""
    order = ("data_batch_4", "test_batch", "data_batch_3", "batches.meta", "data_batch_2",
             "data_batch_5", "data_batch_1")
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in order:
            if name in skip:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(pickles[name])
            tar.addfile(info, io.BytesIO(pickles[name]))
    return path


def _expected_cifar(images, labels):
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return (np.concatenate([images[n] for n in train]), np.concatenate([labels[n] for n in train]),
            images["test_batch"], labels["test_batch"])


@pytest.fixture
def fake_cifar_origin(tmp_path, monkeypatch, no_default_sources):
    """No local source, downloads allowed, and CIFAR10_URL serving a small archive in the real
    format (a file:// URL, so keras.utils.get_file runs for real without a network)."""
    images, labels, pickles = _cifar_python_batches()
    (tmp_path / "origin").mkdir()
    archive = _write_cifar_python_archive(tmp_path / "origin" / "cifar-10-python.tar.gz", pickles)
    monkeypatch.setattr(datasets.sources, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(datasets.sources, "CIFAR10_SHA256",
                        hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.delenv(datasets.DOWNLOAD_ENV_VAR)
    cached = tmp_path / "keras_home" / "datasets" / datasets.CIFAR10_CACHE_NAME
    return archive, cached, _expected_cifar(images, labels)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SMALL_NPZ.is_file(), reason=f"shared data missing: {SMALL_NPZ}")
def test_load_shared_small_npz(monkeypatch):
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)
    data = datasets.load_data(small=True)  # discovery step 2, small variant
    assert data.source == str(SMALL_NPZ.resolve())
    assert data.x_train.shape == (2000, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (1000, 32, 32, 3) and data.x_test.dtype == np.uint8
    assert data.y_train.dtype == np.int32 and data.y_test.dtype == np.int32
    assert data.num_classes == 10 and data.image_shape == (32, 32, 3)
    assert data.class_names[:2] == ("airplane", "automobile")
    np.testing.assert_array_equal(np.bincount(data.y_train), [200] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test), [100] * 10)
    # Without small=True, discovery prefers the full JPEG archive (not loaded here: too slow).
    assert datasets.find_source() == str(datasets.shared_data_dir() / "cifar10-jpg.tar.gz")


def test_load_npz_without_class_names_and_bad_npz(tmp_path):
    data = _synthetic([3, 2], [1, 1])
    path = tmp_path / "d.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train.astype(np.uint8),
             x_test=data.x_test, y_test=data.y_test)
    loaded = datasets.load_data(path)
    assert loaded.class_names == ("0", "1")
    np.testing.assert_array_equal(loaded.x_train, data.x_train)
    assert loaded.y_train.dtype == np.int32

    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=data.x_train)
    with pytest.raises(ValueError, match="lacks arrays"):
        datasets.load_data(bad)


def test_load_png_tree_exact(tmp_path):
    expected = _write_tree(tmp_path / "tree", fmt="png")
    data = datasets.load_data(str(tmp_path / "tree"))
    assert data.class_names == CLASSES
    assert data.source == str((tmp_path / "tree").resolve())
    for split in ("train", "test"):
        x, y = expected[split]
        np.testing.assert_array_equal(getattr(data, f"x_{split}"), x)  # PNG is lossless
        np.testing.assert_array_equal(getattr(data, f"y_{split}"), y)
        assert getattr(data, f"x_{split}").dtype == np.uint8


def test_load_jpeg_tree_wrapped_in_one_folder(tmp_path):
    expected = _write_tree(tmp_path / "outer" / "cifar", fmt="jpg")
    data = datasets.load_data(tmp_path / "outer")  # a PathLike, one wrapper folder
    assert data.x_train.shape == (12, 32, 32, 3) and data.x_test.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(data.y_train, expected["train"][1])
    diff = np.abs(data.x_train.astype(int) - expected["train"][0].astype(int))
    assert diff.mean() < 3  # JPEG is lossy, but smooth images survive closely


def test_tree_errors(tmp_path):
    (tmp_path / "no_train" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="no train/ folder"):
        datasets.load_data(tmp_path / "no_train")

    _write_tree(tmp_path / "odd", fmt="png")
    big = np.zeros((40, 32, 3), np.uint8)
    tf.io.write_file(str(tmp_path / "odd" / "train" / "cat" / "big.png"), tf.io.encode_png(big))
    with pytest.raises(ValueError, match="must all be 32x32"):
        datasets.load_data(tmp_path / "odd")

    _write_tree(tmp_path / "extra", fmt="png")
    (tmp_path / "extra" / "test" / "owl").mkdir()
    with pytest.raises(ValueError, match="'owl' is not among the training classes"):
        datasets.load_data(tmp_path / "extra")


# --------------------------------------------------------------------------------------------
# Archive cache
# --------------------------------------------------------------------------------------------


def test_tar_gz_unpacked_once_and_reused(tmp_path, monkeypatch):
    expected = _write_tree(tmp_path / "tree", fmt="png")
    archive = _write_tar(tmp_path / "tree", tmp_path / "tiny-images.tar.gz")
    cache = tmp_path / "cache"
    calls = []
    real_extract = datasets.cache._extract_tar

    def counting_extract(src, dest):
        calls.append(src)
        real_extract(src, dest)

    monkeypatch.setattr(datasets.cache, "_extract_tar", counting_extract)
    first = datasets.load_data(archive, cache_dir=cache)
    assert len(calls) == 1
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("tiny-images-")  # no partial left over
    unpacked = cache / entries[0]
    stamp = unpacked.stat().st_mtime_ns

    # Second call, cache given through the environment instead: reused, not unpacked again.
    monkeypatch.setenv(datasets.CACHE_ENV_VAR, str(cache))
    second = datasets.load_data(str(archive))
    assert len(calls) == 1
    assert unpacked.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert first.source == second.source == str(archive.resolve())
    np.testing.assert_array_equal(second.x_train, expected["train"][0])
    np.testing.assert_array_equal(second.y_test, expected["test"][1])
    assert datasets.unpack_archive(archive) == unpacked

    # A tree wrapped in a top-level folder inside the archive works too.
    wrapped = _write_tar(tmp_path / "tree", tmp_path / "wrapped.tgz", wrap="cifar")
    assert datasets.load_data(wrapped, cache_dir=cache).x_train.shape == (12, 32, 32, 3)


def test_interrupted_unpack_leaves_no_cache_entry(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree", fmt="png", n_train=(1, 1, 1), n_test=(1, 1, 1))
    archive = _write_tar(tmp_path / "tree", tmp_path / "t.tar.gz")
    cache = tmp_path / "cache"
    real_extract = datasets.cache._extract_tar

    def failing_extract(src, dest):
        (Path(dest) / "train").mkdir()  # half-done work
        raise OSError("No space left on device")

    monkeypatch.setattr(datasets.cache, "_extract_tar", failing_extract)
    with pytest.raises(ValueError, match="could not be unpacked"):
        datasets.load_data(archive, cache_dir=cache)
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(datasets.cache, "_extract_tar", real_extract)
    assert datasets.load_data(archive, cache_dir=cache).x_train.shape == (3, 32, 32, 3)

    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"this is not a tar file")
    with pytest.raises(ValueError, match="could not be unpacked"):
        datasets.load_data(corrupt, cache_dir=cache)


def test_archive_member_outside_the_cache_is_refused(tmp_path):
    archive = tmp_path / "escape.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"unsafe member path '\.\./escaped\.txt'"):
        datasets.unpack_archive(archive, cache_dir=cache)
    assert list(cache.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


def test_package_exports_every_public_name():
    """`from recipes import datasets` serves every public name of its submodules' API (those
    of the single-file recipes/datasets.py among them): each the very object of the submodule
    that holds it."""
    import types

    submodules = {name: getattr(datasets, name)
                  for name in ("sources", "readers", "cache", "pipeline", "base")}
    public = sorted(name for name, value in vars(datasets).items()
                    if not name.startswith("_") and not isinstance(value, types.ModuleType))
    assert public == sorted(datasets.__all__)
    single_file_names = {
        "CIFAR10_MEAN", "CIFAR10_STD", "DATA_ENV_VAR", "CACHE_ENV_VAR", "DOWNLOAD_ENV_VAR",
        "TFDS_NAMES", "SHARED_FULL_NAME", "SHARED_SMALL_NAME", "IMAGE_SIZE", "CIFAR10_URL",
        "CIFAR10_SHA256", "CIFAR10_CACHE_NAME", "DataNotFoundError", "ImageData",
        "project_root", "shared_data_dir", "find_source", "download_enabled",
        "keras_cache_dir", "download_cifar10", "load_data", "default_cache_dir",
        "unpack_archive", "subset", "normalize_images", "make_dataset",
    }
    assert single_file_names <= set(datasets.__all__)
    for name in datasets.__all__:
        value = getattr(datasets, name)
        holders = [module for module in submodules.values() if hasattr(module, name)]
        assert holders, f"{name}: in no submodule of recipes.datasets"
        for module in holders:
            assert getattr(module, name) is value, (name, module.__name__)
        home = getattr(value, "__module__", None)  # functions and classes: where defined
        if isinstance(value, (type, types.FunctionType)):
            assert home in {module.__name__ for module in submodules.values()}, (name, home)
            assert getattr(sys.modules[home], name) is value, name
    assert datasets.load_data is datasets.sources.load_data


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def test_discovery_order(tmp_path, monkeypatch, no_default_sources):
    shared = no_default_sources
    (shared / datasets.SHARED_FULL_NAME).write_bytes(b"")
    (shared / datasets.SHARED_SMALL_NAME).write_bytes(b"")
    assert datasets.find_source() == str(shared / datasets.SHARED_FULL_NAME)
    assert datasets.find_source(small=True) == str(shared / datasets.SHARED_SMALL_NAME)

    # $KERAS_NORM_DATA comes first, and load_data() with no source reads it.
    _write_tree(tmp_path / "tree", fmt="png")
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "tree"))
    assert datasets.find_source() == str(tmp_path / "tree")
    data = datasets.load_data(small=True)
    assert data.source == str((tmp_path / "tree").resolve()) and data.num_classes == 3

    # A $KERAS_NORM_DATA that points nowhere is an error, not a silent fall-through.
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(datasets.DataNotFoundError, match="KERAS_NORM_DATA"):
        datasets.find_source()


def test_discovery_falls_back_to_prepared_tfds(monkeypatch, no_default_sources):
    _fake_tfds_status(monkeypatch, (True, "prepared"))
    assert datasets.find_source() == "tfds:cifar10"


def test_not_found_error_message(no_default_sources):
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_data()
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("No image data found. Looked at: ")
    assert "--data PATH" in message and "KERAS_NORM_DATA" in message
    assert str(no_default_sources / datasets.SHARED_FULL_NAME) in message
    assert "tensorflow_datasets is not installed" in message
    assert "no CIFAR-10 download in the Keras cache" in message
    assert "downloading is turned off ($KERAS_NORM_DOWNLOAD='0' or --no-download)" in message
    with pytest.raises(datasets.DataNotFoundError, match=r"turned off \(download=False\)"):
        datasets.load_data(download=False)

    with pytest.raises(datasets.DataNotFoundError, match="--data PATH"):
        datasets.load_data("cifar10")


def test_download_through_keras_get_file(fake_cifar_origin, capsys):
    """Discovery's last step downloads CIFAR-10 into the Keras cache with a progress bar and
    one line saying where it went; the next run finds it there without downloading."""
    origin, cached, (x_train, y_train, x_test, y_test) = fake_cifar_origin
    data = datasets.load_data()
    out = capsys.readouterr().out
    assert f"Downloading data from {origin.as_uri()}" in out  # keras.utils.get_file's own line
    assert f"CIFAR-10 downloaded to {cached} (0 MB)" in out
    assert cached.read_bytes() == origin.read_bytes()
    assert data.source == str(cached) and data.class_names == CIFAR10_NAMES
    np.testing.assert_array_equal(data.x_train, x_train)
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.x_test, x_test)
    np.testing.assert_array_equal(data.y_test, y_test)

    origin.unlink()  # the origin is gone: the cached copy is a local source now
    for download in (None, False):
        assert datasets.find_source(download=download) == str(cached)
    assert "Downloading" not in capsys.readouterr().out

    cached.write_bytes(b"truncated")  # a damaged cached copy is not used, and is replaced
    with pytest.raises(datasets.DataNotFoundError, match="the download failed: .*URL fetch"):
        datasets.find_source()
    assert not cached.exists()


def test_offline_download_is_a_clear_error(fake_cifar_origin, monkeypatch):
    origin, cached, _ = fake_cifar_origin
    origin.unlink()  # what an offline machine sees: the fetch fails
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_data()
    message = str(info.value)
    assert message.startswith("No image data found. Looked at: ")
    assert f"(5) the download failed: Exception: URL fetch failure on {origin.as_uri()}" in message
    assert "--data PATH" in message and "\n" not in message
    assert not cached.exists()


def test_download_with_a_wrong_hash_leaves_nothing(fake_cifar_origin, monkeypatch):
    _, cached, _ = fake_cifar_origin
    monkeypatch.setattr(datasets.sources, "CIFAR10_SHA256", "0" * 64)
    with pytest.raises(datasets.DataNotFoundError, match="download failed: ValueError: .*hash"):
        datasets.find_source()
    assert not cached.exists()


def test_download_has_a_timeout(no_default_sources, monkeypatch):
    """A network that drops packets ends in the clear error, not in a wait without end."""
    import socket

    import keras

    seen = []

    def stalled_get_file(**kwargs):
        seen.append((socket.getdefaulttimeout(), kwargs["fname"], kwargs["cache_subdir"]))
        raise TimeoutError("timed out")

    monkeypatch.setattr(keras.utils, "get_file", stalled_get_file)
    before = socket.getdefaulttimeout()
    expected = r"\(5\) the download failed: TimeoutError: timed out\. Point at"
    with pytest.raises(datasets.DataNotFoundError, match=expected):
        datasets.find_source(download=True)
    assert seen == [(60.0, datasets.CIFAR10_CACHE_NAME, "datasets")]
    assert socket.getdefaulttimeout() == before


def test_download_switch(monkeypatch):
    for value, expected in (("", True), ("1", True), ("Yes", True), ("0", False),
                            (" off ", False), ("FALSE", False)):
        monkeypatch.setenv(datasets.DOWNLOAD_ENV_VAR, value)
        assert datasets.download_enabled() is expected, value
        assert datasets.download_enabled(not expected) is (not expected)
    monkeypatch.setenv(datasets.DOWNLOAD_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="KERAS_NORM_DOWNLOAD='sometimes'"):
        datasets.download_enabled()
    with pytest.raises(ValueError, match="download must be True, False or None, got 1"):
        datasets.download_enabled(1)


def test_keras_cache_dir_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert datasets.keras_cache_dir() == Path("/tmp/.keras")  # not there: Keras's fallback
    assert datasets.keras_cache_dir(create=True) == tmp_path / "kh"
    monkeypatch.delenv("KERAS_HOME")
    assert datasets.keras_cache_dir() == Path.home() / ".keras"


def test_cifar_python_release_archive_and_folder(tmp_path):
    images, labels, pickles = _cifar_python_batches(seed=1)
    x_train, y_train, x_test, y_test = _expected_cifar(images, labels)
    archive = _write_cifar_python_archive(tmp_path / "any-name.bin", pickles)
    folder = tmp_path / "unpacked" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, blob in pickles.items():
        (folder / name).write_bytes(blob)
    for source in (archive, tmp_path / "unpacked", tmp_path / "unpacked" / "cifar-10-batches-py"):
        data = datasets.load_data(source)
        assert data.class_names == CIFAR10_NAMES and data.x_train.dtype == np.uint8
        np.testing.assert_array_equal(data.x_train, x_train)
        np.testing.assert_array_equal(data.y_train, y_train)
        np.testing.assert_array_equal(data.x_test, x_test)
        np.testing.assert_array_equal(data.y_test, y_test)

    # Without batches.meta the classes are numbered.
    no_meta = _write_cifar_python_archive(tmp_path / "no_meta.tar.gz", pickles,
                                          skip=("batches.meta",))
    assert datasets.load_data(no_meta).class_names == tuple(
        str(i) for i in range(1 + max(y_train.max(), y_test.max())))


def test_cifar_python_release_errors(tmp_path):
    _, _, pickles = _cifar_python_batches()
    missing = _write_cifar_python_archive(tmp_path / "m.tar.gz", pickles, skip=("data_batch_1",))
    with pytest.raises(ValueError, match=r"lacks \['data_batch_1'\]"):
        datasets.load_data(missing)

    # A pickle that would run code is refused, not loaded.
    evil = dict(pickles, data_batch_2=pickle.dumps({b"data": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR-10 python batch: "
                                         r"UnpicklingError: refusing to load posix.getcwd"):
        datasets.load_data(_write_cifar_python_archive(tmp_path / "e.tar.gz", evil))

    bad = dict(pickles, test_batch=pickle.dumps(
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be uint8 \(N, 3072\)"):
        datasets.load_data(_write_cifar_python_archive(tmp_path / "b.tar.gz", bad))


def test_cifar_recipe_offline_exits_2_with_one_line(fake_cifar_origin, tmp_path, capsys,
                                                    monkeypatch):
    """`python -m recipes.cifar` on a machine with no local data and no network."""
    from recipes import cifar

    origin, _, _ = fake_cifar_origin
    origin.unlink()
    # TFDS is installed (the recipes extra) but has no prepared data.
    monkeypatch.delitem(sys.modules, "tensorflow_datasets")
    _fake_tfds_status(monkeypatch, (False, "absent"))
    status = cifar.main(["--output", str(tmp_path / "run"), "--epochs", "1", "--verbose", "0"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("python -m recipes.cifar: error: No image data found. Looked at: ")
    assert "the download failed: Exception: URL fetch failure" in err

    status = cifar.main(["--output", str(tmp_path / "run"), "--no-download", "--verbose", "0"])
    err = capsys.readouterr().err
    assert status == 2 and "(5) downloading is turned off" in err, err


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    with pytest.raises(datasets.DataNotFoundError, match="not prepared"):
        datasets.load_data("cifar100", tfds_data_dir=str(tmp_path))


def test_load_prepared_tfds(monkeypatch):
    """The TFDS reading path, on TFDS's own offline mock data (no files, no network)."""
    import tensorflow_datasets as tfds  # a hard dependency: never skip on its absence
    _fake_tfds_status(monkeypatch, (True, "mocked"))
    with tfds.testing.mock_data(num_examples=12):
        data = datasets.load_data("tfds:cifar10")
    assert data.source == "tfds:cifar10" and data.num_classes == 10
    assert data.x_train.shape == (12, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.y_train.dtype == np.int32 and data.y_train.max() < 10


def test_bad_sources(tmp_path):
    with pytest.raises(datasets.DataNotFoundError, match="does not exist"):
        datasets.load_data(tmp_path / "nothing_here")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        datasets.load_data(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unsupported TFDS data set"):
        datasets.load_data("tfds:mnist")
    with pytest.raises(ValueError, match="source must be"):
        datasets.load_data(3)
    with pytest.raises(ValueError, match="cache_dir"):
        datasets.default_cache_dir(tmp_path / "notes.txt" / "sub")


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def test_subset_is_stratified_and_deterministic():
    data = _synthetic([10, 10, 3], [4, 4, 4])
    small = datasets.subset(data, train_size=9, test_size=6, seed=0)
    np.testing.assert_array_equal(np.bincount(small.y_train, minlength=3), [3, 3, 3])
    np.testing.assert_array_equal(np.bincount(small.y_test, minlength=3), [2, 2, 2])
    assert small.class_names == data.class_names and "subset" in small.source

    # Class 2 runs short: its share goes to the others, the odd one to a seeded pick.
    counts = np.bincount(datasets.subset(data, train_size=20).y_train, minlength=3)
    assert counts[2] == 3 and sorted(counts[:2]) == [8, 9]

    again = datasets.subset(data, train_size=9, test_size=6, seed=0)
    np.testing.assert_array_equal(again.x_train, small.x_train)
    other = datasets.subset(data, train_size=9, test_size=6, seed=1)
    assert not np.array_equal(other.x_train, small.x_train)

    only_train = datasets.subset(data, train_size=5)
    assert len(only_train.y_train) == 5 and only_train.x_test is data.x_test

    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="train_size must be a positive integer"):
            datasets.subset(data, train_size=bad)
    with pytest.raises(ValueError, match="test_size=13 is larger than the 12"):
        datasets.subset(data, test_size=13)


@pytest.mark.skipif(not SMALL_NPZ.is_file(), reason=f"shared data missing: {SMALL_NPZ}")
def test_subset_of_shared_small_npz():
    data = datasets.subset(datasets.load_data(SMALL_NPZ), train_size=100, test_size=50, seed=3)
    np.testing.assert_array_equal(np.bincount(data.y_train), [10] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test), [5] * 10)


# --------------------------------------------------------------------------------------------
# tf.data pipelines
# --------------------------------------------------------------------------------------------


def test_make_dataset_shapes_and_dtypes():
    data = _synthetic([20, 20, 10], [7, 7, 7])
    train = datasets.make_dataset(data.x_train, data.y_train, 16, training=True, seed=0)
    batches = list(train)
    assert len(batches) == 3  # 50 // 16, remainder dropped when training
    for images, labels in batches:
        assert images.shape == (16, 32, 32, 3) and images.dtype == tf.float32
        assert labels.shape == (16,) and labels.dtype == tf.int32
    assert train.element_spec[0].shape.as_list() == [16, 32, 32, 3]

    test = datasets.make_dataset(data.x_test, data.y_test, 8, training=False)
    sizes = [int(labels.shape[0]) for _, labels in test]
    assert sizes == [8, 8, 5]  # evaluation keeps the last, smaller batch

    # Training visits every example once per epoch, in a new order each epoch.
    full = datasets.make_dataset(data.x_train, data.y_train, 10, training=True, seed=1)
    first = np.concatenate([labels.numpy() for _, labels in full])
    second = np.concatenate([labels.numpy() for _, labels in full])
    np.testing.assert_array_equal(np.sort(first), np.sort(data.y_train))
    assert not np.array_equal(first, second)


def _all_crops(image, pad, mode):
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    size = image.shape[0]
    crops = [
        padded[dy : dy + size, dx : dx + size]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    ]
    return crops + [c[:, ::-1] for c in crops]


@pytest.mark.parametrize("padding, np_mode", [("reflect", "reflect"), ("zero", "constant")])
def test_augmentation_is_crop_and_flip(padding, np_mode):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24)  # labels identify the source image
    ds = datasets.make_dataset(x, y, 12, training=True, seed=5, padding=padding)
    epoch1 = [(i.numpy(), l.numpy()) for i, l in ds]
    epoch2 = [(i.numpy(), l.numpy()) for i, l in ds]
    changed = 0
    for images, labels in epoch1:
        assert images.shape == (12, 32, 32, 3)
        for image, label in zip(_denormalize(images), labels):
            crops = _all_crops(x[label], 4, np_mode)
            assert any(np.array_equal(image, c) for c in crops)
            changed += not np.array_equal(image, x[label])
    assert changed >= 20  # the identity (no shift, no flip) has probability 1/162

    # Same seed, new pipeline: identical epochs; a new epoch draws new augmentations.
    again = [(i.numpy(), l.numpy()) for i, l in
             datasets.make_dataset(x, y, 12, training=True, seed=5, padding=padding)]
    for (a, la), (b, lb) in zip(epoch1, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    by_label_1 = {int(l): im for imgs, ls in epoch1 for im, l in zip(imgs, ls)}
    by_label_2 = {int(l): im for imgs, ls in epoch2 for im, l in zip(imgs, ls)}
    assert any(not np.array_equal(by_label_1[k], by_label_2[k]) for k in range(24))


def test_training_without_augmentation_and_eval_are_plain():
    data = _synthetic([6, 6], [5, 4])
    expected = (data.x_test / 255.0 - np.asarray(datasets.CIFAR10_MEAN)) / np.asarray(
        datasets.CIFAR10_STD
    )
    test = datasets.make_dataset(data.x_test, data.y_test, 4, training=False, seed=0)
    runs = []
    for _ in range(2):
        images = np.concatenate([i.numpy() for i, _ in test])
        labels = np.concatenate([l.numpy() for _, l in test])
        np.testing.assert_allclose(images, expected, atol=1e-5)  # in order, unaugmented
        np.testing.assert_array_equal(labels, data.y_test)
        runs.append(images)
    np.testing.assert_array_equal(runs[0], runs[1])

    plain = datasets.make_dataset(data.x_train, data.y_train, 12, training=True, augment=False)
    images, _ = next(iter(plain))
    # Shuffled, but each unaugmented training image is exactly one of the originals, once.
    originals = sorted(image.tobytes() for image in data.x_train)
    assert sorted(image.tobytes() for image in _denormalize(images.numpy())) == originals


def test_make_dataset_argument_errors():
    data = _synthetic([8, 8], [2, 2])
    x, y = data.x_train, data.y_train
    cases = [
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(structure="stratified"), "structure must be 'random' or 'balanced'"),
        (dict(padding="edge"), "padding must be 'reflect' or 'zero'"),
        (dict(examples_per_class=2), "only applies to structure='balanced'"),
        (dict(batch_size=32), "batch_size=32 exceeds the 16 examples"),
        (dict(structure="balanced", examples_per_class=3, num_classes=2),
         "batch_size == examples_per_class \\* num_classes"),
        (dict(structure="balanced", batch_size=5), "divisible by num_classes"),
        (dict(structure="balanced", num_classes=1), "num_classes=1 must be positive and cover"),
        (dict(num_replicas=2), "num_replicas=2 must be positive, and other than 1 only"),
    ]
    for kwargs, message in cases:
        kwargs = {"batch_size": 4, **kwargs}
        with pytest.raises(ValueError, match=message):
            datasets.make_dataset(x, y, training=True, **kwargs)
    with pytest.raises(ValueError, match="x must be a uint8 array"):
        datasets.make_dataset(x.astype(np.float32), y, 4, training=True)
    with pytest.raises(ValueError, match="y must be an integer array"):
        datasets.make_dataset(x, y[:-1], 4, training=True)


@pytest.mark.skipif(
    importlib.util.find_spec("keras_norm.data") is None,
    reason="keras_norm/data.py (balanced_batches) is not written yet",
)
def test_balanced_structure():
    data = _synthetic([12, 9, 15], [3, 3, 3])
    ds = datasets.make_dataset(
        data.x_train, data.y_train, 6, training=True, structure="balanced",
        examples_per_class=2, num_classes=3, seed=0,
    )
    batches = list(ds)
    assert batches
    for images, labels in batches:
        assert images.shape == (6, 32, 32, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int32
        np.testing.assert_array_equal(np.bincount(labels.numpy(), minlength=3), [2, 2, 2])
    # The defaults derive k = batch_size // num_classes and num_classes = max(y) + 1.
    default = datasets.make_dataset(
        data.x_train, data.y_train, 6, training=True, structure="balanced", seed=0
    )
    for _, labels in default:
        np.testing.assert_array_equal(np.bincount(labels.numpy(), minlength=3), [2, 2, 2])
    # num_replicas=2: each replica's half of a global batch is balanced too.
    split = datasets.make_dataset(
        data.x_train, data.y_train, 6, training=True, structure="balanced", seed=0,
        num_replicas=2,
    )
    for _, labels in split:
        for half in np.split(labels.numpy(), 2):
            np.testing.assert_array_equal(np.bincount(half, minlength=3), [1, 1, 1])
    # Images are gathered with their own labels (ids are recoverable from pixel content).
    ids = datasets.make_dataset(
        data.x_train, data.y_train, 6, training=True, augment=False, structure="balanced",
        seed=1,
    )
    lookup = {image.tobytes(): label for image, label in zip(data.x_train, data.y_train)}
    for images, labels in ids:
        for image, label in zip(_denormalize(images.numpy()), labels.numpy()):
            assert lookup[image.tobytes()] == label


def test_no_dependency_on_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert datasets.project_root() == PROJECT_ROOT
    assert datasets.shared_data_dir() == PROJECT_ROOT.parent / "shared" / "data"
    assert os.getcwd() == str(tmp_path)
