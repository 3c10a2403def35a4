"""offrl alternate and offrl iterate on real ManiSkill (physx_cpu) and a real local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from offrl.data import OfflineDataset
from offrl.envs import ManiSkillCPUSim
from offrl.envs.tasks import DEFAULTS, TASK_A, TASK_B
from offrl.platform.alternate import attempts_dataset, summarize_chains, switch_task, task_goal
from tests.conftest import ROOT, run_cli

EXPERT = {"kind": "expert", "name": "pickplace"}


def _run_expert_until_success(sim, steps=100):
    from offrl.platform.rollout import build_policy

    pol = build_policy(EXPERT, sim)
    obs = sim._obs.copy()
    for _ in range(steps):
        a, _ = pol(obs, sim)
        obs, _, term, _, info = sim.step(a)
        if info["success"][0]:
            return obs
    raise AssertionError("the expert did not solve the task")


def test_switch_task_hands_the_state_over_without_a_reset():
    sim = ManiSkillCPUSim(TASK_A, num_envs=1, max_episode_steps=100, autoreset=False)
    try:
        sim.reset(seed=4)
        _run_expert_until_success(sim)  # the cube now rests on the target, the arm is home
        env = sim.raw_envs[0]
        before = sim.get_state()
        goal = task_goal(env, "B", seed=0, chain=0, cycle=0)
        x0, x1, y0, y1 = DEFAULTS["region"]
        assert x0 <= goal[0] <= x1 and y0 <= goal[1] <= y1
        obs = switch_task(sim, 0, goal)
        after = sim.get_state()
        # everything but the goal marker is exactly the state A ended in: robot, cube, velocities
        for name, v in before["sim"]["articulations"].items():
            np.testing.assert_allclose(after["sim"]["articulations"][name], v, atol=1e-6)
        np.testing.assert_allclose(after["sim"]["actors"]["cube"], before["sim"]["actors"]["cube"], atol=1e-7)
        np.testing.assert_allclose(after["sim"]["actors"]["goal_site"][0, :2], goal, atol=1e-6)
        assert after["elapsed_steps"][0] == 0 and before["elapsed_steps"][0] > 0
        # the observation shows the new goal; B's success is not met yet (the cube is on A's target)
        np.testing.assert_allclose(obs[25:27], goal, atol=1e-6)  # extra/goal_pos follows qpos, qvel, tcp_pose
        assert not bool(env.evaluate()["success"][0])
        # and B's expert can take it from there, in the same env
        _run_expert_until_success(sim)
        np.testing.assert_allclose(env.cube.pose.p[0, :2].numpy(), goal, atol=DEFAULTS["distance_threshold"])
    finally:
        sim.close()


@pytest.fixture(scope="module")
def expert_chains(ray_cluster):
    """3 chains of the scripted expert playing both tasks, 2 cycles each, on real SimHost actors."""
    from offrl.config import load_config
    from offrl.data.collect import _host_layout
    from offrl.platform.alternate import _alternate_on_host
    from offrl.platform.simhost import SimHostPool

    cfg = load_config(None, [f"env.id={TASK_A}", "env.num_envs=2", "env.max_episode_steps=100", "cluster.num_hosts=2"])
    pool = SimHostPool(cfg.env, cfg.cluster, seed=0)
    try:
        batches = [[(0, 2)], [(2, 1)]]
        res = pool._get([h.apply.remote(_alternate_on_host, EXPERT, EXPERT, b, 7, 2, 100)
                         for h, b in zip(pool.hosts, batches)])
        layout = pool._get([pool.hosts[0].apply.remote(_host_layout)])[0]
    finally:
        pool.shutdown()
    return cfg, res, layout


def test_alternating_chains_hand_over_state_between_attempts(expert_chains):
    cfg, res, layout = expert_chains
    chains = sorted((c for r in res for c in r["chains"]), key=lambda c: c["chain"])
    attempts = sorted((a for r in res for a in r["attempts"]), key=lambda a: (a["chain"], a["cycle"], a["task"]))
    assert [c["chain"] for c in chains] == [0, 1, 2] and [c["seed"] for c in chains] == [7, 8, 9]
    for c in chains:  # the expert completes every cycle: the chain stops at max_cycles
        assert c["consecutive_success"] == 2 and c["ended"] == "max_cycles"
        assert c["A_attempts"] == c["A_successes"] == 2 and c["B_attempts"] == c["B_successes"] == 2
    for j in range(3):
        seq = [a for a in attempts if a["chain"] == j]
        seq.sort(key=lambda a: (a["cycle"], a["task"]))  # A0, B0, A1, B1
        assert [(a["task"], a["cycle"]) for a in seq] == [("A", 0), ("B", 0), ("A", 1), ("B", 1)]
        for prev, nxt in zip(seq, seq[1:]):
            # no reset: the next attempt starts in the state the previous one ended in (the goal marker aside)
            for name, v in prev["env_states"]["articulations"].items():
                np.testing.assert_allclose(nxt["env_states"]["articulations"][name][0], v[-1], atol=1e-6)
            np.testing.assert_allclose(nxt["env_states"]["actors"]["cube"][0], prev["env_states"]["actors"]["cube"][-1],
                                       atol=1e-6)
            assert prev["success"] and prev["success_flags"][-1]
        for a in seq:
            goal = a["env_states"]["actors"]["goal_site"][0, :2]
            if a["task"] == "A":
                np.testing.assert_allclose(goal, DEFAULTS["target_xy"], atol=1e-6)
            else:
                np.testing.assert_allclose(goal, task_goal(type("E", (), {"region": DEFAULTS["region"]}), "B", 7, j,
                                                           a["cycle"]), atol=1e-6)
    s = summarize_chains(chains, 2)
    assert s["consecutive_success"]["mean"] == 2 and s["consecutive_success"]["distribution"] == [0, 0, 3]
    assert s["A_success_rate"]["mean"] == 1.0 and s["B_success_rate"]["attempts"] == 6


def test_attempts_become_datasets_of_their_task(expert_chains, tmp_path):
    cfg, res, layout = expert_chains
    attempts = [a for r in res for a in r["attempts"]]
    for task, env_id in (("A", TASK_A), ("B", TASK_B)):
        ds = attempts_dataset(attempts, task, cfg.env, layout, 100, "test")
        path = ds.save(tmp_path / f"rollouts_{task}.h5")
        back = OfflineDataset.load(path)
        assert back.env_id == env_id and len(back) == 6 and back.has_env_states
        assert all(e.succeeded for e in back.episodes)
    assert attempts_dataset([a for a in attempts if a["task"] == "A"], "B", cfg.env, layout, 100, "x") is None


@pytest.fixture(scope="module")
def tiny_policies(ray_cluster, tmp_path_factory):
    """Tiny A and B policies (2 epochs of 10 steps) and 6-episode datasets: they fail, which is all the CLI
    checks below need."""
    from offrl.config import load_config
    from offrl.data.collect import obs_layout, run_episode
    from offrl.data.reverse import reverse_dataset
    from offrl.envs.experts import PickPlaceExpert
    from offrl.envs.maniskill import make_maniskill_env
    from offrl.platform.pretrain import run_pretrain_job

    root = tmp_path_factory.mktemp("rev2fwd")
    env = make_maniskill_env(TASK_B, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos",
                             obs_mode="state", reward_mode="normalized_dense")
    try:
        eps = [run_episode(env, PickPlaceExpert(1), s, 100) for s in range(6)]
        layout = obs_layout(env)
    finally:
        env.close()
    meta = {"env_info": {"env_id": TASK_B, "env_kwargs": {"obs_mode": "state", "control_mode": "pd_ee_delta_pos",
                                                          "reward_mode": "normalized_dense"}, "max_episode_steps": 100},
            "source_type": "test", "source_desc": "test", "offrl": {"obs_layout": layout, "reward_mode": "normalized_dense"}}
    b_data = OfflineDataset(eps, meta).save(root / "b.h5")
    a_ds, _ = reverse_dataset(OfflineDataset.load(b_data), replay=False)
    a_data = a_ds.save(root / "a.h5")
    runs = {}
    for t, env_id, data in (("A", TASK_A, a_data), ("B", TASK_B, b_data)):
        cfg = load_config(ROOT / "tune_configs/pretrain_pickplace.yaml", [
            f"env.id={env_id}", f"pretrain.dataset={data}", "pretrain.epochs=2", "pretrain.steps_per_epoch=10",
            "pretrain.eval_episodes=1", "policy.hidden=[32,32]", "env.num_envs=2", f"run.root={root}",
            "run.experiment=p", f"run.trial={t}", "run.progress=false", "pretrain.batch_size=32"])
        runs[t] = run_pretrain_job(cfg, log=lambda *a: None)
    return root, runs, {"A": a_data, "B": b_data}


def test_cli_alternate_writes_its_outputs_and_refuses_the_wrong_task(tiny_policies, tmp_path):
    root, runs, _ = tiny_policies
    out = tmp_path / "alt"
    r = run_cli("alternate", "--policy-a", str(runs["A"]), "--policy-b", str(runs["B"]), "--chains", "3",
                "--max-cycles", "2", "--horizon", "15", "--out", str(out), "env.num_envs=2", "cluster.num_cpus=2")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "alternate.json").read_text())
    assert s["chains"] == 3 and len(s["per_chain"]) == 3 and s["horizon"] == 15
    assert s["A_success_rate"]["attempts"] >= 3
    assert (out / "consecutive_success.png").stat().st_size > 0
    ds = OfflineDataset.load(out / "rollouts_A.h5")
    assert ds.env_id == TASK_A and all(e.length <= 15 for e in ds.episodes)

    def refused(pattern, *args):
        r = run_cli("alternate", *args, "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and pattern in r.stderr, r.stderr
        assert not (tmp_path / "bad").exists()

    refused("trained for offrl/PickPlaceB-v1, --policy-a needs a policy for offrl/PickPlaceA-v1",
            "--policy-a", str(runs["B"]), "--policy-b", str(runs["B"]))
    refused("trained for offrl/PickPlaceA-v1, --policy-b needs", "--policy-a", str(runs["A"]), "--policy-b", str(runs["A"]))
    refused("--chains must be >= 1", "--policy-a", str(runs["A"]), "--policy-b", str(runs["B"]), "--chains", "0")
    refused("checkpoint not found", "--policy-a", str(tmp_path / "nope"), "--policy-b", str(runs["B"]))


def test_merge_refuses_an_empty_rollout_set(tiny_policies, tmp_path):
    from offrl.errors import OffrlError
    from offrl.platform.iterate import merge_successes

    root, runs, data = tiny_policies
    # a rollout file whose attempts all failed
    ds = OfflineDataset.load(data["A"])
    for e in ds.episodes:
        e.success = np.zeros_like(e.success)
        e.terminated = np.zeros_like(e.terminated)
        e.truncated = np.zeros_like(e.truncated)
        e.truncated[-1] = True
        e.info["success"] = False
    failed = ds.save(tmp_path / "failed.h5")
    with pytest.raises(OffrlError, match="no successful rollouts to merge"):
        merge_successes(data["A"], failed, tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()
    info = merge_successes(data["A"], data["A"], tmp_path / "merged.h5")
    assert info["added"] == 6 and info["episodes"] == 12


def test_expert_b_starts_from_the_failed_attempts_states_and_joins_the_merge(tiny_policies, tmp_path):
    from offrl.platform.iterate import expert_from_failures, merge_successes

    root, runs, data = tiny_policies
    # two "failed" B attempts whose start has the cube moved 1.5 cm in x off where the seed's reset puts it
    ds = OfflineDataset.load(data["B"]).subset([0, 1])
    for e in ds.episodes:
        e.success[:] = False
        e.terminated[:] = False
        e.truncated[-1] = True
        e.info["success"] = False
        e.env_states["actors"]["cube"][0, 0] += 0.015
    failed = ds.save(tmp_path / "rollouts_B.h5")
    r = expert_from_failures(failed, tmp_path / "expert_B.h5", log=lambda *a: None)
    assert r["failed_attempts"] == 2 and r["expert_successes"] == 2
    ex = OfflineDataset.load(tmp_path / "expert_B.h5")
    assert ex.env_id == TASK_B and all(e.succeeded for e in ex.episodes)
    for e, f in zip(ex.episodes, ds.episodes):
        np.testing.assert_allclose(e.env_states["actors"]["cube"][0], f.env_states["actors"]["cube"][0], atol=1e-6)
        np.testing.assert_allclose(e.obs[0, 28], f.obs[0, 28] + 0.015, atol=1e-4)   # obj_pose x: the moved cube
    # the demonstrations join B's data even when no B attempt succeeded
    info = merge_successes(data["B"], failed, tmp_path / "merged.h5", extra=tmp_path / "expert_B.h5")
    assert info["added"] == 0 and info["expert_added"] == 2 and info["episodes"] == 8


@pytest.fixture(scope="module")
def memorized(ray_cluster, tmp_path_factory):
    """Policies that succeed: the scripted expert's own chains (seeds 0 and 1, one A->B cycle) memorised by
    3,000 steps of BC each. They replay those chains, which is what iterate's test needs to collect successes."""
    from offrl.config import load_config
    from offrl.data.collect import _host_layout
    from offrl.platform.alternate import _alternate_on_host
    from offrl.platform.pretrain import run_pretrain_job
    from offrl.platform.simhost import SimHostPool

    root = tmp_path_factory.mktemp("memorized")
    cfg = load_config(None, [f"env.id={TASK_A}", "env.num_envs=2", "env.max_episode_steps=100", "cluster.num_hosts=1"])
    pool = SimHostPool(cfg.env, cfg.cluster, seed=0)
    try:
        res = pool._get([pool.hosts[0].apply.remote(_alternate_on_host, EXPERT, EXPERT, [(0, 2)], 0, 1, 100)])
        layout = pool._get([pool.hosts[0].apply.remote(_host_layout)])[0]
    finally:
        pool.shutdown()
    paths, runs = {}, {}
    for t, env_id in (("A", TASK_A), ("B", TASK_B)):
        paths[t] = attempts_dataset(res[0]["attempts"], t, cfg.env, layout, 100, "expert").save(root / f"{t}.h5")
        c = load_config(ROOT / "tune_configs/pretrain_pickplace.yaml", [
            f"env.id={env_id}", f"pretrain.dataset={paths[t]}", "pretrain.epochs=10", "pretrain.steps_per_epoch=300",
            "pretrain.batch_size=64", "pretrain.val_fraction=0", "pretrain.select=last", "pretrain.eval_episodes=1",
            "env.num_envs=2", "policy.hidden=[128,128]", f"run.root={root}", "run.experiment=p", f"run.trial={t}",
            "run.progress=false"])
        runs[t] = run_pretrain_job(c, log=lambda *a: None)
    return root, runs, paths


