"""Balanced-batch input pipelines (batch structure, Hajaj & Gillies 2018, arXiv:1802.07590).

`balanced_batches` turns a finite `tf.data.Dataset` of `(features, label)` pairs into one whose
every batch holds exactly `examples_per_class` examples of each class. See ALGORITHMS.md
section 6 for why batch structure matters to batch normalization.
"""

import numbers

import numpy as np
import tensorflow as tf

POLICIES = ("drop", "oversample", "strict")

# Elements are read out of the source dataset in chunks of this many, so that materialising it
# costs Python overhead per chunk, not per example.
_MATERIALISE_CHUNK = 4096

# Salts that turn one per-epoch seed into independent seeds for each random draw of a plan.
_SEED_SALT_CLASS_ORDER = 1
_SEED_SALT_TILE_ORDER = 2
_SEED_SALT_BATCH_ORDER = 3


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
    examples, so the (finite) dataset is read once, at construction, into one in-memory tensor
    per feature; batching is then a `tf.gather` of index rows. Per epoch, a plan of indices is
    computed with vectorised, stateless TF ops from a per-epoch seed (drawn by
    `tf.data.Dataset.random(..., rerandomize_each_iteration=True)`): shuffle the examples of
    each class, cut each class into `(num_batches, examples_per_class)` slots, interleave the
    classes and shuffle within each batch. This keeps the cost of an epoch to one sort of the
    labels plus one gather per batch, instead of filtering the dataset once per class.

    Memory cost: the whole source dataset is held in host memory once (for CIFAR-10's 50,000
    uint8 training images about 147 MiB), plus 8 bytes per example for the labels and for each
    epoch's index plan. Tensors larger than 2 GB cannot be serialized into a dataset graph, which
    some distributed set-ups do. So balance a light dataset (file paths, encoded bytes or uint8
    arrays, with their labels) and decode and augment afterwards with
    `.map(..., num_parallel_calls=tf.data.AUTOTUNE)` and `.prefetch(...)`, as in the example.
    Every element must have the same shape (they are stacked); the source dataset is
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
    class_ids = _class_ids(elements[label_position], dataset.element_spec[label_position],
                           num_classes)
    class_counts = np.bincount(class_ids, minlength=num_classes)
    _check_class_counts(class_counts, examples_per_class, policy)
    num_batches = _num_batches(class_counts, examples_per_class, policy)

    plan_epoch = _epoch_planner(
        class_ids, class_counts, examples_per_class, num_batches, num_replicas
    )
    # One stateless seed pair per iteration: `rerandomize_each_iteration` draws a new pair each
    # time the dataset is iterated (including each pass of `.repeat()`), reproducibly under
    # `seed`, so every epoch gets a new plan without any Python-side state.
    epoch_seeds = tf.data.Dataset.random(seed=0, rerandomize_each_iteration=True)
    epoch_seeds = epoch_seeds.batch(2, drop_remainder=True).take(1)
    index_rows = epoch_seeds.flat_map(
        lambda epoch_seed: tf.data.Dataset.from_tensor_slices(plan_epoch(epoch_seed))
    )

    def gather_batch(indices):
        return tf.nest.map_structure(lambda tensor: tf.gather(tensor, indices), elements)

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
        # An empty dataset: keep the structure (zero examples) so the count check reports it.
        return tf.nest.map_structure(
            lambda spec: tf.zeros([0] + spec.shape.as_list(), spec.dtype), dataset.element_spec
        )
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *chunks)


