"""The service's modules share code through public names only: a name with a leading underscore is its module's
own business, free to change without a look elsewhere, so another module that imports it (a route borrowing a
helper of another route) is a coupling nobody sees until it breaks. What two modules share lives in a module of
its own, under a public name."""

from __future__ import annotations

import ast
from pathlib import Path

import talkative.serve

SERVE = Path(talkative.serve.__file__).parent


def private_imports(path: Path) -> list[str]:
    """`module: name` for each `from module import _name` in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        f"{'.' * node.level}{node.module or ''}: {alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_no_module_of_the_service_imports_another_modules_private_name() -> None:
    found = {
        str(path.relative_to(SERVE)): names
        for path in sorted(SERVE.rglob("*.py"))
        if (names := private_imports(path))
    }
    assert found == {}
