"""Balanced-batch input pipelines (batch structure, Hajaj & Gillies 2018, arXiv:1802.07590).

`balanced_batches` turns a finite `tf.data.Dataset` of `(features, label)` pairs into one whose
every batch holds exactly `examples_per_class` examples of each class. See docs/algorithms.md
section 6 for why batch structure matters to batch normalization.
"""

import numbers

import numpy as np
import tensorflow as tf

POLICIES = ("drop", "oversample", "strict")

# Elements are read out of the source dataset in chunks of this many, so that materialising it
# costs Python overhead per chunk, not per example.
_MATERIALISE_CHUNK = 4096


def balanced_batches(
    dataset,
    num_classes,
    examples_per_class=1,
    policy="drop",
    seed=None,
    num_replicas=1,
):
    """Batches a dataset so that every batch holds the same number of examples of each class.

    Every batch of the returned dataset holds exactly `examples_per_class` examples of each of
    the `num_classes` classes (batch size `examples_per_class * num_classes`), in random order
    within the batch. One iteration of the returned dataset is one finite epoch; call
    `.repeat()` on it to train for several. Each new iteration (including each pass of
    `.repeat()`) draws a new order; under a `seed`, the sequence of epochs is reproducible.
    Within an epoch each example appears at most once, except under `policy="oversample"`.

    Imbalanced classes are handled by `policy`:

    - `"drop"`: an epoch has `min_count // examples_per_class` batches, so it ends when the
      smallest class runs out; the surplus of the other classes is a fresh random subset each
      epoch.
    - `"oversample"`: an epoch has `ceil(max_count / examples_per_class)` batches, so every
      example of the largest class is used; smaller classes are repeated as whole reshuffled
      passes plus one random partial pass, so each of their examples appears at least once and
      the repeat counts differ by at most one.
    - `"strict"`: raises a `ValueError` naming every class and its count unless all classes
      have the same number of examples (then it behaves like `"drop"`, which only drops the
      `count % examples_per_class` remainder of each class).

    Design: random access by materialising. Balanced batches need random access to the
    examples, which a general `tf.data.Dataset` does not offer, so the (finite) dataset is read
    once, at construction, into one in-memory tensor per component; each batch is then one
    `tf.gather` of a row of example indices, run by a parallel `map`. The indices of an epoch
    (its plan) come from vectorised, stateless TF ops and one per-epoch seed (drawn by
    `tf.data.Dataset.random(..., rerandomize_each_iteration=True)`): a full sort of the labels
    with random tie-breaking shuffles every class at once, each class is cut into
    `(num_batches, examples_per_class)` slots, the classes are interleaved into batches and
    each batch is shuffled. An epoch thus costs one sort of `N` keys plus one gather per batch,
    instead of filtering the dataset once per class.

    Memory cost: the whole source dataset is held in host memory once (CIFAR-10's 50,000 uint8
    training images: about 147 MiB; twice that, briefly, while it is read), plus a few tens of
    bytes per example for the sort keys and each epoch's plan. Like `from_tensor_slices` data,
    these tensors are part of the dataset graph, which tf.data may copy (e.g. per device under
    a distribution strategy) and which hits the 2 GB limit of serialized graphs where it is
    serialized. So balance a light dataset (file paths, encoded bytes or uint8 arrays, with
    their labels) and decode and augment afterwards with
    `.map(..., num_parallel_calls=tf.data.AUTOTUNE)` and `.prefetch(...)`, as in the example.
    Every element must have the same shape (they are stacked), and the source dataset is
    iterated eagerly once, so it must be finite.

    Distribution: with `strategy.experimental_distribute_dataset`, every global batch is
    balanced, but by default a replica's share of it (a consecutive slice) is not. Pass
    `num_replicas=strategy.num_replicas_in_sync` to lay each global batch out as
    `num_replicas` consecutive balanced sub-batches, each holding
    `examples_per_class // num_replicas` examples of every class, so that every replica's
    local batch is balanced too.

    Args:
        dataset: A finite `tf.data.Dataset` of unbatched `(features, label)` or
            `(features, label, sample_weight)` tuples. `features` may be any nested structure
            of tensors. `label` is an integer class id (shape `()` or `(1,)`) or a one-hot
            vector of shape `(num_classes,)`; it is passed through unchanged.
        num_classes: Positive int, the number of classes; labels must lie in
            `[0, num_classes)`.
        examples_per_class: Positive int, the number of examples of each class in every batch.
        policy: One of `"drop"`, `"oversample"` or `"strict"`: what to do when classes have
            different numbers of examples (see above).
        seed: Optional int. With a seed the sequence of epochs is reproducible; without one,
            each run draws different orders.
        num_replicas: Positive int that divides `examples_per_class`; each global batch is laid
            out as this many consecutive balanced sub-batches (see "Distribution" above).

    Returns:
        A `tf.data.Dataset` of batches with the same structure as `dataset`'s elements, a
        static batch size of `examples_per_class * num_classes` and a known cardinality (the
        number of batches per epoch).

    Raises:
        ValueError: If an argument is invalid, if a label lies outside `[0, num_classes)`, if
            a class has fewer than `examples_per_class` examples, if `policy="strict"` and the
            classes are imbalanced, or if `dataset` is infinite.
        TypeError: If an argument has the wrong type.

    Example:

    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from keras_norm.data import balanced_batches
    >>> images = np.zeros((60, 8, 8, 3), dtype="uint8")
    >>> labels = np.repeat(np.arange(3), 20)
    >>> source = tf.data.Dataset.from_tensor_slices((images, labels))
    >>> def augment(images, labels):
    ...     images = tf.image.convert_image_dtype(images, tf.float32)
    ...     return tf.image.random_flip_left_right(images), labels
    >>> train = (
    ...     balanced_batches(source, num_classes=3, examples_per_class=4, seed=0)
    ...     .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ...     .prefetch(tf.data.AUTOTUNE)
    ... )
    >>> int(train.cardinality())
    5
    >>> for _, batch_labels in train.take(1):
    ...     print(np.bincount(batch_labels.numpy(), minlength=3))
    [4 4 4]

    To decode one example at a time (for example from file paths), unbatch, map and batch
    again. tf.data keeps the order (unless `deterministic=False` is set), and every epoch holds
    a whole number of batches, so the batches stay balanced:

    >>> batch_size = 3 * 4
    >>> per_example = (
    ...     balanced_batches(source, num_classes=3, examples_per_class=4, seed=0)
    ...     .unbatch()
    ...     .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ...     .batch(batch_size, drop_remainder=True)
    ...     .prefetch(tf.data.AUTOTUNE)
    ... )
    """
    _validate_arguments(dataset, num_classes, examples_per_class, policy, seed, num_replicas)
    label_position = _label_position(dataset.element_spec)
    elements = _materialise(dataset)
    class_ids = _class_ids(elements[label_position], num_classes)
    class_counts = np.bincount(class_ids, minlength=num_classes)
    _check_class_counts(class_counts, examples_per_class, policy)
    num_batches = _num_batches(class_counts, examples_per_class, policy)

    plan_epoch = _epoch_planner(
        class_ids, class_counts, examples_per_class, num_batches, num_replicas
    )
    return _gathered_batches(elements, plan_epoch, num_batches, seed)


