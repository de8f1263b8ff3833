"""Throughput of `balanced_batches` against plain `shuffle(N).batch(B)` on CIFAR-10.

Both pipelines start from the same in-memory uint8 images and labels and share the same
downstream `map(augment, AUTOTUNE).prefetch(AUTOTUNE)`. Full epochs of the two are timed in
interleaved order (the order alternates each repeat, after one warm-up epoch each), so drift in
machine load hits both alike; the table reports the median and the min-max spread.

    python benchmarks/bench_pipeline.py                # the 2,000-image npz subset
    python benchmarks/bench_pipeline.py --full         # all 50,000 training JPEGs, decoded
    python benchmarks/bench_pipeline.py --full --encoded   # also: balance JPEG bytes, decode after

With `--encoded` a second comparison balances the encoded JPEG bytes (the "light dataset"
usage) and decodes one example at a time afterwards (`unbatch().map(decode).batch(B)`),
against `shuffle(N).map(decode).batch(B)`.
"""

import argparse
import os
import pathlib
import statistics
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_norm.data import balanced_batches  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Data


def load_small():
    data = np.load(SHARED_DATA / "cifar10-small.npz")
    return data["x_train"], data["y_train"].astype("int64")


def read_train_jpegs():
    """Returns the encoded training JPEGs and their labels, read from the tar.gz in memory."""
    encoded, class_names = [], []
    with tarfile.open(SHARED_DATA / "cifar10-jpg.tar.gz", "r:gz") as archive:
        for member in archive:
            parts = pathlib.PurePosixPath(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] == "train":
                encoded.append(archive.extractfile(member).read())
                class_names.append(parts[1])
    # Folder names in alphabetical order are the usual CIFAR-10 label order (README).
    label_of = {name: label for label, name in enumerate(sorted(set(class_names)))}
    return np.array(encoded, dtype=object), np.array([label_of[n] for n in class_names])


def decode(jpeg, label):
    return tf.ensure_shape(tf.io.decode_jpeg(jpeg, channels=3), (32, 32, 3)), label


def decode_all(encoded, labels):
    decoded = (
        tf.data.Dataset.from_tensor_slices((encoded, labels))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(5000)
    )
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in decoded])
    return np.concatenate(images), np.concatenate(labels).astype("int64")


# ---------------------------------------------------------------------------------------------
# Pipelines


def augment(images, labels):
    """The shared downstream work: scale to [0, 1] and flip each image at random."""
    images = tf.image.convert_image_dtype(images, tf.float32)
    return tf.image.random_flip_left_right(images), labels


def array_pipelines(images, labels, examples_per_class, seed):
    batch_size = examples_per_class * NUM_CLASSES
    source = tf.data.Dataset.from_tensor_slices((images, labels))
    start = time.perf_counter()
    balanced = balanced_batches(source, NUM_CLASSES, examples_per_class, seed=seed)
    setup_s = time.perf_counter() - start
    shuffled = source.shuffle(len(labels), seed=seed).batch(batch_size)
    downstream = lambda ds: ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(  # noqa
        tf.data.AUTOTUNE
    )
    return {"shuffle(N).batch(B)": downstream(shuffled),
            "balanced_batches": downstream(balanced)}, setup_s


def encoded_pipelines(encoded, labels, examples_per_class, seed):
    batch_size = examples_per_class * NUM_CLASSES
    source = tf.data.Dataset.from_tensor_slices((encoded, labels))
    start = time.perf_counter()
    balanced = balanced_batches(source, NUM_CLASSES, examples_per_class, seed=seed)
    setup_s = time.perf_counter() - start
    per_example = lambda ds, drop: (  # noqa: E731
        ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=drop)
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    return {
        "shuffle(N).map(decode).batch(B)": per_example(source.shuffle(len(labels), seed=seed),
                                                       False),
        "balanced_batches.unbatch().map(decode).batch(B)": per_example(balanced.unbatch(), True),
    }, setup_s


# ---------------------------------------------------------------------------------------------
# Timing


def time_epoch(dataset):
    """Returns (images, seconds) for one full epoch, from a fresh iterator."""
    images = 0
    start = time.perf_counter()
    for batch_images, _ in dataset:
        images += int(batch_images.shape[0])
    return images, time.perf_counter() - start


def interleaved_throughputs(pipelines, repeats):
    """Images/s per epoch of each pipeline, timed alternately (order flips every repeat)."""
    names = list(pipelines)
    for name in names:  # warm-up: traces functions, fills caches, starts thread pools
        time_epoch(pipelines[name])
    rates = {name: [] for name in names}
    epoch_images = {}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            images, seconds = time_epoch(pipelines[name])
            epoch_images[name] = images
            rates[name].append(images / seconds)
    return rates, epoch_images


def markdown_table(rates, epoch_images, batch_size):
    names = list(rates)
    baseline = statistics.median(rates[names[0]])
    lines = [
        "| pipeline | batch | images/epoch | median images/s | spread (min-max) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        median = statistics.median(rates[name])
        lines.append(
            f"| `{name}` | {batch_size} | {epoch_images[name]} | {median:,.0f} | "
            f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f} | {median / baseline:.2f}x |"
        )
    return "\n".join(lines)


def report(title, pipelines, setup_s, args):
    rates, epoch_images = interleaved_throughputs(pipelines, args.repeats)
    print(f"\n### {title}\n")
    print(markdown_table(rates, epoch_images, args.examples_per_class * NUM_CLASSES))
    print(f"\n`balanced_batches` construction (reads the source once): {setup_s:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="decode all 50,000 training JPEGs instead of the npz subset")
    parser.add_argument("--encoded", action="store_true",
                        help="with --full, also balance JPEG bytes and decode afterwards")
    parser.add_argument("--examples-per-class", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed epochs per pipeline (default: 15 small, 5 with --full)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.encoded and not args.full:
        parser.error("--encoded needs --full (the npz subset holds decoded images only)")
    if args.repeats is None:
        args.repeats = 5 if args.full else 15  # small epochs are short, so take more

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores visible")
    if args.full:
        start = time.perf_counter()
        encoded, labels = read_train_jpegs()
        images, image_labels = decode_all(encoded, labels)
        print(f"Read and decoded {len(images)} training JPEGs in "
              f"{time.perf_counter() - start:.1f} s")
    else:
        images, image_labels = load_small()
    name = "CIFAR-10 train, full (JPEG-decoded)" if args.full else "CIFAR-10 small npz"
    pipelines, setup_s = array_pipelines(images, image_labels, args.examples_per_class,
                                         args.seed)
    report(f"{name}: uint8 arrays -> map(augment) -> prefetch", pipelines, setup_s, args)
    if args.encoded:
        pipelines, setup_s = encoded_pipelines(encoded, labels, args.examples_per_class,
                                               args.seed)
        report(f"{name}: JPEG bytes -> per-example decode -> batch -> map(augment)",
               pipelines, setup_s, args)


if __name__ == "__main__":
    main()
