"""The package's shape: imports point one way (methods -> storage -> tensors), no cycle (not even in annotations), no
private names borrowed from another module, and transformers' internals are reached from one module only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvlab"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(typing: bool = False) -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported module, names)] for every import of a kvlab module (at any level); ``typing``: those
    under ``if TYPE_CHECKING:`` too."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for path in PACKAGE.rglob("*.py"):
        found = []
        tree = ast.parse(path.read_text())
        for node in (ast.walk(tree) if typing else _executed(tree)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found.extend((a.name, []) for a in node.names)
        out[_module(path)] = found
    return out


def _executed(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only; never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(target: str, modules: set[str]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


@pytest.mark.parametrize("typing", [False, True], ids=["run time", "annotations too"])
def test_no_import_cycle_among_kvlab_modules(typing):
    imports = _imports(typing)
    modules = set(imports)
    graph = {m: set() for m in modules}
    for m, found in imports.items():
        for target, names in found:
            if not target.startswith("kvlab"):
                continue
            for name in names or [""]:  # `from kvlab.x import y` may name a submodule y
                full = _resolve(f"{target}.{name}" if name else target, modules)
                if full and full != m and not full == m.rpartition(".")[0]:  # a package may import its children
                    graph[m].add(full)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_storage_never_imports_methods_or_transformers():
    for m, found in _imports().items():
        if m.startswith("kvlab.storage") or m == "kvlab.quant":
            bad = [t for t, _ in found if t.startswith(("kvlab.methods", "kvlab.cache", "transformers"))]
            assert not bad, f"{m} imports {bad}"


# kvlab's packages from the top down: a module imports only from its own package and those below it
LAYERS = ("kvlab.cli", "kvlab.doctor", "kvlab.compare", "kvlab.lab", "kvlab.evals", "kvlab.cache", "kvlab.methods",
          "kvlab.storage")


def _layer(module: str) -> int | None:
    return next((i for i, top in enumerate(LAYERS) if module == top or module.startswith(top + ".")), None)


def test_packages_import_only_downwards():
    for m, found in _imports().items():
        mine = _layer(m)
        if mine is None:
            continue
        up = [t for t, _ in found if (other := _layer(t)) is not None and other < mine]
        assert not up, f"{m} ({LAYERS[mine]}) imports from packages above it: {up}"


def test_no_module_imports_another_modules_private_names():
    for m, found in _imports().items():
        for target, names in found:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not (target.startswith("kvlab") and private), f"{m} imports {private} from {target}"


def test_only_cache_touches_transformers_cache_and_attention_internals():
    internals = ("transformers.cache_utils", "transformers.masking_utils", "transformers.integrations")
    users = {m for m, found in _imports().items() for t, _ in found if t.startswith(internals)}
    assert all(m == "kvlab.cache" or m.startswith("kvlab.cache.") for m in users), users
