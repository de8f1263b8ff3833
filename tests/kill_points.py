"""Runs a recipe's command line and kills it (SIGKILL) at a chosen point, as a job killed by
a user, a scheduler or the out-of-memory killer would be; the tests' way to show that a
killed run or search resumes where it stopped, with no hook in the recipes themselves.

    python tests/kill_points.py after-checkpoint N recipes.cifar ARGS...
    python tests/kill_points.py after-batch N recipes.tune ARGS...

`after-checkpoint N`: right after the checkpoint of epoch N is written (every process of a
multi-worker run writes its share); `after-batch N`: right after the N-th training batch this
process runs. Both wrap private functions of `recipes.training`, the one training loop.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

POINTS = ("after-checkpoint", "after-batch")


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point, count):
    """Wraps `recipes.training` so that this process dies at `point` number `count`."""
    from recipes import training

    if point == "after-checkpoint":
        save = training._save_checkpoint

        def save_then_die(checkpoint, manager, output, worker_id):
            save(checkpoint, manager, output, worker_id)
            if int(checkpoint.finished_epochs.numpy()) == count:
                _die()

        training._save_checkpoint = save_then_die
        return
    steps = training._distributed_steps
    done = [0]

    def dying_steps(*args, **kwargs):
        train_step, test_step = steps(*args, **kwargs)

        def step(batch):
            result = train_step(batch)
            done[0] += 1
            if done[0] == count:
                _die()
            return result

        return step, test_step

    training._distributed_steps = dying_steps


def main(argv):
    if len(argv) < 3 or argv[0] not in POINTS or not argv[1].isdigit():
        sys.exit(f"usage: python {__file__} {{{','.join(POINTS)}}} N MODULE [ARGS...]")
    point, count, module, args = argv[0], int(argv[1]), argv[2], argv[3:]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root
    install(point, count)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
