"""The DVC graph is complete: every stage depends on all the project code its script imports (the
import closure, function-level imports included) and on every file its command names; what it
writes is an output, except the resume file, which DVC must never delete."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PACKAGES = ("kdcompress", "models", "pipeline")
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` imports, anywhere but under ``if TYPE_CHECKING:``; a module
    brings its parent packages (their ``__init__`` runs first)."""
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}  # names may be submodules
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] in PACKAGES:
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i]))}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_modules(module_file(name))
    return {str(module_file(m).relative_to(ROOT)) for m in seen}


def covered(path: str, entries: list, folder_arg: bool = False) -> bool:
    """``path`` is an entry or lies in one; with ``folder_arg``, an entry lying in ``path`` also counts
    (a command that names a folder and reads or writes the listed files in it)."""
    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    return any(path == n or path.startswith(n.rstrip("/") + "/") or (folder_arg and n.startswith(path + "/"))
               for n in names)


def command_paths(cmd: str) -> dict[str, str]:
    words = shlex.split(cmd)
    words = words[words.index("-m"):]  # the stage's own arguments, not torchrun's
    return {w[2:]: v for w, v in zip(words, words[1:]) if w.startswith("--") and w != "--params"}


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_depends_on_its_whole_import_closure(name):
    stage = DVC[name]
    words = shlex.split(stage["cmd"])
    assert words[0] in ("python", "torchrun") and "-m" in words  # python -m or torchrun [options] -m
    module = words[words.index("-m") + 1]
    assert module.startswith("pipeline.")
    missing = sorted(f for f in closure(module) if not covered(f, stage["deps"]))
    assert not missing, f"stage {name}: imports {missing} but does not depend on them"


@pytest.mark.parametrize("name", sorted(DVC))
def test_every_file_a_stage_names_is_a_dep_or_an_output(name):
    stage = DVC[name]
    outputs = stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])
    for flag, path in command_paths(stage["cmd"]).items():
        if flag == "resume":
            assert not covered(path, outputs), f"stage {name}: DVC would delete the resume file {path}"
        else:
            folder = not Path(path).suffix
            listed = covered(path, stage["deps"], folder) or covered(path, outputs, folder)
            assert listed, f"stage {name}: --{flag} {path} is neither a dep nor an output"


def test_inputs_outside_the_commands_are_deps():
    assert covered("data/fashion_mnist", DVC["prepare"]["deps"])  # the raw data (data.root)
    assert covered("weights/teacher.pt", DVC["train_teacher"]["deps"])  # teacher.checkpoint lives there


def test_the_closure_finds_function_level_imports_and_skips_type_checking_ones():
    assert "kdcompress/common/int8.py" in closure("kdcompress.training.ort_teacher")  # imported inside a method
    assert "kdcompress/methods/base.py" not in closure("kdcompress.training.distiller")  # only for annotations
    assert "kdcompress/training/selection/__init__.py" in closure("kdcompress.training.selection.full")  # package first
