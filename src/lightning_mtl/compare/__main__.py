"""``python -m lightning_mtl.compare <sweep_dir>``: the table of a finished sweep."""

from lightning_mtl.compare import main

raise SystemExit(main())
