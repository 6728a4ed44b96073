"""The layering of edge_agent/ (docs/architecture.md), read from the code's own imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edge_agent"
SUBPACKAGES = ("audio", "model", "scoring", "agent", "evaluation", "fleet")
# What each part must never import (beside torch and export/, which nothing in edge_agent imports).
# fleet is the operator's CLI (an MQTT client of the agents): it may use the agent's code, never the reverse.
FORBIDDEN = {
    "audio": ("model", "scoring", "agent", "evaluation", "fleet"),
    "model": ("scoring", "agent", "evaluation", "fleet"),
    "scoring": ("model", "agent", "evaluation", "fleet"),
    "agent": ("evaluation", "fleet"),
    "evaluation": ("agent", "fleet"),
    "fleet": ("evaluation",),
    "": SUBPACKAGES,  # the top-level modules (errors, clock, fsutil, logs, model_info): shared by every part
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (TYPE_CHECKING and function-level included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in SUBPACKAGES else ""


def test_every_part_imports_only_what_lies_below_it() -> None:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    problems = []
    for name, path in modules.items():
        if name in ("edge_agent.cli", "edge_agent.__main__"):
            continue  # the CLI wires every part together
        for imported in _imports(path):
            root = imported.split(".")[0]
            forbidden = root == "edge_agent" and _part(imported) in FORBIDDEN[_part(name)]
            if root in ("torch", "export", "torchaudio") or forbidden:
                problems.append(f"{name} imports {imported}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles_inside_edge_agent() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_runtime_loads_without_torch_onnx_or_the_exporter() -> None:
    code = ("import sys, edge_agent.cli, edge_agent.agent.daemon; "
            "print(','.join(sorted(m for m in ('torch', 'onnx', 'export', 'matplotlib', 'sklearn', 'scipy') "
            "if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == ""

