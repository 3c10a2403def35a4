"""Sweeps (``offrl sweep``): a base experiment plus sweep axes, run as a Ray Tune experiment.

A sweep YAML is an ordinary experiment YAML (``env``, ``cluster``, ``pretrain``, ``finetune``, ``run``, ...)
with one more top-level section, ``sweep:`` (:class:`SweepSpec`)::

    sweep:
      job: finetune                       # pretrain | finetune: the offrl job every trial runs
      axes:
        finetune.advantage: {grid_search: [gae, mc, iql, sarsa]}
        finetune.actor_lr: {loguniform: [1.0e-5, 1.0e-3]}
      seeds: [0, 1, 2]                    # a grid axis over the master seed

Every trial is one offrl run whose run directory *is* its Tune trial directory
(``<storage>/<sweep.name>/<trial>/``: config.yaml, meta.json, metrics.csv, TensorBoard events,
checkpoints/ beside Tune's params.json, result.json, progress.csv and checkpoint_*/). Each trial holds a
placement group with its learner bundle and one bundle per SimHost; the SimHosts it starts land in it.

This module parses and validates sweeps and drives Tune; the code that runs inside a trial is in
:mod:`offrl.platform.sweep_trial`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from offrl import metrics as M
from offrl.config import (ExperimentConfig, _Checked, _coerce, _f, _sub, apply_overrides, from_dict,
                          parse_override, read_yaml, to_dict)
from offrl.errors import ConfigError, OffrlError

# the file each job writes into its run directory when it has finished
DONE_FILES = {"pretrain": "pretrain_done.json", "finetune": "finetune_summary.json"}

SWEEP_JOBS = ("pretrain", "finetune")
AXIS_KINDS = ("grid_search", "choice", "uniform", "loguniform")
SWEEP_FILE = "offrl_sweep.yaml"          # in the experiment dir: the resolved sweep, read by --resume
# set by the sweep for every trial (the run directory is the Tune trial directory)
RESERVED_KEYS = ("run.root", "run.experiment", "run.trial")
# config values that are paths: made absolute before trials start (Tune moves a trial's working directory)
PATH_KEYS = ("pretrain.dataset", "finetune.checkpoint", "finetune.rerollout_checkpoint", "collect.output")
_MAX_CHECKED_COMBINATIONS = 2000
_print = functools.partial(print, flush=True)  # progress lines appear at once in logs and `ray job logs`


@dataclass(frozen=True)
class SweepResources(_Checked):
    """Resources of each trial's learner bundle; SimHost bundles come from the cluster section."""

    learner_cpus: float = _f(1.0, "CPUs of the trial's learner bundle (the Tune trial process).")
    learner_gpus: float = _f(0.0, "GPUs of the trial's learner bundle.")

    def check(self) -> None:
        if self.learner_cpus < 0 or self.learner_gpus < 0:
            raise ConfigError("learner_cpus", "resource amounts must be >= 0")
        if self.learner_cpus == 0 and self.learner_gpus == 0:
            raise ConfigError("learner_cpus", "the learner bundle needs some CPU or GPU (Ray refuses empty bundles)")


