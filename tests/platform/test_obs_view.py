"""bench/obs_view.py: BC with the full observation and with the orientation quaternions hidden (real, tiny runs)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_trains_each_view_and_prints_its_table(tmp_path, expert_dataset):
    cmd = [sys.executable, "bench/obs_view.py", "--root", str(tmp_path), "--data", str(expert_dataset), "--demos", "4",
           "--seeds", "0", "--variants", "full", "no_orientation", "--", "pretrain.epochs=1",
           "pretrain.steps_per_epoch=5", "pretrain.eval_episodes=1", "env.num_envs=1", "cluster.num_hosts=1",
           "policy.hidden=[32]"]
    r = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 4 |")]
    assert [ln.split("|")[2].strip() for ln in rows] == ["full", "no_orientation"]
    archs = {}
    for view in ("full", "no_orientation"):
        run = tmp_path / "obs_view" / f"bc_n4_{view}_s0"
        ev = json.loads((run / "eval.json").read_text())
        assert f"| 4 | {view} | {ev['success_once']['mean']:.2f} |" in r.stdout
        state = json.loads((run / "checkpoints" / "1" / "training_state" / "state.json").read_text())
        archs[view] = state["actor_arch"]
        assert state["data"]["actor"]["episodes"] == 4
    assert "obs_ignore" not in archs["full"]
    assert archs["no_orientation"]["obs_ignore"] == [22, 23, 24, 25, 32, 33, 34, 35]
    assert (tmp_path / "obs_view.md").read_text().count("\n") == 4
    # a rerun reads the finished runs back instead of training them again
    again = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout


def test_bench_refuses_missing_data(tmp_path):
    r = subprocess.run([sys.executable, "bench/obs_view.py", "--root", str(tmp_path), "--data", str(tmp_path / "no.h5")],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr


def test_a_run_that_fails_stops_the_bench_with_its_error(tmp_path, expert_dataset):
    r = subprocess.run([sys.executable, "bench/obs_view.py", "--root", str(tmp_path), "--data", str(expert_dataset),
                        "--demos", "500", "--seeds", "0", "--variants", "full"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pretrain.num_episodes=500" in r.stderr and "bc_n500_full_s0 failed" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "obs_view.md").exists()
