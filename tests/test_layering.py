"""The code's one dependency direction: actors on a small foundation, planning and the run on actors."""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOUNDATION = {"pipeline.config", "pipeline.gpus", "pipeline.window", "pipeline.storage", "pipeline.presets",
              "pipeline.checkpoints", "pipeline.seeds", "pipeline.counters", "pipeline.progress", "pipeline.images"}


def modules(package: str) -> list[str]:
    folder = os.path.join(REPO, package)
    return sorted(f"{package}.{name[:-3]}" for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py")


def imported(module: str) -> set[str]:
    """Every project module `module` imports, at the top or inside a function."""
    with open(os.path.join(REPO, *module.split(".")) + ".py", encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    project = ("pipeline.", "actors.", "jobs.", "benchmarks.", "tests.")
    return {name for name in found if name.startswith(project)}


def known(names: set[str]) -> set[str]:
    """Only names that are modules (`from pipeline import storage` names pipeline.storage)."""
    all_modules = set(modules("pipeline")) | set(modules("actors")) | set(modules("jobs")) | set(modules("benchmarks"))
    return {n for n in names if n in all_modules}


@pytest.mark.parametrize("module", sorted(FOUNDATION))
def test_the_foundation_imports_only_the_foundation(module):
    assert known(imported(module)) <= FOUNDATION, known(imported(module)) - FOUNDATION


@pytest.mark.parametrize("module", modules("actors"))
def test_actors_import_only_the_foundation_and_other_actors(module):
    outside = {m for m in known(imported(module)) if not m.startswith("actors.") and m not in FOUNDATION}
    assert not outside, f"{module} imports {sorted(outside)}"


@pytest.mark.parametrize("module", modules("pipeline") + modules("actors"))
def test_the_product_never_imports_jobs_benchmarks_or_tests(module):
    assert not {m for m in imported(module) if m.startswith(("jobs.", "benchmarks.", "tests."))}


def test_the_foundation_is_what_actors_need():
    # Every foundation module is used by an actor (directly or through another foundation module), so the
    # list stays the small base it claims to be.
    used = set()
    for module in modules("actors"):
        used |= known(imported(module)) & FOUNDATION
    for module in list(used):
        used |= known(imported(module)) & FOUNDATION
    assert used == FOUNDATION, FOUNDATION - used