@dataclass(frozen=True)
class SweepSpec(_Checked):
    """The ``sweep:`` section: the job each trial runs, the swept axes and how Tune runs the trials."""

    job: Literal["pretrain", "finetune"] = _f("finetune", "offrl job every trial runs: pretrain or finetune.")
    name: Optional[str] = _f(None, "Tune experiment name, the folder under --storage (null: run.experiment when "
                                   "the YAML sets it, else the YAML file's name).")
    axes: dict = _f({}, "Swept config keys (dotted, e.g. finetune.advantage) -> {grid_search: [...]}, "
                        "{choice: [...]}, {uniform: [low, high]} or {loguniform: [low, high]}; a mapping value "
                        "is merged into a section (coupled axes); null removes an axis.")
    seeds: Optional[tuple[int, ...]] = _f(None, "Master seeds: a grid axis over `seed` (null: the experiment's seed).")
    num_samples: int = _f(1, "Repetitions of the grid; each draws fresh values for choice/uniform/loguniform axes.")
    max_failures: int = _f(1, "Times a failed trial is retried from its last checkpoint (-1: without limit).")
    max_concurrent: int = _f(0, "Trials running at once; 0: as many as the cluster's resources allow.")
    resources: SweepResources = _sub(SweepResources)
    metric: str = _f(M.EVAL_SUCCESS_RATE, "Metric of the final summary (last logged value per trial).")
    mode: Literal["max", "min"] = _f("max", "Whether a higher (max) or lower (min) metric is better.")
    scheduler: dict = _f({}, "Tune trial scheduler: {} (none: every trial runs to the end); {asha: {metric: "
                             "..., mode: ..., grace_period: G, reduction_factor: R, max_t: T}} for Tune's "
                             "ASHAScheduler, which stops trials whose metric is in the bottom 1 - 1/R at a rung; or "
                             "{pbt: {perturbation_interval: P, hyperparam_mutations: {key: [values] | {uniform: "
                             "[lo, hi]}}, quantile_fraction: 0.25, resample_probability: 0.25, synch: false}} for "
                             "Tune's PopulationBasedTraining: every P steps a trial in the bottom quantile continues "
                             "from a top trial's checkpoint with mutated values. Times are in the trial's `step` "
                             "units (finetune: env steps; pretrain: epochs); metric/mode default to "
                             "sweep.metric/mode. A stopped trial keeps its run directory.")
    keep_checkpoints: Optional[int] = _f(None, "Tune's checkpoint copies kept per trial: the latest K (null: every "
                                               "one). The run directory keeps its own latest checkpoints and, for "
                                               "pretraining, the best one by validation loss (checkpoints/best).")

    def check(self) -> None:
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", f"must be >= 1 or null, got {self.keep_checkpoints}")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")
        if self.seeds is not None:
            if not self.seeds:
                raise ConfigError("seeds", "needs at least one seed (or null)")
            if len(set(self.seeds)) != len(self.seeds):
                raise ConfigError("seeds", f"has repeated seeds: {list(self.seeds)}")
        if self.num_samples < 1:
            raise ConfigError("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"must be >= -1, got {self.max_failures}")
        if self.max_concurrent < 0:
            raise ConfigError("max_concurrent", f"must be >= 0, got {self.max_concurrent}")
        if self.metric not in M.ALL:
            raise ConfigError("metric", f"unknown metric {self.metric!r} (metric names are in offrl/metrics.py)")
        asha_settings(self)  # names a bad scheduler key before Ray starts


SCHEDULERS = ("asha", "pbt")
_ASHA_KEYS = {"metric": str, "mode": str, "grace_period": float, "reduction_factor": float, "max_t": float}
_PBT_KEYS = {"metric": str, "mode": str, "perturbation_interval": float, "hyperparam_mutations": dict,
             "quantile_fraction": float, "resample_probability": float, "synch": bool}


def _scheduler_body(raw: dict, name: str, keys: dict) -> dict:
    """``sweep.scheduler.<name>``'s settings, each known and of its type (numbers finite), or a ConfigError."""
    body = raw[name] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"scheduler.{name}", f"expected a mapping of settings, got {body!r}")
    for k, v in body.items():
        if k not in keys:
            raise ConfigError(f"scheduler.{name}.{k}", f"unknown setting; known: {', '.join(keys)}")
        if keys[k] is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"scheduler.{name}.{k}", f"must be a finite number, got {v!r}")
        if keys[k] is bool and not isinstance(v, bool):
            raise ConfigError(f"scheduler.{name}.{k}", f"must be true or false, got {v!r}")
    return body


def asha_settings(spec: "SweepSpec") -> Optional[dict]:
    """Validated ``sweep.scheduler.asha`` settings with defaults filled in (None: no scheduler, or PBT);
    a ``pbt`` scheduler is validated too (:func:`pbt_settings`)."""
    raw = spec.scheduler
    if not raw:
        return None
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in SCHEDULERS:
        raise ConfigError("scheduler", f"expected {{}}, {{asha: {{...}}}} or {{pbt: {{...}}}}, got {raw!r}")
    if "pbt" in raw:
        pbt_settings(spec)
        return None
    body = _scheduler_body(raw, "asha", _ASHA_KEYS)
    out = {"metric": spec.metric, "mode": spec.mode, "grace_period": 1, "reduction_factor": 2, "max_t": None,
           **body}
    if out["metric"] not in M.ALL:
        raise ConfigError("scheduler.asha.metric", f"unknown metric {out['metric']!r}")
    if out["mode"] not in ("max", "min"):
        raise ConfigError("scheduler.asha.mode", f"must be max or min, got {out['mode']!r}")
    if out["grace_period"] <= 0:
        raise ConfigError("scheduler.asha.grace_period", f"must be > 0, got {out['grace_period']}")
    if out["reduction_factor"] <= 1:
        raise ConfigError("scheduler.asha.reduction_factor", f"must be > 1, got {out['reduction_factor']}")
    if out["max_t"] is None:
        raise ConfigError("scheduler.asha.max_t", "is needed: the step of a trial's last report (finetune: "
                                                  "iterations x steps_per_iter x envs; pretrain: epochs)")
    if out["max_t"] < out["grace_period"]:
        raise ConfigError("scheduler.asha.max_t", f"must be >= grace_period, got {out['max_t']}")
    return out


