"""Forward+backward speed of every keras_norm layer against Keras, measured in one run.

Each candidate runs `y = layer(x, training=True)` and the gradients of `sum(y * dy)` with
respect to the input and the layer's weights, inside a `tf.function` (with and without
`jit_compile`). Candidates are timed in interleaved rounds (a new random order each round) so
that drift in machine load hits all alike; each ratio is taken within a round against Keras's
`BatchNormalization` (and against the Keras layer of the same name), and the table reports the
median over rounds with the min-max spread.

    python benchmarks/bench_layers.py                  # all layers, writes BENCHMARKS.md
    python benchmarks/bench_layers.py --only batch,group --rounds 5 --no-write
    python benchmarks/bench_layers.py --distributed-only   # sync vs unsync BN on 2 replicas

Synchronized BN is timed under `MirroredStrategy` on two logical CPU devices (no XLA: TF
cannot compile cross-replica collectives on CPU) against unsynchronized BN on the same two
replicas.
"""

import argparse
import os
import pathlib
import platform
import random
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_norm  # noqa: E402
from keras_norm import registry  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (128, 32, 32, 64)

# Keras counterparts of registered names, for the "vs same-name Keras layer" column.
KERAS_COUNTERPARTS = {
    "batch": lambda: keras.layers.BatchNormalization(),
    "layer": lambda: keras.layers.LayerNormalization(),
    "group": lambda: keras.layers.GroupNormalization(groups=32),
    "rms": lambda: keras.layers.RMSNormalization(),
}


CONV_BN = "keras Conv2D 3x3 + keras_norm BN"


def _conv_factory(conv_cls):
    return lambda: conv_cls(64, 3, padding="same", use_bias=False)


def candidates(only=None):
    """`{label: (factory, keras_counterpart_label or None)}` for every layer to time."""
    result = {"keras BatchNormalization": (lambda: keras.layers.BatchNormalization(), None)}
    for label, factory in KERAS_COUNTERPARTS.items():
        if label != "batch":
            result[f"keras {factory().__class__.__name__}"] = (factory, None)
    result["keras Conv2D 3x3"] = (_conv_factory(keras.layers.Conv2D), None)
    # What a conv-wrapping norm (Cross-Iteration BN) replaces: a convolution and a batch norm.
    result[CONV_BN] = (lambda: keras.Sequential([_conv_factory(keras.layers.Conv2D)(),
                                                 keras_norm.BatchNormalization()]), None)
    for name in keras_norm.available():
        if only and name not in only:
            continue
        entry = keras_norm.spec(name)
        counterpart = None
        if name in KERAS_COUNTERPARTS:
            counterpart = f"keras {KERAS_COUNTERPARTS[name]().__class__.__name__}"
        if entry.kind == "conv_wrapper":
            conv = _conv_factory(keras.layers.Conv2D)
            result[name] = (lambda e=entry, c=conv: e.build(SHAPE[-1], layer=c()), CONV_BN)
        else:
            result[name] = (lambda e=entry: e.build(SHAPE[-1]), counterpart)
        if entry.conv is not None:
            label = f"{entry.conv.__name__} 3x3"
            result.setdefault(label, (_conv_factory(entry.conv), "keras Conv2D 3x3"))
    return result


def make_step(layer, x, dy, jit):
    layer.build(x.shape)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    return step


