"""The packages import one way: each imports only packages of the levels before its own, at the
top of a file or inside a function, so the folder tree reads as the pipeline (README's layout)."""

from __future__ import annotations

import ast

from conftest import REPO

# Each level may import the levels before it; packages of one level do not import each other.
LEVELS = [["utils"], ["config"], ["data"], ["models"], ["memory", "saving"], ["training"], ["parallel"]]
LEVEL = {package: i for i, packages in enumerate(LEVELS) for package in packages}


def imported_packages(tree: ast.AST):
    """(top-level package, line) of every absolute import in `tree`, function-level ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno


def test_packages_import_only_the_levels_below_them():
    upward = []
    for package, level in LEVEL.items():
        for file in sorted((REPO / package).rglob("*.py")):
            for imported, line in imported_packages(ast.parse(file.read_text(encoding="utf-8"))):
                if imported in LEVEL and imported != package and LEVEL[imported] >= level:
                    upward.append(f"{file.relative_to(REPO)}:{line} imports {imported}")
    assert not upward, "imports against the package order " + " < ".join("/".join(p) for p in LEVELS) + ":\n" + \
        "\n".join(upward)
