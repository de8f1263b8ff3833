"""The one training path of the recipes: one custom loop for every distribution strategy.

`fit` is the loop (epochs, checkpoints and resume, logs, divergence); `train` is `fit` plus
the evaluation modes and the results of a `recipes.cifar` run; every trial of `recipes.tune`
is a `fit` on its training images, tested on its validation images (`split_validation`).

Keras 3's `Model.fit` fails under `MultiWorkerMirroredStrategy` (keras issue #20585), so the
recipes train with their own step, run by `strategy.run` inside a `tf.function`, for the default
strategy, `MirroredStrategy` and `MultiWorkerMirroredStrategy` alike. It keeps what `fit` gives:
a `keras.utils.Progbar`, TensorBoard and CSV logs, and checkpoints.

The recipe, in short:

- Loss: sparse softmax cross-entropy on float32 logits, averaged over the *global* batch
  (`tf.nn.compute_average_loss`), since the optimizer sums the replicas' gradients.
- Learning rate: `lr` is the rate at a reference batch of 128 and is scaled linearly with the
  global batch (`lr * batch_size / 128`, Goyal et al. 2017). Schedule `"cosine"`: optional
  linear warm-up over `warmup_epochs`, then cosine decay to 0 at the last step; `"constant"`:
  the scaled rate throughout. Extending `epochs` on resume stretches the schedule.
- Optimizers: `"sgd"` (momentum 0.9, Nesterov off) or `"adamw"`. Weight decay is decoupled
  (the Keras optimizers' `weight_decay`) and applies only to convolution and dense kernels,
  never to normalization parameters or biases.
- Mixed precision: the `mixed_float16` policy (float32 normalization statistics and logits)
  with a dynamic `LossScaleOptimizer`.
- Data order: the training pipeline of epoch `e` is built with the seed `seed * 1000 + e`, so
  a resumed run sees exactly the batches and augmentations it would have seen without the
  interruption, without saving iterator state. With balanced batches under a strategy, each
  replica's slice of a global batch is balanced too when the replicas divide k.
- After every epoch the test set is evaluated with the population statistics (the `test_`
  columns of the logs and the curves), in batches of `batch_size`.
- Checkpoints (`tf.train.CheckpointManager` in `OUTPUT/checkpoints`): model, optimizer (its
  step counter drives the schedule) and the number of finished epochs, written after every
  epoch. Started again with the same command, a run restores the latest one and continues
  with the next epoch; at most the interrupted epoch is lost.
- Multi-worker (`TF_CONFIG`): every worker trains in lock step; the chief (task `chief`, or
  worker 0 when there is none) writes the checkpoints, logs and reports into `OUTPUT`, the
  other workers write their checkpoints into a temporary folder that is removed again (the
  pattern TensorFlow documents) and their final model and results into `OUTPUT/worker-<i>`.
  All workers resume from the chief's checkpoints, so `OUTPUT` must be on a shared file
  system when the workers run on different machines. When one worker dies, TensorFlow's
  health check aborts the others' collectives and they stop with `WorkerLostError`; starting
  every worker again resumes the run. `python -m recipes.launch` runs a cluster on one machine.
- Elsewhere: the strategy and its devices (`create_strategy`) are `recipes.distribution`'s;
  the output folder's file names, logs and recorded settings `recipes.outputs`'s; the
  evaluation modes that `train` runs after training `recipes.evaluation_modes`'s.

Deprecated here (moved; `MOVED`): `RunConfig`, `ConfigError`, `BATCH_STRUCTURES`, `EVAL_MODES`,
`OPTIMIZERS`, `SCHEDULES`, `STRATEGIES` (now in `recipes.config`); `configure_cpu_replicas`,
`create_strategy` (`recipes.distribution`); `CSV_NAME`, `RUN_CONFIG_NAME`, `CSV_FIELDS`,
`RUN_FOLDERS`, `RUN_FILES`, `clear_outputs`, `check_resumable` (`recipes.outputs`);
`resolve_eval_modes`, `evaluate_modes` (`recipes.evaluation_modes`). They still work from here
until the next release, with a DeprecationWarning naming their new module.
"""

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from recipes import config as run_config
from recipes import evaluation_modes, outputs

