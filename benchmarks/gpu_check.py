"""One command for a short GPU slot: the layer tests, the speed ratios and the tuner on a GPU.

    python benchmarks/gpu_check.py                      # on a GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --dry-run            # the same plan on the CPU, tiny sizes
    python benchmarks/gpu_check.py --parts bench,tune   # only some parts

Four parts, each in its own process with its own time limit (a hang costs that part only),
in this order:

- `layers`: every registered norm through the shared layer checks of
  `tests/test_registry_harness.py` on the GPU: NumPy reference (eager and traced), XLA
  (`jit_compile=True` equals eager) and mixed precision (`mixed_float16`), with TensorFloat-32
  off (the references are float32).
- `sync`: every synchronizable norm under `MirroredStrategy` on the GPU equals one device on
  the global batch (outputs, moving statistics, gradients). With one GPU it is split into two
  logical GPUs (reduced through one device: NCCL needs distinct physical GPUs).
- `bench`: `benchmarks/bench_layers.py`'s forward+backward timing on the GPU, with and without
  XLA, as ratios against Keras's BatchNormalization and the same-name Keras layer.
- `tune`: `python -m recipes.tune --quick` on the GPU (its data as usual: `--data`, or
  `$KERAS_NORM_DATA`, or the shared copy beside the project; nothing is downloaded).

Each part writes its own JSON as it goes; after every part the summary is rewritten, so a part
that times out (or a slot that ends) still leaves a report of what ran: OUTPUT/summary.md (a
GPU section for BENCHMARKS.md) and OUTPUT/summary.json. The exit status is 1 when any check
failed, timed out or could not run (e.g. no GPU visible without --dry-run), else 0.

`--dry-run` runs the same plan on the CPU with a few norms, tiny tensors and a tiny search (two
logical CPU devices stand in for the GPUs), in a minute or two: it is part of the test suite
(`tests/test_gpu_check.py`), so this script cannot rot while no GPU is at hand.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("layers", "sync", "bench", "tune")
#: Seconds per part on a GPU (total 450 s: under the 8 minutes of a 15-minute slot, leaving
#: time to start the machine and to run one part again) and in a dry run.
BUDGETS = {"layers": 170, "sync": 70, "bench": 125, "tune": 85}
DRY_BUDGETS = {"layers": 150, "sync": 100, "bench": 100, "tune": 150}
DEFAULT_TOTAL = sum(BUDGETS.values())
#: A dry run checks a few norms at tiny sizes.
DRY_NAMES = ("batch", "group")
DRY_SYNC_NAMES = ("sync_batch",)
DRY_BENCH_SHAPE = (4, 8, 8, 64)  # the benchmark's layers are built for 64 channels
DRY_BENCH_LAYERS = ("keras BatchNormalization", "keras GroupNormalization", "batch", "group")
DRY_TUNE_ARGS = ("--train-size", "64", "--val-size", "32", "--batch-sizes", "32")
LAYER_CHECKS = {"reference": "test_registered_name_matches_reference",
                "xla": "test_registered_name_compiles_with_xla",
                "mixed_precision": "test_registered_name_mixed_precision"}
SYNC_CHECK = "test_registered_synchronized_name_equals_one_device"


# ----------------------------------------------------------------------------- part runners
def _write_json(path, data):
    """Writes `data` atomically (a reader never sees half a file)."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(temporary, path)


def _configure_devices(dry_run, split_gpu=False):
    """Before TensorFlow starts: two logical CPUs (dry run); on GPUs, memory on demand, or
    with `split_gpu` on a one-GPU machine two logical GPUs (for the mirrored check). Returns a
    description of the devices."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if dry_run:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return {"kind": "CPU (dry run)", "gpus": [], "logical_split": True}
    if not gpus:
        return {"kind": None, "gpus": [], "logical_split": False}
    split = split_gpu and len(gpus) == 1
    if split:  # 2 x 16 GiB: the checks' tensors are tiny
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=16384)] * 2)
    else:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    names = []
    for gpu in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name",
                                                                            gpu.name))
        except (RuntimeError, ValueError):
            names.append(gpu.name)
    return {"kind": "GPU", "gpus": names, "logical_split": split}


def _versions():
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def _import_harness_tests():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import test_registry_harness

    return test_registry_harness


def _run_check(function, *args):
    """`(status, seconds, message)` of one harness check, with the suite's per-test reset."""
    import keras

    started = time.perf_counter()
    try:
        function(*args)
        status, message = "passed", ""
    except Exception as err:  # noqa: BLE001  every failure is reported, none stops the part
        status = "failed"
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
        traceback.print_exc()
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session(free_memory=False)
    return status, time.perf_counter() - started, message


