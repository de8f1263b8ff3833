"""What the XLA-compiled kernels cost and save in a whole model: CIFAR ResNet-20 training steps
(`train_on_batch`, batch 128, no model-level `jit_compile`) with `keras_norm.set_xla_kernels`
on and off, one fresh process per setting so that nothing compiled is shared.

    python benchmarks/bench_kernels.py --norms group,evonorm_s0

Prints the first step (tracing and compiling included) and the median of the next steps.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(norm, kernels, steps):
    """Runs in a child process: `(first step seconds, median later step seconds)`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np

    import keras_norm
    from recipes.models import build_model

    keras_norm.set_xla_kernels(kernels)
    model = build_model("resnet20", norm=norm)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.random((128, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 128)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return times[0], float(np.median(times[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default="group,evonorm_s0")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        first, later = measure(args.child[0], args.child[1] == "on", args.steps)
        print(f"{first:.2f} {later:.4f}")
        return
    print("| norm | kernels | first step (s) | later steps (ms, median) |")
    print("|---|---|---|---|")
    for norm in args.norms.split(","):
        for setting in ("on", "off"):
            output = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--child", norm, setting],
                check=True, capture_output=True, text=True).stdout.split()
            first, later = float(output[-2]), float(output[-1])
            print(f"| {norm} | {setting} | {first:.1f} | {later * 1e3:.0f} |")


if __name__ == "__main__":
    main()
