"""Tests for `keras_norm.data.balanced_batches`, the balanced-batch tf.data pipeline."""

import collections
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from keras_norm.data import balanced_batches

# The shared data lies beside the project root (see shared/data/README.md).
CIFAR_SMALL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-small.npz"

# Class sizes of the imbalanced synthetic set: class 1 is the largest, class 0 the smallest.
IMBALANCED_COUNTS = (7, 20, 12)


def _labelled_ids(counts):
    """Returns `(ids, labels)`: example `i` has the unique feature id `i` and class `labels[i]`."""
    labels = np.repeat(np.arange(len(counts)), counts)
    # Shuffle once so that the source is not sorted by class.
    labels = np.random.default_rng(0).permutation(labels).astype("int64")
    return np.arange(labels.size, dtype="int64"), labels


def _id_dataset(counts):
    ids, labels = _labelled_ids(counts)
    return tf.data.Dataset.from_tensor_slices((ids, labels)), labels


def _epoch(dataset):
    """Returns one epoch as lists of NumPy `(ids, labels)` batches."""
    batches = [(ids.numpy(), labels.numpy()) for ids, labels in dataset]
    return [ids for ids, _ in batches], [labels for _, labels in batches]


def _epoch_order(dataset):
    return np.concatenate(_epoch(dataset)[0])


def _assert_balanced(labels_per_batch, num_classes, examples_per_class):
    for labels in labels_per_batch:
        np.testing.assert_array_equal(
            np.bincount(labels, minlength=num_classes), [examples_per_class] * num_classes
        )


# ---------------------------------------------------------------------------------------------
# Batch structure


@pytest.mark.parametrize("examples_per_class", [1, 3])
def test_every_batch_has_exact_class_counts(examples_per_class):
    dataset, all_labels = _id_dataset((9, 9, 9, 9))
    balanced = balanced_batches(dataset, 4, examples_per_class, seed=0)
    ids, labels = _epoch(balanced)
    assert balanced.element_spec[0].shape == (4 * examples_per_class,)
    assert len(ids) == 9 // examples_per_class == int(balanced.cardinality())
    _assert_balanced(labels, 4, examples_per_class)
    for batch_ids, batch_labels in zip(ids, labels):
        np.testing.assert_array_equal(all_labels[batch_ids], batch_labels)  # pairs kept


def test_order_within_batch_is_shuffled():
    dataset, _ = _id_dataset((30, 30, 30))
    _, labels = _epoch(balanced_batches(dataset, 3, 2, seed=0))
    # A fixed class layout (e.g. 0,0,1,1,2,2 in every batch) would give a single pattern.
    assert len({tuple(batch) for batch in labels}) > 5


