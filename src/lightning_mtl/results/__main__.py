"""``python -m lightning_mtl.results``: the same as ``mtl-report``."""

import sys

from lightning_mtl.results.cli import main

sys.exit(main())
