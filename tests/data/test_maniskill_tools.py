"""Interoperability with ManiSkill's own tools (mani_skill.trajectory.replay_trajectory, RecordEpisode)."""

import re

import numpy as np
import pytest

from offrl.data import OfflineDataset

from .conftest import replay


def replayed(out: str) -> tuple[int, int]:
    m = re.search(r"Replayed (\d+) episodes, (\d+)/\d+", out)
    assert m, out[-2000:]
    return int(m.group(1)), int(m.group(2))


def test_offrl_files_replay_with_maniskill_from_seeds(tmp_path, expert_ds):
    """ManiSkill resets with each episode's reset_kwargs and replays the actions: the demos succeed again."""
    path = expert_ds.subset(range(3)).save(tmp_path / "demo.h5")
    r = replay("--traj-path", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert replayed(r.stdout) == (3, 3)  # 3 replayed, 3 successful


def test_maniskill_conversion_of_offrl_files_loads(tmp_path, expert_ds):
    """`-o state --use-env-states --save-traj --record-rewards` re-records an offrl file with ManiSkill's writer."""
    src = expert_ds.subset(range(2))
    path = src.save(tmp_path / "demo.h5")
    r = replay("--traj-path", str(path), "-o", "state", "--use-env-states", "--save-traj", "--record-rewards",
               "--reward-mode", "normalized_dense", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert replayed(r.stdout) == (2, 2)
    out = OfflineDataset.load(tmp_path / "demo.state.pd_ee_delta_pos.physx_cpu.h5")
    assert (len(out), out.env_id, out.control_mode, out.obs_dim) == (2, "PickCube-v1", "pd_ee_delta_pos", 42)
    assert out.reward_keys == ["rewards"] and out.reward_mode == "normalized_dense" and out.has_env_states
    for a, b in zip(src.episodes, out.episodes):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.obs[0], b.obs[0])
        # ManiSkill records the observation of each replayed step before restoring the stored state;
        # contacts are re-solved, so later rows agree to simulator precision, not bit for bit
        np.testing.assert_allclose(a.obs, b.obs, atol=0.05)
    # and it merges with offrl data (its 'rewards' are normalized_dense; the other modes are dropped)
    merged = OfflineDataset.merge([expert_ds.subset(range(2, 4)), out])
    assert merged.reward_keys == ["rewards", "rewards_normalized_dense"] and len(merged) == 4


def test_maniskill_recorded_and_converted_files_load(maniskill_joint_pos_file):
    """A RecordEpisode pd_joint_pos file (like ManiSkill's motion-planning demos) and its conversion to
    pd_ee_delta_pos by ManiSkill's replay tool both load unchanged."""
    cwd = maniskill_joint_pos_file.parent
    raw = OfflineDataset.load(maniskill_joint_pos_file)
    assert (len(raw), raw.control_mode, raw.act_dim, raw.obs_dim) == (2, "pd_joint_pos", 8, 42)
    r = replay("--traj-path", str(maniskill_joint_pos_file), "-c", "pd_ee_delta_pos", "-o", "state", "--save-traj",
               "--record-rewards", "--reward-mode", "normalized_dense", "--allow-failure", cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    conv = OfflineDataset.load(cwd / "demos.state.pd_ee_delta_pos.physx_cpu.h5")
    assert (len(conv), conv.control_mode, conv.act_dim, conv.obs_dim) == (2, "pd_ee_delta_pos", 4, 42)
    assert conv.transitions()["reward"].shape[0] == conv.num_steps
    assert np.abs(conv.transitions()["action"].numpy()).max() <= 1.0


@pytest.mark.parametrize("flag", ["--use-first-env-state"])
def test_custom_randomization_replays_from_the_first_state(tmp_path, flag):
    """Datasets collected with custom cube/goal ranges replay from their first env state."""
    from offrl.data.collect import collect_chunk
    from offrl.data.format import write_trajectories
    from offrl.envs.maniskill import make_maniskill_env

    env = make_maniskill_env("PickCube-v1", num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos",
                             obs_mode="state", reward_mode="normalized_dense")
    ranges = {"cube_xy": [0.05, 0.08, -0.08, -0.05], "goal_xy": [-0.06, -0.04, 0.04, 0.06], "goal_z": [0.1, 0.15]}
    recs = collect_chunk(env, [(0, 11), (1, 12)], "pickcube", 0.0, 50, ranges, keep_failures=True)
    env.close()
    eps = [r["episode"] for r in recs]
    for e in eps:  # obs columns: extra/goal_pos 26:29, extra/obj_pose 29:36
        cube, goal = e.obs[0, 29:31], e.obs[0, 26:29]
        assert 0.05 <= cube[0] <= 0.08 and -0.08 <= cube[1] <= -0.05
        assert -0.06 <= goal[0] <= -0.04 and 0.04 <= goal[1] <= 0.06 and 0.1 <= goal[2] <= 0.15
        assert e.succeeded
    meta = {"env_info": {"env_id": "PickCube-v1", "env_kwargs": {"obs_mode": "state", "control_mode": "pd_ee_delta_pos",
                                                                 "reward_mode": "normalized_dense",
                                                                 "sim_backend": "physx_cpu"},
                         "max_episode_steps": 50}}
    path = write_trajectories(tmp_path / "ranges.h5", eps, meta)
    r = replay("--traj-path", str(path), flag, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert replayed(r.stdout) == (2, 2)
