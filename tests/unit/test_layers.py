"""The house's layers, read from the code's own imports (module level and inside functions alike).

Layers point down: cli / orchestrate -> stages -> deploy, monitor -> evaluate -> data, train, models ->
registry, feedback, config and the small ground-floor modules. Nothing imports what stands above it,
and no two modules import each other in a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "tuneloop"
# installed as tuneloop.components and tuneloop.pipelines (pyproject: package-dir)
TREES = {SRC: "tuneloop", ROOT / "components": "tuneloop.components", ROOT / "pipelines": "tuneloop.pipelines"}

# the floor of each room (top-level module or package under tuneloop); higher imports lower, never back
FLOORS = {
    "config": 0, "feedback": 0, "images": 0, "env": 0, "jsonl": 0, "pkgdata": 0, "progress": 0, "tracing": 0,
    "registry": 1, "tiny": 1, "mlflow_users": 2,
    "data": 2, "train": 2, "models": 2,
    "evaluate": 3,
    "deploy": 4, "monitor": 4, "repair": 4,
    "stages": 5,
    "orchestrate": 6, "warm_tasks": 6, "warm_task_client": 6, "components": 6, "pipelines": 6, "cli": 7, "demo": 0,
}


def _modules() -> dict[str, Path]:
    out = {}
    for tree, package in TREES.items():
        for path in tree.rglob("*.py"):
            if "demo/data" in path.as_posix():
                continue
            parts = [p for p in path.relative_to(tree).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every tuneloop module this file imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tuneloop")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuneloop"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from tuneloop.x import module`
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"  # __init__: the package's face


def _floor(module: str) -> int:
    return FLOORS.get(_room(module), 0)


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _graph()} - {"__init__"}
    assert rooms <= set(FLOORS), f"give these rooms a floor in FLOORS: {sorted(rooms - set(FLOORS))}"


def test_no_import_runs_uphill():
    uphill = [f"{m} -> {i}" for m, targets in _graph().items() for i in targets
              if _room(m) != "__init__" and _floor(i) > _floor(m)]
    assert uphill == []


def test_only_the_cli_and_orchestration_reach_the_kfp_layer():
    reach = [f"{m} -> {i}" for m, targets in _graph().items() for i in targets
             if _room(i) in ("components", "orchestrate", "pipelines", "cli")
             and _room(m) not in ("cli", "orchestrate", "components", "pipelines")]
    assert reach == []


def test_the_data_layer_imports_nothing_from_serving_or_monitoring():
    bad = [f"{m} -> {i}" for m, targets in _graph().items() if _room(m) == "data" for i in targets
           if _room(i) in ("deploy", "monitor", "stages")]
    assert bad == []


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for i in sorted(graph[m]):
            if state.get(i) == 1:
                circles.append(stack[stack.index(i):] + [i])
            elif i not in state:
                visit(i, [*stack, i])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []
