"""The package's layers, read from the imports of every module: each layer imports only the layers below it.

README's "Architecture" section draws the same table.
"""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bv"

# a layer -> the layers it may import (everything below it); the private root modules are the bottom
BOTTOM = {"_layers", "_checks", "_select", "_sharding", "_trace", "_plots"}
ALLOWED = {
    "_plots": set(),
    "_layers": set(),
    "_checks": set(),
    "_select": set(),
    "_sharding": set(),
    "_trace": set(),
    "neurons": BOTTOM,
    "functional": BOTTOM | {"neurons"},
    "transforms": BOTTOM | {"neurons", "functional"},
    "modules": BOTTOM | {"neurons", "functional", "transforms"},
    "callbacks": BOTTOM | {"neurons", "functional", "transforms"},
    "cli": BOTTOM | {"neurons", "functional", "transforms", "modules", "callbacks"},
    "__init__": BOTTOM | {"neurons", "functional", "transforms", "modules"},
}
LIGHTNING = {"modules", "callbacks", "cli"}  # the only layers that import Lightning


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


@functools.cache
def imports() -> dict[str, set[str]]:
    """``{module path: the modules it imports}`` over every file of the package (imports inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lightning_bv":
                names.update(f"lightning_bv.{a.name}" for a in node.names)  # a module of the package, or a name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[module] = names
    return found


def test_every_module_belongs_to_a_known_layer():
    assert {layer(m) for m in imports()} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(imports()))
def test_imports_point_down(module):
    mine = layer(module)
    for name in imports()[module]:
        if not name.startswith("lightning_bv."):
            assert name.split(".")[0] not in ("pytorch_lightning", "lightning") or mine in LIGHTNING, (module, name)
            continue
        theirs = layer(name)
        assert theirs == mine or theirs in ALLOWED[mine], f"{module} ({mine}) imports {name} ({theirs})"


def test_no_import_cycles_between_modules():
    graph = {m: {n for n in names if n in imports()} for m, names in imports().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if n.startswith(m + ".") or m.startswith(n + "."):  # a package and its own modules
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