def test_each_example_at_most_once_per_epoch():
    dataset, _ = _id_dataset(IMBALANCED_COUNTS)
    ids = _epoch_order(balanced_batches(dataset, 3, 2, policy="drop", seed=0))
    assert ids.size == len(np.unique(ids)) == 3 * 2 * (7 // 2)


def test_cifar_small_strict_epoch_uses_every_image_once_with_its_label():
    data = np.load(CIFAR_SMALL)
    images, labels = data["x_train"], data["y_train"]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    balanced = balanced_batches(dataset, 10, examples_per_class=5, policy="strict", seed=0)
    label_of_image = {image.tobytes(): label for image, label in zip(images, labels)}
    seen = []
    for batch_images, batch_labels in balanced:
        batch_images, batch_labels = batch_images.numpy(), batch_labels.numpy()
        _assert_balanced([batch_labels], 10, 5)
        for image, label in zip(batch_images, batch_labels):
            assert label_of_image[image.tobytes()] == label
            seen.append(image.tobytes())
    assert len(seen) == len(set(seen)) == len(label_of_image) == 2000


# ---------------------------------------------------------------------------------------------
# Randomness: new order every epoch, reproducible under a seed


def test_order_changes_each_time_the_dataset_is_iterated():
    dataset, _ = _id_dataset((20, 20, 20))
    balanced = balanced_batches(dataset, 3, 2, seed=0)
    first, second = _epoch_order(balanced), _epoch_order(balanced)
    assert sorted(first) == sorted(second)
    assert not np.array_equal(first, second)


def test_order_changes_across_repeat():
    dataset, _ = _id_dataset((20, 20, 20))
    batch_ids, batch_labels = _epoch(balanced_batches(dataset, 3, 2, seed=0).repeat(3))
    _assert_balanced(batch_labels, 3, 2)
    ids = np.concatenate(batch_ids).reshape(3, 60)
    for epoch in ids:
        assert sorted(epoch) == list(range(60))  # every epoch is a whole, fresh pass
    assert not np.array_equal(ids[0], ids[1])
    assert not np.array_equal(ids[1], ids[2])


def test_same_seed_gives_same_epochs_and_different_seed_different_ones():
    dataset, _ = _id_dataset((20, 20, 20))

    def two_epochs(seed):
        balanced = balanced_batches(dataset, 3, 2, seed=seed)
        return np.stack([_epoch_order(balanced), _epoch_order(balanced)])

    np.testing.assert_array_equal(two_epochs(7), two_epochs(7))
    assert not np.array_equal(two_epochs(7)[0], two_epochs(8)[0])


# ---------------------------------------------------------------------------------------------
# Imbalanced classes


def test_drop_ends_the_epoch_when_the_smallest_class_runs_out():
    dataset, labels = _id_dataset(IMBALANCED_COUNTS)
    balanced = balanced_batches(dataset, 3, 1, policy="drop", seed=0)
    ids, batch_labels = _epoch(balanced)
    assert len(ids) == int(balanced.cardinality()) == min(IMBALANCED_COUNTS)
    _assert_balanced(batch_labels, 3, 1)
    used = np.concatenate(ids)
    assert set(np.flatnonzero(labels == 0)) <= set(used)  # the smallest class is used up
    assert len(set(used)) == used.size


def test_drop_takes_a_different_subset_of_large_classes_each_epoch():
    dataset, labels = _id_dataset(IMBALANCED_COUNTS)
    balanced = balanced_batches(dataset, 3, 1, policy="drop", seed=0)
    first, second = _epoch_order(balanced), _epoch_order(balanced)
    largest = set(np.flatnonzero(labels == 1))
    assert set(first) & largest != set(second) & largest


def test_oversample_uses_every_example_and_repeats_minorities_evenly():
    dataset, labels = _id_dataset(IMBALANCED_COUNTS)
    # 20 examples of the largest class need ceil(20 / 3) = 7 batches of 3 per class.
    balanced = balanced_batches(dataset, 3, 3, policy="oversample", seed=0)
    ids, batch_labels = _epoch(balanced)
    assert len(ids) == int(balanced.cardinality()) == 7
    _assert_balanced(batch_labels, 3, 3)
    uses = collections.Counter(np.concatenate(ids).tolist())
    for class_id in range(3):
        class_uses = [uses[i] for i in np.flatnonzero(labels == class_id)]
        assert min(class_uses) >= 1  # every example, of every class, appears
        assert max(class_uses) - min(class_uses) <= 1  # repeats are spread evenly
    assert max(uses[i] for i in np.flatnonzero(labels == 0)) > 1  # minority is resampled


def test_oversample_reshuffles_each_pass_over_a_minority_class():
    dataset, labels = _id_dataset((6, 60))
    ids, _ = _epoch(balanced_batches(dataset, 2, 2, policy="oversample", seed=0))
    minority = set(np.flatnonzero(labels == 0))
    pairs = {frozenset(set(batch) & minority) for batch in ids}
    # Ten passes over 6 examples: repeating one order would pair them the same 3 ways.
    assert len(pairs) > 3


def test_strict_names_the_classes_and_counts_when_imbalanced():
    dataset, _ = _id_dataset(IMBALANCED_COUNTS)
    with pytest.raises(ValueError, match=r"strict.*class 0: 7, class 1: 20, class 2: 12"):
        balanced_batches(dataset, 3, 1, policy="strict")


def test_strict_accepts_balanced_classes():
    dataset, _ = _id_dataset((6, 6, 6))
    _, labels = _epoch(balanced_batches(dataset, 3, 2, policy="strict", seed=0))
    assert len(labels) == 3
    _assert_balanced(labels, 3, 2)


@pytest.mark.parametrize("policy", ["drop", "oversample", "strict"])
def test_class_with_too_few_examples_is_reported(policy):
    dataset, _ = _id_dataset((5, 5, 2))
    with pytest.raises(ValueError, match=r"at least examples_per_class=3 .*\(class 2: 2\)"):
        balanced_batches(dataset, 3, 3, policy=policy)


def test_missing_class_is_reported():
    dataset, _ = _id_dataset((5, 5))
    with pytest.raises(ValueError, match=r"\(class 2: 0\)"):
        balanced_batches(dataset, 3, 1)


def test_empty_dataset_is_reported():
    empty = tf.data.Dataset.from_tensor_slices((np.zeros(0, "int64"), np.zeros(0, "int64")))
    with pytest.raises(ValueError, match=r"`dataset` is empty.*Received: dataset with 0"):
        balanced_batches(empty, 2, 1)


# ---------------------------------------------------------------------------------------------
# Label formats


def test_one_hot_labels_are_balanced_and_passed_through():
    ids, labels = _labelled_ids((8, 8, 8))
    one_hot = np.eye(3, dtype="float32")[labels]
    dataset = tf.data.Dataset.from_tensor_slices((ids, one_hot))
    balanced = balanced_batches(dataset, 3, 2, seed=0)
    assert balanced.element_spec[1].shape == (6, 3)
    batch_ids, batch_one_hot = _epoch(balanced)
    assert len(batch_ids) == 8 // 2  # the loop below checks every batch of a whole epoch
    for ids_of_batch, one_hot_of_batch in zip(batch_ids, batch_one_hot):
        np.testing.assert_array_equal(one_hot_of_batch, np.eye(3)[labels[ids_of_batch]])
        _assert_balanced([one_hot_of_batch.argmax(axis=1)], 3, 2)


def test_labels_of_shape_one_are_class_ids():
    ids, labels = _labelled_ids((4, 4))
    dataset = tf.data.Dataset.from_tensor_slices((ids, labels[:, None].astype("uint8")))
    batch_ids, batch_labels = _epoch(balanced_batches(dataset, 2, 2, seed=0))
    assert len(batch_labels) == 2
    _assert_balanced([batch[:, 0] for batch in batch_labels], 2, 2)
    for ids_of_batch, labels_of_batch in zip(batch_ids, batch_labels):
        np.testing.assert_array_equal(labels_of_batch, labels[ids_of_batch][:, None])


def test_nested_features_and_sample_weights_stay_aligned():
    ids, labels = _labelled_ids((6, 6))
    features = {"id": ids, "twice": 2 * ids}
    weights = ids.astype("float32") / 10
    dataset = tf.data.Dataset.from_tensor_slices((features, labels, weights))
    batches = list(balanced_batches(dataset, 2, 3, seed=0))
    assert len(batches) == 6 // 3  # the loop below checks every batch of a whole epoch
    for batch_features, batch_labels, batch_weights in batches:
        batch_ids = batch_features["id"].numpy()
        _assert_balanced([batch_labels.numpy()], 2, 3)
        np.testing.assert_array_equal(batch_features["twice"].numpy(), 2 * batch_ids)
        np.testing.assert_array_equal(batch_labels.numpy(), labels[batch_ids])
        np.testing.assert_allclose(batch_weights.numpy(), batch_ids / 10)


@pytest.mark.parametrize("bad_label", [-1, 3])
def test_labels_outside_the_class_range_are_rejected(bad_label):
    ids, labels = _labelled_ids((4, 4, 4))
    labels[5] = bad_label
    dataset = tf.data.Dataset.from_tensor_slices((ids, labels))
    with pytest.raises(ValueError, match=rf"\[0, 3\).*example 5.*\[{bad_label}\]"):
        balanced_batches(dataset, 3, 1)


def test_vector_labels_that_are_not_one_hot_are_rejected():
    ids, labels = _labelled_ids((4, 4))
    soft = np.eye(2, dtype="float32")[labels]
    soft[3] = [0.5, 0.5]
    dataset = tf.data.Dataset.from_tensor_slices((ids, soft))
    with pytest.raises(ValueError, match=r"must be one-hot.*example 3"):
        balanced_batches(dataset, 2, 1)


def test_float_class_ids_are_rejected():
    ids, labels = _labelled_ids((4, 4))
    dataset = tf.data.Dataset.from_tensor_slices((ids, labels.astype("float32")))
    with pytest.raises(TypeError, match=r"integer dtype.*Received: label dtype=float32"):
        balanced_batches(dataset, 2, 1)


def test_label_shape_that_fits_neither_format_is_rejected():
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(4), np.zeros((4, 5), "int64")))
    with pytest.raises(ValueError, match=r"unbatch a batched dataset first.*shape=\(5,\)"):
        balanced_batches(dataset, 3, 1)


