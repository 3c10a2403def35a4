"""Sweeps: YAML parsing and validation, trial placement groups, Tune logging, a real tiny finetuning sweep
read back by offrl.stats, and a sweep killed with SIGKILL then resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import run_cli
from offrl.cli import main
from offrl.config import from_dict
from offrl.errors import ConfigError, OffrlError
from offrl.platform.sweep import (SweepResources, load_sweep, parse_axes, run_sweep, trial_bundles, trial_dict,
                                  trial_dirname)
from offrl.platform.sweep_trial import JsonResultLog, ProgressCsvLog, replay_metrics, usable_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tune_configs"


@pytest.fixture
def fake_inputs(tmp_path):
    """A dataset file and a checkpoint folder that pass the sweep's input checks (nothing runs here)."""
    ds = tmp_path / "demos.h5"
    ds.write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    (ckpt / "training_state").mkdir(parents=True)
    # the sweep reads a checkpoint's safetensors header and JSON files before Ray starts: make them readable
    from safetensors.numpy import save_file

    save_file({"actor.w": np.zeros(1, np.float32)}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text("{}")
    (ckpt / "training_state" / "state.json").write_text('{"step": 0}')
    return SimpleNamespace(dataset=ds, checkpoint=ckpt)


# ------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("name, job, trials, axes", [
    ("quickstart.yaml", "finetune", 4, ["finetune.advantage", "finetune.update"]),
    ("advantage_x_update.yaml", "finetune", 36, ["finetune.advantage", "finetune.update"]),
    ("pretrain_sweep.yaml", "pretrain", 9, ["pretrain.algo"]),
])
def test_shipped_sweeps_parse(fake_inputs, name, job, trials, axes):
    sweep = load_sweep(CONFIGS / name, [f"finetune.checkpoint={fake_inputs.checkpoint}",
                                        f"pretrain.dataset={fake_inputs.dataset}"], log=lambda *a: None)
    assert sweep.spec.job == job and sweep.num_trials() == trials and list(sweep.axes) == axes
    assert sweep.name == Path(name).stem
    space = sweep.param_space()
    assert set(space) == set(axes) | {"seed"}
    assert space["seed"] == {"grid_search": list(sweep.spec.seeds)}
    assert sweep.base["cluster"]["num_hosts"] >= 1


def test_rollout_config_is_not_a_sweep():
    with pytest.raises(OffrlError, match="no `sweep:` section"):
        load_sweep(CONFIGS / "rollout.yaml")


