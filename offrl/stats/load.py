"""Run and Tune experiment directories -> one tidy DataFrame (a row per trial and step).

Two kinds of directory are read, found recursively under the given path(s):

* **offrl run directories**: a folder holding ``config.yaml`` (the resolved nested config) and
  ``metrics.csv`` (``step`` plus namespaced metrics, empty cells where a metric was not logged);
  ``meta.json`` beside them is not needed here. Preferred wherever one exists.
* **Ray Tune trial directories** (``<exp>/<trial_name>/params.json`` + ``result.json`` +
  ``progress.csv``): a trial that holds an offrl run directory (itself or below it) is read through it;
  otherwise the last ``run_dir`` entry in ``result.json`` (absolute, or relative to the trial folder)
  may point to one; otherwise the trial is read from ``params.json`` (the config) and ``progress.csv``
  (metrics, with ``step`` or else ``training_iteration`` as the step; Tune's own bookkeeping columns
  are left out).

Config keys are flattened to dotted names (``finetune.advantage``, ``seed``); lists and empty mappings
become JSON strings (``"[256, 256]"``) so that every config value is hashable. The column ``trial`` is
the run directory's path relative to the given path (a Tune trial's path for a trial read from Tune
files or through a ``run_dir`` pointer). Several rows logged at one step are merged, the last
non-empty value of each metric winning.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import yaml

from offrl.errors import OffrlError

TRIAL = "trial"
STEP = "step"

# Ray Tune fills these into every result; they are bookkeeping, not metrics (ray.tune.result)
_TUNE_BOOKKEEPING = frozenset({
    "done", "trial_id", "experiment_id", "experiment_tag", "date", "timestamp", "pid", "hostname", "node_ip",
    "time_this_iter_s", "time_total_s", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "training_iteration", "checkpoint_dir_name", "should_checkpoint", "run_dir",
})

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class RunSource:
    """Where one trial's data comes from."""

    trial: str          # unique id: the path relative to the searched folder
    kind: str           # "offrl" (config.yaml + metrics.csv) or "tune" (params.json + progress.csv)
    path: Path          # the run directory (or Tune trial directory) read


# ------------------------------------------------------------------------------------------ finding

def find_runs(paths: Union[PathLike, Sequence[PathLike]]) -> list[RunSource]:
    """All runs under ``paths`` (folders searched recursively), sorted by trial id."""
    roots = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not roots:
        raise OffrlError("no path given")
    for r in roots:
        if not r.exists():
            raise OffrlError(f"path not found: {r}")
        if not r.is_dir():
            raise OffrlError(f"not a folder: {r} (give an experiment or run directory)")
    base = roots[0] if len(roots) == 1 else Path(os.path.commonpath([os.path.abspath(r) for r in roots]))

    def trial_id(p: Path) -> str:
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(base))
        return p.resolve().name if rel == "." else rel

    offrl_dirs: dict[Path, Path] = {}   # resolved -> as found
    tune_dirs: list[Path] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here, files = Path(dirpath), set(filenames)
            if "config.yaml" in files and "metrics.csv" in files:
                offrl_dirs.setdefault(here.resolve(), here)
                dirnames.clear()  # checkpoints/ and the like hold no further runs
            elif "params.json" in files and ("progress.csv" in files or "result.json" in files):
                tune_dirs.append(here)

    sources = {res: RunSource(trial_id(p), "offrl", p) for res, p in offrl_dirs.items()}
    for t in tune_dirs:
        tres = t.resolve()
        if any(res == tres or tres in res.parents for res in offrl_dirs):
            continue  # the trainable wrote an offrl run directory inside this trial
        pointed = _run_dir_pointer(t)
        if pointed is not None:
            sources.setdefault(pointed.resolve(), RunSource(trial_id(t), "offrl", pointed))
        elif (t / "progress.csv").exists():
            sources.setdefault(tres, RunSource(trial_id(t), "tune", t))
    found = sorted(sources.values(), key=lambda s: s.trial)
    seen: set[str] = set()
    for s in found:
        if s.trial in seen:
            raise OffrlError(f"two runs share the trial id {s.trial!r}; pass folders that do not overlap")
        seen.add(s.trial)
    return found


def _run_dir_pointer(trial_dir: Path) -> Optional[Path]:
    """The offrl run directory named by the last ``run_dir`` in a Tune trial's result.json, if it exists."""
    result = trial_dir / "result.json"
    if not result.exists():
        return None
    pointer = None
    for line in result.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed trial
        if isinstance(obj, dict) and obj.get("run_dir"):
            pointer = str(obj["run_dir"])
    if pointer is None:
        return None
    p = Path(pointer) if os.path.isabs(pointer) else trial_dir / pointer
    return p if (p / "config.yaml").exists() and (p / "metrics.csv").exists() else None