#: Names that moved out of this module -> their module now (see `__getattr__`).
MOVED = {
    **dict.fromkeys(("BATCH_STRUCTURES", "EVAL_MODES", "OPTIMIZERS", "SCHEDULES", "STRATEGIES",
                     "ConfigError", "RunConfig"), "recipes.config"),
    **dict.fromkeys(("configure_cpu_replicas", "create_strategy"), "recipes.distribution"),
    **dict.fromkeys(("evaluate_modes", "resolve_eval_modes"), "recipes.evaluation_modes"),
    **dict.fromkeys(("CSV_FIELDS", "CSV_NAME", "RUN_CONFIG_NAME", "RUN_FILES", "RUN_FOLDERS",
                     "check_resumable", "clear_outputs"), "recipes.outputs"),
}


def __getattr__(name):
    """The old path of a moved name (`MOVED`) still works, with a DeprecationWarning."""
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Imported here, not at the top: keras_norm imports TensorFlow.
    from keras_norm import _deprecated

    return _deprecated.forward(__name__, name, MOVED)


REFERENCE_BATCH_SIZE = 128
#: Settings that must not change when a run is resumed from its checkpoints.
RESUME_KEYS = ("model", "norm", "norm_kwargs", "placement", "other_norm", "head_norm",
               "source", "train_size", "batch_size", "batch_structure", "examples_per_class",
               "optimizer", "mixed_precision", "seed")


class WorkerLostError(RuntimeError):
    """Multi-worker training stopped because another worker of the cluster stopped."""


@dataclasses.dataclass
class Trained:
    """What `fit` returns.

    Attributes:
        model: The trained model (under the strategy), at the last finished epoch when
            training diverged.
        history: One row of `CSV_FIELDS` per finished epoch, resumed ones included (the
            chief's; empty on other workers). `test_` columns are of `data`'s test split.
        start_epoch: Epochs already finished when this call started (resume).
        diverged_at: The 1-based epoch whose training loss was not finite, or None.
        steps_per_epoch: Training steps per epoch.
        replicas: Replicas of the strategy.
    """

    model: object
    history: list
    start_epoch: int
    diverged_at: int
    steps_per_epoch: int
    replicas: int


# ------------------------------------------------------------------------------------- data
def load_images(source):
    """Loads a data set (see `recipes.datasets.load_data`); a missing source is a
    `ConfigError`."""
    from recipes import datasets

    try:
        return datasets.load_data(source)
    except (ValueError, OSError) as err:  # DataNotFoundError is a ValueError
        raise run_config.ConfigError(str(err)) from None


def shrink(data, config):
    """The class-balanced `train_size`/`test_size` subset of `data` (seeded by `seed`)."""
    from recipes import datasets

    if not (config.train_size or config.test_size):
        return data
    try:
        return datasets.subset(data, config.train_size, config.test_size, seed=config.seed)
    except ValueError as err:
        raise run_config.ConfigError(str(err)) from None


