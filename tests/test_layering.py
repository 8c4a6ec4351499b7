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