# ---------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    "arguments, error, fragment",
    [
        ({"num_classes": 0}, ValueError, "num_classes=0"),
        ({"num_classes": -2}, ValueError, "num_classes=-2"),
        ({"num_classes": 2.0}, TypeError, "num_classes=2.0"),
        ({"num_classes": True}, TypeError, "num_classes=True"),
        ({"examples_per_class": 0}, ValueError, "examples_per_class=0"),
        ({"examples_per_class": -1}, ValueError, "examples_per_class=-1"),
        ({"examples_per_class": True}, TypeError, "examples_per_class=True"),
        ({"examples_per_class": 1.5}, TypeError, "examples_per_class=1.5"),
        ({"examples_per_class": "2"}, TypeError, "examples_per_class='2'"),
        ({"policy": "balance"}, ValueError, "policy='balance'"),
        ({"policy": None}, ValueError, "policy=None"),
        ({"seed": 1.5}, TypeError, "seed=1.5"),
        ({"num_replicas": 0}, ValueError, "num_replicas=0"),
    ],
)
def test_invalid_arguments_name_the_function_argument_and_value(arguments, error, fragment):
    dataset, _ = _id_dataset((4, 4))
    call = {"num_classes": 2, **arguments}
    with pytest.raises(error, match=r"`balanced_batches`.*Received: " + re.escape(fragment)):
        balanced_batches(dataset, **call)


