"""Multi-node scenarios on a real Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``).

Run as a script, one scenario per process (a process joins one Ray cluster; the test session has its own):

    python tests/platform/multinode_scenarios.py rollout_node_loss OUT.json
    python tests/platform/multinode_scenarios.py sweep_node_loss OUT.json DATASET.h5

The cluster is a head node with no CPUs (nothing but the driver runs there) and worker nodes with 1 CPU each,
with Ray's health checks shortened, as Ray's own node-failure tests do, so a dead node is noticed in about a
second rather than half a minute. The scenario writes what it observed to OUT.json; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200, "health_check_failure_threshold": 5}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc: tells when a host is busy."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_cluster(workers: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "_system_config": HEALTH})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def rollout_node_loss(out: Path) -> None:
    """Two SimHosts spread over three 1-CPU worker nodes; the node of host 0 is removed ungracefully while
    a rollout runs. The rollout must come back complete, with host 0 re-created on the spare node."""
    import numpy as np

    from offrl.config import ClusterConfig, EnvConfig
    from offrl.platform.cluster import init_ray, shutdown_ray
    from offrl.platform.simhost import SimHostPool, concat_rollouts

    cluster, nodes = make_cluster(3)
    report: dict = {"worker_nodes": [n.node_id for n in nodes]}
    try:
        ccfg = ClusterConfig(address=cluster.address, num_hosts=2, max_restarts=3)
        init_ray(ccfg)
        pool = SimHostPool(EnvConfig(id="PickCube-v1", num_envs=1, max_episode_steps=50), ccfg, seed=0)
        report["nodes_before"] = pool.node_ids()
        report["pids_before"] = pool.pids()
        steps = 1500  # several seconds on one CPU
        result: dict = {}

        def run() -> None:
            t = time.time()
            try:
                result["rollouts"] = pool.rollout({"kind": "random"}, steps)
            except Exception as e:  # the assertion is on the report
                result["error"] = f"{type(e).__name__}: {e}"
            result["seconds"] = time.time() - t

        victim_pid = report["pids_before"][0]
        cpu0 = cpu_seconds(victim_pid)
        th = threading.Thread(target=run)
        th.start()
        # remove the node as soon as its host is busy with the rollout, not after a guessed delay
        deadline = time.monotonic() + 60
        while cpu_seconds(victim_pid) - cpu0 < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = next(n for n in nodes if n.node_id == report["nodes_before"][0])
        report["removed_node"] = victim.node_id
        report["removed_while_running"] = th.is_alive()
        cluster.remove_node(victim, allow_graceful=False)
        th.join(timeout=300)
        report["finished"] = not th.is_alive()
        report["error"] = result.get("error")
        report["seconds"] = result.get("seconds")
        if "rollouts" in result:
            r = concat_rollouts(result["rollouts"])
            report["shape"] = list(r["obs"].shape)
            report["actions_shape"] = list(r["actions"].shape)
            report["finite"] = bool(np.isfinite(r["obs"]).all() and np.isfinite(r["rewards"]).all())
            report["expected_shape"] = [steps, pool.num_envs, pool.spec["obs_dim"]]
        report["nodes_after"] = pool.node_ids()
        report["pids_after"] = pool.pids()
        pool.shutdown()
    finally:
        shutdown_ray()
        cluster.shutdown()
    out.write_text(json.dumps(report, indent=1))


def _metric_steps(trial_dir: Path) -> dict:
    import csv

    with open(trial_dir / "metrics.csv", newline="") as f:
        metrics = [int(r["step"]) for r in csv.DictReader(f)]
    result = [json.loads(line)["step"] for line in (trial_dir / "result.json").read_text().splitlines()]
    with open(trial_dir / "progress.csv", newline="") as f:
        progress = [int(r["step"]) for r in csv.DictReader(f)]
    return {"metrics": metrics, "result": result, "progress": progress}


def sweep_node_loss(out: Path, dataset: str) -> None:
    """A 2-trial pretraining sweep (1 CPU a trial) on three 1-CPU worker nodes; the node running trial 0 is
    removed ungracefully after its second epoch. Tune retries the trial on the spare node from its last
    checkpoint; the sweep must end with both trials finished once and no duplicated or missing rows."""
    from offrl.platform.cluster import shutdown_ray
    from offrl.platform.sweep import load_sweep, run_sweep

    cluster, nodes = make_cluster(3)
    storage = out.parent / "sweep_storage"
    report: dict = {"worker_nodes": [n.node_id for n in nodes]}
    try:
        sweep = load_sweep(ROOT / "tune_configs" / "pretrain_sweep.yaml", [
            f"pretrain.dataset={dataset}", "pretrain.algo=critic_mc", "sweep.seeds=[0, 1]", "sweep.name=mn",
            "sweep.max_concurrent=2", "pretrain.epochs=5", "pretrain.steps_per_epoch=150",
            "pretrain.checkpoint_every=1", "critic.hidden=[32, 32]", "run.tensorboard=false",
            f"cluster.address={cluster.address}"], log=lambda *a: None)
        trial0 = storage / "mn" / "0000_seed=0"
        removed: dict = {}

        def watch() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and not removed:
                try:
                    if len((trial0 / "metrics.csv").read_text().splitlines()) >= 3:  # header + 2 epochs
                        node = json.loads((trial0 / "sweep_trial.json").read_text())["attempts"][0]["node_id"]
                        victim = next(n for n in nodes if n.node_id == node)
                        cluster.remove_node(victim, allow_graceful=False)
                        removed["node"] = node
                except (OSError, ValueError, KeyError, StopIteration):
                    pass
                time.sleep(0.05)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        report["exit_status"] = run_sweep(sweep, storage, log=lambda *a: None)
        th.join(timeout=5)
        report["removed_node"] = removed.get("node")
        for name in ("0000_seed=0", "0001_seed=1"):
            d = storage / "mn" / name
            report[name] = {"steps": _metric_steps(d),
                            "attempts": json.loads((d / "sweep_trial.json").read_text())["attempts"],
                            "done": (d / "pretrain_done.json").exists()}
    finally:
        shutdown_ray()
        cluster.shutdown()
    out.write_text(json.dumps(report, indent=1))


SCENARIOS = {"rollout_node_loss": rollout_node_loss, "sweep_node_loss": sweep_node_loss}

if __name__ == "__main__":
    name, dest = sys.argv[1], Path(sys.argv[2])
    SCENARIOS[name](dest, *sys.argv[3:])
