"""objectives/ is pure (DESIGN.md, "Who may import whom"): standard library, torch, numpy,
scikit-learn and geomloss only; nothing else of ours, no test-only packages."""

from __future__ import annotations

import ast
import pathlib
import sys

import objectives

ALLOWED = {"torch", "numpy", "sklearn", "geomloss", "objectives"}


def imported_top_level_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_objectives_imports_only_allowed_packages() -> None:
    package = pathlib.Path(objectives.__file__).parent
    files = sorted(package.glob("*.py"))
    assert len(files) >= 2
    for path in files:
        foreign = imported_top_level_modules(path) - ALLOWED - set(sys.stdlib_module_names)
        assert not foreign, f"{path.name} imports {sorted(foreign)}"


def test_public_names_are_exported() -> None:
    assert sorted(objectives.__all__) == sorted(
        ["METRIC_DIRECTIONS", "METRIC_NAMES", "THRESHOLD_FREE", "Evaluation", "GroupRates", "evaluate", "evaluate_detailed",
         "compile_fairness_loss", "fairness_loss", "fairness_loss_multi", "sinkhorn_divergence"]
    )
    assert all(hasattr(objectives, name) for name in objectives.__all__)
