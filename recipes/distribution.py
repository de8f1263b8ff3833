"""Where a run trains: the `tf.distribute` strategy of `--strategy` and its devices.

- `configure_cpu_replicas`: `--cpu-replicas`, logical CPU devices for `MirroredStrategy`
  without GPUs, set before TensorFlow starts.
- `create_strategy`: the default strategy, `MirroredStrategy` or (from `TF_CONFIG`)
  `MultiWorkerMirroredStrategy`, with whether this process is the chief and its worker id.

`recipes.training` trains under these (`recipes.training.create_strategy` and
`configure_cpu_replicas` still work there until the next release, with a DeprecationWarning).
"""

import json
import os

from recipes.config import ConfigError


def configure_cpu_replicas(count):
    """Splits the first CPU into `count` logical devices, before TensorFlow starts.

    A runtime already split into `count` devices is accepted (a command line run twice in
    one process, as the tests do); any other started runtime is a `ConfigError`.
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise ConfigError(f"--cpu-replicas {count} must be set before TensorFlow starts "
                              f"({err})") from None


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
