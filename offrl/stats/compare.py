"""Compare groups of trials: final performance (IQM, mean, median), area under the learning curve and
probability of improvement over a baseline, each with a stratified bootstrap interval; learning curves
on a common step grid. Pure pandas/numpy: :mod:`offrl.stats.plots` draws, :mod:`offrl.stats.cli` writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from offrl.errors import OffrlError
from offrl.stats.aggregate import auc, bootstrap_ci, iqm, probability_of_improvement_ci
from offrl.stats.load import (STEP, TRIAL, config_columns, config_frame, final_values, require_metric,
                              trial_table, value_key, varying_columns)

DEFAULT_METRIC = "eval/success_rate"
DEFAULT_TASK_COLUMN = "env.id"
AUTO = "auto"
GROUP = "group"
GRID_POINTS = 100
START = "start"  # --baseline start: every group against its own trials' first logged values

# final-performance statistics: (CSV column prefix, table header, function of a [B, n] array over axis 1)
FINAL_STATS = (("iqm", "IQM", iqm), ("mean", "mean", np.mean), ("median", "median", np.median))


@dataclass
class Comparison:
    """The result of :func:`compare`: tables as DataFrames plus what produced them."""

    metric: str
    by: list[str]
    baseline: str
    task_column: Optional[str]
    reps: int
    seed: int
    level: float
    table: pd.DataFrame    # one row per group: by values, trials, point/lo/hi per statistic
    trials: pd.DataFrame   # one row per trial: group, final step and value, AUC
    curves: pd.DataFrame   # group, step, mean, lo, hi, trials: the learning curves on the common grid
    notes: list[str] = field(default_factory=list)
    # --pairwise: one row per ordered pair of groups (a, b): P(a > b) with its interval
    pairs: Optional[pd.DataFrame] = None

    @property
    def groups(self) -> list[str]:
        return list(self.table[GROUP])

    def markdown(self) -> str:
        """A markdown section: a heading, how the numbers were computed, the table and notes."""
        pct = f"{self.level:.0%}"
        if self.task_column:
            n_tasks = len({value_key(v) for v in self.trials[self.task_column]})
            strata = f"stratified by {self.task_column}, {n_tasks} task{'s' if n_tasks != 1 else ''}"
        else:
            strata = "no task strata"
        lines = [f"### {self.metric}: final performance by {' × '.join(self.by) if self.by else 'all trials'}", "",
                 f"{len(self.trials)} trials in {len(self.table)} groups. Final = last logged value per trial; "
                 f"AUC = area under the learning curve / step range, averaged over trials; "
                 f"{'P(> start)' if self.baseline == START else 'P(> baseline)'} = "
                 + (f"P(X > Y) + 0.5 P(X = Y) over pairs of (final, start) values of each group's own trials "
                    f"(start = a trial's first logged value). " if self.baseline == START else
                    f"P(X > Y) + 0.5 P(X = Y) over pairs of trials against the baseline `{self.baseline}`. ") +
                 f"{pct} bootstrap CIs in brackets ({self.reps} resamples of trials, {strata}, seed {self.seed}).",
                 ""]
        head = (self.by or [GROUP]) + ["trials"] + [h for _, h, _ in FINAL_STATS] + [
            "AUC", "P(> start)" if self.baseline == START else "P(> baseline)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h == "trials" else "---" for h in head) + "|"]
        for _, row in self.table.iterrows():
            cells = [_cell(format_value(row[c])) for c in self.by] if self.by else [row[GROUP]]
            cells.append(str(row["trials"]))
            cells += [_fmt_interval(row, key) for key, _, _ in FINAL_STATS]
            cells.append(_fmt_interval(row, "auc"))
            cells.append("baseline" if row[GROUP] == self.baseline and self.baseline != START
                         else _fmt_interval(row, "poi"))
            lines.append("| " + " | ".join(cells) + " |")
        if self.pairs is not None and not self.pairs.empty:
            labs = self.groups
            lines += ["", f"P(row > column) = P(X > Y) + 0.5 P(X = Y) over pairs of final values, {pct} bootstrap "
                          "CIs (trials of both groups resampled independently):", "",
                      "| row > column | " + " | ".join(_cell(lab) for lab in labs) + " |",
                      "|---|" + "---|" * len(labs)]
            cell = {(r["a"], r["b"]): _fmt_interval(r, "poi") for _, r in self.pairs.iterrows()}
            for a in labs:
                lines.append(f"| {_cell(a)} | " + " | ".join("-" if a == b else cell[(a, b)] for b in labs) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a markdown table cell (a "|" would end the cell)."""
    return text.replace("|", "\\|")


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


