"""The import structure is part of the design, so the suite checks it.

- the `layers` contract in pyproject.toml (import-linter): a module imports only from its own
  layer or lower ones;
- no cycle between any two modules, inside a package too (the layers contract sees only
  imports between layers): strongly connected components of grimp's import graph, which
  counts function-level and `TYPE_CHECKING` imports as well;
- loading a spec imports only the spec (not the agents, the store, SQLAlchemy or MLflow);
- a function-level (lazy) import says why on its line: only an optional or heavy dependency
  deserves one, never a cycle to dodge.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.application.use_cases import lint_imports
from importlinter.configuration import configure

ROOT = Path(__file__).resolve().parents[1]

# Known cycles, each with the file and why (empty: any cycle fails). An entry that no longer
# matches fails the test too, so that the list only shrinks.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}
# There is no upward import left on this branch. Should one have to stay for a while, it goes in
# the `ignore_imports` of the layers contract in pyproject.toml ("importer -> imported", with a
# comment saying why); import-linter then fails once it no longer matches.


def _cycles(graph: grimp.ImportGraph) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph.find_modules_directly_imported_by(root)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.find_modules_directly_imported_by(nxt))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def _describe(graph: grimp.ImportGraph, comp: frozenset[str]) -> str:
    lines = []
    for a in sorted(comp):
        for b in sorted(graph.find_modules_directly_imported_by(a) & comp):
            where = [d["line_number"] for d in graph.get_import_details(importer=a, imported=b)]
            lines.append(f"    {a} -> {b} (line {', '.join(map(str, where))})")
    return "\n".join(lines)


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("scanflow", cache_dir=None)
    cycles = _cycles(graph)
    new = [c for c in cycles if c not in ALLOWED_CYCLES]
    stale = [c for c in ALLOWED_CYCLES if c not in cycles]
    assert not new, "import cycles:\n" + "\n".join(
        f"  {sorted(c)}\n{_describe(graph, c)}" for c in new)
    assert not stale, f"no longer a cycle, remove from ALLOWED_CYCLES: {[sorted(c) for c in stale]}"


def test_the_cycle_finder_sees_cycles_inside_a_package() -> None:
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c", "p.d"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    graph.add_import(importer="p.d", imported="p.a")
    assert _cycles(graph) == [frozenset({"p.a", "p.b", "p.c"})]


def test_imports_point_downward_only(capsys: pytest.CaptureFixture[str]) -> None:
    """The contracts of pyproject.toml, as `lint-imports` checks them (its report on failure)."""
    configure()  # what the `lint-imports` command does first
    kept = lint_imports(str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert "layers" in report or "downward" in report  # the contract was found and checked
    assert kept, report


def test_loading_a_spec_imports_only_the_spec() -> None:
    code = (
        "import json, sys\n"
        "from scanflow.spec import load_application\n"
        f"app = load_application({str(ROOT / 'examples/mnist/dataengineer')!r})\n"
        "assert app.agents\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    heavy = [m for m in loaded if m.split(".")[0] in {"sqlalchemy", "mlflow", "fastapi"}
             or (m.startswith("scanflow.") and not m.startswith("scanflow.spec"))]
    assert heavy == []


def _uncommented_lazy_imports(path: Path) -> list[int]:
    lines = path.read_text().splitlines()
    found: set[int] = set()
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found |= {node.lineno for node in ast.walk(fn) if isinstance(node, ast.Import | ast.ImportFrom)
                      and "#" not in lines[node.lineno - 1]}
    return sorted(found)


def test_lazy_imports_say_why() -> None:
    src = ROOT / "src" / "scanflow"
    over = []
    for path in sorted(src.rglob("*.py")):
        lines = _uncommented_lazy_imports(path)
        if lines:
            over.append(f"  {path.relative_to(src).as_posix()}: lines {lines}")
    assert not over, "function-level imports without a comment saying why:\n" + "\n".join(over)
