"""Training for the CIFAR recipe: one custom loop for every distribution strategy.

Keras 3's `Model.fit` fails under `MultiWorkerMirroredStrategy` (keras issue #20585), so the
recipe trains with its own step, run by `strategy.run` inside a `tf.function`, for the default
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
  columns of the logs and the curves).
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
- Evaluation modes run after training on a single-device copy of the trained model (the same
  weights and statistics): `population` (moving statistics), `batch` (random test batches
  normalized with their own statistics), `balanced` (class-balanced test batches, built with
  the labels, normalized with their own statistics: the "conditional" evaluation of Hajaj &
  Gillies 2018), `pseudo_balanced` (balanced by the model's own predicted labels),
  `assignment` (balanced by a class-prior assignment of the test images, no labels) and
  `recomputed` (population statistics recomputed as an equal-weight average over training
  batches, "precise BN").
"""

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE_BATCH_SIZE = 128
EVAL_MODES = ("population", "batch", "balanced", "pseudo_balanced", "assignment", "recomputed")
STRATEGIES = ("default", "mirrored", "multiworker")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BATCH_STRUCTURES = ("random", "balanced")
#: Settings that must not change when a run is resumed from its checkpoints.
RESUME_KEYS = ("model", "norm", "norm_kwargs", "placement", "other_norm", "head_norm",
               "source", "train_size", "batch_size", "batch_structure", "examples_per_class",
               "optimizer", "mixed_precision", "seed")
CSV_NAME = "training_log.csv"
RUN_CONFIG_NAME = "run_config.json"
CSV_FIELDS = ("epoch", "loss", "accuracy", "test_loss", "test_accuracy", "learning_rate",
              "seconds")


class ConfigError(ValueError):
    """A bad setting: the command line reports it in one line and exits with status 2."""


class WorkerLostError(RuntimeError):
    """Multi-worker training stopped because another worker of the cluster stopped."""


@dataclasses.dataclass
class RunConfig:
    """Everything a CIFAR run depends on (the command line fills it; see `recipes.cifar`)."""

    model: str = "small_cnn"
    norm: str = "batch"
    norm_kwargs: dict = dataclasses.field(default_factory=dict)
    placement: str = "all"
    other_norm: str = None
    head_norm: str = None
    source: str = None
    train_size: int = None
    test_size: int = None
    epochs: int = 5
    steps_per_epoch: int = None
    batch_size: int = 128
    batch_structure: str = "random"
    examples_per_class: int = None
    augment: bool = True
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    seed: int = 0
    eval_modes: tuple = ("auto",)
    recompute_steps: int = 200
    strategy: str = "default"
    cpu_replicas: int = None
    jit: bool = False
    mixed_precision: bool = False
    output: str = None
    verbose: int = 1
    stop_after_epochs: int = None

    def to_dict(self):
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ environment
def configure_cpu_replicas(count):
    """Splits the first CPU into `count` logical devices; must run before TensorFlow starts."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        raise ConfigError(f"--cpu-replicas must be set before TensorFlow starts ({err})") from None


def create_strategy(name, jit=False):
    """Returns `(strategy, is_chief, worker_id)` for `"default"|"mirrored"|"multiworker"`."""
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if jit and name != "default" and not has_gpu:
        # Mirrored: XLA cannot reach variables on other logical CPU devices; multi-worker:
        # "Collectives are not yet implemented for CPU devices when compiling with XLA".
        raise ConfigError(f"--jit with --strategy {name} is not supported on CPU by TensorFlow "
                          "(XLA has no CPU collectives); drop --jit or use --strategy default")
    if name == "default":
        return tf.distribute.get_strategy(), True, 0
    if name == "mirrored":
        devices = None if has_gpu else [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices), True, 0
    if not os.environ.get("TF_CONFIG"):
        raise ConfigError("--strategy multiworker needs the TF_CONFIG environment variable "
                          "(cluster and task of this worker); see `--help`")
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
        task = tf_config["task"]
        task_type, task_id = task["type"], int(task["index"])
        cluster = tf_config["cluster"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON with 'cluster' and 'task': {err}") from None
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in cluster)
    worker_id = task_id + (1 if "chief" in cluster and task_type == "worker" else 0)
    return strategy, is_chief, worker_id


# ------------------------------------------------------------------------------------- data
def load_images(source):
    """Loads a data set (see `recipes.datasets.load_data`); a missing source is a
    `ConfigError`."""
    from recipes import datasets

    try:
        return datasets.load_data(source)
    except (ValueError, OSError) as err:  # DataNotFoundError is a ValueError
        raise ConfigError(str(err)) from None


def shrink(data, config):
    """The class-balanced `train_size`/`test_size` subset of `data` (seeded by `seed`)."""
    from recipes import datasets

    if not (config.train_size or config.test_size):
        return data
    try:
        return datasets.subset(data, config.train_size, config.test_size, seed=config.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def examples_per_class(config, num_classes):
    """k of the balanced structure: `--examples-per-class`, else `batch_size / classes`."""
    if config.examples_per_class is not None:
        return config.examples_per_class
    return config.batch_size // num_classes


def validate(config, num_classes):
    """Checks the settings that depend on the data; raises `ConfigError`."""
    if config.batch_structure == "balanced":
        if config.batch_size % num_classes:
            raise ConfigError(
                f"--batch-structure balanced needs a batch size divisible by the {num_classes} "
                f"classes (k examples of each class); got --batch-size {config.batch_size}")
        k = examples_per_class(config, num_classes)
        if k * num_classes != config.batch_size:
            raise ConfigError(
                f"--examples-per-class {k} and --batch-size {config.batch_size} disagree: a "
                f"balanced batch holds k x {num_classes} classes = {k * num_classes} images")
    elif config.examples_per_class is not None:
        raise ConfigError("--examples-per-class only applies with --batch-structure balanced")


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


# --------------------------------------------------------------------------------- logging
class _Logs:
    """CSV and TensorBoard logs of the chief; rows of epochs not checkpointed are dropped."""

    def __init__(self, output, enabled):
        self.enabled = enabled
        self.path = Path(output) / CSV_NAME
        self.rows = []
        if not enabled:
            return
        import tensorflow as tf

        self.writers = {split: tf.summary.create_file_writer(str(Path(output) / "logs" / split))
                        for split in ("train", "test")}

    def restore(self, finished_epochs):
        """Keeps the rows of the checkpointed epochs (a killed run may have logged one more)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as handle:
            rows = [row for row in csv.DictReader(handle)]
        self.rows = [{key: (int(value) if key == "epoch" else float(value))
                      for key, value in row.items()}
                     for row in rows if int(row["epoch"]) <= finished_epochs]
        self._rewrite()

    def _rewrite(self):
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)

    def add(self, row):
        if not self.enabled:
            return
        self.rows.append(row)
        self._rewrite()
        import tensorflow as tf

        for split, prefix in (("train", ""), ("test", "test_")):
            with self.writers[split].as_default(step=row["epoch"]):
                tf.summary.scalar("epoch_loss", row[f"{prefix}loss"])
                tf.summary.scalar("epoch_accuracy", row[f"{prefix}accuracy"])
                if split == "train":
                    tf.summary.scalar("learning_rate", row["learning_rate"])
            self.writers[split].flush()