def _gathered_batches(elements, plan_epoch, num_batches, seed):
    """One epoch per iteration: plan it from a fresh seed, then gather batch by batch."""
    # `rerandomize_each_iteration` draws a new seed pair each time the dataset is iterated
    # (including each pass of `.repeat()`), reproducibly under `seed`: every epoch gets a new
    # plan without any Python-side state.
    epoch_seed = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    epoch_seed = epoch_seed.batch(2, drop_remainder=True).take(1)
    index_rows = epoch_seed.flat_map(
        lambda seed_pair: tf.data.Dataset.from_tensor_slices(plan_epoch(seed_pair))
    )

    def gather_batch(indices):
        return tf.nest.map_structure(lambda tensor: tf.gather(tensor, indices), elements)

    # deterministic=True keeps the batch order reproducible under `seed` even when the user's
    # options allow non-deterministic maps (balance does not depend on it).
    batches = index_rows.map(
        gather_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return batches.apply(tf.data.experimental.assert_cardinality(num_batches))


# ---------------------------------------------------------------------------------------------
# Argument checks


def _argument_error(error_type, name, requirement, value):
    return error_type(
        f"`balanced_batches`: argument `{name}` must be {requirement}. "
        f"Received: {name}={value!r}"
    )


def _is_integer(value):
    # bool is an int subclass, but `examples_per_class=True` is a bug, not the number 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_positive_integer(name, value):
    if not _is_integer(value):
        raise _argument_error(TypeError, name, "a positive integer", value)
    if value < 1:
        raise _argument_error(ValueError, name, "a positive integer", value)


def _validate_arguments(dataset, num_classes, examples_per_class, policy, seed, num_replicas):
    if not isinstance(dataset, tf.data.Dataset):
        raise _argument_error(TypeError, "dataset", "a `tf.data.Dataset`", dataset)
    _check_positive_integer("num_classes", num_classes)
    _check_positive_integer("examples_per_class", examples_per_class)
    _check_positive_integer("num_replicas", num_replicas)
    if not isinstance(policy, str) or policy not in POLICIES:
        raise _argument_error(ValueError, "policy", f"one of {POLICIES}", policy)
    if seed is not None and not _is_integer(seed):
        raise _argument_error(TypeError, "seed", "None or an integer", seed)
    if examples_per_class % num_replicas:
        raise ValueError(
            "`balanced_batches`: `examples_per_class` must be divisible by `num_replicas`, so "
            "that each replica's share of a global batch holds the same number of examples of "
            "every class. Use a multiple of num_replicas for examples_per_class. "
            f"Received: examples_per_class={examples_per_class}, num_replicas={num_replicas}"
        )
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "`balanced_batches`: argument `dataset` must be finite (one epoch of examples); "
            "apply `.repeat()` to the balanced dataset instead. "
            "Received: dataset with infinite cardinality"
        )