@pytest.mark.parametrize("override, message", [
    ("sweep.jobb=x", r"'sweep.jobb': unknown key \(did you mean job\?\)"),
    ("sweep.job=rollout", r"'sweep.job': expected one of 'pretrain', 'finetune'"),
    ("sweep.axes.finetune.advantge={grid_search: [gae]}",
     r"'sweep.axes.finetune.advantge': grid_search value 'gae': unknown key \(did you mean advantage\?\)"),
    ("sweep.axes.finetune.advantage={grid_search: [gae, foo]}",
     r"'sweep.axes.finetune.advantage': grid_search value 'foo': expected one of 'gae'"),
    ("sweep.axes.finetune.actor_lr={loguniform: [0, 1]}", r"'sweep.axes.finetune.actor_lr': loguniform needs low > 0"),
    ("sweep.axes.finetune.actor_lr={uniform: [2, 1]}", r"uniform needs low < high"),
    ("sweep.axes.finetune.actor_lr={grid: [1]}", r"unknown axis kind 'grid'"),
    ("sweep.axes.finetune.actor_lr=3", r"'sweep.axes.finetune.actor_lr': expected \{grid_search"),
    ("sweep.axes.finetune.epochs={choice: []}", r"choice needs a non-empty list"),
    ("sweep.axes.run.trial={grid_search: [a]}", r"'sweep.axes.run.trial': is set by the sweep"),
    ("sweep.axes.seed={grid_search: [1]}", r"'sweep.axes.seed': conflicts with sweep.seeds"),
    ("sweep.axes.finetune.rerollout_policy={grid_search: [current, checkpoint]}",
     r"grid_search value 'checkpoint': config key 'finetune.rerollout_checkpoint': needed"),
    ("sweep.seeds=[]", r"'sweep.seeds': needs at least one seed"),
    ("sweep.seeds=[1, 1]", r"'sweep.seeds': has repeated seeds"),
    ("sweep.metric=eval/sucess_rate", r"'sweep.metric': unknown metric"),
    ("sweep.resources.learner_cpus=0", r"'sweep.resources.learner_cpus': the learner bundle needs"),
    ("sweep.name=a/b", r"'sweep.name': must be a plain folder name"),
    ("finetune.iterations=0", r"'finetune.iterations': must be >= 1"),
])
def test_mistakes_name_the_key(fake_inputs, override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(CONFIGS / "quickstart.yaml", [f"finetune.checkpoint={fake_inputs.checkpoint}", override])


def test_missing_inputs_are_refused_before_anything_runs(tmp_path, fake_inputs):
    with pytest.raises(OffrlError, match="checkpoint not found"):
        load_sweep(CONFIGS / "quickstart.yaml", [f"finetune.checkpoint={tmp_path / 'nope'}"])
    with pytest.raises(OffrlError, match="pretrain.dataset not found"):
        load_sweep(CONFIGS / "pretrain_sweep.yaml", [f"pretrain.dataset={tmp_path / 'nope.h5'}"])


def test_overrides_fix_axes_and_paths_become_absolute(tmp_path, fake_inputs, monkeypatch):
    monkeypatch.chdir(fake_inputs.checkpoint.parent)
    notes = []
    sweep = load_sweep(CONFIGS / "quickstart.yaml",
                       ["finetune.checkpoint=ckpt", "finetune.advantage=iql", "seed=7",
                        "sweep.axes.finetune.update={grid_search: [awr, push_away]}",
                        "sweep.axes.finetune.actor_lr={loguniform: [1e-5, 1e-3]}",
                        "sweep.axes.policy={grid_search: [{hidden: [64, 64]}, {hidden: [32], activation: tanh}]}"],
                       log=notes.append)
    assert "finetune.advantage" not in sweep.axes and sweep.spec.seeds is None
    assert sweep.axes["finetune.update"] == ("grid_search", ["awr", "push_away"])
    assert sweep.axes["finetune.actor_lr"] == ("loguniform", [1e-5, 1e-3])
    assert len(notes) == 2 and sweep.num_trials() == 4
    assert sweep.by_columns() == ["finetune.update", "finetune.actor_lr", "policy.activation", "policy.hidden"]
    assert sweep.base["finetune"]["checkpoint"] == str(fake_inputs.checkpoint)
    assert sweep.base["finetune"]["advantage"] == "iql" and sweep.base["seed"] == 7
    # a mapping value is merged into its section: the section's other keys keep the base values
    merged = from_dict(trial_dict(sweep.base, {"policy": sweep.axes["policy"][1][1]}))
    assert (merged.policy.hidden, merged.policy.activation, merged.policy.log_std_init) == ((32,), "tanh", -0.5)


def test_parse_axes_nested_and_null_removal():
    axes = parse_axes({"finetune.update": {"grid_search": ["ppo"]},
                       "finetune": {"update": {"choice": ["awr", "ppo"]}, "beta": {"uniform": [0.5, "2"]}},
                       "pretrain": {"algo": None}})
    assert axes == {"finetune.update": ("choice", ["awr", "ppo"]), "finetune.beta": ("uniform", [0.5, 2.0])}
    assert parse_axes({"finetune.update": {"grid_search": ["ppo"]}, "finetune": {"update": None}}) == {}


def test_trial_bundles():
    res = from_dict({"learner_cpus": 0.5}, SweepResources)
    cfg = from_dict(trial_dict({"cluster": {"num_hosts": 0, "cpus_per_host": 0.5}}, {}))
    assert cfg.cluster.num_hosts == 1  # 0 (size to the cluster) means one SimHost inside a trial
    assert trial_bundles(cfg, "finetune", res) == [{"CPU": 0.5}, {"CPU": 0.5}]
    cfg = from_dict(trial_dict({"cluster": {"num_hosts": 3}, "env": {"backend": "gpu"}}, {}))
    assert trial_bundles(cfg, "finetune", res) == [{"CPU": 0.5}] + [{"CPU": 1.0, "GPU": 1.0}] * 3
    critic_only = from_dict(trial_dict({"pretrain": {"algo": "critic_mc"}}, {}))
    assert trial_bundles(critic_only, "pretrain", res) == [{"CPU": 0.5}]  # no actor: no SimHost


def test_trial_dirname():
    trial = SimpleNamespace(experiment_tag="3_finetune.advantage=iql,seed=1", trial_id="ab12c_00003",
                            config={"finetune.advantage": "iql", "finetune.actor_lr": 0.000123456,
                                    "finetune.checkpoint": "/runs/pre/0001_algo=bc", "policy.hidden": [64, 64],
                                    "seed": 1})
    assert trial_dirname(trial) == "0003_advantage=iql_actor_lr=0.000123_checkpoint=0001_algo=bc_hidden=64-64_seed=1"


def test_cli_dry_run_and_mistakes(fake_inputs, capsys):
    out = run_cli("sweep", "tune_configs/advantage_x_update.yaml", f"finetune.checkpoint={fake_inputs.checkpoint}",
                  "--dry-run", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "36 trials (grid 4 x 3 x 3 seeds" in out.stdout
    assert "placement group [{'CPU': 1.0}, {'CPU': 1.0}]" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 36 and {r[1] for r in rows} == {"gae", "mc", "iql", "sarsa"}
    for argv, message in [
        (["sweep", str(CONFIGS / "quickstart.yaml"), f"finetune.checkpoint={fake_inputs.checkpoint}",
          "sweep.axes.finetune.update={grid_search: [ppo, adam]}"], "sweep.axes.finetune.update"),
        (["sweep"], "give a sweep YAML"),
        (["sweep", "--resume", str(fake_inputs.checkpoint)], "is not an offrl sweep"),
        (["sweep", "--resume", str(fake_inputs.checkpoint), "seed=1"], "--resume continues a sweep"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("offrl: error: ") and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------ Tune logging

class _Trial:
    """What Tune's logger callbacks use of a Trial: its folder in the experiment (``path``, on the storage
    path) and Tune's driver staging folder (``staging``), which Tune copies over the former now and then."""

    def __init__(self, path: Path, staging: Path):
        import pyarrow.fs
        from types import SimpleNamespace

        staging.mkdir(parents=True, exist_ok=True)
        self.local_path, self.config, self.checkpoint, self.trial_id = str(staging), {"seed": 0}, None, "t0"
        self.storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(path))

    def init_local_path(self) -> None:
        pass


def _log(callbacks, trial, *rows):
    for i, row in enumerate(rows):
        for cb in callbacks:
            cb.log_trial_result(i, trial, {**row, "config": {"seed": 0}, "training_iteration": i + 1})


def test_tune_logs_keep_one_row_per_step_and_every_column(tmp_path):
    trial = _Trial(tmp_path / "t", tmp_path / "staging")
    cbs = [JsonResultLog(), ProgressCsvLog()]
    _log(cbs, trial, {"step": 0, "eval/success_rate": 0.1}, {"step": 8, "losses/policy_loss": 1.0},
         {"step": 16, "losses/policy_loss": 0.5, "eval/success_rate": 0.2})
    # the trial restarts from its checkpoint at step 8: rows after it are replaced, not duplicated
    _log(cbs, trial, {"step": 16, "losses/policy_loss": 0.4, "eval/success_rate": 0.3}, {"step": 24})
    for cb in cbs:
        cb.log_trial_end(trial)
    rows = [json.loads(line) for line in (tmp_path / "t" / "result.json").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 8, 16, 24] and rows[2]["eval/success_rate"] == 0.3
    with open(tmp_path / "t" / "progress.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["step"] for r in table] == ["0", "8", "16", "24"]
    assert table[2]["eval/success_rate"] == "0.3" and table[1]["losses/policy_loss"] == "1.0"
    # a new driver (after --resume) reads the files back; a restart from scratch rewinds to step 0
    cbs = [JsonResultLog(), ProgressCsvLog()]
    for cb in cbs:
        cb.log_trial_start(trial)
    _log(cbs, trial, {"step": 0, "eval/success_rate": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "t" / "result.json").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["eval/success_rate"] == 0.5
    with open(tmp_path / "t" / "progress.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0"]
    # the logs are written straight into the experiment folder, never into Tune's staging folder, whose
    # copies Tune writes over the experiment's in the background (a driver killed then leaves them cut short)
    assert sorted(f.name for f in (tmp_path / "staging").iterdir()) == ["params.json", "params.pkl"]


def test_tune_logs_drop_a_line_a_killed_driver_cut_short(tmp_path):
    """A driver killed in the middle of an append leaves a last line without its newline: the next driver
    drops it before appending, so the next row is not glued onto it."""
    trial = _Trial(tmp_path / "t", tmp_path / "staging")
    cbs = [JsonResultLog(), ProgressCsvLog()]
    _log(cbs, trial, {"step": 1, "x": 0.1}, {"step": 2, "x": 0.2})
    for name in ("result.json", "progress.csv"):
        path = tmp_path / "t" / name
        path.write_text(path.read_text() + path.read_text().splitlines()[-1][:7])  # step 3, cut short
    cbs = [JsonResultLog(), ProgressCsvLog()]
    for cb in cbs:
        cb.log_trial_start(trial)
    _log(cbs, trial, {"step": 3, "x": 0.3})
    assert [json.loads(line)["step"] for line in (tmp_path / "t" / "result.json").read_text().splitlines()] == [1, 2, 3]
    with open(tmp_path / "t" / "progress.csv", newline="") as f:
        assert [(r["step"], r["x"]) for r in csv.DictReader(f)] == [("1", "0.1"), ("2", "0.2"), ("3", "0.3")]


def test_replay_metrics_of_a_finished_run(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/v_loss,eval/success_rate\n1,0.5,\n2,0.25,0.5\n3,0.125,1.0\n")
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    got = []
    assert replay_metrics(tmp_path, after=1, report=lambda *a: got.append(a)) == 2
    assert got == [(2, {"train/v_loss": 0.25, "eval/success_rate": 0.5}, None),
                   (3, {"train/v_loss": 0.125, "eval/success_rate": 1.0}, tmp_path / "checkpoints" / "3")]
    assert replay_metrics(tmp_path, after=3, report=lambda *a: got.append(a)) == 0


# ------------------------------------------------------------------------------------------ real sweeps

def test_finetune_sweep_on_ray_then_stats_compare(tmp_path, tiny_bc_iql_run, ray_cluster, capsys):
    """Two trials of 0.5 + 0.5 CPU fill the 2-CPU cluster: their SimHosts must land in the trials'
    placement groups, or the sweep would wait forever for free CPUs."""
    from offrl.stats.compare import compare
    from offrl.stats.load import load_runs, varying_columns

    sweep = load_sweep(CONFIGS / "quickstart.yaml", [
        f"finetune.checkpoint={tiny_bc_iql_run}", "sweep.axes.finetune.update={grid_search: [awr]}",
        "finetune.iterations=1", "finetune.steps_per_iter=4", "finetune.eval_every=1", "finetune.eval_episodes=1",
        "env.num_envs=1", "run.tensorboard=false"], log=lambda *a: None)
    assert main(["sweep", "--dry-run", str(CONFIGS / "quickstart.yaml"),
                 f"finetune.checkpoint={tiny_bc_iql_run}"]) == 0
    capsys.readouterr()
    assert run_sweep(sweep, tmp_path) == 0
    out = capsys.readouterr().out
    exp = tmp_path / "quickstart"
    assert "2 trials: 2 finished, 0 failed" in out
    assert f"offrl stats compare {exp} --metric eval/success_rate --by finetune.advantage finetune.update" in out
    trials = sorted(p for p in exp.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0000_advantage=gae_update=awr_seed=0", "0001_advantage=iql_update=awr_seed=0"]
    pgs = set()
    for t in trials:
        for name in ("config.yaml", "meta.json", "metrics.csv", "eval.json", "finetune_summary.json",
                     "params.json", "result.json", "progress.csv", "checkpoints/4/model.safetensors"):
            assert (t / name).exists(), (t, name)
        cfg = from_dict(yaml.safe_load((t / "config.yaml").read_text()))
        assert Path(cfg.run.root) / cfg.run.experiment / cfg.run.trial == t and cfg.cluster.num_hosts == 1
        attempt, = json.loads((t / "sweep_trial.json").read_text())["attempts"]
        assert attempt["mode"] == "fresh" and attempt["capture_child_tasks"] is True
        assert attempt["bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}]
        pgs.add(attempt["placement_group"])
        result_steps = [json.loads(line)["step"] for line in (t / "result.json").read_text().splitlines()]
        with open(t / "progress.csv", newline="") as f:
            progress = list(csv.DictReader(f))
        with open(t / "metrics.csv", newline="") as f:
            metrics_steps = [int(r["step"]) for r in csv.DictReader(f)]
        assert result_steps == metrics_steps == [int(r["step"]) for r in progress] == [0, 4]
        assert progress[-1]["eval/success_rate"] != "" and progress[-1]["charts/advantage_mean"] != ""
        assert sorted(p.name for p in t.glob("checkpoint_*")) == ["checkpoint_000000", "checkpoint_000001"]
    assert len(pgs) == 2
    # the experiment dir is what offrl.stats reads
    df = load_runs(exp)
    assert sorted(df["trial"].unique()) == [t.name for t in trials]
    assert "finetune.advantage" in varying_columns(df)
    cmp = compare(df, metric="eval/success_rate", by=["finetune.advantage"], reps=200)
    assert list(cmp.table["finetune.advantage"]) == ["gae", "iql"] and list(cmp.table["trials"]) == [1, 1]
    assert main(["stats", "compare", str(exp), "--by", "finetune.advantage", "--reps", "200"]) == 0
    assert (exp / "stats" / "compare_eval_success_rate.md").exists()
    with pytest.raises(OffrlError, match="exists already"):
        run_sweep(sweep, tmp_path)
    too_big = load_sweep(CONFIGS / "quickstart.yaml", [f"finetune.checkpoint={tiny_bc_iql_run}",
                                                             "cluster.num_hosts=4", "sweep.name=too_big"])
    with pytest.raises(OffrlError, match=r"a trial needs 2.5 CPU .* but the Ray cluster has 2 CPU"):
        run_sweep(too_big, tmp_path)
    assert not (tmp_path / "too_big").exists()


def _steps(trial_dir: Path) -> tuple[list, list, list]:
    """Logged steps of metrics.csv, result.json and progress.csv."""
    with open(trial_dir / "metrics.csv", newline="") as f:
        metrics = [int(r["step"]) for r in csv.DictReader(f)]
    result = [json.loads(line)["step"] for line in (trial_dir / "result.json").read_text().splitlines()]
    with open(trial_dir / "progress.csv", newline="") as f:
        progress = [int(r["step"]) for r in csv.DictReader(f)]
    return metrics, result, progress


def _story(*trials: Path) -> str:
    """What each trial's attempts and log say (for the message of a failed assertion)."""
    out = []
    for t in trials:
        attempts = json.loads((t / "sweep_trial.json").read_text())["attempts"] if (t / "sweep_trial.json").exists() else []
        out.append(f"{t.name}: steps {_steps(t)}; attempts " + "; ".join(
            f"{a['mode']}@{a['checkpoint_step']} from {a.get('checkpoint_from')} at {a['started']}" for a in attempts))
        if (t / "trial.log").exists():
            out.append((t / "trial.log").read_text())
    return "\n".join(out)


def _pretrain_sweep(dataset: Path, name: str, seeds: str, *extra: str) -> list[str]:
    """Overrides of a pretrain sweep of quick critic-only trials (no SimHost) checkpointing every epoch."""
    return [f"pretrain.dataset={dataset}", "pretrain.algo=critic_mc", f"sweep.seeds={seeds}", f"sweep.name={name}",
            "sweep.max_concurrent=1", "pretrain.epochs=5", "pretrain.steps_per_epoch=150",
            "pretrain.checkpoint_every=1", "critic.hidden=[32, 32]", "run.tensorboard=false", *extra]


def _kill_first_attempt_when(ready: Any, timeout: float) -> tuple[Any, list]:
    """A started thread that SIGKILLs a trial's first attempt once ``ready()`` returns its trial dir."""
    import threading

    killed: list = []

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not killed:
            try:
                trial_dir = ready()
                if trial_dir is not None:
                    pid = json.loads((trial_dir / "sweep_trial.json").read_text())["attempts"][0]["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher, killed


def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint(tmp_path, expert_dataset, ray_cluster, capsys):
    """sweep.max_failures: the trial's process is SIGKILLed after 2 epochs; Tune restarts the trial, which
    continues from its last Tune checkpoint, and no step is logged twice."""
    sweep = load_sweep(CONFIGS / "pretrain_sweep.yaml", _pretrain_sweep(expert_dataset, "retry", "[0]"),
                       log=lambda *a: None)
    trial_dir = tmp_path / "retry" / "0000_seed=0"
    watcher, killed = _kill_first_attempt_when(
        lambda: trial_dir if len((trial_dir / "metrics.csv").read_text().splitlines()) >= 3 else None, 180)
    assert run_sweep(sweep, tmp_path) == 0
    watcher.join()
    assert killed and "retrying 0000_seed=0 after a failure" in capsys.readouterr().out
    attempts = json.loads((trial_dir / "sweep_trial.json").read_text())["attempts"]
    assert [a["mode"] for a in attempts] == ["fresh", "resume"] and attempts[1]["checkpoint_step"] >= 1
    assert _steps(trial_dir) == ([1, 2, 3, 4, 5],) * 3


def test_a_finetune_trial_whose_worker_dies_continues_from_its_checkpoint(tmp_path, tiny_bc_iql_run, ray_cluster,
                                                                         capsys):
    """A finetuning trial SIGKILLed after its round-2 checkpoint is retried by Tune in mode "resume" from that
    checkpoint: it ends with every round logged exactly once in metrics.csv, result.json and progress.csv."""
    sweep = load_sweep(CONFIGS / "quickstart.yaml", [
        f"finetune.checkpoint={tiny_bc_iql_run}", "finetune.advantage=gae", "finetune.update=ppo",
        "finetune.iterations=5", "finetune.steps_per_iter=4", "finetune.eval_every=1", "finetune.eval_episodes=1",
        "env.num_envs=1", "run.tensorboard=false", "sweep.max_failures=1", "sweep.name=ft_retry"],
        log=lambda *a: None)
    exp = tmp_path / "ft_retry"

    def after_round_2() -> Any:
        trial_dir, = [p for p in exp.iterdir() if p.is_dir() and (p / "sweep_trial.json").exists()]
        return trial_dir if (trial_dir / "checkpoints" / "8" / "model.safetensors").exists() else None

    watcher, killed = _kill_first_attempt_when(after_round_2, 300)
    assert run_sweep(sweep, tmp_path) == 0
    watcher.join()
    trial_dir, = [p for p in exp.iterdir() if p.is_dir() and (p / "sweep_trial.json").exists()]
    assert killed and f"retrying {trial_dir.name} after a failure" in capsys.readouterr().out
    attempts = json.loads((trial_dir / "sweep_trial.json").read_text())["attempts"]
    # Tune registers a checkpoint after the report that carries it: the kill can fall between the two
    assert [a["mode"] for a in attempts] == ["fresh", "resume"] and attempts[1]["checkpoint_step"] >= 4
    assert _steps(trial_dir) == ([0, 4, 8, 12, 16, 20],) * 3
    summary = json.loads((trial_dir / "finetune_summary.json").read_text())
    assert summary["env_steps"] == 20


def test_asha_scheduler_stops_the_worse_trials_early(tmp_path, expert_dataset, ray_cluster, capsys):
    """sweep.scheduler.asha: trials run one at a time; the first (learning rate 1e-3) sets the rung values,
    the two with a learning rate of 1e-7 have a worse held-out MC error at the first rung and are stopped
    there. They keep their run directories and the sweep counts them as stopped, not unfinished."""
    sweep = load_sweep(CONFIGS / "pretrain_sweep.yaml", _pretrain_sweep(
        expert_dataset, "asha", "[0]", "sweep.axes.pretrain.critic_lr={grid_search: [1.0e-3, 1.0e-7, 2.0e-7]}",
        "sweep.scheduler={asha: {metric: val/mc_error, mode: min, grace_period: 1, reduction_factor: 2, max_t: 5}}"),
        log=lambda *a: None)
    assert run_sweep(sweep, tmp_path) == 0
    out = capsys.readouterr().out
    assert "3 trials: 1 finished, 0 failed, 0 unfinished, 2 stopped early by the scheduler" in out, out
    trials = sorted(p for p in (tmp_path / "asha").iterdir() if p.is_dir() and (p / "metrics.csv").exists())
    steps = [_steps(t)[0] for t in trials]
    assert steps[0] == [1, 2, 3, 4, 5] and all(len(s) < 5 for s in steps[1:]), steps
    assert all((t / "config.yaml").exists() for t in trials)


def test_a_bad_scheduler_key_is_named_before_ray_starts(tmp_path, expert_dataset):
    for bad, words in [("{asha: {grace: 1, max_t: 5}}", "sweep.scheduler.asha.grace"),
                       ("{asha: {max_t: 5, reduction_factor: 1}}", "sweep.scheduler.asha.reduction_factor"),
                       ("{pbt: {perturbation_interval: 2}}", "sweep.scheduler.pbt.hyperparam_mutations"),
                       ("{pbt: {hyperparam_mutations: {pretrain.critic_lr: [1e-3]}}}",
                        "sweep.scheduler.pbt.perturbation_interval"),
                       ("{pbt: {perturbation_interval: 2, hyperparam_mutations: {pretrain.critic_lr: [-1.0]}}}",
                        "sweep.scheduler.pbt.hyperparam_mutations.pretrain.critic_lr"),
                       ("{pbt: {perturbation_interval: 2, hyperparam_mutations: {run.trial: [a]}}}",
                        "cannot change while a trial runs"),
                       ("{pbt: {perturbation_interval: 2, synch: 3, hyperparam_mutations: {pretrain.critic_lr: [1.0]}}}",
                        "sweep.scheduler.pbt.synch")]:
        with pytest.raises(ConfigError, match=words):
            load_sweep(CONFIGS / "pretrain_sweep.yaml", _pretrain_sweep(expert_dataset, "x", "[0]",
                                                                        f"sweep.scheduler={bad}"), log=lambda *a: None)


def test_resume_of_a_trial_that_had_finished_reports_nothing_twice(tmp_path, expert_dataset, ray_cluster):
    """The driver died after a trial's last report but before Tune recorded its end (simulated by marking
    it RUNNING in the saved experiment state): --resume restores it at its final checkpoint, and the
    trial replays nothing, recomputes nothing and leaves every log with one row per step."""
    from offrl.platform.sweep import resume_sweep

    sweep = load_sweep(CONFIGS / "pretrain_sweep.yaml", _pretrain_sweep(expert_dataset, "ended", "[0]"),
                       log=lambda *a: None)
    assert run_sweep(sweep, tmp_path, log=lambda *a: None) == 0
    exp, trial_dir = tmp_path / "ended", tmp_path / "ended" / "0000_seed=0"
    state = max(exp.glob("experiment_state-*.json"))
    data = json.loads(state.read_text())
    for entry in data["trial_data"]:
        entry[0] = json.dumps({**json.loads(entry[0]), "status": "RUNNING"})
    state.write_text(json.dumps(data))
    mtime = (trial_dir / "metrics.csv").stat().st_mtime_ns
    assert resume_sweep(exp, log=lambda *a: None) == 0
    attempts = json.loads((trial_dir / "sweep_trial.json").read_text())["attempts"]
    assert [(a["mode"], a["checkpoint_step"]) for a in attempts] == [("fresh", None), ("replay", 5)]
    assert (trial_dir / "metrics.csv").stat().st_mtime_ns == mtime
    assert _steps(trial_dir) == ([1, 2, 3, 4, 5],) * 3
    assert set(_statuses(exp).values()) == {"TERMINATED"}


def _statuses(exp: Path) -> dict[str, str]:
    """Trial folder name -> Tune status, from the latest experiment state (names end in a timestamp)."""
    state = max(exp.glob("experiment_state-*.json"))
    out = {}
    for trial_json, _ in json.loads(state.read_text())["trial_data"]:
        t = json.loads(trial_json)
        out[t["custom_dirname"]] = t["status"]
    return out


def test_sweep_killed_with_sigkill_then_resumed(tmp_path, expert_dataset, process_sessions):
    """A driver and its local Ray cluster are SIGKILLed while trial 2 of 3 runs; --resume completes every
    trial exactly once: finished trials are not run again, the interrupted one continues from its Tune
    checkpoint, and no step is logged twice in metrics.csv, result.json or progress.csv."""
    # its own local cluster: with the default temp dir, ray.init() would join a cluster of `ray start`
    env = {**os.environ, "RAY_TMPDIR": process_sessions.temp_dir()}
    env.pop("RAY_ADDRESS", None)
    storage = tmp_path / "runs"
    exp = storage / "killed"
    cmd = [sys.executable, "-m", "offrl", "sweep", str(CONFIGS / "pretrain_sweep.yaml"),
           *_pretrain_sweep(expert_dataset, "killed", "[0, 1, 2]", "cluster.num_cpus=2"), "--storage", str(storage)]
    log = open(tmp_path / "driver.log", "w")
    driver = process_sessions.popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    done, running = [], []
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        dirs = [d for d in exp.glob("0*") if (d / "metrics.csv").exists()]
        done = [d for d in dirs if (d / "pretrain_done.json").exists()]
        running = [d for d in dirs if d not in done and len((d / "metrics.csv").read_text().splitlines()) >= 3]
        if done and running:
            break
        time.sleep(0.05)
    assert done and running, (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its Ray cluster's head processes
    driver.wait()
    process_sessions.kill()  # Ray workers in their own process groups
    before = {d.name: (d / "metrics.csv").stat().st_mtime_ns for d in done}
    interrupted = {d.name for d in running}

    out = process_sessions.run([sys.executable, "-m", "offrl", "sweep", "--resume", str(exp)], cwd=str(ROOT),
                               env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "3 trials: 3 finished, 0 failed, 0 unfinished" in out.stdout
    trials = sorted(d for d in exp.iterdir() if d.is_dir())
    assert len(trials) == 3 and set(_statuses(exp).values()) == {"TERMINATED"}
    for t in trials:
        assert _steps(t) == ([1, 2, 3, 4, 5],) * 3, t.name
        modes = [a["mode"] for a in json.loads((t / "sweep_trial.json").read_text())["attempts"]]
        if t.name in before:  # finished before the kill: not run again
            # when the kill came between the job's last write and Tune recording the trial as done, Tune
            # starts it again and the trial only replays its finished metrics to Tune ("replay")
            assert modes in (["fresh"], ["fresh", "replay"]), modes
            assert (t / "metrics.csv").stat().st_mtime_ns == before[t.name]
        elif t.name in interrupted:
            assert modes[0] == "fresh" and modes[-1] in ("resume", "fresh") and len(modes) == 2
        assert (t / "pretrain_done.json").exists()


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_keep_checkpoints_bounds_tune_copies_per_trial(tmp_path, expert_dataset, ray_cluster, capsys):
    """sweep.keep_checkpoints=1: each trial keeps one Tune copy instead of one per reported checkpoint; the run
    directory keeps its own latest checkpoints, and the trials' logs are unchanged."""
    sizes = {}
    for keep in ("null", "1"):
        name = f"keep_{keep}"
        sweep = load_sweep(CONFIGS / "pretrain_sweep.yaml",
                           _pretrain_sweep(expert_dataset, name, "[0]", f"sweep.keep_checkpoints={keep}",
                                           "pretrain.keep_checkpoints=1"), log=lambda *a: None)
        assert run_sweep(sweep, tmp_path) == 0
        trial = tmp_path / name / "0000_seed=0"
        copies = sorted(p.name for p in trial.glob("checkpoint_*"))
        assert len(copies) == (5 if keep == "null" else 1), copies
        assert [p.name for p in (trial / "checkpoints").glob("[0-9]*")] == ["5"]
        assert _steps(trial) == ([1, 2, 3, 4, 5],) * 3
        sizes[keep] = _mb(trial)
    print(f"MB per trial: every Tune copy kept {sizes['null']:.2f}, sweep.keep_checkpoints=1 {sizes['1']:.2f}")
    assert sizes["1"] < sizes["null"]


def test_a_trial_whose_tune_copy_was_deleted_continues_from_its_own_checkpoint(tmp_path):
    run = tmp_path / "trial"
    for step in (2, 3):
        (run / "checkpoints" / str(step) / "training_state").mkdir(parents=True)
        (run / "checkpoints" / str(step) / "training_state" / "state.json").write_text(json.dumps({"step": step}))
    tune_copy = run / "checkpoint_000001"
    assert usable_checkpoint(tune_copy, run) == run / "checkpoints" / "3"  # Tune deleted it: the run's latest
    (tune_copy / "training_state").mkdir(parents=True)
    (tune_copy / "training_state" / "state.json").write_text(json.dumps({"step": 2}))
    assert usable_checkpoint(tune_copy, run) == tune_copy
    assert usable_checkpoint(None, run) is None
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_sweep(CONFIGS / "pretrain_sweep.yaml", ["sweep.keep_checkpoints=0"], log=lambda *a: None)


def test_pbt_copies_a_better_trials_checkpoint_and_its_metrics_continue(tmp_path, expert_dataset, ray_cluster):
    """sweep.scheduler.pbt: two critic trials, one learning (critic_lr 1e-3) and one barely (1e-7), side by side.
    At a perturbation step the bad one continues from the good one's checkpoint with a mutated learning rate:
    its next validation error drops to the good trial's level, and every step is logged once."""
    sweep = load_sweep(CONFIGS / "pretrain_sweep.yaml", _pretrain_sweep(
        expert_dataset, "pbt", "[0]", "sweep.max_concurrent=2", "pretrain.epochs=6",
        "sweep.axes={pretrain.critic_lr: {grid_search: [1.0e-3, 1.0e-7]}}",
        "sweep.scheduler={pbt: {metric: val/mc_error, mode: min, perturbation_interval: 2, quantile_fraction: 0.5, "
        "resample_probability: 0.0, synch: true, hyperparam_mutations: {pretrain.critic_lr: [1.0e-3, 3.0e-4]}}}"),
        log=lambda *a: None)
    assert run_sweep(sweep, tmp_path) == 0
    trials = sorted((tmp_path / "pbt").glob("0*"))
    assert len(trials) == 2
    good = next(t for t in trials if "0.001" in t.name)
    bad = next(t for t in trials if t is not good)
    attempts = json.loads((bad / "sweep_trial.json").read_text())["attempts"]
    cloned = [a for a in attempts if a.get("checkpoint_from") == good.name]
    assert cloned and cloned[0]["mode"] == "resume" and cloned[0]["checkpoint_step"] in (2, 4)
    assert cloned[0]["config"]["pretrain.critic_lr"] in (1.0e-3, 3.0e-4)
    step = cloned[0]["checkpoint_step"]
    assert _steps(bad) == ([1, 2, 3, 4, 5, 6],) * 3 and _steps(good) == ([1, 2, 3, 4, 5, 6],) * 3, _story(good, bad)
    err = {t: {int(r["step"]): float(r["val/mc_error"]) for r in csv.DictReader(open(t / "metrics.csv"))}
           for t in (good, bad)}
    # before: the bad trial's error is far above the good one's; after: it continues at the good one's level
    assert err[bad][step] > 2 * err[good][step]
    assert err[bad][step + 1] < 0.5 * err[bad][step]
    assert err[bad][step + 1] == pytest.approx(err[good][step + 1], rel=0.5)


def test_pbt_exploiting_a_trial_that_is_still_saving_does_not_end_it_early(tmp_path, ray_cluster):
    """Synchronous PBT, two trials reporting the perturbation step together: the exploited trial can still be
    saving its own checkpoint, and Tune's stock scheduler then leaves a STOP behind that ends it one step after
    it restarts (measured with this trainable: 4 of 10 sweeps ended a trial at step 3). offrl's scheduler
    drops that decision: every trial of every sweep runs its 6 steps."""
    import tempfile

    from ray import tune

    from offrl.platform.sweep_trial import PBTScheduler

    def lockstep(config: dict, barrier_dir: str) -> None:  # nested: Ray ships it by value to the workers
        """Six steps, a checkpoint at each; both trials report step 2 (the first perturbation) together."""
        ckpt = tune.get_checkpoint()
        start = json.loads((Path(ckpt.path) / "s.json").read_text())["step"] if ckpt else 0
        for step in range(start + 1, 7):
            time.sleep(0.2)
            if step == 2 and start == 0:
                Path(barrier_dir, tune.get_context().get_trial_id()).touch()
                t0 = time.time()
                while len(os.listdir(barrier_dir)) < 2 and time.time() - t0 < 60:
                    time.sleep(0.005)
            with tempfile.TemporaryDirectory() as d:
                Path(d, "s.json").write_text(json.dumps({"step": step}))
                tune.report({"step": step, "score": config["lr"]}, checkpoint=tune.Checkpoint.from_directory(d))

    for i in range(3):
        barrier = tmp_path / f"barrier{i}"
        barrier.mkdir()
        sched = PBTScheduler(time_attr="step", metric="score", mode="max", perturbation_interval=2,
                             quantile_fraction=0.5, resample_probability=0.0, synch=True,
                             hyperparam_mutations={"lr": [1.0, 2.0]})
        tuner = tune.Tuner(tune.with_parameters(lockstep, barrier_dir=str(barrier)),
                           param_space={"lr": tune.grid_search([1.0, 0.001])},
                           run_config=tune.RunConfig(storage_path=str(tmp_path), name=f"lockstep{i}", verbose=0),
                           tune_config=tune.TuneConfig(scheduler=sched, reuse_actors=False))
        results = tuner.fit()
        assert sorted(r.metrics.get("step") for r in results) == [6, 6], f"sweep {i}"
        assert not results.errors