# ------------------------------------------------------------------------------------------ reading

def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted key: value}; lists and empty mappings become JSON strings."""
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return {prefix: _scalar(data)} if prefix else {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key))
        else:
            out[key] = _scalar(v)
    return out


def _scalar(v: Any) -> Any:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def _read_config(src: RunSource) -> dict[str, Any]:
    path = src.path / ("config.yaml" if src.kind == "offrl" else "params.json")
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if src.kind == "offrl" else json.loads(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        raise OffrlError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OffrlError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    flat = flatten_config(data)
    # keep our own columns' names free: a config key "trial" or "step" is renamed "config.trial"
    return {(f"config.{k}" if k in (TRIAL, STEP) else k): v for k, v in flat.items()}


def _read_metrics(src: RunSource) -> pd.DataFrame:
    """The run's metrics: column ``step`` plus one column per metric, one row per step."""
    path = src.path / ("metrics.csv" if src.kind == "offrl" else "progress.csv")
    if src.kind == "offrl":
        from offrl.platform.logger import read_metrics_csv

        # strict: a ragged row or a non-numeric cell is an OffrlError naming file:line, never NaN or a
        # shifted data point; empty cells (metrics not logged at that step) stay NaN
        columns, rows = read_metrics_csv(path)
        if not rows:
            return pd.DataFrame({STEP: []})
        raw = pd.DataFrame([[float(r[c]) if r[c].strip() else np.nan for c in columns] for r in rows],
                           columns=columns)
        step_col, metric_cols = STEP, [c for c in columns if c != STEP]
    else:
        try:
            raw = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            return pd.DataFrame({STEP: []})
        except (OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
            raise OffrlError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        step_col = STEP if STEP in raw.columns else "training_iteration"
        if step_col not in raw.columns:
            raise OffrlError(f"{path} has neither a 'step' nor a 'training_iteration' column")
        metric_cols = [c for c in raw.columns if c != step_col and c not in _TUNE_BOOKKEEPING
                       and pd.api.types.is_numeric_dtype(raw[c])]
    out = pd.DataFrame({STEP: pd.to_numeric(raw[step_col], errors="coerce")})
    for c in metric_cols:
        out[c] = pd.to_numeric(raw[c], errors="coerce")
    out = out[out[STEP].notna()]
    if out.empty:
        return out
    # rows logged at one step (e.g. eval and train written separately) -> one row, last non-empty values
    out = out.groupby(STEP, sort=True).last().reset_index()
    if np.all(np.mod(out[STEP].to_numpy(), 1) == 0):
        out[STEP] = out[STEP].astype(np.int64)
    return out


def load_runs(paths: Union[PathLike, Sequence[PathLike]]) -> pd.DataFrame:
    """Every run under ``paths`` as one tidy DataFrame: one row per (trial, step).

    Columns: ``trial``, ``step``, the metrics (union over runs; NaN where a run did not log a metric at
    that step) and every flattened config key (NaN/None where a run's config lacks the key). The column
    lists are kept in ``df.attrs["metric_columns"]`` and ``df.attrs["config_columns"]``; runs that logged
    no rows at all are listed in ``df.attrs["empty_trials"]`` and ``df.attrs["sources"]`` maps each
    trial to the folder it was read from. Raises OffrlError when a path is missing or holds no runs.
    """
    sources = find_runs(paths)
    if not sources:
        where = ", ".join(str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths))
        raise OffrlError(f"no runs found under {where} (looked for run directories with config.yaml + "
                         "metrics.csv and Tune trial directories with params.json + progress.csv)")
    metric_frames, configs, empty, own = [], [], [], []
    for src in sources:
        cfg = _read_config(src)
        m = _read_metrics(src)
        if m.empty:
            empty.append(src.trial)
            continue
        m = m.drop(columns=[c for c in m.columns if c in cfg])  # a config key wins over a same-named metric
        m.insert(0, TRIAL, src.trial)
        metric_frames.append(m)
        configs.append({TRIAL: src.trial, **cfg})
        own.append(src.kind == "offrl")  # beside configs: empty runs are in neither
    if not metric_frames:
        raise OffrlError(f"no run under {paths} has logged any metric yet ({len(empty)} empty)")
    _fill_new_keys([c for c, o in zip(configs, own) if o])
    metrics = pd.concat(metric_frames, ignore_index=True, sort=False)
    metric_cols = [c for c in metrics.columns if c not in (TRIAL, STEP)]
    config = config_frame(configs)
    config_cols = [c for c in config.columns if c != TRIAL]
    df = metrics.merge(config, on=TRIAL, how="left", validate="many_to_one")
    df = df.sort_values([TRIAL, STEP], kind="stable").reset_index(drop=True)
    df.attrs.update(metric_columns=metric_cols, config_columns=config_cols, empty_trials=empty,
                    sources={s.trial: {"kind": s.kind, "path": str(s.path)} for s in sources})
    return df