def _label_position(element_spec):
    if isinstance(element_spec, tuple) and len(element_spec) in (2, 3):
        if isinstance(element_spec[1], tf.TensorSpec):
            return 1
    raise ValueError(
        "`balanced_batches`: argument `dataset` must yield `(features, label)` or "
        "`(features, label, sample_weight)` tuples with a tensor label. "
        f"Received: dataset.element_spec={element_spec}"
    )


# ---------------------------------------------------------------------------------------------
# Construction: read the dataset once and check its labels


def _materialise(dataset):
    """Reads every element of `dataset` into one stacked tensor per component."""
    chunks = []
    try:
        for chunk in dataset.batch(_MATERIALISE_CHUNK):
            chunks.append(chunk)
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(
            "`balanced_batches`: could not stack the elements of `dataset` into tensors; all "
            "elements must have the same shape. Balance the light, fixed-shape data (for "
            "example file paths and labels) and decode or resize afterwards with `.map()`. "
            f"Received: dataset.element_spec={dataset.element_spec}"
        ) from error
    if not chunks:
        raise ValueError(
            "`balanced_batches`: argument `dataset` is empty; it must hold at least "
            "examples_per_class examples of every class. Received: dataset with 0 elements"
        )
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *chunks)


def _class_ids(labels, num_classes):
    """Returns the int64 class id of every example as a NumPy vector, checking the labels.

    `labels` is the stacked label tensor; its concrete shape is used, so labels whose spec has
    an unknown shape are handled too.
    """
    label_shape = tuple(labels.shape[1:])
    if label_shape in ((), (1,)):
        class_ids = _integer_class_ids(labels)
    elif label_shape == (num_classes,):
        class_ids = _one_hot_class_ids(labels.numpy())
    else:
        raise ValueError(
            "`balanced_batches`: each label must be an integer class id of shape () or (1,), "
            f"or a one-hot vector of shape ({num_classes},) for num_classes={num_classes} "
            "(unbatch a batched dataset first). "
            f"Received: label shape={label_shape}"
        )
    outside = (class_ids < 0) | (class_ids >= num_classes)
    if outside.any():
        positions = np.flatnonzero(outside)
        raise ValueError(
            f"`balanced_batches`: every label must lie in [0, num_classes) = "
            f"[0, {num_classes}); {positions.size} do not (first at example "
            f"{positions[0]}). Received: labels {sorted(set(class_ids[positions].tolist()))[:10]}"
        )
    return class_ids


