"""dsarag installs one top-level package, `dsarag`, and its folders shadow no package another distribution ships."""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def test_the_installed_distribution_has_one_top_level_package():
    shipped_by = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in shipped_by.items() if "dsarag" in dists)
    assert ours == ["dsarag"]


def test_every_mapped_folder_is_a_package_under_dsarag():
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    assert all(name.startswith("dsarag.") for name in package_dir)
    assert all((ROOT / folder / "__init__.py").is_file() for folder in package_dir.values())


def test_no_folder_of_ours_shadows_an_installed_package_when_run_from_the_checkout():
    # transformers 5.25 made Hugging Face's `kernels` a dependency, which an old `kernels/` folder shadowed, so
    # importing sentence-transformers failed from the repository root.
    folders = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"].values()
    shipped_by = importlib.metadata.packages_distributions()
    clashes = {
        folder: shipped_by[folder] for folder in folders if set(shipped_by.get(folder, [])) - {"dsarag"}
    }
    assert clashes == {}