def test_numpy_integers_are_accepted():
    dataset, _ = _id_dataset((4, 4))
    balanced = balanced_batches(dataset, np.int64(2), np.int32(2), seed=np.int64(3))
    assert int(balanced.cardinality()) == 2


def test_examples_per_class_must_split_over_replicas():
    dataset, _ = _id_dataset((4, 4))
    with pytest.raises(
        ValueError,
        match=r"`balanced_batches`.*divisible by `num_replicas`.*"
        r"Received: examples_per_class=3, num_replicas=2",
    ):
        balanced_batches(dataset, 2, 3, num_replicas=2)


def test_non_dataset_is_rejected():
    with pytest.raises(TypeError, match=r"`balanced_batches`.*Received: dataset=\[1, 2\]"):
        balanced_batches([1, 2], 2)


def test_infinite_dataset_is_rejected():
    dataset, _ = _id_dataset((4, 4))
    with pytest.raises(ValueError, match=r"must be finite.*\.repeat\(\)"):
        balanced_batches(dataset.repeat(), 2)


def test_elements_that_are_not_feature_label_pairs_are_rejected():
    with pytest.raises(ValueError, match=r"`\(features, label\)`.*Received: dataset.element"):
        balanced_batches(tf.data.Dataset.range(4), 2)


def test_elements_of_different_shapes_are_reported():
    ragged = tf.data.Dataset.range(1, 5).map(lambda n: (tf.zeros([n]), n % 2))
    with pytest.raises(ValueError, match=r"same shape.*decode or resize afterwards"):
        balanced_batches(ragged, 2)


# ---------------------------------------------------------------------------------------------
# Downstream pipeline and distribution


def test_balance_survives_parallel_map_and_prefetch():
    dataset, labels = _id_dataset((12, 12, 12))

    def decode(ids, batch_labels):
        return tf.cast(ids, tf.float32) * 0.5, batch_labels

    pipeline = (
        balanced_batches(dataset, 3, 2, seed=0)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    assert int(pipeline.cardinality()) == 6
    values, batch_labels = _epoch(pipeline)
    _assert_balanced(batch_labels, 3, 2)
    for batch_values, batch in zip(values, batch_labels):
        np.testing.assert_array_equal(labels[(batch_values * 2).astype(int)], batch)


def test_balance_survives_unbatch_per_example_map_and_rebatch():
    dataset, _ = _id_dataset((12, 12, 12))
    pipeline = (
        balanced_batches(dataset, 3, 2, seed=0)
        .repeat(2)
        .unbatch()
        .map(lambda i, label: (i + 1, label), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(6, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    _, batch_labels = _epoch(pipeline)
    assert len(batch_labels) == 12
    _assert_balanced(batch_labels, 3, 2)


def _replica_label_counts(strategy, dataset, num_classes):
    """Returns the per-class label counts of every replica's local batch, batch by batch."""
    counts = []
    for distributed in strategy.experimental_distribute_dataset(dataset):
        local_labels = strategy.experimental_local_results(distributed[1])
        counts.append([np.bincount(labels.numpy(), minlength=num_classes).tolist()
                       for labels in local_labels])
    return np.array(counts)  # (batches, replicas, classes)


def test_each_replica_gets_a_balanced_share_under_mirrored_strategy(mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    dataset, _ = _id_dataset((16, 16, 16))
    balanced = balanced_batches(dataset, 3, 4, seed=0, num_replicas=2)
    counts = _replica_label_counts(mirrored_strategy, balanced, 3)
    assert counts.shape == (4, 2, 3)
    np.testing.assert_array_equal(counts, np.full((4, 2, 3), 2))


def test_without_num_replicas_only_the_global_batch_is_balanced(mirrored_strategy):
    # Documents the default: replica shares are random slices of a balanced global batch.
    dataset, _ = _id_dataset((16, 16, 16))
    counts = _replica_label_counts(mirrored_strategy, balanced_batches(dataset, 3, 4, seed=0), 3)
    np.testing.assert_array_equal(counts.sum(axis=1), np.full((4, 3), 4))
    assert (counts != 2).any()