def pbt_settings(spec: "SweepSpec") -> Optional[dict]:
    """Validated ``sweep.scheduler.pbt`` settings with defaults filled in (None: not PBT).

    ``hyperparam_mutations`` maps dotted config keys to a list of values or ``{uniform: [low, high]}`` /
    ``{loguniform: [low, high]}``; every key must be a valid value of the experiment's config."""
    raw = spec.scheduler
    if not isinstance(raw, dict) or "pbt" not in raw:
        return None
    body = _scheduler_body(raw, "pbt", _PBT_KEYS)
    out = {"metric": spec.metric, "mode": spec.mode, "perturbation_interval": None, "hyperparam_mutations": {},
           "quantile_fraction": 0.25, "resample_probability": 0.25, "synch": False, **body}
    if out["metric"] not in M.ALL:
        raise ConfigError("scheduler.pbt.metric", f"unknown metric {out['metric']!r}")
    if out["mode"] not in ("max", "min"):
        raise ConfigError("scheduler.pbt.mode", f"must be max or min, got {out['mode']!r}")
    if out["perturbation_interval"] is None or out["perturbation_interval"] <= 0:
        raise ConfigError("scheduler.pbt.perturbation_interval", "is needed, > 0, in the trial's step units "
                                                                 "(finetune: env steps; pretrain: epochs)")
    if not 0 < out["quantile_fraction"] <= 0.5:
        raise ConfigError("scheduler.pbt.quantile_fraction", f"must be in (0, 0.5], got {out['quantile_fraction']}")
    if not 0 <= out["resample_probability"] <= 1:
        raise ConfigError("scheduler.pbt.resample_probability", f"must be in [0, 1], got {out['resample_probability']}")
    muts = out["hyperparam_mutations"]
    if not isinstance(muts, dict) or not muts:
        raise ConfigError("scheduler.pbt.hyperparam_mutations", "needs at least one key -> [values] or "
                                                                "{uniform: [low, high]}")
    checked = {}
    for key, spec_v in muts.items():
        path = f"scheduler.pbt.hyperparam_mutations.{key}"
        if key in RESERVED_KEYS or key.split(".")[0] in ("run", "cluster") or key == "seed":
            raise ConfigError(path, "cannot change while a trial runs")
        if isinstance(spec_v, list):
            kind, args = _axis(path, "choice", spec_v)
        elif isinstance(spec_v, dict) and len(spec_v) == 1 and next(iter(spec_v)) in ("uniform", "loguniform"):
            kind, args = _axis(path, *next(iter(spec_v.items())))
        else:
            raise ConfigError(path, f"expected [values] or {{uniform: [low, high]}}, got {spec_v!r}")
        checked[key] = (kind, args)
    out["hyperparam_mutations"] = checked
    return out


def _scheduler(spec: "SweepSpec") -> Any:
    """Tune's scheduler object for ``sweep.scheduler`` (None: FIFO, every trial runs to the end)."""
    from offrl.platform.sweep_trial import STEP

    pbt = pbt_settings(spec)
    if pbt is not None:
        from ray import tune

        from offrl.platform.sweep_trial import PBTScheduler

        make = {"choice": lambda a: a, "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a)}
        return PBTScheduler(
            time_attr=STEP, metric=pbt["metric"], mode=pbt["mode"],
            perturbation_interval=pbt["perturbation_interval"], quantile_fraction=pbt["quantile_fraction"],
            resample_probability=pbt["resample_probability"], synch=pbt["synch"],
            hyperparam_mutations={k: make[kind](args) for k, (kind, args) in pbt["hyperparam_mutations"].items()})
    asha = asha_settings(spec)
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=STEP, metric=asha["metric"], mode=asha["mode"], max_t=asha["max_t"],
                         grace_period=asha["grace_period"], reduction_factor=asha["reduction_factor"],
                         stop_last_trials=False)  # a trial that reaches max_t finishes on its own


# ------------------------------------------------------------------------------------------ axes