def _integer_class_ids(labels):
    if not labels.dtype.is_integer:
        raise TypeError(
            "`balanced_batches`: class-id labels must have an integer dtype (or be one-hot "
            f"vectors). Received: label dtype={labels.dtype.name}"
        )
    return labels.numpy().reshape(-1).astype(np.int64)


def _one_hot_class_ids(labels):
    is_one_hot = ((labels == 0) | (labels == 1)).all(axis=1) & (labels.sum(axis=1) == 1)
    if not is_one_hot.all():
        position = int(np.flatnonzero(~is_one_hot)[0])
        raise ValueError(
            "`balanced_batches`: vector labels must be one-hot (a single 1, zeros elsewhere). "
            f"Received: label {labels[position].tolist()} at example {position}"
        )
    return labels.argmax(axis=1).astype(np.int64)


def _describe_counts(class_counts):
    return ", ".join(f"class {c}: {n}" for c, n in enumerate(class_counts.tolist()))


def _check_class_counts(class_counts, examples_per_class, policy):
    too_few = np.flatnonzero(class_counts < examples_per_class)
    if too_few.size:
        listed = ", ".join(f"class {c}: {class_counts[c]}" for c in too_few.tolist())
        raise ValueError(
            f"`balanced_batches`: every class needs at least examples_per_class="
            f"{examples_per_class} examples to fill one balanced batch, but some have fewer "
            f"({listed}). Lower examples_per_class or check num_classes and the labels. "
            f"Received: class counts {{{_describe_counts(class_counts)}}}"
        )
    if policy == "strict" and class_counts.min() != class_counts.max():
        raise ValueError(
            "`balanced_batches`: policy='strict' requires every class to have the same number "
            "of examples, but the classes are imbalanced. Use policy='drop' or "
            "policy='oversample' to balance them. "
            f"Received: class counts {{{_describe_counts(class_counts)}}}"
        )