def part_layers(args, result, save):
    """Reference, XLA and mixed-precision checks of every registered norm."""
    module = _import_harness_tests()
    names = list(DRY_NAMES) if args.dry_run else sorted(module.REFERENCES)
    result["names"] = names
    result["checks"] = []
    for check, test_name in LAYER_CHECKS.items():
        for name in names:
            status, seconds, message = _run_check(getattr(module, test_name), name)
            result["checks"].append({"check": check, "name": name, "status": status,
                                     "seconds": round(seconds, 2), "message": message})
            print(f"{check:>16} {name:<16} {status} ({seconds:.1f} s) {message}", flush=True)
            save()
    failed = [c for c in result["checks"] if c["status"] != "passed"]
    result["status"] = "failed" if failed else "passed"


def _synchronizable(module):
    names = getattr(module, "SYNCHRONIZABLE", None)
    if names is not None:
        return list(names)
    import keras_norm

    found = []
    for name in sorted(module.REFERENCES):
        try:
            if module._build(keras_norm.spec(name), synchronized=True).synchronized:
                found.append(name)
        except (TypeError, ValueError):
            pass
    return found


def part_sync(args, result, save):
    """Every synchronizable norm under MirroredStrategy equals one device."""
    import tensorflow as tf

    module = _import_harness_tests()
    if args.dry_run:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
        names = list(DRY_SYNC_NAMES)
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        names = _synchronizable(module)
    # NCCL (MirroredStrategy's default on GPUs) needs distinct physical GPUs.
    cross_device_ops = (tf.distribute.ReductionToOneDevice()
                        if result["devices"]["logical_split"] else None)
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
    result.update(names=names, strategy_devices=devices,
                  replicas=strategy.num_replicas_in_sync,
                  cross_device_ops=type(cross_device_ops).__name__ if cross_device_ops
                  else "default")
    result["checks"] = []
    for name in names:
        status, seconds, message = _run_check(getattr(module, SYNC_CHECK), name, strategy)
        result["checks"].append({"check": "mirrored", "name": name, "status": status,
                                 "seconds": round(seconds, 2), "message": message})
        print(f"mirrored {name:<16} {status} ({seconds:.1f} s) {message}", flush=True)
        save()
    failed = [c for c in result["checks"] if c["status"] != "passed"]
    result["status"] = "failed" if failed or strategy.num_replicas_in_sync < 2 else "passed"
    if strategy.num_replicas_in_sync < 2:
        result["message"] = f"only {strategy.num_replicas_in_sync} replica(s)"


def part_bench(args, result, save):
    """bench_layers.py's interleaved timing on the GPU, without and with XLA."""
    import statistics

    import tensorflow as tf

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench_layers
    from keras_norm import registry

    shape = DRY_BENCH_SHAPE if args.dry_run else bench_layers.SHAPE
    rounds, steps = (2, 2) if args.dry_run else (args.rounds, args.steps)
    only = {registry.canonical_name(n) for n in DRY_NAMES} if args.dry_run else None
    device = "/CPU:0" if args.dry_run else "/GPU:0"
    result.update(shape=list(shape), rounds=rounds, steps=steps, device=device, rows=[])
    layers = bench_layers.candidates(only)
    if args.dry_run:
        layers = {label: (factory, counterpart if counterpart in DRY_BENCH_LAYERS else None)
                  for label, (factory, counterpart) in layers.items()
                  if label in DRY_BENCH_LAYERS}
    x = tf.random.normal(shape, seed=0)
    dy = tf.random.normal(shape, seed=1)
    for jit in (False, True):
        with tf.device(device):
            step_fns = {label: bench_layers.make_step(factory(), x, dy, jit)
                        for label, (factory, _) in layers.items()}
            times = bench_layers.interleaved(step_fns, rounds, steps)
        for label, (_, counterpart) in layers.items():
            row = {"layer": label, "xla": jit,
                   "ms_per_step": statistics.median(times[label]) * 1e3,
                   "vs_keras_bn": bench_layers.ratio_summary(times, label,
                                                             "keras BatchNormalization"),
                   "vs_keras_norm_bn": (bench_layers.ratio_summary(times, label, "batch")
                                        if "batch" in times else None),
                   "counterpart": counterpart,
                   "vs_same_name": (bench_layers.ratio_summary(times, label, counterpart)
                                    if counterpart else None)}
            result["rows"].append(row)
        save()  # the table without XLA survives a timeout in the XLA half
    result["status"] = "passed"


