"""Fixtures for the data tests.

``expert_dataset`` (tests/conftest.py) collects 20 PickCube-v1 expert episodes once per session on the
real Ray cluster; the fixtures here derive small files from it or write ManiSkill-format data with
ManiSkill's own ``RecordEpisode`` wrapper. (tests/data is a package so that this conftest does not
shadow tests/conftest.py's ``from conftest import run_cli``.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offrl.data import Episode, OfflineDataset


@pytest.fixture(scope="session")
def expert_ds(expert_dataset) -> OfflineDataset:
    return OfflineDataset.load(expert_dataset)


@pytest.fixture
def small_file(tmp_path, expert_ds) -> Path:
    """A fresh 3-episode copy of the expert data (safe to corrupt)."""
    return expert_ds.subset(range(3)).save(tmp_path / "small.h5")


@pytest.fixture(scope="session")
def maniskill_joint_pos_file(tmp_path_factory) -> Path:
    """Two PickCube-v1 demos in pd_joint_pos written by ManiSkill's RecordEpisode (like its motion-planning
    demos): the joint targets follow the scripted ee expert run side by side in a pd_ee_delta_pos env."""
    import gymnasium as gym
    from mani_skill.utils.wrappers.record import RecordEpisode

    from offrl.envs.experts import PickCubeExpert
    from offrl.envs.maniskill import make_maniskill_env

    out = tmp_path_factory.mktemp("maniskill")
    ee = make_maniskill_env("PickCube-v1", num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos",
                            obs_mode="state", reward_mode="normalized_dense")
    env = gym.make("PickCube-v1", obs_mode="state", control_mode="pd_joint_pos", reward_mode="normalized_dense",
                   sim_backend="physx_cpu", render_backend="none")
    env = RecordEpisode(env, str(out), trajectory_name="demos", save_video=False, save_on_reset=False,
                        record_reward=True)
    ex = PickCubeExpert(1)
    for seed in (2, 3):
        ee.reset(seed=seed)
        env.reset(seed=seed)
        ex.reset()
        for _ in range(30):
            a = ex.act(ex.privileged(ee))
            _, _, te, _, _ = ee.step(a)
            q = ee.agent.robot.get_qpos()[0, :7].numpy()
            env.step(np.concatenate([q, a[0, 3:]]).astype(np.float32))
            if te[0]:
                break
        env.flush_trajectory()
    env.close()
    ee.close()
    return out / "demos.h5"


def replay(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mani_skill.trajectory.replay_trajectory ARGS`` (ManiSkill's own tool)."""
    return subprocess.run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", *args], cwd=str(cwd),
                          capture_output=True, text=True, timeout=300)


def make_episode(T: int, obs_dim: int = 3, act_dim: int = 2, rewards=None, seed: int = 0, **kw) -> Episode:
    """A synthetic episode with T steps (obs rows T+1)."""
    rng = np.random.default_rng(seed)
    r = np.asarray(rewards if rewards is not None else rng.normal(size=T), np.float32)
    term = np.zeros(T, bool)
    term[-1] = True
    return Episode(obs=rng.normal(size=(T + 1, obs_dim)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                   terminated=term, truncated=np.zeros(T, bool), success=term.copy(),
                   rewards={"rewards": r}, info={"control_mode": "pd_ee_delta_pos"}, **kw)


def synthetic_meta(obs_dim: int = 3, **offrl) -> dict:
    return {"env_info": {"env_id": "PickCube-v1", "env_kwargs": {"obs_mode": "state", "control_mode": "pd_ee_delta_pos",
                                                                 "reward_mode": "sparse"}, "max_episode_steps": 50},
            "offrl": {"obs_layout": [["obs", obs_dim]], **offrl}}