def _num_batches(class_counts, examples_per_class, policy):
    if policy == "oversample":
        return int(-(-class_counts.max() // examples_per_class))  # ceil: use the largest class.
    return int(class_counts.min() // examples_per_class)


# ---------------------------------------------------------------------------------------------
# Per-epoch plan: which example goes into which batch position


def _epoch_planner(class_ids, class_counts, examples_per_class, num_batches, num_replicas):
    """Returns `plan(epoch_seed)`, the `(num_batches, batch_size)` example indices of an epoch.

    `epoch_seed` is a stateless seed, shape `(2,)`. All shapes are fixed at construction, so
    the plan's static shape is known and `experimental_distribute_dataset` can split its
    batches.

    Everything that does not depend on the seed is computed here, once, in NumPy: each op left
    in `plan` is instantiated again whenever an iterator is created (every epoch), at a cost of
    roughly a millisecond per op, which is noticeable on small datasets.
    """
    slots_per_class = num_batches * examples_per_class
    slot_positions = _slot_positions(class_counts, slots_per_class)  # (C, slots)
    pass_of_slot = _pass_of_slot(class_counts, slots_per_class)  # (C, slots)
    batch_layout = _batch_layout(class_counts.size, examples_per_class, num_batches,
                                 num_replicas)  # (batches, replicas, sub-batch) flat slot ids
    if pass_of_slot.max() > 0:
        pass_noise_size = pass_of_slot.size
        layout_for = _reshuffled_passes_layout(slot_positions, pass_of_slot, batch_layout)
    else:
        pass_noise_size = 0
        layout_for = _single_pass_layout(slot_positions, batch_layout)
    noise_sizes = [class_ids.size, pass_noise_size, batch_layout.size]
    class_keys = tf.constant(_group_keys(class_ids))

    def plan(epoch_seed):
        class_noise, pass_noise, batch_noise = tf.split(
            _uniform_noise(epoch_seed, sum(noise_sizes)), noise_sizes
        )
        # Grouped by class (keys of class c lie in (-2c - 1, -2c]), random order within.
        by_class = _descending_order(class_keys - class_noise)
        layout = layout_for(pass_noise)  # positions in `by_class`, batch by batch
        within_batch = _descending_order(tf.reshape(batch_noise, layout.shape))
        rows = tf.gather(layout, within_batch, batch_dims=2)
        return tf.gather(by_class, tf.reshape(rows, [num_batches, -1]))

    return plan


def _single_pass_layout(slot_positions, batch_layout):
    """No class is oversampled: which class position each batch slot reads is fixed."""
    layout = tf.constant(slot_positions.reshape(-1)[batch_layout])
    return lambda unused_pass_noise: layout


def _reshuffled_passes_layout(slot_positions, pass_of_slot, batch_layout):
    """Oversampling: shuffles each pass over a class separately, every epoch."""
    pass_keys = tf.constant(_group_keys(pass_of_slot))
    slot_positions = tf.constant(slot_positions)
    batch_layout = tf.constant(batch_layout)

    def layout_for(pass_noise):
        pass_order = _descending_order(pass_keys - tf.reshape(pass_noise, pass_keys.shape))
        positions = tf.gather(slot_positions, pass_order, batch_dims=1)
        return tf.gather(tf.reshape(positions, [-1]), batch_layout)

    return layout_for


def _slot_positions(class_counts, slots_per_class):
    """Where, in the examples sorted by class, each class's slots take their example from.

    Slot `j` of a class with `n` examples takes the class's example `j mod n`. With at least as
    many examples as slots (every policy but oversampling) that is a prefix of the class's
    (freshly shuffled) examples, so each example is used at most once. With fewer, the slots
    make `ceil(slots / n)` passes over the class; `plan` shuffles each pass separately, so an
    oversampled class does not meet the same partners in every pass, and the last, partial
    pass takes a random subset of the class.
    """
    counts = class_counts[:, None]
    class_starts = np.cumsum(counts, axis=0) - counts  # where each class begins when sorted
    return class_starts + np.arange(slots_per_class)[None, :] % counts


def _pass_of_slot(class_counts, slots_per_class):
    """Which pass over its class each slot belongs to (see `_slot_positions`)."""
    return np.arange(slots_per_class)[None, :] // class_counts[:, None]


def _batch_layout(num_classes, examples_per_class, num_batches, num_replicas):
    """Deals the `(class, slot)` pairs, as flat ids, into batches of balanced sub-batches.

    Batch `i`, sub-batch `r` holds slots `[i * k + r * k / R, i * k + (r + 1) * k / R)` of every
    class (`k` examples per class, `R` replicas), so every sub-batch, and hence every batch, is
    balanced before the order within it is shuffled.
    """
    per_replica = examples_per_class // num_replicas
    slot_ids = np.arange(num_classes * num_batches * examples_per_class)
    slot_ids = slot_ids.reshape(num_classes, num_batches, num_replicas, per_replica)
    return slot_ids.transpose(1, 2, 0, 3).reshape(num_batches, num_replicas, -1)


def _group_keys(groups):
    """Sort keys `-2 * group`: minus noise in [0, 1) they sort group 0 first, randomly within.

    The factor 2 leaves a gap of 1 between groups, so float64 rounding can never move an
    element into a neighbouring group; within a group, rare ties only keep index order.
    """
    return -2.0 * np.asarray(groups, dtype=np.float64)


def _uniform_noise(seed, size):
    """`size` stateless uniform float64 values in [0, 1).

    The raw ops are `tf.random.stateless_uniform` without its rescaling to [minval, maxval),
    which [0, 1) does not need (fewer ops per epoch, see `_epoch_planner`).
    """
    key, counter, algorithm = tf.raw_ops.StatelessRandomGetKeyCounterAlg(seed=seed)
    return tf.raw_ops.StatelessRandomUniformV2(
        shape=[size], key=key, counter=counter, alg=algorithm, dtype=tf.float64
    )


def _descending_order(keys):
    """Indices that sort the last axis of `keys` in descending order (a full `top_k`)."""
    return tf.math.top_k(keys, k=keys.shape[-1]).indices
