"""offrl.stats.load: run and Tune directories -> one tidy DataFrame."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offrl.errors import OffrlError
from offrl.stats.compare import default_by
from offrl.stats.load import (config_columns, final_values, find_runs, load_runs, metric_columns, trial_table,
                              varying_columns)

from .conftest import EVAL_STEPS, FINAL_BASE, ROLLOUT_STEPS, SEEDS, final_value, write_run, write_tune_trial


def test_sweep_loads_into_a_tidy_frame(sweep_dir):
    df = load_runs(sweep_dir)
    steps = sorted(set(EVAL_STEPS) | set(ROLLOUT_STEPS))
    assert df["trial"].nunique() == len(FINAL_BASE) * len(SEEDS) == 12
    assert len(df) == 12 * len(steps)  # one row per (trial, step): the two rows at step 400 are merged
    assert not df.duplicated(["trial", "step"]).any()
    assert list(df.columns[:2]) == ["trial", "step"]
    assert metric_columns(df) == ["eval/success_rate", "rollout/return"]
    assert config_columns(df) == ["seed", "env.id", "env.num_envs", "a.b", "c.d", "policy.hidden",
                                  "run.experiment", "run.trial"]
    assert varying_columns(df) == ["seed", "a.b", "c.d", "run.trial"]
    assert default_by(df) == ["a.b", "c.d"]
    # types survive: ints stay ints, lists become JSON strings
    assert df["c.d"].dtype == np.int64 and df["step"].dtype == np.int64
    assert set(df["policy.hidden"]) == {"[8, 8]"}

    one = df[df["trial"] == "b-y_d-2_s1"].set_index("step")
    assert list(one.index) == steps
    assert one.loc[400, "eval/success_rate"] == pytest.approx(final_value("y", 2, 1))
    assert one.loc[400, "rollout/return"] == pytest.approx(10 * final_value("y", 2, 1) + 4)
    assert np.isnan(one.loc[50, "eval/success_rate"]) and np.isnan(one.loc[0, "rollout/return"])
    assert (one["a.b"] == "y").all() and (one["seed"] == 1).all()
    assert len(trial_table(df)) == 12


def test_final_values_are_the_last_logged(sweep_dir):
    df = load_runs(sweep_dir)
    fin = final_values(df, "eval/success_rate").set_index("trial")
    assert len(fin) == 12 and (fin["step"] == 400).all()
    for (b, d) in FINAL_BASE:
        for s in SEEDS:
            assert fin.loc[f"b-{b}_d-{d}_s{s}", "eval/success_rate"] == pytest.approx(final_value(b, d, s))
    # a run that stopped logging eval early: its last eval value counts, at its own step
    write_run(sweep_dir / "short", {"seed": 9, "a": {"b": "x"}, "c": {"d": 1}},
              [{"step": 0, "eval/success_rate": 0.1}, {"step": 100, "eval/success_rate": 0.7},
               {"step": 200, "rollout/return": 3.0}])
    fin = final_values(load_runs(sweep_dir), "eval/success_rate").set_index("trial")
    assert fin.loc["short", "eval/success_rate"] == 0.7 and fin.loc["short", "step"] == 100
    assert fin.loc["short", "env.id"] is None  # a key this run's config lacks


def test_nested_folders_and_several_paths(tmp_path):
    write_run(tmp_path / "exp" / "grp1" / "t1", {"seed": 0, "lr": 0.1}, [{"step": 1, "eval/return": 1.0}])
    write_run(tmp_path / "exp" / "grp2" / "t1", {"seed": 0, "lr": 0.2}, [{"step": 1, "eval/return": 2.0}])
    # checkpoints/ inside a run are not searched (a config.yaml there is no run)
    (tmp_path / "exp" / "grp1" / "t1" / "checkpoints" / "1").mkdir(parents=True)
    df = load_runs(tmp_path / "exp")
    assert sorted(df["trial"]) == ["grp1/t1", "grp2/t1"]
    assert varying_columns(df) == ["lr"]
    df2 = load_runs([tmp_path / "exp" / "grp1" / "t1", tmp_path / "exp" / "grp2"])
    assert sorted(df2["trial"]) == ["grp1/t1", "grp2/t1"]
    assert load_runs(tmp_path / "exp" / "grp1" / "t1")["trial"].tolist() == ["t1"]  # a run directory itself


TUNE_ROWS = [{"eval/success_rate": 0.1 * i, "step": 100 * i, "nested/a": i} for i in (1, 2, 3)]


def test_tune_trials_without_run_dirs(tmp_path):
    exp = tmp_path / "tune_exp"
    for i, lr in enumerate((0.1, 0.2)):
        write_tune_trial(exp / f"trainable_abc_{i:05d}_{i}_lr={lr}", {"lr": lr, "finetune": {"advantage": "gae"}},
                         TUNE_ROWS)
    (exp / "experiment_state-2026.json").write_text("{}")
    df = load_runs(exp)
    assert [s.kind for s in find_runs(exp)] == ["tune", "tune"]
    assert sorted(df["trial"].unique()) == ["trainable_abc_00000_0_lr=0.1", "trainable_abc_00001_1_lr=0.2"]
    assert metric_columns(df) == ["eval/success_rate", "nested/a"]  # Tune's bookkeeping is left out
    assert config_columns(df) == ["lr", "finetune.advantage"] and varying_columns(df) == ["lr"]
    assert df["step"].tolist()[:3] == [100, 200, 300]
    # without a step column, training_iteration is the step
    write_tune_trial(exp / "trainable_abc_00002_2_lr=0.3", {"lr": 0.3}, [{"loss": 1.0}, {"loss": 0.5}])
    df = load_runs(exp)
    assert df.loc[df["trial"].str.contains("00002"), "step"].tolist() == [1, 2]


def test_tune_trials_read_through_offrl_run_dirs(tmp_path):
    exp = tmp_path / "tune_exp"
    # 1) the trainable wrote the offrl contract inside its trial folder
    t0 = write_tune_trial(exp / "trainable_00000", {"lr": 0.1}, TUNE_ROWS)
    write_run(t0 / "run", {"seed": 0, "finetune": {"lr": 0.1}}, [{"step": 5, "eval/success_rate": 0.5}])
    # 2) result.json points at a run directory elsewhere
    elsewhere = write_run(tmp_path / "runs" / "grid" / "t1", {"seed": 0, "finetune": {"lr": 0.2}},
                          [{"step": 5, "eval/success_rate": 0.9}])
    write_tune_trial(exp / "trainable_00001", {"lr": 0.2}, TUNE_ROWS,
                     results=[{"training_iteration": 1, "run_dir": str(elsewhere)}])
    srcs = {s.trial: s for s in find_runs(exp)}
    assert {k: s.kind for k, s in srcs.items()} == {"trainable_00000/run": "offrl", "trainable_00001": "offrl"}
    df = load_runs(exp)
    assert "finetune.lr" in config_columns(df) and "lr" not in config_columns(df)
    fin = final_values(df, "eval/success_rate").set_index("trial")["eval/success_rate"]
    assert fin.to_dict() == {"trainable_00000/run": 0.5, "trainable_00001": 0.9}


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(OffrlError, match="path not found"):
        load_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OffrlError, match="no runs found under"):
        load_runs(tmp_path / "empty")
    run = write_run(tmp_path / "bad" / "t", {"seed": 0}, [{"step": 1, "eval/return": 1.0}])
    (run / "config.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(OffrlError, match="cannot read .*config.yaml"):
        load_runs(tmp_path / "bad")
    run2 = write_run(tmp_path / "nostep" / "t", {"seed": 0}, [{"step": 1, "eval/return": 1.0}])
    (run2 / "metrics.csv").write_text("epoch,eval/return\n1,2\n")
    with pytest.raises(OffrlError, match="no 'step' column"):
        load_runs(tmp_path / "nostep")


def test_empty_metrics_are_noted_not_fatal(sweep_dir):
    (sweep_dir / "fresh").mkdir()
    (sweep_dir / "fresh" / "config.yaml").write_text(json.dumps({"seed": 5}))
    (sweep_dir / "fresh" / "metrics.csv").write_text("")
    df = load_runs(sweep_dir)
    assert df.attrs["empty_trials"] == ["fresh"] and "fresh" not in set(df["trial"])


def test_a_key_newer_than_a_run_takes_its_default(tmp_path):
    """A run written before a config key existed reads as having the key's default, so it groups with
    the newer runs of the same cell (keys are added with defaults that keep the earlier behaviour)."""
    from offrl.stats.compare import default_by

    from .conftest import write_run

    rows = [{"step": 0, "eval/success_rate": 0.5}, {"step": 10, "eval/success_rate": 0.6}]
    base = {"finetune": {"update": "awr"}, "run": {"experiment": "e"}}
    write_run(tmp_path / "old", {**base, "seed": 0, "policy": {"hidden": [8]}}, rows)
    write_run(tmp_path / "new", {**base, "seed": 1, "policy": {"hidden": [8], "obs_ignore": []},
                                 "finetune": {"update": "awr", "ref_kl_coef": 0.0}}, rows)
    write_run(tmp_path / "other", {**base, "seed": 2, "policy": {"hidden": [8], "obs_ignore": []},
                                   "finetune": {"update": "awr", "ref_kl_coef": 1.0}}, rows)
    df = load_runs(tmp_path)
    t = trial_table(df).set_index("trial")
    assert t.loc["old", "finetune.ref_kl_coef"] == 0.0
    assert t.loc["old", "policy.obs_ignore"] == t.loc["new", "policy.obs_ignore"] is not None
    assert default_by(df) == ["finetune.ref_kl_coef"]  # old and new together; obs_ignore no longer splits
    write_run(tmp_path / "bare", {"seed": 3, "finetune": {"update": "awr"}}, rows)
    assert trial_table(load_runs(tmp_path)).set_index("trial").loc["bare", "policy.obs_ignore"] is None
