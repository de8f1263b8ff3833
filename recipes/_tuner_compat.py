"""KerasTuner's non-public API that the recipes rely on, listed in one place.

KerasTuner (1.4) has no public hooks for what `recipes.oracles` and `recipes.tuning` change:
how many trials a Hyperband round holds, how a bracket draws its first round, which
combinations were tried. Its oracles' private methods are overridden or called there; every
one of them, and the private state and data layout those overrides read, is listed here, and
`tests/test_compat.py` checks each against the installed KerasTuner, so an upgrade that
renames or reshapes one fails a test naming it rather than silently changing the search.
"""

import keras_tuner as kt

#: Private methods `recipes.oracles` (the oracles) and `recipes.tuning` (the tuners: `_is_worker`)
#: override or call: `(class, name, parameters)`, the class as KerasTuner exports it, the
#: parameters without `self`.
PRIVATE_METHODS = (
    (kt.Oracle, "_duplicate", ("values",)),
    (kt.Oracle, "_compute_values_hash", ("values",)),
    (kt.oracles.BayesianOptimizationOracle, "_random_populate_space", ()),
    (kt.oracles.HyperbandOracle, "_get_size", ("bracket_num", "round_num")),
    (kt.oracles.HyperbandOracle, "_get_epochs", ("bracket_num", "round_num")),
    (kt.oracles.HyperbandOracle, "_get_num_rounds", ("bracket_num",)),
    (kt.oracles.HyperbandOracle, "_get_num_brackets", ()),
    (kt.oracles.HyperbandOracle, "_random_trial", ("trial_id", "bracket")),
    (kt.Tuner, "_is_worker", ()),
)

#: Private attributes the oracles of `recipes.oracles` read or change: `(class, name, type)`,
#: set by the class's constructor (`_retry_queue`: the ids of trials to run again).
PRIVATE_ATTRIBUTES = (
    (kt.Oracle, "_seed_state", int),
    (kt.Oracle, "_retry_queue", list),
    (kt.oracles.HyperbandOracle, "_current_bracket", int),
    (kt.Oracle, "ongoing_trials", dict),
    (kt.Oracle, "tuner_ids", set),
    (kt.Oracle, "end_order", list),
)

#: Where KerasTuner keeps its gRPC service (the chief's server side, not exported): the
#: module holding `get_service_grpc` and the request handler class. The recipes serve the
#: chief's oracle from their own loop (`recipes.tuning.serve_search`), so they need both.
GRPC_PROTOS = "keras_tuner.src.protos"
ORACLE_SERVICER = "keras_tuner.src.distribute.oracle_chief.OracleServicer"

#: The attribute of KerasTuner's gRPC `OracleClient` that holds the worker's local oracle.
CLIENT_LOCAL_ORACLE = "_oracle"

#: The layout of a Hyperband bracket that `HyperbandOracle._random_trial` fills: a dict with
#: these keys; `rounds[r]` lists the round's trials as dicts with these keys.
BRACKET_KEYS = ("bracket_num", "rounds")
ROUND_ENTRY_KEYS = ("past_id", "id")


def hyperband_plan(oracle):
    """`(brackets, trials per Hyperband iteration)` of a KerasTuner `HyperbandOracle` (or a
    subclass), from its private sizing methods."""
    brackets = oracle._get_num_brackets()
    trials = sum(oracle._get_size(bracket, round_num)
                 for bracket in range(brackets)
                 for round_num in range(oracle._get_num_rounds(bracket)))
    return brackets, trials


def oracle_service():
    """`(add_servicer_to_server, OracleServicer)`: KerasTuner's gRPC registration function and
    request handler for a chief oracle (see `GRPC_PROTOS`, `ORACLE_SERVICER`)."""
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer
    return protos.get_service_grpc().add_OracleServicer_to_server, OracleServicer


def local_oracle(oracle):
    """The oracle object in this process: on a distributed worker, the one KerasTuner's gRPC
    client wraps (it describes the search space; the chief's oracle runs the search)."""
    return getattr(oracle, CLIENT_LOCAL_ORACLE, oracle)
