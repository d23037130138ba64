"""The package's arrows run one way: the subpackages of kdcompress form an acyclic import graph, the
library never imports the project's ``models`` or ``pipeline`` folders, every subpackage says in its
``__init__`` what lives there, and stage scripts stay thin."""

from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

import pytest
from conftest import ROOT
from test_dvc_graph import imported_modules

LIBRARY = ROOT / "kdcompress"
SUBPACKAGES = sorted(p.parent.name for p in LIBRARY.glob("*/__init__.py"))


def part(module: str) -> str:
    """``kdcompress.training.loop`` -> ``training``; top-level modules (``config``, ``io``) are parts too."""
    return module.split(".")[1] if module.count(".") else module


def arrows() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in LIBRARY.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if rel == ("kdcompress", "__init__"):
            continue
        source = rel[1]
        targets = {part(m) for m in imported_modules(path) if m.startswith("kdcompress.")}
        graph.setdefault(source, set()).update(targets - {source})
    return graph


def test_subpackage_imports_are_acyclic():
    graph = arrows()
    assert {"common", "data", "deploy", "methods", "report", "training"} <= set(graph)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle between kdcompress subpackages: {err.args[1]}")
    assert order.index("common") < order.index("training") and order.index("methods") < order.index("training")


def test_library_never_imports_models_or_pipeline():
    offenders = [f"{path.relative_to(ROOT)} imports {m}" for path in LIBRARY.rglob("*.py")
                 for m in imported_modules(path) if m.split(".")[0] in ("models", "pipeline")]
    assert not offenders


def test_training_and_deploy_do_not_import_each_other_or_report():
    graph = arrows()
    assert not graph["training"] & {"deploy", "report"}
    assert not graph["deploy"] & {"training", "report"}


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_says_what_lives_there(name):
    text = (LIBRARY / name / "__init__.py").read_text()
    assert text.startswith('"""') and len(text.split('"""')[1].strip()) > 40


@pytest.mark.parametrize("script", sorted((ROOT / "pipeline").glob("[!_]*.py")), ids=lambda p: p.name)
def test_stage_scripts_are_thin(script):
    assert len(script.read_text().splitlines()) <= 60
