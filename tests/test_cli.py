"""The command line, run as users run it (subprocesses)."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("rollout", "config", "envs"):
        assert cmd in r.stdout
    r = run_cli("rollout", "--help")
    assert r.returncode == 0 and "KEY=VALUE" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["rollout", "missing.yaml"], "config file not found: missing.yaml"),
    (["config", "show", "env.nope=1"], "config key 'env.nope': unknown key"),
    (["config", "show", "env.num_envs=x"], "config key 'env.num_envs': expected an integer"),
    (["nosuchcommand"], "invalid choice"),
    (["rollout"], "required"),
])
def test_user_mistakes_exit_2_with_one_line(args, words):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert words in lines[0]
    assert "Traceback" not in r.stderr


def test_config_keys_documents_everything():
    r = run_cli("config", "keys")
    assert r.returncode == 0
    assert "env.num_envs" in r.stdout and "cluster.max_restarts" in r.stdout


def test_rollout_job_writes_a_run_directory(tmp_path):
    root = tmp_path / "runs"
    r = run_cli("rollout", "tune_configs/rollout.yaml", f"run.root={root}", "run.trial=t1", "env.num_envs=1",
                "rollout.iterations=2", "rollout.steps_per_iter=30", "run.progress=false", "cluster.num_cpus=2")
    assert r.returncode == 0, r.stderr[-2000:]
    run = root / "rollout" / "t1"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["env"]["num_envs"] == 1 and cfg["rollout"]["iterations"] == 2
    meta = json.loads((run / "meta.json").read_text())
    assert "commit" in meta["git"] and meta["versions"]["mani_skill"]
    lines = (run / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and "time/env_sps" in lines[0]
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "120" / "model.safetensors").exists()  # 2 iters x 30 steps x 1 env x 2 hosts
    # the same trial again is refused without touching the existing run
    r2 = run_cli("rollout", "tune_configs/rollout.yaml", f"run.root={root}", "run.trial=t1")
    assert r2.returncode == 2 and "exists already" in r2.stderr


def test_unknown_env_id_leaves_nothing_behind(tmp_path):
    root = tmp_path / "runs"
    r = run_cli("rollout", "tune_configs/rollout.yaml", f"run.root={root}", "env.id=PickCub-v1",
                "cluster.num_cpus=1", "cluster.max_restarts=0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("offrl: error: unknown env id 'PickCub-v1'")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not root.exists() or not any(root.rglob("*"))
