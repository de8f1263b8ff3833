"""Speed of the class-prior assignment of `evaluate_pseudo_balanced(method="assignment")`.

`keras_norm.evaluation.balanced_assignment` gives each of n test examples a class so that every
class gets its share (n / 10 for CIFAR-10's equal prior) at the highest total log-probability.
Targets (issue #16): 10,000 examples in under 30 s, 2,000 in under 3 s, on one CPU core:

    taskset -c 0 python benchmarks/bench_assignment.py

Three kinds of scores, 10 classes, seeded:

- "classifier-like": logits with the true class raised, about 55% argmax accuracy, and one
  class favoured, like the first pass of a small CIFAR CNN;
- "skewed": the same with class 0 favoured strongly, so half the examples start in class 0;
- "worst case": every example's most probable class is class 0, so 90% of them must move
  (from a greedy start the solver's shortest-path rounds grow with the examples that must
  move; its dual start leaves few).

Prints the best of `--repeats` timings for each size and kind, the rounds (examples moved
off their argmax class) and, with `--reference`, the time and cost of SciPy's
`linear_sum_assignment` on the n x n matrix with each class repeated for its share (the
optimal cost must agree).
"""

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_norm.evaluation import balanced_assignment  # noqa: E402  (after the log level)

CLASSES = 10


def scores(kind, n, seed=0):
    """Synthetic (n, 10) logits of the given kind."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % CLASSES
    logits = rng.normal(size=(n, CLASSES)) * 1.5
    logits[np.arange(n), truth] += 2.0
    if kind == "classifier-like":
        logits[:, 3] += 0.5
    elif kind == "skewed":
        logits[:, 0] += 2.5
    elif kind == "worst case":
        logits[:, 0] = logits.max(axis=1) + rng.random(n)
    else:
        raise ValueError(f"scores: unknown kind {kind!r}")
    return logits


def _cost(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return -(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", action="store_true",
                        help="also time scipy's linear_sum_assignment (2,000 examples only)")
    args = parser.parse_args(argv)
    print(f"{'examples':>8} {'scores':>16} {'moved':>6} {'seconds':>8}  reference")
    for n in (int(size) for size in args.sizes.split(",")):
        for kind in ("classifier-like", "skewed", "worst case"):
            logits = scores(kind, n)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                labels = balanced_assignment(logits)
                times.append(time.perf_counter() - start)
            moved = int(np.sum(labels != np.argmax(logits, axis=1)))
            reference = ""
            if args.reference and n <= 2000:
                from scipy.optimize import linear_sum_assignment

                cost = _cost(logits)
                start = time.perf_counter()
                repeated = np.repeat(cost, np.full(CLASSES, n // CLASSES), axis=1)
                rows, cols = linear_sum_assignment(repeated)
                seconds = time.perf_counter() - start
                gap = cost[np.arange(n), labels].sum() - repeated[rows, cols].sum()
                reference = f"linear_sum_assignment {seconds:.2f} s, cost difference {gap:.1e}"
            print(f"{n:>8} {kind:>16} {moved:>6} {min(times):>8.3f}  {reference}", flush=True)


if __name__ == "__main__":
    main()