def _fill_new_keys(configs: list[dict]) -> None:
    """Give offrl runs written before a config key existed that key's current default, where other runs
    have the key and the run has other keys of its section (``policy.obs_ignore`` for a run with
    ``policy.hidden``): a key is added with a default that keeps the earlier behaviour, so the old run did
    run with it, and without the fill the old and new runs of one cell land in different groups. A whole
    section the run lacks stays missing (None)."""
    keys = set().union(*configs) if configs else set()
    if not any(keys - set(c) for c in configs):
        return
    from offrl.config import load_config, to_dict

    defaults = flatten_config(yaml.safe_load(yaml.safe_dump(to_dict(load_config(None, [])), sort_keys=False)))
    for c in configs:
        sections = {k.split(".", 1)[0] for k in c if "." in k}
        for k in keys - set(c):
            if k in defaults and k.split(".", 1)[0] in sections:
                c[k] = defaults[k]


def config_frame(records: Sequence[dict]) -> pd.DataFrame:
    """Records of config values -> DataFrame; a column with gaps stays object-typed (ints stay ints, gaps
    are None, where pandas would make floats and NaN), other columns get their natural dtype."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    cols = {}
    for k in keys:
        values = [value_key(r.get(k)) for r in records]
        col = pd.Series(values, dtype=object)
        cols[k] = col if any(v is None for v in values) else col.infer_objects()
    return pd.DataFrame(cols, index=pd.RangeIndex(len(records)))


# ------------------------------------------------------------------------------------------ helpers

def config_columns(df: pd.DataFrame) -> list[str]:
    """The flattened config keys of a :func:`load_runs` frame (without attrs: columns with no '/')."""
    cols = df.attrs.get("config_columns")
    if cols is None:
        cols = [c for c in df.columns if c not in (TRIAL, STEP) and "/" not in str(c)]
    return [c for c in cols if c in df.columns]


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of a :func:`load_runs` frame (without attrs: columns with a '/')."""
    cols = df.attrs.get("metric_columns")
    if cols is None:
        cols = [c for c in df.columns if "/" in str(c)]
    return [c for c in cols if c in df.columns]


def value_key(v: Any) -> Any:
    """A config value as a plain hashable Python value; every kind of missing value becomes None."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
        return None if isinstance(v, float) and math.isnan(v) else v
    return v


def trial_table(df: pd.DataFrame, columns: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """One row per trial with its config columns (or the given ones)."""
    cols = list(columns) if columns is not None else config_columns(df)
    return df.drop_duplicates(TRIAL)[[TRIAL] + cols].reset_index(drop=True)


def varying_columns(df: pd.DataFrame, columns: Optional[Iterable[str]] = None) -> list[str]:
    """Config columns whose value differs between trials (the swept axes, ``seed`` included)."""
    cols = list(columns) if columns is not None else config_columns(df)
    trials = trial_table(df, cols)
    return [c for c in cols if len({value_key(v) for v in trials[c]}) > 1]


def require_metric(df: pd.DataFrame, metric: str) -> None:
    """Raise OffrlError naming the available metrics when ``metric`` is not a metric column of ``df``."""
    available = metric_columns(df)
    if metric not in available:
        raise OffrlError(f"metric {metric!r} not found; available: {', '.join(sorted(available)) or 'none'}")


def final_values(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The last logged (non-NaN) value of ``metric`` per trial.

    Returns one row per trial that logged the metric: ``trial``, ``step`` (where the value was logged),
    ``metric`` (named as the metric) and the config columns; trials that never logged it are absent.
    """
    require_metric(df, metric)
    logged = df[df[metric].notna()].sort_values([TRIAL, STEP], kind="stable")
    last = logged.groupby(TRIAL, sort=True).tail(1)
    return last[[TRIAL, STEP, metric] + config_columns(df)].reset_index(drop=True)