def _class_ids(labels, label_spec, num_classes):
    """Returns the int64 class id of every example as a NumPy vector, checking the labels."""
    labels = labels.numpy()
    if label_spec.shape.rank == 0 or label_spec.shape.as_list() == [1]:
        class_ids = _integer_class_ids(labels.reshape(-1), label_spec)
    elif label_spec.shape.as_list() == [num_classes]:
        class_ids = _one_hot_class_ids(labels)
    else:
        raise ValueError(
            "`balanced_batches`: labels must be integer class ids of shape () or (1,), or "
            f"one-hot vectors of shape ({num_classes},) for num_classes={num_classes}. "
            f"Received: label shape={label_spec.shape}"
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


def _integer_class_ids(labels, label_spec):
    if not label_spec.dtype.is_integer:
        raise TypeError(
            "`balanced_batches`: class-id labels must have an integer dtype (or be one-hot "
            f"vectors). Received: label dtype={label_spec.dtype.name}"
        )
    return labels.astype(np.int64)


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

    All shapes are fixed at construction, so the plan's static shape is known and
    `experimental_distribute_dataset` can split its batches.
    """
    num_classes = class_counts.size
    slots_per_class = num_batches * examples_per_class
    class_ids = tf.constant(class_ids)
    counts = tf.constant(class_counts[:, None], tf.int64)  # (C, 1)
    # Where each class's examples start once the examples are sorted by class.
    class_starts = tf.constant(np.cumsum(class_counts)[:, None] - class_counts[:, None])

    def plan(epoch_seed):
        seeds = [tf.random.experimental.stateless_fold_in(epoch_seed, salt) for salt in (
            _SEED_SALT_CLASS_ORDER, _SEED_SALT_TILE_ORDER, _SEED_SALT_BATCH_ORDER)]
        by_class = _shuffle_within_classes(class_ids, seeds[0])
        slots = _class_slots(counts, slots_per_class, seeds[1])  # (C, slots), offsets in class
        example_slots = tf.gather(by_class, class_starts + slots)  # (C, slots)
        return _interleave_classes(
            example_slots, num_classes, examples_per_class, num_batches, num_replicas, seeds[2]
        )

    return plan


def _shuffle_within_classes(class_ids, seed):
    """Returns all example indices sorted by class, in a fresh random order within each class."""
    shuffled = tf.random.experimental.stateless_shuffle(
        tf.range(tf.size(class_ids, out_type=tf.int64)), seed
    )
    # A stable sort by class keeps the random order inside each class.
    return tf.gather(shuffled, tf.argsort(tf.gather(class_ids, shuffled), stable=True))


def _class_slots(counts, slots_per_class, seed):
    """Returns, for each class, which of its (shuffled) examples fills each of its slots.

    Slot `j` of a class with `n` examples takes example `j mod n`: with at least as many
    examples as slots (every policy but oversampling) that is a plain prefix, so each example
    is used at most once. With fewer ("oversample"), the slots form `ceil(slots / n)` passes
    over the class; each pass is shuffled separately (sorting by pass + uniform noise), so
    repeats are spread out and the last, partial pass is a random subset of the class.
    """
    slot = tf.range(slots_per_class, dtype=tf.int64)[None, :]  # (1, slots)
    offset_in_class = slot % counts  # (C, slots)
    pass_index = tf.cast(slot // counts, tf.float64)
    noise = tf.random.stateless_uniform(tf.shape(offset_in_class), seed, dtype=tf.float64)
    order_in_pass = tf.argsort(pass_index + noise, axis=1)
    return tf.gather(offset_in_class, order_in_pass, batch_dims=1)


def _interleave_classes(
    example_slots, num_classes, examples_per_class, num_batches, num_replicas, seed
):
    """Arranges per-class slots into batches of `num_replicas` balanced, shuffled sub-batches."""
    per_replica = examples_per_class // num_replicas
    sub_batch_size = per_replica * num_classes
    slots = tf.reshape(example_slots, [num_classes, num_batches, num_replicas, per_replica])
    sub_batches = tf.reshape(
        tf.transpose(slots, [1, 2, 0, 3]), [num_batches, num_replicas, sub_batch_size]
    )
    noise = tf.random.stateless_uniform(tf.shape(sub_batches), seed)
    shuffled = tf.gather(sub_batches, tf.argsort(noise, axis=-1), batch_dims=2)
    return tf.reshape(shuffled, [num_batches, num_replicas * sub_batch_size])
