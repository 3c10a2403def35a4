"""offrl's pick-and-place tasks (offrl/PickPlaceA-v1, offrl/PickPlaceB-v1) and their scripted expert, on real
ManiSkill (physx_cpu)."""

import numpy as np
import pytest
from sapien.physx import PhysxRigidBaseComponent

from offrl.envs import ManiSkillCPUSim
from offrl.envs.experts import expert_for_env, make_expert
from offrl.envs.maniskill import make_maniskill_env
from offrl.envs.tasks import DEFAULTS, TASK_A, TASK_B, task_success
from offrl.errors import OffrlError

LAYOUT = ["agent/qpos", "agent/qvel", "extra/tcp_pose", "extra/goal_pos", "extra/obj_pose", "extra/tcp_to_obj_pos",
          "extra/obj_to_goal_pos"]


def make(env_id, **kw):
    return make_maniskill_env(env_id, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos",
                              obs_mode="state", reward_mode="normalized_dense", extra=kw or None)


@pytest.fixture(scope="module")
def envs():
    e = {TASK_A: make(TASK_A), TASK_B: make(TASK_B)}
    yield e
    for x in e.values():
        x.close()


def test_tasks_share_one_observation_layout_without_contact_terms(envs):
    from offrl.data.collect import obs_layout

    for env in envs.values():
        obs, _ = env.reset(seed=0)
        assert obs.shape == (1, 41)
        assert [n for n, _ in obs_layout(env)] == LAYOUT
        assert "is_grasped" not in str(obs_layout(env))
        # the markers are visual only: no collision shapes, kinematic
        assert env.target_ring.px_body_type == "kinematic" and env.goal_site.px_body_type == "kinematic"
        for marker in (env.target_ring, env.goal_site):
            body = marker._objs[0].find_component_by_type(PhysxRigidBaseComponent)
            assert body.collision_shapes == []


def test_starts_and_goals_follow_the_task(envs):
    tx, ty = DEFAULTS["target_xy"]
    x0, x1, y0, y1 = DEFAULTS["region"]
    for seed in range(8):
        a, b = envs[TASK_A], envs[TASK_B]
        a.reset(seed=seed)
        b.reset(seed=seed)
        cube_a, goal_a = a.cube.pose.p[0].numpy(), a.goal_site.pose.p[0].numpy()
        cube_b, goal_b = b.cube.pose.p[0].numpy(), b.goal_site.pose.p[0].numpy()
        # A: the cube anywhere in the region, the goal on the target ring
        assert x0 <= cube_a[0] <= x1 and y0 <= cube_a[1] <= y1
        np.testing.assert_allclose(goal_a[:2], [tx, ty], atol=1e-6)
        # B: the cube on the target (within the jitter), the goal anywhere in the region
        assert np.all(np.abs(cube_b[:2] - [tx, ty]) <= DEFAULTS["target_noise"] + 1e-6)
        assert x0 <= goal_b[0] <= x1 and y0 <= goal_b[1] <= y1
        np.testing.assert_allclose(a.target_ring.pose.p[0, :2].numpy(), [tx, ty], atol=1e-6)
        for env in (a, b):
            assert not bool(env.evaluate()["success"][0])  # the cube is not on its goal at the start
            assert env.cube.pose.p[0, 2].item() == pytest.approx(0.02, abs=1e-4)


def test_task_keywords_move_the_target_and_bad_ones_name_the_problem():
    env = make(TASK_A, target_xy=[0.05, 0.1], distance_threshold=0.02)
    try:
        env.reset(seed=1)
        np.testing.assert_allclose(env.goal_site.pose.p[0, :2].numpy(), [0.05, 0.1], atol=1e-6)
        assert env.distance_threshold == 0.02
    finally:
        env.close()
    with pytest.raises(OffrlError, match="region must have xmin < xmax"):
        make(TASK_B, region=[0.1, -0.1, 0.0, 0.1])
    with pytest.raises(OffrlError, match="finite"):
        make(TASK_B, distance_threshold=float("nan"))
    with pytest.raises(OffrlError, match="env.kwargs .*'target_xyz'"):
        make(TASK_B, target_xyz=[0.0, 0.1])


def test_success_is_the_state_rule(envs):
    """evaluate() agrees with task_success on hand-placed states: placed + resting + the arm home."""
    import torch
    from mani_skill.utils.structs.pose import Pose

    env = envs[TASK_A]
    env.reset(seed=3)
    tx, ty = DEFAULTS["target_xy"]
    home = env.home_xyz
    tcp = env.agent.tcp_pose.p[0].numpy()
    assert np.linalg.norm(tcp - home) <= env.home_distance  # a reset puts the arm at rest, home
    cases = [((tx + 0.01, ty, 0.02), True), ((tx + 0.03, ty, 0.02), False), ((tx, ty, 0.05), False)]
    for (x, y, z), want in cases:
        env.cube.set_pose(Pose.create_from_pq(torch.tensor([[x, y, z]]), env.cube.pose.q))
        got = bool(env.evaluate()["success"][0])
        ref = task_success(np.array([x, y, z]), np.zeros(3), tcp, np.array([tx, ty]), env.distance_threshold,
                           home, env.home_distance)
        assert got == bool(ref) == want, (x, y, z)
    # the cube placed but the arm still at it, or moving cube: not a success
    assert not task_success(np.array([tx, ty, 0.02]), np.zeros(3), np.array([tx, ty, 0.05]), np.array([tx, ty]),
                            0.025, home, 0.06)
    assert not task_success(np.array([tx, ty, 0.02]), np.array([0.1, 0, 0]), np.asarray(home), np.array([tx, ty]),
                            0.025, home, 0.06)


@pytest.mark.parametrize("env_id", [TASK_B, TASK_A])
def test_expert_solves_both_tasks_through_the_batched_sim(env_id):
    """>= 95% on 20 seeds through the BatchedSim policy interface (measured 100/100 on B, 60/60 on A)."""
    assert expert_for_env(env_id) == "pickplace"
    sim = ManiSkillCPUSim(env_id, num_envs=4, control_mode="pd_ee_delta_pos", max_episode_steps=100)
    try:
        policy = make_expert("auto", sim)
        wins, n = 0, 0
        for seed in (0, 10, 20, 30, 40):
            obs = sim.reset(seed=seed)
            done = np.zeros(4, bool)
            success = np.zeros(4, bool)
            for _ in range(100):
                act, _ = policy(obs, sim)
                obs, _, te, _, info = sim.step(act)
                new = info["done"] & ~done
                success[new] = info["success"][new]
                done |= info["done"]
                if done.all():
                    break
            wins += int(success.sum())
            n += 4
        assert wins / n >= 0.95, f"{wins}/{n}"
    finally:
        sim.close()


def test_state_round_trip_restores_the_task(envs):
    """get_state/set_state of the BatchedSim carry the goal marker (B's random goal) and the cube."""
    sim = ManiSkillCPUSim(TASK_B, num_envs=2, control_mode="pd_ee_delta_pos", max_episode_steps=100)
    try:
        obs0 = sim.reset(seed=5)
        snap = sim.get_state()
        for _ in range(5):
            sim.step(np.tile([[0.3, 0.0, -0.3, 1.0]], (2, 1)).astype(np.float32))
        sim.reset(seed=99)  # other goals
        back = sim.set_state(snap)
        np.testing.assert_allclose(back, obs0, atol=1e-5)
    finally:
        sim.close()
