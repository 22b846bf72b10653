"""The layer plan of docs/architecture.md, enforced by reading every module's imports (AST).

Each package may import only packages of lower layers (peers in one layer not at all), and no
two modules may import each other, directly or round a longer circle. Imports inside functions
count too: a lazy import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "medsight"

#: bottom first; packages on one line are peers and must not import each other
LAYERS: list[tuple[str, ...]] = [
    ("_version", "errors"),
    ("io",),
    ("models",),
    ("predict",),
    ("explain",),
    ("evaluate",),
    ("train",),
    ("integration", "scale"),
    ("serve",),
    ("gateway",),
    ("cli",),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
#: ``medsight/__init__.py`` is the public facade (``medsight.load_model`` ...): it may name any layer
FACADE = "medsight"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """The medsight modules ``path`` imports (a ``from pkg import name`` of a submodule counts as that module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "medsight")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "medsight":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(subs or {target})
    found.discard(name)
    return {m for m in found if m in MODULES}


GRAPH = {name: imported(path) for name, path in MODULES.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def test_every_package_has_a_layer():
    unplaced = sorted({layer_of(m) for m in MODULES} - RANK.keys() - {FACADE})
    assert not unplaced, f"packages missing from LAYERS and docs/architecture.md: {unplaced}"


def test_no_package_imports_a_higher_layer_or_a_peer():
    bad = []
    for src, targets in GRAPH.items():
        a = layer_of(src)
        if a == FACADE:
            continue
        for dst in targets:
            b = layer_of(dst)
            if b == a:
                continue
            if b == FACADE or RANK.get(b, -1) >= RANK.get(a, -1):
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_between_modules():
    # Tarjan's strongly connected components would be overkill for ~200 modules: a DFS with colours finds a circle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_written_plan_names_every_layer(doc):
    text = (ROOT.parent / doc).read_text()
    missing = [pkg for pkg in RANK if pkg not in ("_version",) and f"`{pkg}`" not in text]
    assert not missing, f"{doc} does not name the layers {missing}"
