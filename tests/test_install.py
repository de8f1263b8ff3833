"""The install: what `pip install keras-norm` brings (TensorFlow, Keras, NumPy), what the
`recipes` extra adds, which versions CI tests, and what the recipes do without the extra."""

import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy of tomli that pip vendors
    from pip._vendor import tomli as tomllib

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import cli  # noqa: E402

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
# Modules of the recipes extra that keras_norm must never import. (TensorFlow and Keras import
# matplotlib, scipy and TensorBoard themselves when they are installed, so for those the check
# is that keras_norm adds nothing to what `import tensorflow, keras` already loaded.)
NEVER_IMPORTED = ("keras_tuner", "tensorflow_datasets")


def _name(requirement):
    """The distribution name of a requirement string, lower case."""
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def _pins(path):
    """{name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_lean_dependencies_and_extras():
    project = PYPROJECT["project"]
    assert sorted(_name(r) for r in project["dependencies"]) == ["keras", "numpy", "tensorflow"]
    extras = project["optional-dependencies"]
    recipes = {_name(r) for r in extras["recipes"]}
    # The recipes' own check names exactly the extra's distributions (but for the cap on a
    # TFDS dependency, see pyproject.toml).
    assert "tensorflow-metadata<1.18" in extras["recipes"]
    assert recipes - {"tensorflow-metadata"} == set(cli.RECIPES_EXTRA.values())
    assert {"keras-tuner", "tensorflow-datasets", "matplotlib", "tensorboard"} <= recipes
    test = set(extras["test"])
    assert "keras-norm[recipes]" in test
    assert {"pytest", "pytest-xdist", "flake8"} <= {_name(r) for r in test}


def test_declared_versions_match_the_ci_pairs():
    """pyproject's lower bounds are the oldest pair CI installs; the upper bounds are the next
    major versions; the newest pair CI installs lies inside the bounds."""
    bounds = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
    assert bounds["tensorflow"] == "tensorflow>=2.19,<3"
    assert bounds["keras"] == "keras>=3.10,<4"
    oldest = _pins(PROJECT_ROOT / ".ci" / "oldest.txt")
    newest = _pins(PROJECT_ROOT / ".ci" / "newest.txt")
    for name, lowest in (("tensorflow", (2, 19)), ("keras", (3, 10))):
        old = tuple(int(p) for p in oldest[name].split(".")[:2])
        new = tuple(int(p) for p in newest[name].split(".")[:2])
        assert old == lowest, (name, oldest[name])
        assert lowest <= new and new[0] == lowest[0], (name, newest[name])
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "run_pair oldest" in ci and "run_pair newest" in ci


def test_import_keras_norm_loads_no_recipe_dependency():
    code = (
        "import sys\n"
        "import tensorflow, keras\n"
        "before = set(sys.modules)\n"
        "import keras_norm, keras_norm.convert, keras_norm.data, keras_norm.evaluation\n"
        "import keras_norm.registry, keras_norm.population, keras_norm._math\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        f"never = [m for m in {NEVER_IMPORTED!r} if m in sys.modules]\n"
        "print(sorted(added), never)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    added, never = result.stdout.strip().splitlines()[-1].split("] ")
    assert never == "[]", result.stdout
    extra = set(cli.RECIPES_EXTRA) & set(re.findall(r"'([^']+)'", added))
    assert not extra, f"import keras_norm imports the recipes extra's {sorted(extra)}"
    assert "'keras_norm'" in added  # the probe saw the import it checks


def _run_recipe(module, prelude, *python_flags):
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = [{module!r}, '--help']\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, *python_flags, "-c", code], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=120)


def test_recipes_without_the_extra_exit_2_naming_it():
    for module in ("recipes.cifar", "recipes.tune", "recipes.experiments"):
        # The extra's KerasTuner missing (importing it then fails, as when not installed).
        result = _run_recipe(module, "import sys; sys.modules['keras_tuner'] = None")
        assert result.returncode == 2, (module, result.stdout[-2000:], result.stderr[-2000:])
        assert result.stderr == (
            f"python -m {module}: error: the recipes need the recipes extra (keras-tuner "
            'missing): pip install "keras-norm[recipes]"\n'), result.stderr
        assert result.stdout == ""


def test_recipe_in_a_bare_python_names_every_missing_distribution():
    """`python -S`: no site-packages at all, the leanest install there is."""
    result = _run_recipe("recipes.cifar", "", "-S")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (
        "python -m recipes.cifar: error: the recipes need the recipes extra (keras-tuner, "
        "tensorflow-datasets, matplotlib, tensorboard, scipy missing): "
        'pip install "keras-norm[recipes]"\n')


def test_recipes_with_the_extra_get_past_the_check():
    result = _run_recipe("recipes.cifar", "")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python -m recipes.cifar" in result.stdout and "--no-download" in result.stdout
