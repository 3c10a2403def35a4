"""Time reversal of pick-and-place demonstrations (offrl data reverse): the math on hand-made arrays, and the
whole path on real PickPlaceB-v1 expert episodes (reversed, relabelled, replayed open-loop in PickPlaceA-v1)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offrl.data import OfflineDataset
from offrl.data.reverse import (SETTLE_STEPS, fit_arm_dynamics, fit_tracking_gain, gripper_commands, rebuild_ee_actions,
                                reverse_dataset, reverse_states)
from offrl.envs.tasks import DEFAULTS, TASK_A, TASK_B
from offrl.errors import OffrlError
from tests.conftest import run_cli


# ------------------------------------------------------------------------------------------ math

def test_reverse_states_flips_time_and_negates_every_velocity():
    T1 = 4
    actor = np.arange(T1 * 13, dtype=np.float32).reshape(T1, 13)
    dof = 2
    art = np.arange(T1 * (13 + 2 * dof), dtype=np.float32).reshape(T1, 13 + 2 * dof) + 1000
    out = reverse_states({"actors": {"cube": actor}, "articulations": {"arm": art}})
    a, r = out["actors"]["cube"], out["articulations"]["arm"]
    for t in range(T1):
        src = actor[T1 - 1 - t]
        np.testing.assert_array_equal(a[t, :7], src[:7])           # pose kept
        np.testing.assert_array_equal(a[t, 7:], -src[7:])          # linear and angular velocity negated
        s2 = art[T1 - 1 - t]
        np.testing.assert_array_equal(r[t, :7], s2[:7])            # root pose kept
        np.testing.assert_array_equal(r[t, 7:13], -s2[7:13])       # root velocities negated
        np.testing.assert_array_equal(r[t, 13:13 + dof], s2[13:13 + dof])  # qpos kept
        np.testing.assert_array_equal(r[t, 13 + dof:], -s2[13 + dof:])     # qvel negated
    assert actor[0, 8] == 8  # the input is untouched
    with pytest.raises(OffrlError, match="13 \\+ 2 \\* dof"):
        reverse_states({"articulations": {"arm": np.zeros((3, 14))}})
    with pytest.raises(OffrlError, match="expected 13"):
        reverse_states({"actors": {"cube": np.zeros((3, 12))}})


def test_rebuilt_actions_on_a_hand_made_path():
    # a path of known steps: 0.02 m in x, then 0.05 m in -z (clipped at the 0.1 m limit x gain 0.4 = 0.04 m)
    tcp = np.array([[0, 0, 0.2], [0.02, 0, 0.2], [0.02, 0, 0.15], [0.02, 0.01, 0.15]])
    finger = np.array([0.04, 0.04, 0.019, 0.0185])
    a = rebuild_ee_actions(tcp, finger, scale=0.1, gain=1.0)
    np.testing.assert_allclose(a[:, :3], [[0.2, 0, 0], [0, 0, -0.5], [0, 0.1, 0]], atol=1e-6)
    a = rebuild_ee_actions(tcp, finger, scale=0.1, gain=0.4)
    np.testing.assert_allclose(a[:, :3], [[0.5, 0, 0], [0, 0, -1.0], [0, 0.25, 0]], atol=1e-6)  # -1.25 clipped
    np.testing.assert_array_equal(a[:, 3], [1, -1, -1])  # closes on the step the fingers close on the cube


def test_gripper_switches_at_the_mirrored_time():
    # a forward release: held (0.0185), then opening slowly; played backwards it is a slow closing that should
    # close only when the fingers reach the cube, and a forward one-step grasp becomes a one-step opening
    forward = np.array([0.04, 0.04, 0.0205, 0.0185, 0.0185, 0.0185, 0.027, 0.032, 0.0371, 0.0394])
    rev = forward[::-1]
    cmd = gripper_commands(rev)
    # reversed openings: .0394 .0371 .032 .027 .0185 .0185 .0185 .0205 .04 .04 (85% level: 0.036775)
    np.testing.assert_array_equal(cmd, [1, -1, -1, -1, -1, -1, -1, 1, 1])
    np.testing.assert_array_equal(gripper_commands(rev, level=0.5), [1, 1, -1, -1, -1, -1, -1, 1, 1])
    assert gripper_commands(np.full(5, 0.04)).tolist() == [1, 1, 1, 1]


def test_dynamics_inversion_recovers_the_commands_of_a_known_arm():
    """Simulate d_t = c_t A + [qvel_t, 1] V with known matrices; fit_arm_dynamics finds them and
    rebuild_ee_actions inverts the path (with its velocities) back to the commands."""
    rng = np.random.default_rng(0)
    A = np.diag([0.3, 0.2, 0.25]) + 0.01 * rng.normal(size=(3, 3))
    V = 0.01 * rng.normal(size=(8, 3))  # 7 joint velocities and a bias
    paths, vels, acts = [], [], []
    for _ in range(20):
        T = 40
        a = np.clip(rng.normal(0, 0.5, size=(T, 4)), -1, 1)
        q = rng.normal(0, 0.3, size=(T + 1, 7))
        d = a[:, :3] * 0.1 @ A + np.concatenate([q[:T], np.ones((T, 1))], axis=1) @ V
        paths.append(np.concatenate([np.zeros((1, 3)), np.cumsum(d, axis=0)]))
        vels.append(q)
        acts.append(a)
    W, rms = fit_arm_dynamics(paths, vels, acts)
    np.testing.assert_allclose(W, np.concatenate([A, V]), atol=1e-8)
    assert np.all(rms < 1e-9)
    got = rebuild_ee_actions(paths[0], np.full(41, 0.04), dynamics=W, qvel=vels[0])
    np.testing.assert_allclose(got[:, :3], acts[0][:, :3], atol=1e-6)
    k = fit_tracking_gain(paths, acts)
    assert k.shape == (3,) and np.all(k > 0)
    with pytest.raises(OffrlError, match="too few steps"):
        fit_arm_dynamics([paths[0][:5]], [vels[0][:5]], [acts[0][:4]])
    with pytest.raises(OffrlError, match="needs qvel"):
        rebuild_ee_actions(paths[0], np.full(41, 0.04), dynamics=W, qvel=vels[0][:, :3])


# -------------------------------------------------------------------------------- real episodes

@pytest.fixture(scope="module")
def b_dataset(tmp_path_factory):
    """8 PickPlaceB-v1 expert episodes, recorded as offrl collect records them (without Ray)."""
    from offrl.data.collect import obs_layout, run_episode
    from offrl.envs.experts import PickPlaceExpert
    from offrl.envs.maniskill import make_maniskill_env

    env = make_maniskill_env(TASK_B, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos",
                             obs_mode="state", reward_mode="normalized_dense")
    try:
        ex = PickPlaceExpert(1)
        eps = [run_episode(env, ex, seed, 100) for seed in range(8)]
        layout = obs_layout(env)
    finally:
        env.close()
    for i, e in enumerate(eps):
        e.info.update(episode_id=i, success=bool(e.success[-1]), elapsed_steps=e.length)
    meta = {"env_info": {"env_id": TASK_B, "env_kwargs": {"obs_mode": "state", "control_mode": "pd_ee_delta_pos",
                                                          "reward_mode": "normalized_dense"},
                         "max_episode_steps": 100},
            "source_type": "offrl-scripted-expert", "source_desc": "test",
            "offrl": {"obs_layout": layout, "reward_mode": "normalized_dense"}}
    path = tmp_path_factory.mktemp("rev") / "b.h5"
    OfflineDataset(eps, meta).save(path)
    return path


def test_reversed_b_episodes_are_a_demonstrations_that_replay(b_dataset):
    ds = OfflineDataset.load(b_dataset)
    assert all(e.succeeded for e in ds.episodes)
    rev, report = reverse_dataset(ds)
    assert rev.env_id == TASK_A and report.kept == len(ds)
    assert report.reversed_success == len(ds)
    # measured 10/10 on PickPlaceB expert data; a loose bound keeps the test about the mechanism
    assert report.replay_success >= len(ds) - 1, report.lines()
    goal = rev.field_slice("extra/goal_pos")
    qvel = rev.field_slice("agent/qvel")
    cube = rev.field_slice("extra/obj_pose")
    tx, ty = DEFAULTS["target_xy"]
    for fwd, e in zip(ds.episodes, rev.episodes):
        # starts where B ended, with velocities negated; the goal is A's target everywhere
        np.testing.assert_allclose(e.obs[0, cube][:3], fwd.obs[-1, cube][:3], atol=1e-5)
        np.testing.assert_allclose(e.obs[0, qvel], -fwd.obs[-1, qvel], atol=1e-4)
        np.testing.assert_allclose(e.obs[:, goal][:, :2], np.tile([tx, ty], (e.length + 1, 1)), atol=1e-6)
        # runs back to the state B started from (the arm at rest), terminated there with A's success; the
        # success region is entered a few steps before the end, never at the start
        assert e.length == fwd.length + SETTLE_STEPS  # then holds still
        np.testing.assert_array_equal(e.actions[-SETTLE_STEPS:, :3], 0.0)
        assert e.success[-1] and e.terminated[-1] and not e.terminated[:-1].any() and not e.success[0]
        np.testing.assert_allclose(e.obs[-1, cube][:3], fwd.obs[0, cube][:3], atol=1e-5)
        assert np.all(np.abs(e.actions) <= 1.0)
        assert set(e.rewards) >= {"rewards", "rewards_sparse", "rewards_dense", "rewards_normalized_dense"}
        assert e.rewards["rewards_sparse"][-1] == 1.0
        assert e.info["reversed_from"] >= 0
    assert "time-reversed" in rev.meta["source_desc"]
    assert rev.meta["offrl"]["reverse"]["replay_success"] == report.replay_success


def test_cli_reverse_writes_a_valid_dataset_and_refuses_bad_inputs(b_dataset, tmp_path):
    out = tmp_path / "a.h5"
    r = run_cli("data", "reverse", str(b_dataset), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "open-loop replay" in r.stdout and out.exists()
    assert OfflineDataset.load(out).env_id == TASK_A

    def refused(src, pattern, *extra):
        dst = tmp_path / "bad.h5"
        r = run_cli("data", "reverse", str(src), "-o", str(dst), *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and pattern in r.stderr, r.stderr
        assert not dst.exists() and not dst.with_suffix(".json").exists()

    # an unsupported control mode
    ds = OfflineDataset.load(b_dataset)
    ds.meta = json.loads(json.dumps(ds.meta))
    ds.meta["env_info"]["env_kwargs"]["control_mode"] = "pd_joint_delta_pos"
    for e in ds.episodes:
        e.info["control_mode"] = "pd_joint_delta_pos"
    joint = ds.save(tmp_path / "joint.h5")
    refused(joint, "control mode 'pd_joint_delta_pos' cannot be reversed")
    # no env states
    ds = OfflineDataset.load(b_dataset)
    for e in ds.episodes:
        e.env_states = None
    refused(ds.save(tmp_path / "nostates.h5"), "has no env_states")
    # a task without a partner
    ds = OfflineDataset.load(b_dataset)
    ds.meta["env_info"] = dict(ds.meta["env_info"], env_id="PickCube-v1")
    refused(ds.save(tmp_path / "pickcube.h5"), "cannot reverse episodes of 'PickCube-v1'")
    # a bad gain, an existing output, a missing file
    refused(b_dataset, "gain must be", "--gain", "-1")
    refused(tmp_path / "missing.h5", "missing.h5")