def _axis(path: str, kind: str, args: Any) -> tuple[str, list]:
    """Validate one axis spec; returns (kind, values or [low, high])."""
    if kind in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(path, f"{kind} needs a non-empty list of values, got {args!r}")
        return kind, list(args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(path, f"{kind} needs [low, high], got {args!r}")
    bounds = [_coerce(v, float, path) for v in args]  # numbers; YAML 1.1 reads 1e-3 (no dot) as a string
    if not all(math.isfinite(b) for b in bounds):
        raise ConfigError(path, f"{kind} bounds must be finite numbers, got {args!r}")
    if not bounds[0] < bounds[1]:
        raise ConfigError(path, f"{kind} needs low < high, got {args!r}")
    if kind == "loguniform" and bounds[0] <= 0:
        raise ConfigError(path, f"loguniform needs low > 0, got {args!r}")
    return kind, bounds


def parse_axes(raw: Any) -> dict[str, tuple[str, list]]:
    """``sweep.axes`` -> {dotted key: (kind, args)}; nested mappings are flattened, later entries win."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("sweep.axes", f"expected a mapping of config keys to axis specs, got {raw!r}")
    out: dict[str, tuple[str, list]] = {}
    usage = "expected {grid_search: [...]}, {choice: [...]}, {uniform: [low, high]} or {loguniform: [low, high]}"

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            path = f"sweep.axes.{key}"
            if v is None:  # `sweep.axes.some.key=null` on the command line removes an axis
                out.pop(key, None)
            elif isinstance(v, dict) and len(v) == 1 and next(iter(v)) in AXIS_KINDS:
                out.pop(key, None)  # keep the order of the latest definition
                out[key] = _axis(path, *next(iter(v.items())))
            elif isinstance(v, dict) and v and all(isinstance(x, dict) or x is None for x in v.values()):
                walk(v, key)
            elif isinstance(v, dict) and len(v) == 1 and isinstance(next(iter(v.values())), list):
                raise ConfigError(path, f"unknown axis kind {next(iter(v))!r}; {usage}")
            elif isinstance(v, dict) and v:
                k2, x = next((k2, x) for k2, x in v.items() if not isinstance(x, dict) and x is not None)
                raise ConfigError(f"{path}.{k2}", f"{usage}; got {x!r}")
            else:
                raise ConfigError(path, f"{usage}; got {v!r}")

    walk(raw, "")
    return out


def _set(data: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in nested ``data``; a mapping value is merged into an existing section."""
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section; cannot set a sub-key")
        node = nxt
    old = node.get(parts[-1])
    if isinstance(value, dict) and isinstance(old, dict):
        for k, v in value.items():
            _set(old, str(k), v)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def trial_dict(base: dict, values: dict) -> dict:
    """The nested config of one trial: ``base`` with the trial's axis values (dotted keys) set.

    ``cluster.num_hosts=0`` (size the pool to the cluster) becomes 1: inside a trial the pool must fit
    the trial's placement group, not the whole cluster.
    """
    data = copy.deepcopy(base)
    for key, value in values.items():
        _set(data, key, value)
    cluster = data.setdefault("cluster", {})
    if isinstance(cluster, dict) and not cluster.get("num_hosts"):
        cluster["num_hosts"] = 1
    return data


def _grid(axes: dict[str, tuple[str, list]], seeds: Optional[tuple[int, ...]]) -> list[dict]:
    """Every grid point (grid_search axes and seeds), in axis order; other axes are left out."""
    keys = [k for k, (kind, _) in axes.items() if kind == "grid_search"]
    lists = [axes[k][1] for k in keys]
    if seeds is not None:
        keys, lists = keys + ["seed"], lists + [list(seeds)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def _resolve_paths(data: dict, base_dir: Path) -> None:
    """Make the path values of PATH_KEYS absolute (relative to ``base_dir``), in place."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name]:
            p = Path(node[name]).expanduser()
            node[name] = str(p if p.is_absolute() else (base_dir / p).resolve())


# ------------------------------------------------------------------------------------------ sweep

@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the resolved base experiment (nested dict), the settings and the axes."""

    base: dict
    spec: SweepSpec
    axes: dict  # dotted key -> (kind, args), in YAML order

    @property
    def name(self) -> str:
        return self.spec.name or "sweep"

    def base_config(self) -> ExperimentConfig:
        return from_dict(trial_dict(self.base, {}))

    def param_space(self) -> dict:
        """Tune's param_space: a flat dict of dotted keys (and ``seed``)."""
        from ray import tune

        make = {"grid_search": tune.grid_search, "choice": tune.choice,
                "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a)}
        space = {k: make[kind](args) for k, (kind, args) in self.axes.items()}
        if self.spec.seeds is not None:
            space["seed"] = tune.grid_search(list(self.spec.seeds))
        pbt = pbt_settings(self.spec)
        for key in (pbt["hyperparam_mutations"] if pbt else {}):
            if key not in space:  # PBT mutates keys of the trial's config: start them at the base value
                section, _, name = key.rpartition(".")
                node = self.base
                for part in section.split(".") if section else []:
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict) and name in node:
                    space[key] = node[name]
                else:
                    space[key] = _default_value(key)
        return space

    def num_trials(self) -> int:
        return len(_grid(self.axes, self.spec.seeds)) * self.spec.num_samples

    def by_columns(self) -> list[str]:
        """Config columns to group by in ``offrl stats compare``: the axes (a section axis names the keys
        its values set), without seeds."""
        cols = []
        for k, (kind, args) in self.axes.items():
            subs = sorted({s for a in args if isinstance(a, dict) for s in a}) if kind != "uniform" else []
            cols += [f"{k}.{s}" for s in subs] or [k]
        return [c for c in cols if c != "seed"]

    def to_saved(self) -> dict:
        spec = to_dict(self.spec)
        spec["axes"] = {k: {kind: args} for k, (kind, args) in self.axes.items()}
        return {"sweep": spec, "base": self.base}

    @classmethod
    def from_saved(cls, data: dict) -> "Sweep":
        if not isinstance(data, dict) or "sweep" not in data or "base" not in data:
            raise OffrlError(f"{SWEEP_FILE} is not a saved sweep (needs `sweep:` and `base:`)")
        raw = dict(data["sweep"])
        axes = parse_axes(raw.pop("axes", None))
        spec = _spec_from_dict(raw)
        from_dict(data["base"])  # still a valid experiment with this version of offrl
        return cls(base=data["base"], spec=spec, axes=axes)


def _spec_from_dict(raw: Any) -> SweepSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("sweep", f"expected a mapping of sweep settings, got {raw!r}")
    try:
        return from_dict(raw, SweepSpec)
    except ConfigError as e:
        raise ConfigError(f"sweep.{e.path}" if e.path else "sweep", str(e).split(": ", 1)[1]) from None


def _message(e: ConfigError) -> str:
    return str(e).split("': ", 1)[1] if "': " in str(e) else str(e)


def _check_axes(base: dict, axes: dict[str, tuple[str, list]], spec: SweepSpec) -> None:
    """Every axis names a config key and every value builds a valid experiment (alone and in the grid)."""
    for key, (kind, args) in axes.items():
        path = f"sweep.axes.{key}"
        if key in RESERVED_KEYS or key == "run":
            raise ConfigError(path, "is set by the sweep (the run directory is the Tune trial directory)")
        if key == "seed" and spec.seeds is not None:
            raise ConfigError(path, "conflicts with sweep.seeds (use one of them)")
        if key in ("cluster.address", "cluster.num_cpus"):
            raise ConfigError(path, "is a property of the whole cluster, not of a trial")
        if kind in ("uniform", "loguniform") and key in PATH_KEYS:
            raise ConfigError(path, f"a path cannot be drawn from {kind}")
        for v in args:
            try:
                from_dict(trial_dict(base, {key: v}))
            except ConfigError as e:
                inner = _message(e) if e.path == key else str(e)
                raise ConfigError(path, f"{kind} value {v!r}: {inner}") from None
    combos = _grid(axes, spec.seeds)
    sampled = {k: args[0] for k, (kind, args) in axes.items() if kind != "grid_search"}
    for combo in combos[:_MAX_CHECKED_COMBINATIONS]:
        try:
            from_dict(trial_dict(base, {**combo, **sampled}))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v}" for k, v in combo.items())
            raise ConfigError("sweep.axes", f"the combination {shown} is invalid: {e}") from None
    pbt = pbt_settings(spec)
    for key, (kind, args) in (pbt["hyperparam_mutations"] if pbt else {}).items():
        for v in args:  # the values of a list, or the bounds of a range
            try:
                from_dict(trial_dict(base, {key: v}))
            except ConfigError as e:
                inner = _message(e) if e.path == key else str(e)
                raise ConfigError(f"sweep.scheduler.pbt.hyperparam_mutations.{key}", f"value {v!r}: {inner}") from None


def _default_value(key: str) -> Any:
    """The default value of a dotted config key."""
    from offrl.config import ExperimentConfig

    node: Any = ExperimentConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _input_values(sweep: Sweep, key: str) -> set:
    """Every value ``key`` takes in the sweep's trials (the base value, or an axis over it or its section)."""
    section, name = key.split(".")
    values = {sweep.base.get(section, {}).get(name)}
    for k, (kind, args) in sweep.axes.items():
        if k == key:
            values = set(args)
        elif k == section and kind in ("grid_search", "choice"):
            values |= {a.get(name) for a in args if isinstance(a, dict) and a.get(name)}
    return values


def _check_inputs(sweep: Sweep) -> None:
    """Fail before Ray starts (and before the experiment dir exists) when a dataset or checkpoint a trial
    needs is missing, incomplete or unreadable."""
    from offrl.platform.checkpoint import resolve_checkpoint

    if sweep.spec.job == "pretrain":
        for v in sorted(str(x) for x in _input_values(sweep, "pretrain.dataset") if x is not None):
            if not Path(v).is_file():
                raise OffrlError(f"pretrain.dataset not found: {v}")
        return
    for key in ("finetune.checkpoint", "finetune.rerollout_checkpoint"):
        for v in sorted(str(x) for x in _input_values(sweep, key) if x is not None):
            if not v:
                if key == "finetune.checkpoint":
                    raise ConfigError(key, "is empty: a finetune sweep starts from a pretrained checkpoint "
                                           "(e.g. finetune.checkpoint=runs/finetune_start/bc_iql_100demos)")
                continue  # no fixed re-rollout policy
            try:
                resolve_checkpoint(v)  # found, complete, safetensors header and JSON files readable
            except OffrlError as e:
                raise OffrlError(f"{key}: {e}") from None


def load_sweep(path: str | Path, overrides: Optional[list[str]] = None, log: Any = _print) -> Sweep:
    """Read a sweep YAML, apply ``key=value`` overrides (``sweep.*`` ones too) and validate everything.

    An override of a swept key fixes it (``finetune.advantage=gae`` drops that axis; ``seed=3`` drops
    ``sweep.seeds``). Relative paths (datasets, checkpoints) become absolute, relative to the current
    directory.
    """
    overrides = list(overrides or [])
    data = apply_overrides(read_yaml(path), overrides)
    if "sweep" not in data:
        raise OffrlError(f"{path} has no `sweep:` section (an experiment config runs with offrl pretrain / finetune)")
    raw = data.pop("sweep")
    raw = dict(raw) if isinstance(raw, dict) else raw
    axes = parse_axes(raw.pop("axes", None) if isinstance(raw, dict) else None)
    fixed = [".".join(parse_override(o)[0]) for o in overrides]
    for key in fixed:
        if key in axes:
            del axes[key]
            log(f"[offrl] {key} is set on the command line: it is no longer swept")
        if key == "seed" and isinstance(raw, dict) and raw.get("seeds") is not None:
            raw["seeds"] = None
            log("[offrl] seed is set on the command line: sweep.seeds is ignored")
    spec = _spec_from_dict(raw)
    if spec.name is None:
        run = data.get("run") if isinstance(data.get("run"), dict) else {}
        spec = _spec_from_dict({**to_dict(spec), "name": str(run.get("experiment") or Path(path).stem)})
    cfg = from_dict(data)
    base = to_dict(cfg)
    here = Path.cwd()
    _resolve_paths(base, here)
    for key, (kind, args) in list(axes.items()):
        if key in PATH_KEYS or any(p.startswith(key + ".") for p in PATH_KEYS):
            resolved = []
            for v in args:
                holder: dict = {}
                _set(holder, key, v)
                _resolve_paths(holder, here)
                node = holder
                for p in key.split("."):
                    node = node[p]
                resolved.append(node)
            axes[key] = (kind, resolved)
    _check_axes(base, axes, spec)
    sweep = Sweep(base=base, spec=spec, axes=axes)
    _check_inputs(sweep)
    return sweep


# ------------------------------------------------------------------------------------------ resources

def trial_bundles(cfg: ExperimentConfig, job: str, res: SweepResources) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the learner, then one per SimHost.

    A pretraining trial that trains no actor (critic_mc, ...) evaluates nothing and starts no SimHost.
    """
    def bundle(cpu: float, gpu: float) -> dict[str, float]:
        return {k: float(v) for k, v in (("CPU", cpu), ("GPU", gpu)) if v > 0}

    learner = bundle(res.learner_cpus, res.learner_gpus)
    if job == "pretrain" and not cfg.pretrain.trains_actor:
        return [learner]
    c = cfg.cluster
    host = bundle(c.cpus_per_host, c.gpus_per_host or (1.0 if cfg.env.backend == "gpu" else 0.0))
    if not host:
        raise ConfigError("cluster.cpus_per_host", "a SimHost bundle needs some CPU or GPU in a sweep")
    return [learner] + [host] * c.num_hosts


def _trial_resources(config: dict, *, base: dict, job: str, resources: dict):
    """Tune's per-trial resource request (a PlacementGroupFactory) from the trial's config."""
    from ray import tune

    cfg = from_dict(trial_dict(base, config))
    return tune.PlacementGroupFactory(trial_bundles(cfg, job, from_dict(resources, SweepResources)))


def _bundle_sums(sweep: Sweep) -> list[tuple[dict, dict]]:
    """(grid point, total resources of its bundles) for every grid point."""
    out = []
    sampled = {k: args[0] for k, (kind, args) in sweep.axes.items() if kind != "grid_search"}
    for combo in _grid(sweep.axes, sweep.spec.seeds)[:_MAX_CHECKED_COMBINATIONS]:
        cfg = from_dict(trial_dict(sweep.base, {**combo, **sampled}))
        total: dict[str, float] = {}
        for b in trial_bundles(cfg, sweep.spec.job, sweep.spec.resources):
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        out.append((combo, total))
    return out


def _fmt_resources(total: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in total.items()) or "nothing"


def _check_fits(sweep: Sweep, cluster: dict, local: bool, log: Any) -> None:
    for combo, total in _bundle_sums(sweep):
        short = {k: v for k, v in total.items() if v > cluster.get(k, 0.0) + 1e-9}
        if short:
            what = (f"a trial needs {_fmt_resources(total)} (sweep.resources + cluster.num_hosts x "
                    f"cluster.cpus_per_host/gpus_per_host) but the Ray cluster has "
                    f"{_fmt_resources({k: cluster.get(k, 0.0) for k in total})}")
            if local:
                raise OffrlError(what + "; lower them, e.g. sweep.resources.learner_cpus=0.5 cluster.cpus_per_host=0.5")
            log(f"[offrl] warning: {what}; trials wait until the cluster grows")
            return


# ------------------------------------------------------------------------------------------ naming

def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ",".join(f"{k}={_short(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "-".join(_short(x) for x in v)
    if isinstance(v, str) and ("/" in v or len(v) > 24):
        return Path(v).name[-24:] or v[-24:]
    return str(v)


def trial_dirname(trial: Any) -> str:
    """``<index>_<leaf>=<value>_...``, e.g. ``0003_advantage=iql_update=awr_seed=1`` (also the trial name)."""
    import re

    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    index = f"{int(head):04d}" if head.isdigit() else str(trial.trial_id)
    parts = [f"{str(k).rsplit('.', 1)[-1]}={_short(v)}" for k, v in (trial.config or {}).items()]
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "-", "_".join([index] + parts))
    return name[:100].rstrip("_")


# ------------------------------------------------------------------------------------------ running

def describe(sweep: Sweep, storage: Path) -> str:
    """The trial grid in words and a table (``offrl sweep --dry-run``)."""
    from ray.tune.search.variant_generator import generate_variants

    grid_space = {k: {"grid_search": args} for k, (kind, args) in sweep.axes.items() if kind == "grid_search"}
    if sweep.spec.seeds is not None:
        grid_space["seed"] = {"grid_search": list(sweep.spec.seeds)}
    points = [{k[0]: v for k, v in resolved.items()} for resolved, _ in generate_variants(grid_space)] or [{}]
    sampled = {k: f"{kind}({', '.join(_short(a) for a in args)})"
               for k, (kind, args) in sweep.axes.items() if kind != "grid_search"}
    sizes = [str(len(args)) for kind, args in sweep.axes.values() if kind == "grid_search"]
    if sweep.spec.seeds is not None:
        sizes.append(f"{len(sweep.spec.seeds)} seeds")
    n = len(points) * sweep.spec.num_samples
    sums = _bundle_sums(sweep)
    cfg = sweep.base_config()
    bundles = trial_bundles(cfg, sweep.spec.job, sweep.spec.resources)
    lines = [f"sweep {sweep.name}: job {sweep.spec.job}, {n} trials "
             f"(grid {' x '.join(sizes) or '1'}, num_samples {sweep.spec.num_samples})",
             f"experiment dir: {storage / sweep.name}",
             f"per trial: placement group {bundles} = {_fmt_resources(sums[0][1])}; "
             f"max_concurrent: {sweep.spec.max_concurrent or 'as resources allow'}; "
             f"max_failures: {sweep.spec.max_failures}"]
    cols = list(points[0]) + list(sampled)
    rows = [[str(i)] + [_short(p[c]) if c in p else sampled[c] for c in cols]
            for i, p in enumerate(points * sweep.spec.num_samples)]
    lines += _table(["#"] + cols, rows)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return ["  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header] + rows]


def _save(sweep: Sweep, exp_dir: Path) -> None:
    text = ("# Written by `offrl sweep`; `offrl sweep --resume` reads it. base: the resolved experiment of "
            "every trial before its axis values are set.\n")
    text += f"# command: {' '.join(sys.argv)}\n"
    (exp_dir / SWEEP_FILE).write_text(text + yaml.safe_dump(sweep.to_saved(), sort_keys=False))


def load_saved(exp_dir: str | Path) -> Sweep:
    path = Path(exp_dir) / SWEEP_FILE
    if not path.is_file():
        raise OffrlError(f"{exp_dir} is not an offrl sweep (no {SWEEP_FILE}); give the experiment dir "
                         "that `offrl sweep` printed")
    return Sweep.from_saved(read_yaml(path))


def _tuner_parts(sweep: Sweep, exp_dir: Path):
    """(trainable with parameters and resources, run_config) shared by a new and a resumed sweep."""
    from ray import tune

    from offrl.platform.sweep_trial import JsonResultLog, ProgressCsvLog, SweepProgress, run_trial

    trainable = tune.with_parameters(run_trial, job=sweep.spec.job, base=sweep.base, exp_dir=str(exp_dir))
    trainable = tune.with_resources(trainable, functools.partial(
        _trial_resources, base=sweep.base, job=sweep.spec.job, resources=to_dict(sweep.spec.resources)))
    run_config = tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent), verbose=0,
        failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
        # with num_to_keep, Tune may delete a checkpoint that the experiment state saved on disk still names;
        # a trial restored from such a state continues from its run directory's own latest checkpoint instead
        # (sweep_trial.usable_checkpoint)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.spec.keep_checkpoints),
        callbacks=[JsonResultLog(), ProgressCsvLog(), SweepProgress(sweep.spec.metric, sweep.spec.mode)])
    return trainable, run_config


def _prepare_driver(sweep: Sweep, log: Any) -> None:
    from offrl.platform.cluster import init_ray

    # our JSON/CSV loggers replace Tune's; no Tune TensorBoard files beside offrl's own events
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is silent only in Tune's older output flow
    cfg = sweep.base_config()
    resources = init_ray(cfg.cluster)
    log(f"[offrl] Ray cluster: {_fmt_resources({k: resources.get(k, 0.0) for k in ('CPU', 'GPU')})}")
    _check_fits(sweep, resources, local=not cfg.cluster.address and not os.environ.get("RAY_ADDRESS"), log=log)


def run_sweep(sweep: Sweep, storage: str | Path = "runs", log: Any = _print) -> int:
    """Run every trial of ``sweep`` under ``<storage>/<sweep.name>/``; returns an exit status (0: all finished)."""
    from ray import tune

    storage = Path(storage).expanduser().resolve()
    exp_dir = storage / sweep.name
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise OffrlError(f"experiment dir {exp_dir} exists already: continue it with `offrl sweep --resume "
                         f"{exp_dir}`, or choose another sweep.name=... (or --storage)")
    _prepare_driver(sweep, log)
    exp_dir.mkdir(parents=True, exist_ok=True)
    _save(sweep, exp_dir)
    log(f"[offrl] sweep {sweep.name}: {sweep.num_trials()} trials of `offrl {sweep.spec.job}` -> {exp_dir}")
    trainable, run_config = _tuner_parts(sweep, exp_dir)
    tuner = tune.Tuner(trainable, param_space=sweep.param_space(), run_config=run_config,
                       tune_config=tune.TuneConfig(num_samples=sweep.spec.num_samples,
                                                   max_concurrent_trials=sweep.spec.max_concurrent or None,
                                                   trial_name_creator=trial_dirname,
                                                   trial_dirname_creator=trial_dirname,
                                                   scheduler=_scheduler(sweep.spec)))
    return _finish(sweep, exp_dir, tuner.fit(), log)


def resume_sweep(exp_dir: str | Path, log: Any = _print) -> int:
    """Continue a sweep whose driver stopped (killed, interrupted, or with failed trials).

    Finished trials are not run again; unfinished and failed ones continue from their last Tune
    checkpoint (see :func:`offrl.platform.sweep_trial.run_trial` for what that means per job).
    """
    from ray import tune

    exp_dir = Path(exp_dir).expanduser().resolve()
    if not exp_dir.is_dir():
        raise OffrlError(f"experiment dir not found: {exp_dir}")
    sweep = load_saved(exp_dir)
    if not tune.Tuner.can_restore(str(exp_dir)):
        raise OffrlError(f"{exp_dir} holds no Tune experiment state (the driver died before Tune saved any); "
                         f"remove the folder and start the sweep again")
    _prepare_driver(sweep, log)
    log(f"[offrl] resuming sweep {sweep.name} in {exp_dir}")
    trainable, _ = _tuner_parts(sweep, exp_dir)
    tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    return _finish(sweep, exp_dir, tuner.fit(), log)


def _final(run_dir: Path, metric: str) -> tuple[Optional[int], Optional[float]]:
    """(step, value) of the last logged value of ``metric`` in a run directory's metrics.csv (none yet:
    (None, None)); a malformed metrics.csv is an OffrlError naming file:line."""
    from offrl.platform.logger import read_metrics_csv

    last: tuple[Optional[int], Optional[float]] = (None, None)
    if not (run_dir / "metrics.csv").is_file():
        return last
    for row in read_metrics_csv(run_dir / "metrics.csv")[1]:
        if row.get(metric, "").strip():
            last = (int(float(row["step"])), float(row[metric]))
    return last


def _finish(sweep: Sweep, exp_dir: Path, results: Any, log: Any) -> int:
    """Print the trial table and what to run next; returns 0 when every trial finished."""
    rows, failed, unfinished, stopped = [], [], 0, 0
    values = []
    for r in sorted(results, key=lambda r: Path(r.path).name):
        run_dir = Path(r.path)
        try:
            step, value = _final(run_dir, sweep.spec.metric)
        except OffrlError as e:  # one unreadable trial must not hide the others' results
            log(f"[offrl] warning: {e}")
            step, value = None, None
        done = any((run_dir / f).exists() for f in DONE_FILES.values())
        status = "failed" if r.error is not None else ("finished" if done else "unfinished")
        if r.error is not None:
            failed.append((run_dir.name, str(r.error).strip().splitlines()[-1] if str(r.error).strip() else ""))
        elif not done and sweep.spec.scheduler:  # fit() returned: the scheduler ended it early
            status = f"stopped by {next(iter(sweep.spec.scheduler))}"
            stopped += 1
        elif not done:
            unfinished += 1
        if value is not None:
            values.append((value, run_dir.name))
        rows.append([run_dir.name, status, "" if value is None else f"{value:.4g}", "" if step is None else str(step)])
    n = len(rows)
    log(f"[offrl] {n} trials: {n - len(failed) - unfinished - stopped} finished, {len(failed)} failed, "
        f"{unfinished} unfinished" + (f", {stopped} stopped early by the scheduler" if stopped else ""))
    for line in _table(["trial", "status", sweep.spec.metric, "step"], rows):
        log(line)
    if values:
        best = (max if sweep.spec.mode == "max" else min)(values)
        log(f"[offrl] best {sweep.spec.metric}: {best[0]:.4g} ({best[1]})")
    log(f"[offrl] experiment dir: {exp_dir}")
    by = " ".join(sweep.by_columns())
    log(f"[offrl] compare: offrl stats compare {exp_dir} --metric {sweep.spec.metric}" + (f" --by {by}" if by else ""))
    for name, err in failed:
        log(f"[offrl] failed: {name}: {err} (see {exp_dir / name / 'error.txt'})")
    if failed or unfinished:
        log(f"[offrl] continue with: offrl sweep --resume {exp_dir}")
        return 1
    return 0


def sweep_keys() -> str:
    """Documentation of every ``sweep.*`` key (for ``offrl sweep --help``)."""
    import textwrap

    from offrl.config import iter_keys

    return "\n".join(textwrap.fill(f"{k}: {h} (default: {d!r})", 100, initial_indent="  ", subsequent_indent="      ")
                     for k, _, d, h in iter_keys(SweepSpec, "sweep"))

