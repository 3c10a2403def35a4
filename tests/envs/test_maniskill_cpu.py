import numpy as np
import pytest

from offrl.envs import BatchedSim, ManiSkillCPUSim, ManiSkillGPUSim
from offrl.errors import OffrlError


@pytest.fixture(scope="module")
def sim():
    s = ManiSkillCPUSim("PickCube-v1", num_envs=2, control_mode="pd_ee_delta_pos", max_episode_steps=12)
    yield s
    s.close()


def test_protocol_and_shapes(sim):
    assert isinstance(sim, BatchedSim)
    obs = sim.reset(seed=0)
    assert obs.shape == (2, sim.obs_dim) and obs.dtype == np.float32
    assert sim.act_dim == 4
    o, r, te, tr, info = sim.step(np.zeros((2, 4), np.float32))
    assert o.shape == (2, sim.obs_dim) and r.shape == (2,) and te.dtype == bool and tr.dtype == bool
    assert set(info) >= {"success", "final_obs", "done", "elapsed_steps"}
    with pytest.raises(ValueError, match="shape"):
        sim.step(np.zeros((3, 4), np.float32))


def test_reset_is_seeded(sim):
    a = sim.reset(seed=5)
    b = sim.reset(seed=5)
    c = sim.reset(seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # env i is seeded with seed + i


def test_time_limit_truncates_and_autoresets(sim):
    sim.reset(seed=1)
    for t in range(1, 13):
        obs, r, te, tr, info = sim.step(np.zeros((2, 4), np.float32))
        if t < 12:
            assert not tr.any()
    assert tr.all() and info["done"].all()
    np.testing.assert_array_equal(info["elapsed_steps"], [12, 12])
    np.testing.assert_array_equal(sim.elapsed_steps, [0, 0])  # auto-reset
    assert not np.array_equal(obs, info["final_obs"])


def test_restore_and_step_same_actions_is_identical(sim):
    """Restoring a snapshot and stepping the same actions twice gives bit-identical observations."""
    rng = np.random.default_rng(0)
    sim.reset(seed=3)
    for _ in range(4):
        sim.step(rng.uniform(-1, 1, (2, 4)).astype(np.float32))
    state = sim.get_state()
    assert list(state["elapsed_steps"]) == [4, 4]
    actions = rng.uniform(-1, 1, (6, 2, 4)).astype(np.float32)

    def replay():
        first = sim.set_state(state)
        out = [np.concatenate([first, np.zeros((2, 1), np.float32)], 1)]
        for a in actions:
            o, r, *_ = sim.step(a)
            out.append(np.concatenate([o, r[:, None]], 1))
        return np.stack(out)

    x, y = replay(), replay()
    np.testing.assert_array_equal(x, y)
    assert list(sim.elapsed_steps) == [10, 10]  # the restored counter, not ManiSkill's


def test_restore_single_env_leaves_others(sim):
    sim.reset(seed=4)
    snap = sim.get_state(env_ids=[1])
    for _ in range(3):
        sim.step(np.full((2, 4), 0.5, np.float32))
    before0 = sim._obs[0].copy()
    obs = sim.set_state(snap, env_ids=[1])
    np.testing.assert_array_equal(obs[0], snap["obs"][0])
    np.testing.assert_array_equal(sim._obs[0], before0)
    assert list(sim.elapsed_steps) == [3, 0]


def test_step_active_steps_only_the_active_envs_and_resets_none(sim):
    """The re-rollouts' step: inactive envs keep state, counter and observation; a finishing env stays at
    its final state (no auto-reset, no episode seed drawn); active envs step as ``step`` steps them."""
    rng = np.random.default_rng(1)
    sim.reset(seed=7)
    state = sim.get_state()
    a = rng.uniform(-1, 1, (3, 2, 4)).astype(np.float32)
    sim.set_state(state)
    ref = [sim.step(x)[0][0] for x in a]  # env 0 under the plain step, from the same restored state
    sim.set_state(state)
    seeds_before = sim._tl.rng.bit_generator.state
    for t, x in enumerate(a):
        obs, r, te, tr, info = sim.step_active(x, np.array([True, False]))
        np.testing.assert_array_equal(obs[0], ref[t])
        np.testing.assert_array_equal(obs[1], state["obs"][1])
        assert r[1] == 0 and not (te[1] or tr[1] or info["done"][1] or info["success"][1])
    np.testing.assert_array_equal(sim.elapsed_steps, [3, 0])
    np.testing.assert_array_equal(sim.get_state([1])["sim"]["actors"]["cube"], state["sim"]["actors"]["cube"][1:])
    # env 1 at its last step: its episode ends and it is left there, not reset
    last = {**state, "elapsed_steps": np.array([0, 11])}
    sim.set_state(last)
    obs, r, te, tr, info = sim.step_active(np.zeros((2, 4), np.float32), np.array([True, True]))
    assert info["done"].tolist() == [False, True] and (tr[1] or te[1])  # its time limit (or a success)
    np.testing.assert_array_equal(sim.elapsed_steps, [1, 12])
    np.testing.assert_array_equal(obs[1], info["final_obs"][1])
    assert sim._tl.rng.bit_generator.state == seeds_before  # no episode seed was drawn
    with pytest.raises(ValueError, match="active"):
        sim.step_active(np.zeros((2, 4), np.float32), np.array([True]))


def test_unknown_env_id_is_one_clear_error():
    with pytest.raises(OffrlError, match="unknown env id 'PickCub-v1'"):
        ManiSkillCPUSim("PickCub-v1")


def test_bad_control_mode_is_one_clear_error():
    with pytest.raises(OffrlError, match="cannot build PickCube-v1"):
        ManiSkillCPUSim("PickCube-v1", control_mode="no_such_mode")


@pytest.mark.gpu
def test_gpu_backend_512_envs_restore_determinism():
    """physx_cuda with 512 envs: shapes, partial auto-reset and restore determinism (needs CUDA)."""
    sim = ManiSkillGPUSim("PickCube-v1", num_envs=512, max_episode_steps=10)
    try:
        obs = sim.reset(seed=0)
        assert obs.shape == (512, sim.obs_dim)
        rng = np.random.default_rng(0)
        for _ in range(3):
            sim.step(rng.uniform(-1, 1, (512, 4)).astype(np.float32))
        state = sim.get_state()
        acts = rng.uniform(-1, 1, (4, 512, 4)).astype(np.float32)

        def replay():
            sim.set_state(state)
            return np.stack([sim.step(a)[0] for a in acts])

        np.testing.assert_allclose(replay(), replay(), atol=1e-5)
        for _ in range(10):
            _, _, _, tr, info = sim.step(np.zeros((512, 4), np.float32))
        assert info["done"].any()
    finally:
        sim.close()
