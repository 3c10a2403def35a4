"""`ray job submit` of a tiny sweep to a head node started on loopback (token auth), exactly as the
README shows; the head node is stopped at the end without touching other Ray clusters on the machine."""

import json
import os
import secrets
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_on_a_head_node(tmp_path, expert_dataset, process_sessions):
    from offrl.stats.load import load_runs

    gcs, dash, client, agent = (_free_port() for _ in range(4))
    temp_dir = process_sessions.temp_dir()  # the head node's own, so `ray.init()` elsewhere never finds it
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the venv's python for jobs
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{dash}"
    start = process_sessions.run(
        [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"], env=env, cwd=str(ROOT), timeout=180)
    assert start.returncode == 0, start.stdout[-3000:]

    # without the cluster's token the job API refuses
    anonymous = {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}
    denied = process_sessions.run([BIN / "ray", "job", "list", "--address", address], env=anonymous, timeout=60)
    assert denied.returncode != 0 and "Unauthorized" in denied.stdout

    storage = tmp_path / "results"  # absolute: the job runs in a copy of the working dir
    job_id = f"offrl-test-{secrets.token_hex(4)}"
    submit = process_sessions.run(
        [BIN / "ray", "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
         "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": [".git", "runs", "datasets", ".venv"]}),
         "--", "python", "-m", "offrl", "sweep", "tune_configs/pretrain_sweep.yaml",
         f"pretrain.dataset={expert_dataset}", "pretrain.algo=critic_mc", "sweep.seeds=[0, 1]",
         "pretrain.epochs=2", "pretrain.steps_per_epoch=5", "critic.hidden=[32, 32]", "run.tensorboard=false",
         "--storage", str(storage)], env=env, cwd=str(ROOT), timeout=180)
    assert submit.returncode == 0, submit.stdout[-3000:]

    # --follow returns when the job ends; the job's stdout is the sweep's progress and summary
    logs = process_sessions.run([BIN / "ray", "job", "logs", "--address", address, "--follow", job_id], env=env,
                                timeout=400).stdout
    status = process_sessions.run([BIN / "ray", "job", "status", "--address", address, job_id], env=env,
                                  timeout=60).stdout
    assert f"Job '{job_id}' succeeded" in status, status[-1000:] + logs[-3000:]
    assert "2 trials: 2 finished, 0 failed" in logs

    exp = storage / "pretrain_sweep"  # results come back through the storage path the job wrote to
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["0000_seed=0", "0001_seed=1"]
    df = load_runs(exp)
    assert sorted(df["seed"].unique()) == [0, 1] and sorted(df["step"].unique()) == [1, 2]