def split_validation(data, train_size, val_size, seed):
    """Class-stratified, disjoint training and validation images from the training split.

    A search selects on these (`recipes.tune`), never on the test split.

    Args:
        data: A `recipes.datasets.ImageData`.
        train_size: Training images, or None for all but the validation ones.
        val_size: Validation images.
        seed: Seed of the split.

    Returns:
        An `ImageData` whose training split holds the training images and whose test split
        holds the validation images (original order kept), so that `fit` reports validation
        metrics in its `test_` columns.

    Raises:
        ConfigError: When the training split holds fewer than `train_size + val_size` images.
    """
    from recipes import datasets

    available = len(data.y_train)
    total = (train_size or available - val_size) + val_size
    if val_size >= available or total > available:
        raise run_config.ConfigError(
            f"--train-size {train_size or 'all'} + --val-size {val_size} need more than the "
            f"{available} images of the training split")
    pool = datasets.subset(data, train_size=total, seed=seed) if total < available else data
    x, y = pool.x_train, pool.y_train
    rng = np.random.default_rng([int(seed), 7])
    order = rng.permutation(len(y))
    # Interleave the classes (rank within class / class size), so that any prefix of `order`
    # is class-balanced, and take the validation images from the front.
    rank = np.empty(len(y))
    shuffled = y[order]
    for label in np.unique(shuffled):
        where = np.flatnonzero(shuffled == label)
        rank[where] = (np.arange(len(where)) + 0.5) / len(where)
    order = order[np.argsort(rank, kind="stable")]
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    return datasets.ImageData(x[train], y[train], x[val], y[val], data.class_names,
                              source=data.source)


def examples_per_class(config, num_classes):
    """k of the balanced structure: `--examples-per-class`, else `batch_size / classes`."""
    if config.examples_per_class is not None:
        return config.examples_per_class
    return config.batch_size // num_classes


def validate(config, num_classes):
    """Checks the settings that depend on the data; raises `ConfigError`."""
    if config.batch_structure == "balanced":
        if config.batch_size % num_classes:
            raise run_config.ConfigError(
                f"--batch-structure balanced needs a batch size divisible by the {num_classes} "
                f"classes (k examples of each class); got --batch-size {config.batch_size}")
        k = examples_per_class(config, num_classes)
        if k * num_classes != config.batch_size:
            raise run_config.ConfigError(
                f"--examples-per-class {k} and --batch-size {config.batch_size} disagree: a "
                f"balanced batch holds k x {num_classes} classes = {k * num_classes} images")
    elif config.examples_per_class is not None:
        raise run_config.ConfigError(
            "--examples-per-class only applies with --batch-structure balanced")


def _train_dataset(config, data, epoch, num_replicas):
    """The training batches of `epoch` (0-based), reproducible from `seed` and `epoch`."""
    from recipes import datasets

    balanced = config.batch_structure == "balanced"
    k = examples_per_class(config, data.num_classes)
    # Balance each replica's slice too where the replicas divide k.
    replicas = num_replicas if balanced and k % num_replicas == 0 else 1
    dataset = datasets.make_dataset(
        data.x_train, data.y_train, config.batch_size, training=True, augment=config.augment,
        seed=config.seed * 1000 + epoch, structure=config.batch_structure,
        examples_per_class=k if balanced else None,
        num_classes=data.num_classes if balanced else None, num_replicas=replicas)
    if config.steps_per_epoch:
        dataset = dataset.repeat().take(config.steps_per_epoch)
    return dataset


def steps_per_epoch(config, data):
    if config.steps_per_epoch:
        return config.steps_per_epoch
    if config.batch_structure == "balanced":
        counts = np.bincount(data.y_train, minlength=data.num_classes)
        return int(counts.min()) // examples_per_class(config, data.num_classes)
    return len(data.y_train) // config.batch_size


