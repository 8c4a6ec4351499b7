"""The package layering holds: routers never import the worker (they share only ``llm_router``),
and ``llm_router`` depends on neither (its CLI launches both, lazily).

A router imported ``worker.placement`` and ``worker.devices`` once; that pulled the worker's
process supervisor into every router and let the two sides drift. The rule is checked on the
source (every ``import`` and ``from … import`` of every module under ``router/``, at any depth,
lazy imports inside functions included), so it fails before anyone runs a router.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def imports_of(package: str, forbidden: str, allowed: tuple[str, ...] = ()) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: imports {module}"
            for path in sorted((ROOT / package).rglob("*.py")) if path.name not in allowed
            for line, module in imported_modules(path)
            if module == forbidden or module.startswith(forbidden + ".")]


def test_no_router_module_imports_the_worker():
    assert imports_of("router", "worker") == []


def test_the_shared_package_imports_neither_side_except_the_cli_that_launches_them():
    for side in ("router", "worker"):
        assert imports_of("llm_router", side, allowed=("cli.py",)) == []


def test_the_check_sees_imports_at_any_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from worker.placement import free_vram\n    import worker\n")
    assert [m for _, m in imported_modules(source)] == ["os", "worker.placement", "worker"]