def _fmt_interval(row: pd.Series, key: str) -> str:
    return f"{_fmt(row[key])} [{_fmt(row[key + '_lo'])}, {_fmt(row[key + '_hi'])}]"


def format_value(v: Any) -> str:
    """A config value as it appears in group names: YAML-like (null, true, 0.0003, gae)."""
    v = value_key(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def metric_slug(metric: str) -> str:
    """A file-name-safe form of a metric name: eval/success_rate -> eval_success_rate."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", metric).strip("_") or "metric"


def _is_default_excluded(col: str, task_column: Optional[str]) -> bool:
    last = col.rsplit(".", 1)[-1]
    return last == "seed" or col.startswith("run.") or col == task_column


def default_by(df: pd.DataFrame, task_column: Optional[str] = None) -> list[str]:
    """The swept axes to group by: the config columns that vary between trials, except seeds (``seed``,
    ``*.seed``), the run naming and logging keys (``run.*``) and the task column (tasks are strata
    within a group); of several columns that split the trials identically (keys that change together,
    e.g. a whole config section present in some runs only) only the first is kept."""
    trials = trial_table(df)
    kept, seen = [], set()
    for c in varying_columns(df):
        if _is_default_excluded(c, task_column):
            continue
        first_seen: dict = {}
        split = tuple(first_seen.setdefault(value_key(v), len(first_seen)) for v in trials[c])
        if split not in seen:
            seen.add(split)
            kept.append(c)
    return kept


def resolve_task_column(df: pd.DataFrame, task_column: Optional[str]) -> Optional[str]:
    """``"auto"``: env.id when the runs have it; None: no strata; a name: that config column (checked)."""
    cols = config_columns(df)
    if task_column is None or task_column.lower() == "none":
        return None
    if task_column == AUTO:
        return DEFAULT_TASK_COLUMN if DEFAULT_TASK_COLUMN in cols else None
    if task_column not in cols:
        raise OffrlError(f"task column {task_column!r} is not a config column; available: {', '.join(cols)}")
    return task_column


def _check_by(df: pd.DataFrame, by: Sequence[str]) -> None:
    cols = config_columns(df)
    for c in by:
        if c not in cols:
            swept = varying_columns(df)
            raise OffrlError(f"--by column {c!r} is not a config column; swept: {', '.join(swept) or 'none'}; "
                             f"all: {', '.join(cols)}")
    if len(set(by)) != len(by):
        raise OffrlError(f"--by names a column twice: {' '.join(by)}")


def _sort_key(values: tuple) -> tuple:
    key = []
    for v in values:
        if v is None:
            key.append((2, 0.0, ""))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            key.append((0, float(v), ""))
        else:
            key.append((1, 0.0, format_value(v)))
    return tuple(key)


def group_label(by: Sequence[str], values: tuple) -> str:
    """``a.b=x, c.d=1`` (``all`` when there is nothing to group by)."""
    return ", ".join(f"{c}={format_value(v)}" for c, v in zip(by, values)) if by else "all"


def match_group(by: Sequence[str], keys: Sequence[tuple], text: str) -> int:
    """The index of the one group that ``text`` names: its label, or comma-separated ``key=value`` parts
    and bare values (``finetune.update=ppo``, ``gae, ppo``) that together pick out exactly one group."""
    labels = [group_label(by, k) for k in keys]
    if text in labels:
        return labels.index(text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    wanted = []
    for p in parts:
        col, sep, val = p.partition("=")
        col, val = col.strip(), val.strip()
        if sep and col not in by:
            raise OffrlError(f"baseline {text!r}: {col!r} is not a --by column ({', '.join(by) or 'none'})")
        wanted.append((col if sep else None, val if sep else p))

    def fits(k: tuple) -> bool:
        shown = {c: format_value(v) for c, v in zip(by, k)}
        return all(shown[c] == v if c else v in shown.values() for c, v in wanted)

    hits = [i for i, k in enumerate(keys) if parts and fits(k)]
    if len(hits) != 1:
        why = "matches no group" if not hits else f"matches {len(hits)} groups"
        raise OffrlError(f"baseline group {text!r} {why}; groups: {'; '.join(labels)}")
    return hits[0]


def learning_curves(steps_values: Sequence[tuple[np.ndarray, np.ndarray]], points: int = GRID_POINTS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Trials' curves interpolated onto one grid: (grid [G], values [n, G]).

    The grid spans the steps every trial covers (latest first step to earliest last step): the logged
    steps there when they are at most ``points``, else ``points`` evenly spaced steps; each trial is
    linearly interpolated between its own logged points, never extrapolated. Empty when the trials'
    step ranges do not overlap.
    """
    lo = max(s[0] for s, _ in steps_values)
    hi = min(s[-1] for s, _ in steps_values)
    if lo > hi:
        return np.empty(0), np.empty((len(steps_values), 0))
    union = np.unique(np.concatenate([s[(s >= lo) & (s <= hi)] for s, _ in steps_values]))
    grid = union if len(union) <= points else np.linspace(lo, hi, points)
    if np.all(np.mod(grid, 1) == 0):
        grid = grid.astype(np.int64)
    return grid, np.stack([np.interp(grid, s, v) for s, v in steps_values])


def compare(df: pd.DataFrame, metric: str = DEFAULT_METRIC, by: Optional[Sequence[str]] = None,
            baseline: Optional[str] = None, task_column: Optional[str] = AUTO, reps: int = 2000, seed: int = 0,
            level: float = 0.95, points: int = GRID_POINTS, pairwise: bool = False) -> Comparison:
    """Compare the groups of trials in a :func:`offrl.stats.load.load_runs` frame on ``metric``.

    Groups are the unique combinations of the ``by`` config columns (default: :func:`default_by`).
    Per group: final performance (the last logged value per trial) as IQM, mean and median; the mean
    normalized AUC of the trials' curves (:func:`offrl.stats.aggregate.auc`); the probability of
    improvement over the ``baseline`` group (default: the first group). Each comes with a ``level``
    bootstrap percentile interval from ``reps`` resamples of the group's trials, stratified by the task
    column, drawn from ``default_rng(seed)`` afresh for every interval: trials are ordered by trial id, so
    ``bootstrap_ci(values, iqm, reps, seed, strata)`` on a group's values recomputes its IQM interval.
    ``pairwise``: also P(a > b) with its interval for every ordered pair of groups (``Comparison.pairs``).
    """
    require_metric(df, metric)
    if reps < 1:
        raise OffrlError(f"--reps must be at least 1, got {reps}")
    if seed < 0:
        raise OffrlError(f"--seed must be non-negative, got {seed}")
    task = resolve_task_column(df, task_column)
    notes: list[str] = []
    if by is None:
        by = default_by(df, task)
        also = [c for c in varying_columns(df) if c not in by and not _is_default_excluded(c, task)]
        if also:
            notes.append(f"grouped by {', '.join(by)}; these also vary, in step with them: {_some(also)}")
    by = list(by)
    _check_by(df, by)
    finals = final_values(df, metric)
    never = sorted(set(df[TRIAL]) - set(finals[TRIAL]))
    if finals.empty:
        raise OffrlError(f"no trial logged a value of {metric!r}")
    if never:
        notes.append(f"{len(never)} trial(s) never logged {metric} and are left out: {_some(never)}")
    if df.attrs.get("empty_trials"):
        notes.append(f"{len(df.attrs['empty_trials'])} run(s) had no metrics yet: {_some(df.attrs['empty_trials'])}")

    logged = df[df[metric].notna()]
    curves_by_trial = {t: (g[STEP].to_numpy(float), g[metric].to_numpy(float)) for t, g in logged.groupby(TRIAL)}
    keys_of = {t: tuple(value_key(v) for v in row) for t, row in zip(finals[TRIAL], finals[by].itertuples(index=False))}
    keys = sorted(set(keys_of.values()), key=_sort_key)
    from_start = baseline == START
    base_i = match_group(by, keys, baseline) if baseline is not None and not from_start else 0
    labels = [group_label(by, k) for k in keys]
    if from_start:  # each group against its own trials' first logged values (a finetuning run's step-0 eval)
        firsts = logged.sort_values([TRIAL, STEP], kind="stable").groupby(TRIAL, sort=True).head(1)
        first_of = dict(zip(firsts[TRIAL], firsts[metric].astype(float)))
        first_step = dict(zip(firsts[TRIAL], firsts[STEP]))
        late = sorted(t for t, st in first_step.items() if st != 0)
        if late:
            notes.append(f"--baseline start: {len(late)} trial(s) log {metric} first after step 0: {_some(late)}")
    if baseline is None and len(keys) > 1:
        notes.append(f"baseline: {labels[0]} (the first group; choose another with --baseline)")

    trials = finals.rename(columns={STEP: "final_step", metric: "final"})
    trials.insert(1, GROUP, [labels[keys.index(keys_of[t])] for t in trials[TRIAL]])
    trials["auc"] = [auc(*curves_by_trial[t]) for t in trials[TRIAL]]
    trials = trials[[TRIAL, GROUP, *by, "final_step", "final", "auc"] + ([task] if task and task not in by else [])]
    strata_of = dict(zip(finals[TRIAL], finals[task].map(value_key))) if task else {}

    members = {lab: trials[trials[GROUP] == lab].sort_values(TRIAL) for lab in labels}
    base = members[labels[base_i]]
    group_strata = {lab: [strata_of[t] for t in g[TRIAL]] if task else None for lab, g in members.items()}
    base_strata = group_strata[labels[base_i]]
    rows, curve_rows = [], []
    for lab in labels:
        g = members[lab]
        strata = group_strata[lab]
        row: dict[str, Any] = {GROUP: lab, "trials": len(g), "tasks": len(set(strata)) if task else 1}
        vals = g["final"].to_numpy(float)
        for key, _, fn in FINAL_STATS:
            _put(row, key, bootstrap_ci(vals, fn, reps, seed, strata, level))
        _put(row, "auc", bootstrap_ci(g["auc"].to_numpy(float), np.mean, reps, seed, strata, level))
        if from_start:
            starts = np.array([first_of[t] for t in g[TRIAL]])
            _put(row, "poi", probability_of_improvement_ci(vals, starts, reps, seed, strata, strata, level))
        else:
            _put(row, "poi", probability_of_improvement_ci(vals, base["final"].to_numpy(float), reps, seed,
                                                           strata, base_strata, level))
        row["final_step_min"], row["final_step_max"] = g["final_step"].min(), g["final_step"].max()
        if row["final_step_min"] != row["final_step_max"]:
            notes.append(f"{lab}: trials end at different steps ({row['final_step_min']} to {row['final_step_max']})")
        rows.append(row)
        curve_rows.append(_group_curve(lab, [curves_by_trial[t] for t in g[TRIAL]], reps, seed, strata, level,
                                       points, notes))
    single = [r[GROUP] for r in rows if r["trials"] == 1]
    if single:
        notes.append(f"{len(single)} group(s) have a single trial, so their intervals have no width: {_some(single)}")
    table = pd.DataFrame(rows)
    # by values keep their types (an int axis with a gap must not turn into floats)
    table = pd.concat([table[[GROUP]], config_frame([dict(zip(by, k)) for k in keys]), table.drop(columns=GROUP)],
                      axis=1)
    curve_rows = [c for c in curve_rows if not c.empty]
    curves = (pd.concat(curve_rows, ignore_index=True) if curve_rows
              else pd.DataFrame(columns=[GROUP, STEP, "mean", "lo", "hi", "trials"]))
    pairs = None
    if pairwise:
        prow = []
        for a in labels:
            for b in labels:
                if a == b:
                    continue
                ga, gb = members[a], members[b]
                r: dict[str, Any] = {"a": a, "b": b, "trials_a": len(ga), "trials_b": len(gb)}
                _put(r, "poi", probability_of_improvement_ci(ga["final"].to_numpy(float), gb["final"].to_numpy(float),
                                                              reps, seed, group_strata[a], group_strata[b], level))
                prow.append(r)
        pairs = pd.DataFrame(prow, columns=["a", "b", "trials_a", "trials_b", "poi", "poi_lo", "poi_hi"])
    return Comparison(metric=metric, by=by, baseline=START if from_start else labels[base_i], task_column=task, reps=reps, seed=seed,
                      level=level, table=table, trials=trials.reset_index(drop=True), curves=curves, notes=notes,
                      pairs=pairs)


def _some(names: Sequence[str], k: int = 8) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def _put(row: dict, key: str, interval) -> None:
    row[key], row[key + "_lo"], row[key + "_hi"] = interval


def _group_curve(label: str, steps_values: list, reps: int, seed: int, strata, level: float, points: int,
                 notes: list[str]) -> pd.DataFrame:
    """Mean learning curve of one group with a bootstrap band over its trials."""
    grid, values = learning_curves(steps_values, points)
    if grid.size == 0:
        notes.append(f"{label}: the trials' step ranges do not overlap; no learning curve drawn")
        return pd.DataFrame()
    mean, lo, hi = bootstrap_ci(values, np.mean, reps, seed, strata, level)
    return pd.DataFrame({GROUP: label, STEP: grid, "mean": mean, "lo": lo, "hi": hi, "trials": len(values)})
