"""Synthetic run and Tune directories with known answers.

(tests/stats is a package so that this conftest does not shadow tests/conftest.py's ``from conftest
import run_cli``.)

The offrl sweep: axes a.b in {x, y} and c.d in {1, 2}, seeds 0..2, 12 runs. Each run logs
eval/success_rate at steps 0, 100, ..., 400, rising linearly from 0 to its final value
``FINAL_BASE[(a.b, c.d)] + 0.05 * seed`` (so its normalized AUC is exactly final / 2), and rollout/return
at steps 50, 150, ..., 400 in separate rows (empty eval cells; two rows at step 400 to be merged).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

FINAL_BASE = {("x", 1): 0.2, ("x", 2): 0.4, ("y", 1): 0.6, ("y", 2): 0.8}
SEEDS = (0, 1, 2)
EVAL_STEPS = (0, 100, 200, 300, 400)
ROLLOUT_STEPS = (50, 150, 250, 350, 400)


def final_value(b: str, d: int, seed: int) -> float:
    return FINAL_BASE[(b, d)] + 0.05 * seed


def write_run(run: Path, config: dict, rows: list[dict]) -> Path:
    """An offrl run directory: config.yaml, meta.json and metrics.csv written the way MetricLogger does."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "meta.json").write_text(json.dumps({"git": {"commit": None, "dirty": None}, "command": "test"}))
    columns = ["step"] + list(dict.fromkeys(k for r in rows for k in r if k != "step"))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return run


def write_sweep(exp: Path, env_ids=("Toy-v0",)) -> Path:
    """The 12-run sweep (per env id) under ``exp``; returns ``exp``."""
    for env_id in env_ids:
        for (b, d) in FINAL_BASE:
            for seed in SEEDS:
                name = f"b-{b}_d-{d}_s{seed}" + (f"_{env_id}" if len(env_ids) > 1 else "")
                final = final_value(b, d, seed)
                rows = [{"step": s, "eval/success_rate": final * s / 400} for s in EVAL_STEPS]
                rows += [{"step": s, "rollout/return": 10.0 * final + s / 100} for s in ROLLOUT_STEPS]
                rows.sort(key=lambda r: r["step"])
                config = {"seed": seed, "env": {"id": env_id, "num_envs": 2}, "a": {"b": b}, "c": {"d": d},
                          "policy": {"hidden": [8, 8]}, "run": {"experiment": exp.name, "trial": name}}
                write_run(exp / name, config, rows)
    return exp


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    return write_sweep(tmp_path / "sweep")


def write_tune_trial(trial: Path, params: dict, rows: list[dict], results: list[dict] | None = None) -> Path:
    """A Ray Tune trial directory: params.json, progress.csv (with Tune's bookkeeping columns), result.json."""
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    full = [{**r, "timestamp": 1700000000 + i, "done": False, "training_iteration": i + 1, "trial_id": "abc",
             "date": "2026-01-01_00-00-00", "time_this_iter_s": 0.1, "hostname": "vm", "pid": 1}
            for i, r in enumerate(rows)]
    with open(trial / "progress.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(full[0]))
        w.writeheader()
        w.writerows(full)
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in (results or full)))
    return trial