PART_FUNCTIONS = {"layers": part_layers, "sync": part_sync, "bench": part_bench}


def run_part(args):
    """The body of a part's own process: runs it and writes OUTPUT/part-NAME.json."""
    path = Path(args.output) / f"part-{args.part}.json"
    result = {"part": args.part, "status": "running", "dry_run": args.dry_run}
    started = time.perf_counter()

    def save():
        result["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(path, result)

    try:
        result["devices"] = _configure_devices(args.dry_run, split_gpu=args.part == "sync")
        result["versions"] = _versions()
        if args.part in ("layers", "sync"):
            # The checks compare with float32 NumPy references at float32 tolerances; GPUs
            # from Ampere on run float32 convolutions and matmuls in TensorFloat-32 by default
            # (10-bit mantissa), which would fail the conv-wrapping norms for a reason that is
            # the device's, not the layers'. The benchmark keeps TensorFlow's default.
            import tensorflow as tf

            tf.config.experimental.enable_tensor_float_32_execution(False)
            result["tensor_float_32"] = False
        save()
        if not args.dry_run and not result["devices"]["gpus"]:
            result.update(status="failed", message="no GPU visible to TensorFlow (use "
                                                   "--dry-run to run the plan on the CPU)")
        else:
            PART_FUNCTIONS[args.part](args, result, save)
    except Exception as err:  # noqa: BLE001  reported in the summary, status 1
        traceback.print_exc()
        result.update(status="failed", message=f"{type(err).__name__}: {err}"[:500])
    save()
    return 0 if result["status"] == "passed" else 1


# ----------------------------------------------------------------------------- orchestration
def _tune_command(args, output):
    command = [sys.executable, "-m", "recipes.tune", "--quick", "--overwrite", "--verbose", "2",
               "--output", str(output)]
    if args.data:
        command += ["--data", str(args.data)]
    if args.dry_run:
        command += list(DRY_TUNE_ARGS)
    return command


def _run_process(command, log_path, timeout, env=None):
    """`(return code or None on timeout, seconds)`; the process group is killed on timeout."""
    started = time.perf_counter()
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return code, time.perf_counter() - started


def _tail(path, lines=5):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _tune_result(args, output, code, seconds, log_path):
    import csv

    command = " ".join(["python", *_tune_command(args, output)[1:]])
    result = {"part": "tune", "seconds": round(seconds, 1), "command": command,
              "return_code": code}
    csv_path = output / "results.csv"
    rows = []
    if csv_path.exists():
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    result["rows"] = rows
    completed = [row for row in rows if row["status"] == "COMPLETED"]
    if code is None:
        result.update(status="timed out", message=_tail(log_path))
    elif code != 0 or not rows or len(completed) != len(rows):
        result.update(status="failed", message=_tail(log_path))
    else:
        result["status"] = "passed"
    return result


def run_plan(args):
    """Runs the parts in their own processes; returns the exit status."""
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    parts = args.parts
    deadline = time.monotonic() + args.total_seconds
    summary = {"dry_run": args.dry_run, "parts": {}, "command": _command_line(args),
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    started = time.perf_counter()

    def publish():
        summary["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(output / "summary.json", summary)
        (output / "summary.md").write_text(markdown(summary))

    # GPU memory on demand (the parts share the GPU one after another; the layer and sync
    # parts split it into logical devices themselves).
    env = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    no_gpu = False
    for index, part in enumerate(parts):
        remaining = deadline - time.monotonic()
        # Keep some time for the parts still to come, and never wait past the deadline.
        reserve = 20 * (len(parts) - index - 1)
        timeout = min(budgets[part], remaining - reserve)
        log_path = output / f"part-{part}.log"
        if no_gpu or timeout < 5:
            why = "no GPU" if no_gpu else "no time left in --total-seconds"
            summary["parts"][part] = {"part": part, "status": "skipped", "message": why}
            publish()
            continue
        print(f"[gpu_check] {part}: up to {timeout:.0f} s (log: {log_path})", flush=True)
        if part == "tune":
            tune_output = output / "tune"
            # Nothing downloads here: the data is --data or a local copy.
            code, seconds = _run_process(_tune_command(args, tune_output), log_path, timeout,
                                         {**env, "KERAS_NORM_DOWNLOAD": "0"})
            result = _tune_result(args, tune_output, code, seconds, log_path)
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--part", part,
                       "--output", str(output), "--rounds", str(args.rounds),
                       "--steps", str(args.steps)] + (["--dry-run"] if args.dry_run else [])
            code, seconds = _run_process(command, log_path, timeout,
                                         env if part == "bench" else None)
            path = output / f"part-{part}.json"
            result = json.loads(path.read_text()) if path.exists() else {"part": part}
            result["seconds"] = round(seconds, 1)
            if code is None:
                result.update(status="timed out", message=f"killed after {timeout:.0f} s; "
                                                          "the results so far are kept")
            elif result.get("status") in (None, "running"):
                result.update(status="failed", message=_tail(log_path))
            # Without a GPU the other parts would fail the same way: skip them.
            no_gpu = "devices" in result and result["devices"]["kind"] is None
        summary["parts"][part] = result
        print(f"[gpu_check] {part}: {result['status']} ({result['seconds']:.0f} s)"
              + (f" {result['message']}" if result.get("message") else ""), flush=True)
        publish()
    summary["status"] = ("passed" if all(p["status"] == "passed"
                                         for p in summary["parts"].values()) else "failed")
    publish()
    print((output / "summary.md").read_text())
    return 0 if summary["status"] == "passed" else 1


def _command_line(args):
    command = "python benchmarks/gpu_check.py"
    if args.dry_run:
        command += " --dry-run"
    if tuple(args.parts) != PARTS:
        command += f" --parts {','.join(args.parts)}"
    return command


# ----------------------------------------------------------------------------- summary
def _ratio(summary):
    if not summary:
        return "–"
    median, low, high = summary
    return f"{median:.2f} ({low:.2f}–{high:.2f})"


def markdown(summary):
    """The summary as a BENCHMARKS.md section."""
    parts = summary["parts"]
    first = next((p for p in parts.values() if p.get("devices")), {})
    devices = first.get("devices") or {}
    versions = first.get("versions") or {}
    where = (", ".join(devices.get("gpus") or []) or devices.get("kind") or "unknown device")
    title = "GPU check" + (" (dry run on the CPU: not GPU figures)" if summary["dry_run"] else "")
    lines = [f"## {title}", "",
             f"Measured with `{summary['command']}` on {where}"
             + (f", TensorFlow {versions['tensorflow']}, Keras {versions['keras']}"
                if versions else "")
             + f", started {summary['started']}, {summary.get('seconds', 0):.0f} s in all. "
             f"Overall: **{summary.get('status', 'running')}**.", "",
             "| part | status | seconds | result |", "|---|---|---|---|"]
    for name in PARTS:
        if name not in parts:
            continue
        part = parts[name]
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} | "
                     f"{_part_line(part)} |")
    lines.append("")
    failed = [(name, c) for name in ("layers", "sync") for c in parts.get(name, {}).get(
        "checks", []) if c["status"] != "passed"]
    if failed:
        lines += ["Failed checks:", ""]
        lines += [f"- {name} {c['check']} `{c['name']}`: {c['message']}" for name, c in failed]
        lines.append("")
    bench = parts.get("bench", {})
    if bench.get("rows"):
        shape = "x".join(map(str, bench["shape"]))
        lines += [f"Forward + backward, {shape} float32 on {bench['device']}, median over "
                  f"{bench['rounds']} interleaved rounds of {bench['steps']} steps (min–max "
                  "in brackets; below 1.00 is faster):", "",
                  "| layer | XLA | ms/step | vs keras BN | vs keras_norm BN | vs same-name Keras |",
                  "|---|---|---|---|---|---|"]
        for row in bench["rows"]:
            same = (f"{_ratio(row['vs_same_name'])} ({row['counterpart']})"
                    if row["vs_same_name"] else "–")
            lines.append(f"| {row['layer']} | {'yes' if row['xla'] else 'no'} | "
                         f"{row['ms_per_step']:.2f} | {_ratio(row['vs_keras_bn'])} | "
                         f"{_ratio(row['vs_keras_norm_bn'])} | {same} |")
        lines.append("")
    tune = parts.get("tune", {})
    if tune.get("rows"):
        lines += [f"`{tune['command']}`: {tune['seconds']:.0f} s wall time "
                  "(TensorFlow start-up included).", "",
                  "| trial | status | norm | batch | val acc (%) | steps | s |",
                  "|---|---|---|---|---|---|---|"]
        for row in tune["rows"]:
            accuracy = (f"{100 * float(row['val_accuracy']):.2f}" if row.get("val_accuracy")
                        else "")
            seconds = f"{float(row['seconds']):.1f}" if row.get("seconds") else ""
            lines.append(f"| {row['trial']} | {row['status']} | {row['norm']} | "
                         f"{row['batch_size']} | {accuracy} | {row.get('steps', '')} | "
                         f"{seconds} |")
        lines.append("")
    return "\n".join(lines)


