"""One logging interface: TensorBoard events plus ``metrics.csv`` (one row per step, a column per metric)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping

from offrl import metrics as M
from offrl.errors import OffrlError


def read_metrics_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a ``metrics.csv``, each row ``{column: cell}`` with empty cells kept as ``""``
    (a metric not logged at that step, which is normal).

    Refuses what :class:`MetricLogger` never writes, naming ``file:line``: a header without ``step``, a
    row with more or fewer cells than the header, a cell that is not a number (``nan`` and ``inf`` are
    numbers), a row without a step. An empty file has no rows.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return ["step"], []
            if "step" not in header:
                raise OffrlError(f"{path}:1: the header has no 'step' column")
            if len(set(header)) != len(header):
                dup = next(c for c in header if header.count(c) > 1)
                raise OffrlError(f"{path}:1: the header names column {dup!r} twice")
            rows = []
            for cells in reader:
                line = reader.line_num
                if len(cells) != len(header):
                    raise OffrlError(f"{path}:{line}: {len(cells)} cells but the header has {len(header)} columns")
                for col, cell in zip(header, cells):
                    if cell.strip():
                        try:
                            float(cell)
                        except ValueError:
                            raise OffrlError(f"{path}:{line}: column {col!r} holds {cell!r}, not a number") from None
                row = dict(zip(header, cells))
                if not row["step"].strip():
                    raise OffrlError(f"{path}:{line}: the row has no step")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise OffrlError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return header, rows


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
            self.columns, self.rows = read_metrics_csv(self.csv_path)
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