def test_examples(data):
    """The test split as an unbatched dataset of preprocessed `(image, label)` pairs."""
    import tensorflow as tf
    from recipes import datasets

    return tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).map(
        lambda x, y: (datasets.normalize_images(x), y), num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------- models
def build_model(config, data):
    from recipes import models

    return models.build_model(
        config.model, norm=config.norm, norm_kwargs=config.norm_kwargs,
        placement=config.placement, num_classes=data.num_classes,
        input_shape=data.image_shape, other_norm=config.other_norm,
        head_norm=config.head_norm)


def scaled_learning_rate(config):
    return config.lr * config.batch_size / REFERENCE_BATCH_SIZE


def learning_rate_schedule(config, total_steps, steps_in_epoch):
    """The scaled rate, constant or as a cosine decay to 0 at `total_steps` after
    `warmup_epochs` of linear warm-up from 0 (cosine only)."""
    import keras

    peak = scaled_learning_rate(config)
    if config.schedule != "cosine":
        return peak
    warmup = min(int(round(config.warmup_epochs * steps_in_epoch)), max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(total_steps - warmup, 1), alpha=0.0,
        warmup_target=peak if warmup else None, warmup_steps=warmup)


def make_optimizer(config, total_steps, steps_in_epoch, variables=None):
    """The optimizer and learning-rate schedule of `config` (see the module docstring).

    Args:
        config: A `RunConfig` (`optimizer`, `lr`, `momentum`, `weight_decay`, `schedule`,
            `warmup_epochs`, `batch_size`).
        total_steps: Training steps of the whole run (the cosine decay ends there).
        steps_in_epoch: Steps per epoch (for `warmup_epochs`).
        variables: Optional trainable variables of the model; when given, all but the
            convolution and dense kernels are excluded from weight decay.
    """
    import keras

    learning_rate = learning_rate_schedule(config, total_steps, steps_in_epoch)
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=config.momentum,
                                         weight_decay=config.weight_decay or None)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay)
    if variables is not None:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in variables if v.name != "kernel"])
    return optimizer


def _current_learning_rate(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = inner.learning_rate
    return float(rate.numpy() if hasattr(rate, "numpy") else rate)


# ------------------------------------------------------------------------------ the loop
def _distributed_steps(strategy, model, optimizer, jit, mixed_precision):
    """Builds the `tf.function`s running one training / evaluation step on every replica.

    Each returns the batch's summed loss, number of correct predictions and example count,
    summed over replicas.
    """
    import tensorflow as tf

    def per_example_loss(labels, logits):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.cast(labels, tf.int32), tf.cast(logits, tf.float32))

    def totals(labels, logits, losses):
        labels = tf.cast(labels, tf.int64)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.reduce_sum(losses), correct, count

    def train_fn(images, labels):
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            losses = per_example_loss(labels, logits)
            loss = tf.nn.compute_average_loss(losses)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss) if mixed_precision else loss
        gradients = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return totals(labels, logits, losses)

    def test_fn(images, labels):
        logits = model(images, training=False)
        return totals(labels, logits, per_example_loss(labels, logits))

    if jit:
        train_fn = tf.function(train_fn, jit_compile=True)
        test_fn = tf.function(test_fn, jit_compile=True)

    def reduced(fn):
        def step(batch):
            results = strategy.run(fn, args=batch)
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                    for value in results]
        return tf.function(step)

    return reduced(train_fn), reduced(test_fn)


def _run_epoch(step, dataset, progbar=None):
    """Runs `step` on every batch; returns the mean loss and the accuracy over the examples."""
    import tensorflow as tf

    totals = np.zeros(3)  # summed loss, correct predictions, examples
    try:
        for index, batch in enumerate(dataset, start=1):
            totals += [float(value) for value in step(batch)]
            loss_sum, correct, count = totals
            if progbar is not None:
                progbar.update(index, [("loss", loss_sum / count),
                                       ("accuracy", correct / count)], finalize=False)
    except tf.errors.UnavailableError as err:
        # TensorFlow's health check aborts the collectives of every worker when one stops:
        # say what to do instead of a page of collective-op traceback.
        tasks = [line.strip() for line in str(err).splitlines()
                 if line.strip().startswith("/job:")]
        raise WorkerLostError(
            "another worker of the cluster stopped (TensorFlow's health check: "
            f"{', '.join(tasks) or 'a task'} stopped sending heartbeats); start every worker "
            "again with the same command: they resume from the chief's last checkpoint"
        ) from None
    loss_sum, correct, count = totals
    if count == 0:
        return math.nan, math.nan
    return loss_sum / count, correct / count


def _print(config, is_chief, message):
    if is_chief and config.verbose:
        print(message, flush=True)


