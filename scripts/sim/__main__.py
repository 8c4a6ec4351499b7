"""``python -m scripts.sim fleet ...`` (play N workers) or ``python -m scripts.sim measure ...``
(the scale benchmark), from the repository root."""

import sys

from scripts.sim.cli import main

sys.exit(main())
