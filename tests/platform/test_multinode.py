"""Multi-node Ray on one machine (``ray.cluster_utils.Cluster``): SimHosts spread over the nodes and survive
the loss of a node in the middle of a rollout; a sweep trial whose node is lost continues from its checkpoint. Each scenario runs in its own process (see
multinode_scenarios.py), because a process joins one Ray cluster and this test session has its own."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _scenario(name: str, tmp_path: Path, *args, timeout: int = 900) -> dict:
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, str(HERE / "multinode_scenarios.py"), name, str(out), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_rollout_survives_losing_a_worker_node(tmp_path):
    rep = _scenario("rollout_node_loss", tmp_path)
    workers = set(rep["worker_nodes"])
    # spread: the two SimHosts start on two different worker nodes (the head node has no CPUs)
    assert len(set(rep["nodes_before"])) == 2 and set(rep["nodes_before"]) <= workers
    # the node of host 0 was removed ungracefully while the rollout ran ...
    assert rep["removed_while_running"] and rep["removed_node"] == rep["nodes_before"][0]
    # ... and the rollout still returned every sample: 600 steps x 2 envs, all finite
    assert rep["finished"] and rep["error"] is None
    assert rep["shape"] == rep["expected_shape"] == [1500, 2, 42] and rep["actions_shape"] == [1500, 2, 4]
    assert rep["finite"]
    # host 0 was re-created on the spare node (a new process); host 1 was untouched
    assert rep["nodes_after"][0] in workers - set(rep["nodes_before"])
    assert rep["removed_node"] not in rep["nodes_after"]
    assert rep["pids_after"][0] != rep["pids_before"][0] and rep["pids_after"][1] == rep["pids_before"][1]
    assert rep["nodes_after"][1] == rep["nodes_before"][1]


def test_a_sweep_survives_losing_the_node_of_a_running_trial(tmp_path, expert_dataset):
    rep = _scenario("sweep_node_loss", tmp_path, expert_dataset)
    assert rep["exit_status"] == 0 and rep["removed_node"] is not None
    t0, t1 = rep["0000_seed=0"], rep["0001_seed=1"]
    # trial 0 ran on the removed node, then continued from its last checkpoint on a node still alive
    assert t0["attempts"][0]["node_id"] == rep["removed_node"]
    assert [a["mode"] for a in t0["attempts"]] == ["fresh", "resume"] and t0["attempts"][1]["checkpoint_step"] >= 1
    assert t0["attempts"][1]["node_id"] in set(rep["worker_nodes"]) - {rep["removed_node"]}
    # the other trial ran once; both finished, every step logged exactly once in every log
    assert [a["mode"] for a in t1["attempts"]] == ["fresh"]
    for t in (t0, t1):
        assert t["done"]
        assert t["steps"] == {"metrics": [1, 2, 3, 4, 5], "result": [1, 2, 3, 4, 5], "progress": [1, 2, 3, 4, 5]}
