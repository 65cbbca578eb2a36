"""dsarag's top-level packages must not shadow a package another installed distribution ships."""

import importlib.metadata
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def test_no_installed_distribution_ships_a_top_level_package_of_ours():
    # transformers 5.25 made Hugging Face's `kernels` a dependency, which our old `kernels/` shadowed, so
    # importing sentence-transformers failed (CI, stop 33).
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    ours = [pattern.rstrip("*") for pattern in patterns]
    shipped_by = importlib.metadata.packages_distributions()
    clashes = {name: shipped_by[name] for name in ours if set(shipped_by.get(name, [])) - {"dsarag"}}
    assert clashes == {}
