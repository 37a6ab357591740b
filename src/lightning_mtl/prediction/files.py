"""The prediction tables written atomically (``checkpointing.files.atomic_write``), so a reader or
another rank never sees a partial file: a CSV table, a JSON summary."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_mtl.checkpointing.files import atomic_write


def write_table(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV file with a header row (written atomically)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()), durable=False)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """A JSON file (written atomically)."""
    text = json.dumps(summary, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()), durable=False)
