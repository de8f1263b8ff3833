"""A run's output folder: its file names, its logs, its recorded settings, and clearing it.

(The checkpoints are written by `recipes.training`, the reports by `recipes.report`.)

- The file names (`CSV_NAME`, `RUN_CONFIG_NAME`) and the columns of the training log
  (`CSV_FIELDS`).
- `_Logs`: the chief's CSV and TensorBoard logs, one row per checkpointed epoch.
- `clear_outputs`: deletes what a run (`RUN_FOLDERS`, `RUN_FILES`) or a search wrote.
- `check_resumable`: refuses to continue a run or search started with other settings, and
  records this start's settings.

`recipes.training` writes through these; its old names (`recipes.training.check_resumable`,
`clear_outputs`, `CSV_NAME`, ...) still work there until the next release, with a
DeprecationWarning.
"""

import csv
import json
import shutil
from pathlib import Path

from recipes.config import ConfigError

CSV_NAME = "training_log.csv"
RUN_CONFIG_NAME = "run_config.json"
CSV_FIELDS = ("epoch", "loss", "accuracy", "test_loss", "test_accuracy", "learning_rate",
              "seconds")
#: What a run writes into its output folder (`clear_outputs`).
RUN_FOLDERS = ("checkpoints", "logs")
RUN_FILES = (CSV_NAME, RUN_CONFIG_NAME, "results.json", "report.md", "curves.png",
             "evaluation.png", "model.keras")


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


def clear_outputs(output, folders=RUN_FOLDERS, files=RUN_FILES):
    """Deletes what a run (or, with other names, a search) wrote into `output`, nothing else.

    Args:
        output: The output folder.
        folders: Sub-folders to delete. Defaults to a run's (`RUN_FOLDERS`).
        files: Files to delete. Defaults to a run's (`RUN_FILES`).
    """
    root = Path(output)
    for name in folders:
        shutil.rmtree(root / name, ignore_errors=True)
    for name in files:
        (root / name).unlink(missing_ok=True)


def check_resumable(path, settings, keys, what="run", write=True):
    """Refuses to continue what `path`'s folder holds if it was started with other settings,
    then records `settings` in `path`.

    Args:
        path: The JSON file of the recorded settings (`run_config.json`, a search's
            `search_config.json`).
        settings: The flat settings of this start (a dict).
        keys: The settings that must not change on resume (others, such as the number of
            epochs, may).
        what: `"run"` or `"search"`, for the message.
        write: Whether to record `settings` (false: check only, e.g. on other workers).

    Raises:
        ConfigError: Naming every changed setting with its recorded and new value.
    """
    path = Path(path)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [key for key in keys if saved.get(key) != settings.get(key)]
        if changed:
            details = "; ".join(f"{key}: {saved.get(key)!r} -> {settings.get(key)!r}"
                                for key in changed)
            raise ConfigError(f"{path.parent} holds a {what} with other settings ({details}); "
                              "use another --output, or --overwrite to start again")
    if write:
        # Atomically: other workers may read it at the same moment.
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(settings, indent=2, sort_keys=True))
        scratch.replace(path)