def _iterate_cmd(root, runs, paths, out):
    return [sys.executable, "-m", "offrl", "iterate", str(ROOT / "tune_configs/rev2fwd.yaml"),
            f"iterate.policy_a={runs['A']}", f"iterate.policy_b={runs['B']}", f"iterate.data_a={paths['A']}",
            f"iterate.data_b={paths['B']}", f"iterate.root={out}", "iterate.max_iterations=2", "iterate.chains=2",
            "iterate.max_cycles=1", "iterate.steps_per_iter=20", "iterate.steps_per_epoch=10",
            "iterate.eval_episodes=1", "seed=0"]


def test_iterate_resumes_after_a_kill_between_steps(memorized, tmp_path):
    root, runs, paths = memorized
    out = tmp_path / "loop"
    cmd = _iterate_cmd(root, runs, paths, out) + ["iterate.expert_b=true"]
    # first run: SIGKILL the whole process group as soon as iteration 0's merge is recorded
    p = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    state_file = out / "iterate.json"
    deadline = time.time() + 400
    killed = False
    while time.time() < deadline and p.poll() is None:
        try:
            st = json.loads(state_file.read_text())
        except (OSError, ValueError):
            st = {}
        its = st.get("iterations", [])
        if its and "merge" in its[0]:
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    p.wait(timeout=60)
    assert killed, (p.stdout.read() if p.stdout else "")[-3000:]
    st = json.loads(state_file.read_text())
    wins = {t: st["iterations"][0]["alternate"][f"{t}_success_rate"]["successes"] for t in "AB"}
    assert wins["A"] >= 1  # the memorised chains succeed (measured 2/2 A, 1-2/2 B)
    assert not st["iterations"][0].get("done")
    alt_json = out / "iter_0" / "alternate" / "alternate.json"
    stamp = alt_json.stat().st_mtime_ns
    # second run: the same command continues at the finetuning step
    r = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "continuing" in r.stdout
    assert alt_json.stat().st_mtime_ns == stamp  # the finished test was not run again
    st = json.loads(state_file.read_text())
    assert len(st["iterations"]) == 2 and st["stopped"] == "max_iterations"
    it0 = st["iterations"][0]
    assert it0["done"] and it0["merge"]["A"]["added"] == wins["A"]
    assert (it0["merge"]["B"] or {}).get("added", 0) == wins["B"]
    b_fails = it0["alternate"]["B_success_rate"]["attempts"] - wins["B"]
    assert it0["expert_b"]["failed_attempts"] == b_fails  # the expert ran from every failed B start
    if it0["expert_b"]["expert_successes"]:
        assert it0["merge"]["B"]["expert_added"] == it0["expert_b"]["expert_successes"]
        assert len(OfflineDataset.load(out / "iter_0" / "data_B.h5")) == 2 + wins["B"] + it0["expert_b"]["expert_successes"]
    assert len(OfflineDataset.load(out / "iter_0" / "data_A.h5")) == 2 + wins["A"]
    for t in "AB":
        assert (out / "iter_0" / "finetune" / t / "eval.json").exists()
        assert it0["next_policies"][t] == st["iterations"][1]["policies"][t]
        assert "iter_0/finetune" in st["iterations"][1]["policies"][t]
    assert "alternate" in st["iterations"][1]
    table = (out / "iterate.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| 0 |") and table[3].startswith("| 1 |")
    assert (out / "iterate.png").stat().st_size > 0


def test_iterate_bad_inputs_are_one_line(memorized, tmp_path):
    root, runs, paths = memorized
    base = _iterate_cmd(root, runs, paths, tmp_path / "x")[4:]

    def refused(pattern, *over):
        r = run_cli("iterate", *base, *over)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and pattern in r.stderr, r.stderr
        assert not (tmp_path / "x").exists()  # nothing written

    refused("iterate.policy_a': required", "iterate.policy_a=")
    refused(f"was trained for {TASK_B}, expected {TASK_A}", f"iterate.policy_a={runs['B']}")
    refused(f"holds {TASK_B} data, expected {TASK_A}", f"iterate.data_a={paths['B']}")
    refused("iterate.chains': must be >= 1", "iterate.chains=0")
    refused("checkpoint not found", f"iterate.policy_b={tmp_path / 'none'}")
