"""Hindsight goal relabelling (finetune.her_relabel) on real PickCube-v1 transitions."""

import numpy as np
import pytest
import torch

from offrl.config import load_config
from offrl.envs import ManiSkillCPUSim
from offrl.envs.experts import make_expert
from offrl.envs.goals import GoalRelabeller
from offrl.envs.maniskill import obs_fields
from offrl.errors import ConfigError
from offrl.platform.rollout import run_rollout


@pytest.fixture(scope="module")
def rollout():
    """60 steps of 4 envs of the noisy scripted expert: successes, misses and episode ends in one round."""
    sim = ManiSkillCPUSim("PickCube-v1", num_envs=4, control_mode="pd_ee_delta_pos", reward_mode="sparse",
                          max_episode_steps=30)
    try:
        fields = obs_fields(sim.envs[0].unwrapped)
        sim.reset(seed=11)
        out = run_rollout(sim, make_expert("pickcube", sim, action_noise=0.1, seed=0), 60)
    finally:
        sim.close()
    return fields, out


def test_success_test_matches_the_simulators_flags(rollout):
    fields, out = rollout
    rel = GoalRelabeller("PickCube-v1", fields)
    assert out["success"].any() and (~out["success"]).any()
    np.testing.assert_array_equal(rel.success(out["next_obs"]), out["success"])
    # moving the goal to where it already is changes nothing (the goal-relative parts are recomputed exactly)
    np.testing.assert_allclose(rel.with_goal(out["obs"], out["obs"][..., rel.goal]), out["obs"], atol=1e-6)


def test_episode_ends_within_a_round():
    done = np.array([[0, 1], [1, 0], [0, 0], [0, 1], [0, 0]], bool)
    np.testing.assert_array_equal(GoalRelabeller.episode_ends(done), [[1, 0], [1, 3], [4, 3], [4, 3], [4, 4]])


def test_relabelled_goals_come_from_the_same_episodes_future(rollout):
    fields, out = rollout
    rel = GoalRelabeller("PickCube-v1", fields)
    T, N = out["obs"].shape[:2]
    flat, rate = rel.relabel(out, 3, np.random.default_rng(0))
    assert flat["obs"].shape == (3 * T * N, out["obs"].shape[-1]) and flat["terminated"].dtype == torch.bool
    end = rel.episode_ends(out["terminated"] | out["truncated"])
    pos = out["next_obs"][..., rel.pos]
    goals = flat["obs"].numpy()[:, rel.goal].reshape(3, T, N, 3)
    for c in range(3):
        for t in range(T):
            for n in range(N):
                cands = pos[t:end[t, n] + 1, n]  # the object's positions from this step to its episode's end
                assert np.abs(cands - goals[c, t, n]).max(-1).min() < 1e-6
    # the transition itself is unchanged apart from the goal: actions, and the parts not about the goal
    keep = np.ones(out["obs"].shape[-1], bool)
    keep[rel.goal] = False
    for s in rel.to_goal:
        keep[s] = False
    np.testing.assert_array_equal(flat["obs"].numpy()[:T * N][:, keep], out["obs"].reshape(T * N, -1)[:, keep])
    np.testing.assert_array_equal(flat["actions"].numpy()[:T * N], out["actions"].reshape(T * N, -1))
    # reward = the task's success against the new goal, and the episode ends where it is reached
    hit = rel.success(flat["next_obs"].numpy())
    np.testing.assert_array_equal(flat["rewards"].numpy(), hit.astype(np.float32))
    np.testing.assert_array_equal(flat["terminated"].numpy(), hit)
    assert rate == pytest.approx(hit.mean()) and rate > out["success"].mean()  # hindsight adds successes


def test_min_move_drops_the_goals_the_object_was_never_moved_to(rollout):
    fields, out = rollout
    rel = GoalRelabeller("PickCube-v1", fields)
    full, _ = rel.relabel(out, 2, np.random.default_rng(0))
    kept, _ = rel.relabel(out, 2, np.random.default_rng(0), min_move=0.025)
    o = full["obs"].numpy()
    moved = np.linalg.norm(o[:, rel.goal] - o[:, rel.pos], axis=-1) >= 0.025
    assert 0 < len(kept["obs"]) == int(moved.sum()) < len(full["obs"])  # the same draws, the unmoved ones gone
    for k in full:
        np.testing.assert_array_equal(kept[k].numpy(), full[k].numpy()[moved])


