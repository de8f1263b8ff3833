"""The code style setup.cfg configures (flake8: pyflakes and pycodestyle, 100 columns) holds
for the whole project, so unused imports and variables fail the suite like any other defect."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flake8_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "flake8", "keras_norm", "recipes", "benchmarks", "tests"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
