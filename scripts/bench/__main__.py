"""``python -m scripts.bench`` (from the repository root)."""

import sys

from scripts.bench.cli import main

sys.exit(main())
