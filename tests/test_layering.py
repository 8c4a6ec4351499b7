"""The package layering holds, checked on the source before anyone runs a router.

- Routers never import the worker (they share only the top-level package): a router imported
  the worker's placement and devices once, which pulled the process supervisor into every
  router and let the two sides drift.
- The shared modules (``llm_router/``) import neither side, except the CLI that launches both.
- Inside ``router/`` the sub-packages import downwards only: ``http`` → ``services`` /
  ``supervisor`` → ``forward`` → ``control`` | ``limits`` | ``logs`` (side by side: none imports
  another) → ``observe`` → ``core``. A module may import its own sub-package freely.

Every ``import`` and ``from … import`` of every module, at any depth (lazy imports inside
functions and ``TYPE_CHECKING`` blocks included), is read with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "llm_lab_router"
# Rank of each part of router/: a module may import parts of a lower rank, and its own part.
RANKS = {"core": 0, "observe": 1, "control": 2, "limits": 2, "logs": 2, "forward": 3,
         "services": 4, "supervisor": 4, "http": 5}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if node.module in (TOP, f"{TOP}.router")]  # `from llm_lab_router.router import http`
    return found


def imports_of(folder: str, forbidden: str, allowed: tuple[str, ...] = ()) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: imports {module}"
            for path in sorted((ROOT / folder).rglob("*.py")) if path.name not in allowed
            for line, module in imported_modules(path)
            if module == forbidden or module.startswith(forbidden + ".")]


def part_of(module: str) -> str | None:
    """The router part (``http``, ``core``, …) a dotted module belongs to; None outside router/."""
    prefix = f"{TOP}.router."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else None


def layering_violations(router_dir: Path) -> list[str]:
    bad = []
    for path in sorted(router_dir.rglob("*.py")):
        rel = path.relative_to(router_dir)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own not in RANKS:
            continue  # router/__init__.py
        for line, module in imported_modules(path):
            other = part_of(module)
            if other is None or other == own:
                continue
            if other not in RANKS:
                bad.append(f"router/{rel}:{line}: imports {module}, which no layer owns")
            elif RANKS[other] >= RANKS[own]:
                bad.append(f"router/{rel}:{line}: {own} imports {module} ({other} is not below it)")
    return bad


def test_no_router_module_imports_the_worker():
    assert imports_of("router", f"{TOP}.worker") == []


def test_the_shared_package_imports_neither_side_except_the_cli_that_launches_them():
    for side in ("router", "worker"):
        assert imports_of("llm_router", f"{TOP}.{side}", allowed=("cli.py",)) == []


def test_every_router_part_has_a_rank_and_imports_only_below_it():
    parts = {p.name for p in (ROOT / "router").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in (ROOT / "router").glob("*.py") if p.stem != "__init__"}
    assert parts == set(RANKS), "a new part of router/ needs its place in RANKS"
    assert layering_violations(ROOT / "router") == []


def test_nothing_imports_the_old_top_level_names():
    """``router``, ``worker`` and ``llm_router`` are other distributions' names on the registry."""
    for folder in ("router", "worker", "llm_router", "tests", "scripts"):
        for old in ("router", "worker", "llm_router"):
            assert imports_of(folder, old) == []


def test_the_check_sees_imports_at_any_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from llm_lab_router.worker.placement import free_vram\n"
                      "    import llm_lab_router.worker\n")
    assert [m for _, m in imported_modules(source)] == ["os", "llm_lab_router.worker.placement",
                                                        "llm_lab_router.worker"]


def test_the_check_flags_an_upward_and_a_sideways_import(tmp_path):
    for part in ("core", "control", "limits"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "__init__.py").write_text("")
    (tmp_path / "core" / "errors.py").write_text("from llm_lab_router.router.control.explain import WaitReason\n")
    (tmp_path / "control" / "client.py").write_text("from llm_lab_router.router.limits.quotas import Quotas\n"
                                                    "from llm_lab_router.router.core.errors import ApiError\n")
    (tmp_path / "limits" / "quotas.py").write_text("from llm_lab_router.router.limits.profile import KeyProfile\n")
    assert layering_violations(tmp_path) == [
        "router/control/client.py:1: control imports llm_lab_router.router.limits.quotas (limits is not below it)",
        "router/core/errors.py:1: core imports llm_lab_router.router.control.explain (control is not below it)",
    ]


FOLDERS = {"llm_router": TOP, "router": f"{TOP}.router", "worker": f"{TOP}.worker"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> source file of every module of llm_router/, router/ and worker/."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports, at any depth (``TYPE_CHECKING`` included).
    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
        graph[module] = {m for m in edges if m in files and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each back edge a depth-first search meets (empty: the graph is a DAG)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_module_takes_part_in_an_import_cycle():
    """An import cycle (``TYPE_CHECKING`` ones too) means two modules share a concern that
    belongs in one of them, or in a third both import."""
    assert cycles(import_graph(module_files())) == []


def test_the_cycle_check_finds_a_type_checking_cycle(tmp_path):
    (tmp_path / "llm_router").mkdir()
    (tmp_path / "llm_router" / "a.py").write_text("from llm_lab_router import b\n")
    (tmp_path / "llm_router" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                  "    from llm_lab_router.a import A\n")
    for folder in ("router", "worker"):
        (tmp_path / folder).mkdir()
    graph = import_graph(module_files(tmp_path))
    assert graph["llm_lab_router.a"] == {"llm_lab_router.b"} and cycles(graph) == [
        ["llm_lab_router.a", "llm_lab_router.b", "llm_lab_router.a"]]
