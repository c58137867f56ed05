"""The layers show in the imports: no cycles, nothing imports upwards.

Every `import` of a specprobe module anywhere in a file counts, at module level or inside a
function (a lazy import dodges a cycle at run time but keeps it in the design). Layers, lowest
first:

    errors, store                 nothing of specprobe
    engine/                       errors only: no backend, no drafter, no command
    backends/, drafters/, heads/draft_head
                                  the engine (and store); a backend never imports a drafter, a
                                  drafter never imports a backend
    models, tuned, api            loading, saved choices, the Python API;
    integrations/                 drafters inside other engines (vLLM's proposer plug-in)
    tune, backend_choice, bench/, server, heads/train
    commands/                     argv; nothing imports it
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "specprobe"

RANK = {
    "errors": 0, "store": 0,
    "engine": 1,
    "backends": 2, "drafters": 2, "heads": 2, "heads.draft_head": 2,
    "models": 3, "tuned": 3, "integrations": 3, "api": 4, "__init__": 5,
    "tune": 5, "backend_choice": 5, "bench": 5, "server": 5, "heads.train": 5,
    "commands": 6, "__main__": 7,
}
FORBIDDEN = [("backends", "drafters"), ("drafters", "backends"), ("backends", "heads"), ("engine", "store")]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The specprobe modules a file imports (relative imports resolved), without the package prefix."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("specprobe"):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import kv_cache` names a module
                candidate = ".".join([*target, alias.name])
                found.add(candidate if _exists(candidate) else ".".join(target))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("specprobe.")}
    return {_module_of(f) for f in found if f} - {name}


def _exists(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _module_of(dotted: str) -> str:
    parts = dotted.split(".")
    while parts and not _exists(".".join(parts)):
        parts.pop()
    return ".".join(parts) or "__init__"


def layer(name: str) -> str:
    for key in sorted(RANK, key=len, reverse=True):
        if name == key or name.startswith(key + "."):
            return key
    raise AssertionError(f"{name} has no layer in test_architecture.RANK")


GRAPH = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py") if "data" not in p.parts}


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer(name)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_import_goes_up_a_layer(name):
    mine = layer(name)
    for dep in GRAPH[name]:
        theirs = layer(dep)
        top_mine, top_theirs = mine.split(".")[0], theirs.split(".")[0]
        if top_mine == top_theirs:
            continue  # within one package
        assert RANK[theirs] <= RANK[mine], f"{name} ({mine}) imports {dep} ({theirs}), a higher layer"
        assert (top_mine, top_theirs) not in FORBIDDEN, f"{name} imports {dep}: {top_mine} must not import {top_theirs}"


def test_nothing_imports_the_commands():
    users = [n for n, deps in GRAPH.items() if any(layer(d) == "commands" for d in deps) and layer(n) not in ("commands", "__main__")]
    assert not users


def test_no_module_level_tables_of_models():
    """State that outlives a generation hangs off the objects it belongs to, not module globals."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                value = node.value
                text = ast.unparse(value) if value is not None else ""
                if "WeakKeyDictionary" in text or "WeakValueDictionary" in text or (text in ("{}", "dict()") and isinstance(node, (ast.Assign, ast.AnnAssign))):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offenders, offenders
