"""One logging interface: TensorBoard events plus ``metrics.csv`` (one row per step, a column per metric)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping

from offrl import metrics as M


class MetricLogger:
    """Write scalar metrics (names from :mod:`offrl.metrics`) to TensorBoard and ``metrics.csv``.

    ``metrics.csv`` has columns ``step`` plus every metric seen so far; when a new metric appears the
    file is rewritten with the wider header, so it always parses as one table.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        if self.csv_path.exists():  # resuming: keep what was logged
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [dict(r) for r in reader]
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (used when resuming from an earlier checkpoint)."""
        self.rows = [r for r in self.rows if int(float(r["step"])) <= step]
        self._rewrite()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        row: dict = {"step": int(step)}
        for name, v in values.items():
            M.check(name)
            v = float(v)
            row[name] = v
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(name, v, int(step))
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
