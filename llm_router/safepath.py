"""Starting our own Python children so that they never import code from their cwd.

``python -m pkg.mod`` puts the current directory first on ``sys.path``: a ``redis.py`` or
``psutil.py`` planted in the directory a root worker was started from would run as root in
its linger, and the same for ``up``'s and ``serve --workers``' children. ``-P`` (Python 3.11)
leaves it out. It is a flag, not ``PYTHONSAFEPATH=1`` in the environment, on purpose: that
variable would be inherited by engines (the worker passes ``PYTHON*`` on), where it also drops
an engine script's own directory from its path and breaks scripts that import a sibling.
Children that take no relative paths also run in ``/`` (``worker.handover``).
"""

from __future__ import annotations

import sys


def safe_python_m(module: str, *args: str) -> list[str]:
    """The argv of ``python -P -m module args...`` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *args]
