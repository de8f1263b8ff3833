"""The evaluation modes of a trained run: which ones run, and each one's metrics.

The modes run after training on a single-device copy of the trained model (the same weights and
statistics): `population` (moving statistics), `batch` (random test batches normalized with
their own statistics), `balanced` (class-balanced test batches, built with the labels,
normalized with their own statistics: the "conditional" evaluation of Hajaj & Gillies 2018),
`pseudo_balanced` (balanced by the model's own predicted labels), `assignment` (balanced by a
class-prior assignment of the test images, no labels) and `recomputed` (population statistics
recomputed as an equal-weight average over training batches, "precise BN").

`resolve_eval_modes` picks the modes (`--eval`, `"auto"` by the norms and the batch
structure), `evaluate_modes` runs them; `recipes.training.train` calls it on the chief after
training. The test examples, the training batches of `recomputed` and the balanced
structure's k are `recipes.training`'s. `recipes.training.evaluate_modes` and
`resolve_eval_modes` still work there until the next release, with a DeprecationWarning.
"""

import time

from recipes.config import ConfigError


def _mode_available(mode):
    """Whether the keras_norm module a mode needs is installed (None) or why not (str)."""
    import importlib

    needs = {"batch": "keras_norm.evaluation", "balanced": "keras_norm.evaluation",
             "pseudo_balanced": "keras_norm.evaluation", "assignment": "keras_norm.evaluation",
             "recomputed": "keras_norm.population"}.get(mode)
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
    from recipes import training

    batch_dependent = any(keras_norm.spec(name).batch_dependent
                          for name in (config.norm, config.other_norm, config.head_norm)
                          if name)
    modes, skipped = resolve_eval_modes(config, batch_dependent)
    k = (training.examples_per_class(config, data.num_classes)
         if config.batch_structure == "balanced"
         else max(1, config.batch_size // data.num_classes))
    examples = training.test_examples(data)
    results = {}
    for mode in sorted(modes, key=lambda m: m == "recomputed"):
        started = time.time()
        try:
            metrics = _evaluate_mode(mode, config, data, model, examples, k)
        except ValueError as err:
            # E.g. pseudo-balanced batches when the model predicts some class too rarely: the
            # trained run stays valid, the report says why this mode has no number.
            skipped[mode] = str(err).splitlines()[0]
            training._print(config, True, f"  {mode:>16}: skipped ({skipped[mode]})")
            continue
        results[mode] = {key: float(value) for key, value in metrics.items()}
        results[mode]["seconds"] = time.time() - started
        training._print(config, True, f"  {mode:>16}: accuracy "
                                      f"{results[mode]['accuracy']:.4f}, "
                                      f"loss {results[mode]['loss']:.4f}")
    return results, skipped


def _evaluate_mode(mode, config, data, model, examples, k):
    """One evaluation mode's metrics dict (`model.evaluate(return_dict=True)` style)."""
    from recipes import training

    population = examples.batch(config.batch_size)
    if mode == "population":
        return model.evaluate(population, verbose=0, return_dict=True)
    if mode == "recomputed":
        from keras_norm.population import recompute_statistics

        # Batches as in training (structure, size, augmentation), from one more epoch's seed.
        train_batches = training._train_dataset(config, data, config.epochs, 1)
        steps = min(config.recompute_steps, training.steps_per_epoch(config, data))
        recompute_statistics(model, train_batches, steps=steps, verbose=0)
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
