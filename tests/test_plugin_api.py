"""The declared plugin API: the one module plugins import from lllms, versioned, documented,
and pinned by every plugin distribution."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import lllms_core
from lllms_core import plugin_api

ROOT = Path(__file__).parent.parent
CORE_DEPLOYMENTS = ("lllms_ray",)
"""Plugins that run lllms' core itself elsewhere (ModelServer, the HTTP app) rather than
serve models through the engine protocol: they use the core's modules and pin lllms tightly."""
PLUGIN_SOURCES = sorted(
    [path for path in ROOT.glob("plugins/*/lllms_*/**/*.py") if path.parent.parent.name not in CORE_DEPLOYMENTS]
    + [path for path in ROOT.glob("examples/*/lllms_*/**/*.py")]
    + [ROOT / "lllms_core" / "testing" / "fake.py"]
)
DISTRIBUTIONS = sorted([*ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("examples/*/pyproject.toml"),
                        ROOT / "tests" / "fake_engine" / "pyproject.toml"])  # fmt: skip


def lllms_imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lllms_core":
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names if alias.name.split(".")[0] == "lllms_core"]
    return modules


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_engines_import_from_lllms_only_through_the_plugin_api(path):
    others = [module for module in lllms_imports(path) if module != "lllms_core.plugin_api"]
    assert not others, f"{path.name} imports {others}: import from lllms_core.plugin_api (add what is missing there)"


def test_every_name_of_the_plugin_api_exists_once_and_is_documented():
    assert len(plugin_api.__all__) == len(set(plugin_api.__all__))
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in plugin_api.__all__:
        assert hasattr(plugin_api, name), name
        assert f"`{name}" in docs, f"docs/plugins.md does not document {name}"
    major, minor = plugin_api.API_VERSION
    assert f"plugin API {major}.{minor}" in docs


@pytest.mark.parametrize("pyproject", DISTRIBUTIONS, ids=lambda path: str(path.parent.relative_to(ROOT)))
def test_plugins_pin_a_range_of_lllms_that_includes_this_version(pyproject):
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (lllms,) = [Requirement(spec) for spec in dependencies if Requirement(spec).name == "lllms"]
    assert lllms.specifier.contains(lllms_core.__version__)
    assert any(spec.operator == "<" for spec in lllms.specifier), f"{lllms}: no upper bound"
    assert any(spec.operator == ">=" for spec in lllms.specifier), f"{lllms}: no lower bound"
