#!/usr/bin/env python3
"""``./dev.sh bench``: the benchmark suite, the package ``scripts/bench/`` (its docstring says
what it measures and how); ``python -m scripts.bench`` from the repository root runs the same."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: ``scripts.bench``

from scripts.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