def _part_line(part):
    if part.get("checks") is not None:
        passed = sum(c["status"] == "passed" for c in part["checks"])
        text = f"{passed}/{len(part['checks'])} checks passed"
        if part.get("tensor_float_32") is False and not part.get("dry_run"):
            text += ", TensorFloat-32 off"
        if part["part"] == "sync" and part.get("replicas"):
            text += (f" on {part['replicas']} replicas ({part.get('cross_device_ops')} "
                     "all-reduce)")
    elif part["part"] == "bench" and part.get("rows") is not None:
        text = f"{len(part['rows'])} timings (table below)"
    elif part["part"] == "tune" and part.get("rows") is not None:
        done = sum(row["status"] == "COMPLETED" for row in part["rows"])
        text = f"{done}/{len(part['rows'])} trials completed"
    else:
        text = ""
    if part.get("message"):
        text = f"{text}; {part['message']}" if text else part["message"]
    return text.replace("|", "/").replace("\n", " ")


# ----------------------------------------------------------------------------- command line
def _parts(text):
    parts = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from "
                                         f"{', '.join(PARTS)}")
    return [part for part in PARTS if part in parts]


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 every check passed; 1 a check failed, timed out or could not "
               "run; 2 bad arguments.")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same plan on the CPU at tiny sizes (a minute or two)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="folder of summary.md, summary.json and each part's log and "
                             "JSON. Default: runs/gpu_check (runs/gpu_check_dry with "
                             "--dry-run)")
    parser.add_argument("--parts", type=_parts, default=list(PARTS), metavar="LIST",
                        help=f"comma-separated parts to run, of {', '.join(PARTS)}. "
                             "Default: all")
    parser.add_argument("--total-seconds", type=_positive(float), default=None,
                        metavar="S", help=f"time for all parts together; each part also has "
                                          f"its own limit. Default: {DEFAULT_TOTAL} "
                                          f"({sum(DRY_BUDGETS.values())} with --dry-run)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="data of the tune part (as recipes.tune --data)")
    parser.add_argument("--rounds", type=_positive(int), default=5,
                        help="bench: interleaved timing rounds. Default: 5")
    parser.add_argument("--steps", type=_positive(int), default=20,
                        help="bench: steps timed per round. Default: 20")
    parser.add_argument("--part", choices=tuple(PART_FUNCTIONS), help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.output is None:
        args.output = str(ROOT / "runs" / ("gpu_check_dry" if args.dry_run else "gpu_check"))
    if args.part:
        return run_part(args)
    if args.total_seconds is None:
        args.total_seconds = sum(DRY_BUDGETS.values()) if args.dry_run else DEFAULT_TOTAL
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