def fit(config, data, strategy, is_chief=True, worker_id=0, start_from=None):
    """Trains (or resumes) a model: the one training loop of the recipes.

    Every epoch trains on `data`'s training split, evaluates its test split with population
    statistics, logs both (CSV, TensorBoard) and writes a checkpoint into
    `config.output/checkpoints`; a run started again on the same output continues after its
    last finished epoch. A non-finite training loss stops training (see `Trained`).

    Args:
        config: A `RunConfig` (validated: see `validate`).
        data: The `recipes.datasets.ImageData` to train and test on (a search passes its
            validation images as the test split).
        strategy: A `tf.distribute.Strategy` (see `create_strategy`).
        is_chief: Whether this process writes the outputs (multi-worker).
        worker_id: This worker's index (multi-worker), for its scratch checkpoints.
        start_from: A checkpoint (path prefix) of another run of the same model, optimizer
            and batch size to start from when `config.output` holds none: Hyperband's
            continued trials start where the trial they continue stopped.

    Returns:
        A `Trained`.
    """
    import keras
    import tensorflow as tf

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    outputs.check_resumable(output / outputs.RUN_CONFIG_NAME, config.to_dict(), RESUME_KEYS,
                            "run", write=is_chief)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(config.seed)
    epoch_steps = steps_per_epoch(config, data)
    if epoch_steps < 1:
        raise run_config.ConfigError(
            f"an epoch would hold no batch: {len(data.y_train)} training images for "
            f"--batch-size {config.batch_size}")
    model, optimizer, checkpoint, latest = _restore_or_create(
        config, data, strategy, output, epoch_steps, start_from)
    start_epoch = int(checkpoint.finished_epochs.numpy())
    if start_epoch:
        _print(config, is_chief, f"Resuming from {latest}: {start_epoch}/{config.epochs} epochs "
                                 "already done.")
    logs = outputs._Logs(output, is_chief)
    logs.restore(start_epoch)
    manager = (tf.train.CheckpointManager(checkpoint, str(output / "checkpoints"),
                                          max_to_keep=2) if is_chief else None)
    train_step, test_step = _distributed_steps(strategy, model, optimizer, config.jit,
                                               config.mixed_precision)
    test_batches = test_examples(data).batch(config.batch_size)
    distributed_test = strategy.experimental_distribute_dataset(test_batches)
    diverged_at = None
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.time()
        _print(config, is_chief, f"Epoch {epoch + 1}/{config.epochs}")
        progbar = None
        if is_chief and config.verbose:
            progbar = keras.utils.Progbar(epoch_steps, verbose=config.verbose,
                                          stateful_metrics=["loss", "accuracy"])
        train_batches = strategy.experimental_distribute_dataset(
            _train_dataset(config, data, epoch, strategy.num_replicas_in_sync))
        loss, accuracy = _run_epoch(train_step, train_batches, progbar)
        if not math.isfinite(loss):
            # Every later step would only propagate NaN: stop, keep the last good checkpoint,
            # and say so (results.json records the epoch).
            diverged_at = epoch + 1
            _print(config, is_chief, f"Training diverged in epoch {diverged_at}: the mean "
                                     f"training loss is {loss}. Stopping. Lower --lr or "
                                     "normalize more layers.")
            break
        test_loss, test_accuracy = _run_epoch(test_step, distributed_test)
        if progbar is not None:
            progbar.update(epoch_steps, [("loss", loss), ("accuracy", accuracy),
                                         ("test_loss", test_loss),
                                         ("test_accuracy", test_accuracy)], finalize=True)
        checkpoint.finished_epochs.assign(epoch + 1)
        logs.add({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy,
                  "test_loss": test_loss, "test_accuracy": test_accuracy,
                  "learning_rate": _current_learning_rate(optimizer),
                  "seconds": time.time() - epoch_started})
        _save_checkpoint(checkpoint, manager, output, worker_id)

    if diverged_at is not None:
        last_good = tf.train.latest_checkpoint(str(output / "checkpoints"))
        if last_good:
            checkpoint.restore(last_good)  # every worker: the weights must stay identical
        _print(config, is_chief, f"Evaluating the weights after epoch {diverged_at - 1}, the "
                                 "last finished one." if last_good else
                                 "No epoch finished: the evaluation is of the diverged weights.")
    return Trained(model=model, history=logs.rows, start_epoch=start_epoch,
                   diverged_at=diverged_at, steps_per_epoch=epoch_steps,
                   replicas=strategy.num_replicas_in_sync)


