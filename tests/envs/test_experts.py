"""Scripted experts: success rate on PickCube-v1 through the BatchedSim policy interface, noise, registry."""

import numpy as np
import pytest

from offrl.envs import ManiSkillCPUSim
from offrl.envs.experts import (ExpertPolicy, PickCubeExpert, check_control_mode, expert_for_env, make_expert)
from offrl.errors import OffrlError
from offrl.platform.rollout import build_policy


@pytest.fixture(scope="module")
def sim():
    s = ManiSkillCPUSim("PickCube-v1", num_envs=4, control_mode="pd_ee_delta_pos", max_episode_steps=50)
    yield s
    s.close()


def first_episodes(sim, policy, seed):
    """Run until every env finished its first episode; returns (success, length) per env."""
    sim.reset(seed=seed)
    done = np.zeros(sim.num_envs, bool)
    success = np.zeros(sim.num_envs, bool)
    length = np.zeros(sim.num_envs, int)
    obs = sim._obs.copy()
    for _ in range(sim.max_episode_steps):
        act, logp = policy(obs, sim)
        assert act.shape == (sim.num_envs, 4) and act.dtype == np.float32 and np.all(np.abs(act) <= 1)
        assert logp.shape == (sim.num_envs,) and not logp.any()
        obs, r, te, tr, info = sim.step(act)
        new = info["done"] & ~done
        success[new] = te[new]
        length[new] = info["elapsed_steps"][new]
        done |= info["done"]
        if done.all():
            break
    return success, length


def test_expert_solves_pickcube_on_20_seeds(sim):
    policy = build_policy({"kind": "expert", "name": "pickcube"}, sim)
    results = [first_episodes(sim, policy, seed=100 + 4 * k) for k in range(5)]  # seeds 100..119
    success = np.concatenate([s for s, _ in results])
    length = np.concatenate([n for _, n in results])
    assert success.size == 20
    assert success.mean() >= 0.95, f"success {success.sum()}/20"
    assert length[success].max() <= 50
    # measured: 500/500 seeds, 12-33 steps; the bar here leaves room for physics-version drift


def test_state_machine_restarts_after_autoreset(sim):
    policy = make_expert("auto", sim)
    sim.reset(seed=7)
    obs = sim._obs.copy()
    for _ in range(60):  # past the first episode of every env: autoreset starts a second one
        act, _ = policy(obs, sim)
        obs, r, te, tr, info = sim.step(act)
        fresh = sim.elapsed_steps == 0
        if fresh.any():
            policy(obs, sim)
            assert (policy.expert.phase[fresh] <= PickCubeExpert.DESCEND).all()
            return
    pytest.fail("no episode ended within 60 steps")


def test_action_noise_is_seeded_and_bounded(sim):
    def actions(noise, seed):
        p = make_expert("pickcube", sim, action_noise=noise, seed=seed)
        sim.reset(seed=3)
        out = []
        obs = sim._obs.copy()
        for _ in range(5):
            a, _ = p(obs, sim)
            out.append(a)
            obs, *_ = sim.step(a)
        return np.stack(out)

    clean, a1, a2, b = actions(0.0, 0), actions(0.2, 0), actions(0.2, 0), actions(0.2, 1)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, b) and not np.array_equal(a1, clean)
    assert np.abs(a1).max() <= 1.0


def test_registry_and_control_mode_checks(sim):
    assert expert_for_env("PickCube-v1") == "pickcube"
    assert isinstance(make_expert("auto", sim), ExpertPolicy)
    with pytest.raises(OffrlError, match="no scripted expert for env 'PushCube-v1'"):
        expert_for_env("PushCube-v1")
    with pytest.raises(OffrlError, match="unknown expert 'nope'"):
        make_expert("nope", sim)
    with pytest.raises(OffrlError, match="acts in control_mode pd_ee_delta_pos.*pd_joint_delta_pos"):
        check_control_mode("pickcube", "pd_joint_delta_pos")
    with pytest.raises(OffrlError, match="action_noise"):
        PickCubeExpert(1, action_noise=-1)


def test_state_machine_phases_on_synthetic_poses():
    """Hand-placed poses: hover above the cube, descend when aligned, close at the cube, then lift."""
    ex = PickCubeExpert(1)
    cube, goal = np.array([[0.0, 0.0, 0.02]]), np.array([[0.05, 0.0, 0.2]])
    a = ex.act({"tcp": np.array([[0.1, 0.0, 0.2]]), "cube": cube, "goal": goal})
    assert ex.phase[0] == ex.HOVER and a[0, 0] < 0 and a[0, 3] == 1.0  # move towards -x, gripper open
    ex.act({"tcp": np.array([[0.0, 0.0, 0.07]]), "cube": cube, "goal": goal})
    assert ex.phase[0] == ex.DESCEND
    for _ in range(ex.close_steps + 1):
        a = ex.act({"tcp": np.array([[0.0, 0.0, 0.021]]), "cube": cube, "goal": goal})
    assert ex.phase[0] == ex.LIFT and a[0, 3] == -1.0 and a[0, 2] > 0  # closed, moving up
    ex.reset()
    assert ex.phase[0] == ex.HOVER
