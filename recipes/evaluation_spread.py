"""How much the batch-statistics evaluations of a finished CIFAR run vary with the batches.

    python -m recipes.evaluation_spread runs/experiments/batch_structure/balanced-head_none-seed0

Loads the run's `model.keras` and its test subset (the data settings of its `results.json`)
and repeats, for several batch-composition seeds, the evaluations whose batches are drawn at
random: random test batches, balanced (conditional) test batches, pseudo-balanced batches
(argmax and class-prior assignment, the latter also iterated once). Population statistics do
not depend on the batches and are evaluated once. Prints a Markdown table of the mean, the
sample std and the range over the seeds, in test accuracy (%), so a difference between two
runs' single evaluations can be compared with the evaluation's own noise.

    python -m recipes.evaluation_spread RUN --counts-only

prints instead how many test images the population-statistics pass gives each class, with
the moving statistics and with statistics recomputed over 200 training batches, and the
accuracy of matching each label-balanced test batch's images one-to-one to the classes from
the population scores alone (what the batch composition is worth without batch statistics).
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path


def _row(name, values):
    if not values:  # e.g. argmax batches that cannot be formed (a class never predicted)
        return f"| {name} | n/a | n/a | n/a |"
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"| {name} | {statistics.mean(values):.2f} | {spread:.2f} | "
            f"{min(values):.2f} - {max(values):.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recipes.evaluation_spread",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished recipes.cifar output folder")
    parser.add_argument("--seeds", type=int, default=5, help="batch compositions (default 5)")
    parser.add_argument("--counts-only", action="store_true",
                        help="only print how many test images the population-statistics "
                             "pass predicts for each class")
    args = parser.parse_args(argv)
    from recipes import cli
    cli.require_recipes_extra("python -m recipes.evaluation_spread")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    import keras_norm  # noqa: F401  (registers the layers the saved model uses)
    from keras_norm import evaluation
    from recipes import training
    from recipes.config import RunConfig

    results = json.loads((args.run / "results.json").read_text())
    config = RunConfig.from_dict(results["config"])
    data = training.shrink(training.load_images(config.source), config)
    model = keras.models.load_model(args.run / "model.keras")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    examples = training.test_examples(data)
    classes = data.num_classes
    k = max(1, config.batch_size // classes)
    population = model.evaluate(examples.batch(config.batch_size), verbose=0,
                                return_dict=True)["accuracy"]
    if args.counts_only:
        # How unbalanced the population-statistics predictions are (the test set is not).
        scores = model.predict(examples.map(lambda x, y: x).batch(256), verbose=0)
        counts = np.bincount(np.argmax(scores, axis=1), minlength=data.num_classes)
        print(f"{args.run}: population statistics {100 * population:.2f}%; predicted "
              f"images per class {counts.tolist()} (test images per class "
              f"{np.bincount(data.y_test, minlength=data.num_classes).tolist()})")
        # What knowing a batch holds one image of each class is worth without any batch
        # statistics: the best one-to-one matching of each label-balanced batch's images to
        # the classes, from the population scores (uses the labels, like the conditional).
        rng = np.random.default_rng(0)
        members = np.stack([rng.permutation(np.flatnonzero(data.y_test == c))
                            for c in range(classes)], axis=1)
        matched = [evaluation.balanced_assignment(scores[batch]) == data.y_test[batch]
                   for batch in members[: len(members) // k * k].reshape(-1, k * classes)]
        print(f"  one-to-one matching of label-balanced batches of {k * classes} from the "
              f"population scores: {100 * np.mean(matched):.2f}%")
        # Moving averages that lag the weights, or the weights themselves? Recompute the
        # statistics as an equal-weight average over 200 training batches and look again.
        keras_norm.recompute_statistics(model, training._train_dataset(
            config, data, config.epochs, 1), steps=200, verbose=0)
        recomputed = model.evaluate(examples.batch(config.batch_size), verbose=0,
                                    return_dict=True)["accuracy"]
        scores = model.predict(examples.map(lambda x, y: x).batch(256), verbose=0)
        counts = np.bincount(np.argmax(scores, axis=1), minlength=data.num_classes)
        print(f"  recomputed statistics {100 * recomputed:.2f}%; predicted images per class "
              f"{counts.tolist()}")
        return 0
    rows = {name: [] for name in ("random test batches", "conditional (balanced, labels)",
                                  "pseudo-balanced, argmax", "assignment alone",
                                  "assignment batches", "assignment batches, iterated once")}
    for seed in range(args.seeds):
        rows["random test batches"].append(evaluation.evaluate_batch_statistics(
            model, examples, config.batch_size, seed=seed)["accuracy"])
        rows["conditional (balanced, labels)"].append(evaluation.evaluate_balanced(
            model, examples, classes, k, seed=seed)["accuracy"])
        try:
            rows["pseudo-balanced, argmax"].append(evaluation.evaluate_pseudo_balanced(
                model, examples, classes, k, seed=seed)["accuracy"])
        except ValueError as error:  # a class the first pass never predicts: no batch
            print(f"pseudo-balanced, argmax (seed {seed}): {error}", file=sys.stderr)
        assigned = evaluation.evaluate_pseudo_balanced(model, examples, classes, k, seed=seed,
                                                       method="assignment")
        rows["assignment alone"].append(assigned["assignment_accuracy"])
        rows["assignment batches"].append(assigned["accuracy"])
        rows["assignment batches, iterated once"].append(evaluation.evaluate_pseudo_balanced(
            model, examples, classes, k, seed=seed, method="assignment",
            iterations=2)["accuracy"])
    print(f"{args.run}: population statistics {100 * population:.2f}%; "
          f"{args.seeds} batch-composition seeds (0..{args.seeds - 1}), batch {k * classes}")
    print("\n| evaluation | mean | std | range |\n| --- | ---: | ---: | --- |")
    for name, values in rows.items():
        print(_row(name, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