def test_episode_starts_within_a_round():
    done = np.array([[0, 1], [1, 0], [0, 0], [0, 1], [0, 0]], bool)
    np.testing.assert_array_equal(GoalRelabeller.episode_starts(done), [[0, 0], [0, 1], [2, 1], [2, 1], [2, 4]])


def test_min_move_from_the_episode_start_keeps_goals_the_object_was_carried_to(rollout):
    """her_move_from=episode: a copy goes only when its goal lies within min_move of where the object was at
    its episode's start; goals the expert carried the cube to (and held it at) stay, where the
    transition-start rule drops those held-still copies too."""
    fields, out = rollout
    rel = GoalRelabeller("PickCube-v1", fields)
    full, _ = rel.relabel(out, 2, np.random.default_rng(0))
    kept, _ = rel.relabel(out, 2, np.random.default_rng(0), min_move=0.025, move_from="episode")
    T, N = out["obs"].shape[:2]
    start = rel.episode_starts(out["terminated"] | out["truncated"])
    origin = out["obs"][start, np.arange(N)[None, :]][..., rel.pos].reshape(1, T * N, 3)
    goals = full["obs"].numpy()[:, rel.goal].reshape(2, T * N, 3)
    moved = (np.linalg.norm(goals - origin, axis=-1) >= 0.025).reshape(-1)
    assert 0 < len(kept["obs"]) == int(moved.sum()) < len(full["obs"])
    for k in full:
        np.testing.assert_array_equal(kept[k].numpy(), full[k].numpy()[moved])
    # the held-still successes at a carried-to goal survive here; the transition rule drops every one of them
    by_transition, _ = rel.relabel(out, 2, np.random.default_rng(0), min_move=0.025)
    assert kept["rewards"].sum() > 0 and kept["rewards"].sum() > by_transition["rewards"].sum()
    with pytest.raises(ValueError, match="move_from"):
        rel.relabel(out, 1, np.random.default_rng(0), min_move=0.025, move_from="round")


def test_unknown_task_and_bad_values_are_refused():
    with pytest.raises(ConfigError, match="finetune.her_relabel.*no goal layout known for PushCube-v1"):
        GoalRelabeller("PushCube-v1", [["agent/qpos", 0, 9]])
    with pytest.raises(ConfigError, match="finetune.her_relabel.*lacks extra/goal_pos"):
        GoalRelabeller("PickCube-v1", [["agent/qpos", 0, 9]])
    with pytest.raises(ConfigError, match="her_relabel.*must be >= 0"):
        load_config(None, ["finetune.her_relabel=-1"])
    with pytest.raises(ConfigError, match="her_relabel.*finetune.replay=true"):
        load_config(None, ["finetune.her_relabel=2"])
    with pytest.raises(ConfigError, match="her_relabel.*env.reward_mode sparse"):
        load_config(None, ["finetune.her_relabel=2", "finetune.replay=true", "finetune.update=sac"])
    with pytest.raises(ConfigError, match="her_relabel"):
        load_config(None, ["finetune.her_relabel=nan"])
    for bad in ("-0.01", "nan", "inf"):
        with pytest.raises(ConfigError, match="her_min_move"):
            load_config(None, [f"finetune.her_min_move={bad}"])
    with pytest.raises(ConfigError, match="her_move_from"):
        load_config(None, ["finetune.her_move_from=round"])


def test_cli_refuses_relabelling_off_the_replay_path(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "offrl", "finetune", "tune_configs/finetune_sparse.yaml",
                        "finetune.her_relabel=2", f"run.root={tmp_path}"], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "finetune.her_relabel" in r.stderr and "replay" in r.stderr
    assert not any(tmp_path.iterdir())