def time_steps(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        result = step()
    tf.nest.map_structure(lambda t: t.numpy(), result)  # wait for the last step
    return (time.perf_counter() - start) / steps


def interleaved(steps_by_label, rounds, steps, seed=0):
    """`{label: [seconds per step, one per round]}` from interleaved timing rounds."""
    for step in steps_by_label.values():
        time_steps(step, 2)  # trace, compile, warm up
    times = {label: [] for label in steps_by_label}
    order = list(steps_by_label)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for label in order:
            times[label].append(time_steps(steps_by_label[label], steps))
    return times


def ratio_summary(times, label, baseline):
    ratios = [a / b for a, b in zip(times[label], times[baseline])]
    return statistics.median(ratios), min(ratios), max(ratios)


def single_device_table(only, rounds, steps):
    x = tf.random.normal(SHAPE, seed=0)
    dy = tf.random.normal(SHAPE, seed=1)
    rows = []
    layers = candidates(only)
    for jit in (False, True):
        with tf.device("/cpu:0"):
            step_fns = {label: make_step(factory(), x, dy, jit)
                        for label, (factory, _) in layers.items()}
            times = interleaved(step_fns, rounds, steps)
        for label, (_, counterpart) in layers.items():
            median_ms = statistics.median(times[label]) * 1e3
            vs_bn = ratio_summary(times, label, "keras BatchNormalization")
            vs_ours = ratio_summary(times, label, "batch") if "batch" in times else None
            vs_same = ratio_summary(times, label, counterpart) if counterpart else None
            rows.append((label, jit, median_ms, vs_bn, vs_ours, vs_same, counterpart))
    return rows


def distributed_table(rounds, steps):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    x = tf.random.normal(SHAPE, seed=0)
    dy = tf.random.normal(SHAPE, seed=1)
    halves = (tf.split(x, 2), tf.split(dy, 2))

    def per_replica(parts):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: parts[ctx.replica_id_in_sync_group])

    xs, dys = per_replica(halves[0]), per_replica(halves[1])
    step_fns = {}
    for label, synchronized in (("unsynchronized BN, 2 replicas", False),
                                ("synchronized BN, 2 replicas", True)):
        with strategy.scope():
            layer = keras_norm.BatchNormalization(synchronized=synchronized)
            layer.build((None,) + SHAPE[1:])

        def replica_step(x, dy, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) * dy)
            return tape.gradient(loss, [x] + layer.trainable_variables)

        step_fns[label] = tf.function(
            lambda f=replica_step: strategy.experimental_local_results(
                strategy.run(f, args=(xs, dys))))
    times = interleaved(step_fns, rounds, steps)
    base = "unsynchronized BN, 2 replicas"
    return [(label, statistics.median(times[label]) * 1e3, ratio_summary(times, label, base))
            for label in step_fns]


def fmt_ratio(summary):
    if summary is None:
        return "–"
    median, low, high = summary
    return f"{median:.2f} ({low:.2f}–{high:.2f})"


def markdown(single_rows, distributed_rows, args, elapsed):
    only = f" --only {args.only}" if args.only else ""
    section = f" --section {args.section}" if args.section != "layers" else ""
    lines = [
        "## Layers: forward + backward, (128, 32, 32, 64) float32",
        "",
        f"Measured with `python benchmarks/bench_layers.py --rounds {args.rounds} "
        f"--steps {args.steps}{only}{section}` on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__} ({elapsed:.0f} s). Each ratio "
        "is the median over interleaved rounds of (layer time / reference time) in the same "
        "round, with the min–max over rounds in brackets; below 1.00 is faster.",
        "",
    ]
    if single_rows:
        lines += ["| layer | XLA | ms/step | vs keras BN | vs keras_norm BN | vs same-name Keras |",
                  "|---|---|---|---|---|---|"]
        for label, jit, ms, vs_bn, vs_ours, vs_same, counterpart in single_rows:
            same = f"{fmt_ratio(vs_same)} ({counterpart})" if vs_same else "–"
            lines.append(f"| {label} | {'yes' if jit else 'no'} | {ms:.1f} | {fmt_ratio(vs_bn)} "
                         f"| {fmt_ratio(vs_ours)} | {same} |")
        lines.append("")
    if distributed_rows:
        lines += ["Synchronized BN under `MirroredStrategy` on 2 logical CPU devices (no XLA):",
                  "", "| layer | ms/step | vs unsynchronized BN on the same replicas |",
                  "|---|---|---|"]
        for label, ms, summary in distributed_rows:
            lines.append(f"| {label} | {ms:.1f} | {fmt_ratio(summary)} |")
        lines.append("")
    return "\n".join(lines)


def update_section(path, name, text):
    """Replaces (or appends) the `<!-- name -->` section of BENCHMARKS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(content)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    parser.add_argument("--only", default="", help="comma-separated registry names")
    parser.add_argument("--distributed-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print, don't edit BENCHMARKS.md")
    parser.add_argument("--section", default="layers",
                        help="the BENCHMARKS.md section this run replaces")
    args = parser.parse_args()
    only = {registry.canonical_name(n) for n in args.only.split(",") if n} or None
    start = time.perf_counter()
    single = [] if args.distributed_only else single_device_table(only, args.rounds, args.steps)
    distributed = distributed_table(args.rounds, args.steps)
    text = markdown(single, distributed, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        update_section(ROOT / "BENCHMARKS.md", args.section, text)


if __name__ == "__main__":
    main()