def train(config, data, strategy, is_chief=True, worker_id=0):
    """Trains (or resumes) with `fit`, then evaluates; returns `(results, folder)`: the
    results dict that `recipes.report` writes, and the folder this worker wrote its outputs
    to.

    Args:
        config: A `RunConfig` (validated: see `validate`).
        data: The `recipes.datasets.ImageData` to train and test on.
        strategy: A `tf.distribute.Strategy` (see `create_strategy`).
        is_chief: Whether this process writes the outputs (multi-worker).
        worker_id: This worker's index (multi-worker), for its own output folder.
    """
    import keras
    import tensorflow as tf

    started = time.time()
    trained = fit(config, data, strategy, is_chief, worker_id)
    model = trained.model
    # Every worker reads the weights at the same point: under MultiWorkerMirroredStrategy,
    # reading replica-averaged statistics is a collective operation.
    eval_model = build_model(config, data)
    eval_model.set_weights(model.get_weights())
    output = Path(config.output)
    folder = output if is_chief else output / f"worker-{worker_id}"
    folder.mkdir(parents=True, exist_ok=True)
    eval_model.save(folder / "model.keras")
    eval_model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    results = {
        "config": config.to_dict(),
        "data": {"source": data.source, "train_images": int(len(data.y_train)),
                 "test_images": int(len(data.y_test)), "num_classes": data.num_classes,
                 "class_names": list(data.class_names)},
        "model": {"name": model.name, "parameters": int(model.count_params()),
                  "norm_layers": [layer.name for layer in model.layers
                                  if layer.name.endswith("_norm")]},
        "training": {"strategy": config.strategy, "replicas": trained.replicas,
                     "global_batch_size": config.batch_size,
                     "learning_rate": scaled_learning_rate(config),
                     "steps_per_epoch": trained.steps_per_epoch,
                     "resumed_at_epoch": trained.start_epoch,
                     "diverged_at_epoch": trained.diverged_at, "history": trained.history},
    }
    if is_chief:
        results["evaluation"], results["skipped_evaluation"] = evaluation_modes.evaluate_modes(
            config, data, eval_model)
    else:
        results["evaluation"] = {"population": eval_model.evaluate(
            test_examples(data).batch(config.batch_size), verbose=0, return_dict=True)}
    results["seconds"] = time.time() - started
    results["versions"] = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return results, folder


def _restore_or_create(config, data, strategy, output, epoch_steps, start_from=None):
    """Model, optimizer and a `tf.train.Checkpoint` of both plus `finished_epochs`, restored
    from the latest checkpoint in `output/checkpoints`, else from `start_from` if given."""
    import keras
    import tensorflow as tf

    with strategy.scope():
        model = build_model(config, data)
        optimizer = make_optimizer(config, epoch_steps * config.epochs, epoch_steps,
                                   model.trainable_variables)
        if config.mixed_precision:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Built before restoring, so that the slots are restored too.
        optimizer.build(model.trainable_variables)
    finished = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, finished_epochs=finished)
    latest = tf.train.latest_checkpoint(str(output / "checkpoints")) or start_from
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    return model, optimizer, checkpoint, latest


def _save_checkpoint(checkpoint, manager, output, worker_id):
    """The chief saves into `OUTPUT/checkpoints`; other workers save too (the save is
    collective) but into a temporary folder they delete again."""
    if manager is not None:
        manager.save(checkpoint_number=int(checkpoint.finished_epochs.numpy()))
        return
    scratch = Path(tempfile.mkdtemp(prefix=f".worker-{worker_id}-", dir=output))
    try:
        checkpoint.write(str(scratch / "ckpt"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