def clear_outputs(output):
    """Deletes what a run wrote into `output` (checkpoints, logs, results), nothing else."""
    root = Path(output)
    for name in ("checkpoints", "logs"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (CSV_NAME, RUN_CONFIG_NAME, "results.json", "report.md", "curves.png",
                 "evaluation.png", "model.keras"):
        (root / name).unlink(missing_ok=True)


def _check_resumable(output, config, enabled):
    """Stores the run's settings, or checks that a resumed run did not change them."""
    path = Path(output) / RUN_CONFIG_NAME
    current = config.to_dict()
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [key for key in RESUME_KEYS if saved.get(key) != current.get(key)]
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
                                for key in changed)
            raise ConfigError(f"{output} holds a run with other settings ({details}); use "
                              "another --output, or --overwrite to start again")
    if enabled:
        # Atomically: other workers may read it at the same moment.
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(current, indent=2, sort_keys=True))
        scratch.replace(path)


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


def train(config, data, strategy, is_chief=True, worker_id=0):
    """Trains (or resumes) and evaluates; returns `(results, folder)`: the results dict that
    `recipes.report` writes, and the folder this worker wrote its outputs to.

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
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    _check_resumable(output, config, is_chief)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(config.seed)
    epoch_steps = steps_per_epoch(config, data)
    if epoch_steps < 1:
        raise ConfigError(f"an epoch would hold no batch: {len(data.y_train)} training images "
                          f"for --batch-size {config.batch_size}")
    model, optimizer, checkpoint, latest = _restore_or_create(
        config, data, strategy, output, epoch_steps)
    start_epoch = int(checkpoint.finished_epochs.numpy())
    if start_epoch:
        _print(config, is_chief, f"Resuming from {latest}: {start_epoch}/{config.epochs} epochs "
                                 "already done.")
    logs = _Logs(output, is_chief)
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
        if config.stop_after_epochs and epoch + 1 == config.stop_after_epochs < config.epochs:
            # Testing aid: end abruptly, as if the process were killed here.
            os.kill(os.getpid(), signal.SIGKILL)

    # Every worker reads the weights at the same point: under MultiWorkerMirroredStrategy,
    # reading replica-averaged statistics is a collective operation.
    if diverged_at is not None:
        last_good = tf.train.latest_checkpoint(str(output / "checkpoints"))
        if last_good:
            checkpoint.restore(last_good)  # every worker: the weights must stay identical
        _print(config, is_chief, f"Evaluating the weights after epoch {diverged_at - 1}, the "
                                 "last finished one." if last_good else
                                 "No epoch finished: the evaluation is of the diverged weights.")
    eval_model = build_model(config, data)
    eval_model.set_weights(model.get_weights())
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
        "training": {"strategy": config.strategy, "replicas": strategy.num_replicas_in_sync,
                     "global_batch_size": config.batch_size,
                     "learning_rate": scaled_learning_rate(config),
                     "steps_per_epoch": epoch_steps, "resumed_at_epoch": start_epoch,
                     "diverged_at_epoch": diverged_at, "history": logs.rows},
    }
    if is_chief:
        results["evaluation"], results["skipped_evaluation"] = evaluate_modes(
            config, data, eval_model)
    else:
        results["evaluation"] = {"population": eval_model.evaluate(
            test_batches, verbose=0, return_dict=True)}
    results["seconds"] = time.time() - started
    results["versions"] = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return results, folder


def _restore_or_create(config, data, strategy, output, epoch_steps):
    """Model, optimizer and a `tf.train.Checkpoint` of both plus `finished_epochs`, restored
    from the latest checkpoint in `output/checkpoints` when there is one."""
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
    latest = tf.train.latest_checkpoint(str(output / "checkpoints"))
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


# ------------------------------------------------------------------------------ evaluation
def _mode_available(mode):
    """Whether the keras_norm module a mode needs is installed (None) or why not (str)."""
    import importlib

    needs = {"batch": "keras_norm.evaluation", "balanced": "keras_norm.evaluation",
             "pseudo_balanced": "keras_norm.evaluation", "assignment": "keras_norm.evaluation",
             "recomputed": "keras_norm.statistics"}.get(mode)
    if needs is None:
        return None
    try:
        importlib.import_module(needs)
    except ImportError:
        return f"needs {needs}, which this keras_norm does not have"
    return None


def resolve_eval_modes(config, batch_dependent):
    """The evaluation modes to run and the ones skipped with their reason.

    `"auto"` means population statistics plus, for batch-dependent norms, `batch` and
    `recomputed`, and with balanced training batches also `balanced` and `pseudo_balanced`;
    modes whose keras_norm module is missing are skipped (explicit ones raise `ConfigError`).
    """
    if tuple(config.eval_modes) == ("auto",):
        modes = ["population"]
        if batch_dependent:
            modes += ["batch"]
            if config.batch_structure == "balanced":
                modes += ["balanced", "pseudo_balanced"]
            modes += ["recomputed"]
        skipped = {mode: reason for mode in modes if (reason := _mode_available(mode))}
        return [mode for mode in modes if mode not in skipped], skipped
    for mode in config.eval_modes:
        reason = _mode_available(mode)
        if reason:
            raise ConfigError(f"--eval {mode} {reason}")
    return list(config.eval_modes), {}


def evaluate_modes(config, data, model):
    """Runs the evaluation modes on a single-device compiled `model`; returns
    `({mode: metrics}, {skipped mode: reason})`. `recomputed` runs last (it changes the
    model's population statistics)."""
    import keras_norm

    batch_dependent = any(keras_norm.spec(name).batch_dependent
                          for name in (config.norm, config.other_norm, config.head_norm)
                          if name)
    modes, skipped = resolve_eval_modes(config, batch_dependent)
    k = (examples_per_class(config, data.num_classes) if config.batch_structure == "balanced"
         else max(1, config.batch_size // data.num_classes))
    examples = test_examples(data)
    results = {}
    for mode in sorted(modes, key=lambda m: m == "recomputed"):
        started = time.time()
        try:
            metrics = _evaluate_mode(mode, config, data, model, examples, k)
        except ValueError as err:
            # E.g. pseudo-balanced batches when the model predicts some class too rarely: the
            # trained run stays valid, the report says why this mode has no number.
            skipped[mode] = str(err).splitlines()[0]
            _print(config, True, f"  {mode:>16}: skipped ({skipped[mode]})")
            continue
        results[mode] = {key: float(value) for key, value in metrics.items()}
        results[mode]["seconds"] = time.time() - started
        _print(config, True, f"  {mode:>16}: accuracy {results[mode]['accuracy']:.4f}, "
                             f"loss {results[mode]['loss']:.4f}")
    return results, skipped


def _evaluate_mode(mode, config, data, model, examples, k):
    """One evaluation mode's metrics dict (`model.evaluate(return_dict=True)` style)."""
    population = examples.batch(config.batch_size)
    if mode == "population":
        return model.evaluate(population, verbose=0, return_dict=True)
    if mode == "recomputed":
        from keras_norm import statistics

        # Batches as in training (structure, size, augmentation), from one more epoch's seed.
        train_batches = _train_dataset(config, data, config.epochs, 1)
        steps = min(config.recompute_steps, steps_per_epoch(config, data))
        statistics.recompute_statistics(model, train_batches, steps=steps, verbose=0)
        return model.evaluate(population, verbose=0, return_dict=True)
    from keras_norm import evaluation

    if mode == "batch":
        return evaluation.evaluate_batch_statistics(model, examples, config.batch_size,
                                                    seed=config.seed)
    if mode == "balanced":
        return evaluation.evaluate_balanced(model, examples, data.num_classes, k,
                                            seed=config.seed)
    if mode == "assignment":
        return evaluation.evaluate_pseudo_balanced(model, examples, data.num_classes, k,
                                                   seed=config.seed, method="assignment")
    return evaluation.evaluate_pseudo_balanced(model, examples, data.num_classes, k,
                                               seed=config.seed)
