"""The results store: one SQLite file that every finished run adds itself to.

SQLite (Python's own ``sqlite3``) because the store must survive across runs and sweeps, take
concurrent writers on one machine (jobs of a sweep finishing together: SQLite locks the file,
writers wait up to :data:`TIMEOUT_S`; its locks are not reliable on network file systems such
as NFS, so cluster jobs on several nodes should each keep a local store, or log to W&B, and be
merged with ``mtl-report add``) and stay readable without the template (``sqlite3 logs/results.sqlite 'select * from runs'``). A run is keyed by its run
folder: recording it again (a resumed run that finishes later) replaces its row.

Tables: ``runs`` (one row per run: the :class:`RunRecord` fields, JSON for the mappings) and
``metrics`` (``run_dir, name, value``: every final value the run logged).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

from lightning_mtl.results.identity import RunRecord

#: seconds a writer waits for another one's lock
TIMEOUT_S = 60.0
SCHEMA_VERSION = 1
_JSON_FIELDS = ("tasks", "setup", "task_specs", "recipe")
_COLUMNS = [f.name for f in fields(RunRecord) if f.name != "values"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    {", ".join(f"{name} {'TEXT PRIMARY KEY' if name == 'run_dir' else ''}" for name in _COLUMNS)}
);
CREATE TABLE IF NOT EXISTS metrics (
    run_dir TEXT NOT NULL REFERENCES runs(run_dir) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_dir, name)
);
"""


class ResultsStore:
    """The SQLite file at ``path`` (created with its folder on first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=TIMEOUT_S)
        connection.execute("PRAGMA foreign_keys = ON")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            connection.close()
            raise ValueError(
                f"{self.path}: results store of schema version {version}; this template reads "
                f"version {SCHEMA_VERSION} (move the file aside to start a new store)"
            )
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return connection

    def add(self, record: RunRecord) -> None:
        """Add ``record``, replacing the row of the same run folder if there is one."""
        if not record.recorded_at:
            record.recorded_at = datetime.now(UTC).isoformat(timespec="seconds")
        row = [
            json.dumps(getattr(record, n), default=str) if n in _JSON_FIELDS else getattr(record, n)
            for n in _COLUMNS
        ]
        with closing(self._connect()) as connection, connection:
            connection.execute("DELETE FROM runs WHERE run_dir = ?", (record.run_dir,))
            marks = ", ".join("?" * len(_COLUMNS))
            connection.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({marks})", row)
            connection.executemany(
                "INSERT INTO metrics (run_dir, name, value) VALUES (?, ?, ?)",
                [(record.run_dir, name, value) for name, value in sorted(record.values.items())],
            )

    def remove(self, run_dirs: Iterable[str]) -> int:
        """Delete these runs; returns how many there were."""
        with closing(self._connect()) as connection, connection:
            cursor = connection.executemany(
                "DELETE FROM runs WHERE run_dir = ?", [(str(d),) for d in run_dirs]
            )
            return cursor.rowcount

    def records(self) -> list[RunRecord]:
        """Every run, oldest first, with its metric values."""
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no results store at {self.path}: runs add themselves to it when they finish "
                "(results.store in configs/train.yaml); `mtl-report add <run folders>` adds "
                "runs made before"
            )
        with closing(self._connect()) as connection:
            rows = connection.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY recorded_at, run_dir"
            ).fetchall()
            values: dict[str, dict[str, float]] = {}
            for run_dir, name, value in connection.execute(
                "SELECT run_dir, name, value FROM metrics"
            ):
                values.setdefault(run_dir, {})[name] = float("nan") if value is None else value
        records = []
        for row in rows:
            data = dict(zip(_COLUMNS, row, strict=True))
            for name in _JSON_FIELDS:
                data[name] = json.loads(data[name])
            records.append(RunRecord(**data, values=values.get(data["run_dir"], {})))
        return records
