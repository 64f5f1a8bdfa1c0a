"""What a wheel holds: every package of the source tree, the kernel sources and the presets.

pyproject.toml lists the packages by hand (the kernels and presets are mapped into the package
from outside it), so a new subpackage left off the list would install a talkcli that fails with
ModuleNotFoundError after a non-editable ``pip install .``.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_in_the_wheel():
    listed = set(_setuptools()["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "talkcli").rglob("__init__.py")}
    assert found - listed == set(), f"left out of pyproject.toml's packages: {sorted(found - listed)}"


def test_kernel_sources_and_presets_are_package_data():
    cfg = _setuptools()
    dirs = cfg["package-dir"]
    data = cfg["package-data"]
    for pkg, src in (("talkcli._kernels", "kernels"), ("talkcli._presets", "presets")):
        assert dirs[pkg] == src
    for path in [*(REPO / "kernels").rglob("*"), *(REPO / "presets").rglob("*")]:
        if not path.is_file():
            continue
        top = "talkcli._kernels" if path.is_relative_to(REPO / "kernels") else "talkcli._presets"
        rel = path.relative_to(REPO / dirs[top])
        pkg = ".".join([top, *rel.parent.parts])
        assert pkg in cfg["packages"], f"{path.relative_to(REPO)}: package {pkg} is not listed"
        assert any(fnmatch.fnmatch(rel.name, pat) for pat in data.get(pkg, [])), \
            f"{path.relative_to(REPO)} matches no package-data pattern of {pkg}"
