"""SimHost actors on a real local Ray cluster."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from offrl.config import load_config
from offrl.errors import OffrlError
from offrl.platform.simhost import SimHostImpl, SimHostPool, concat_rollouts

from multinode_scenarios import cpu_seconds  # noqa: E402  (this folder is on sys.path under pytest)


def _cfg(*extra):
    return load_config(None, ["env.num_envs=2", "cluster.num_hosts=2", *extra])


def test_pool_sizes_itself_to_the_cluster(ray_cluster):
    cfg = load_config(None, ["env.num_envs=1", "cluster.num_hosts=0"])
    pool = SimHostPool(cfg.env, cfg.cluster)
    try:
        assert len(pool) == int(ray_cluster.cluster_resources()["CPU"])  # one host per CPU
        assert len(set(pool.pids())) == len(pool)
    finally:
        pool.shutdown()


def test_rollout_inside_actors_returns_numpy(ray_cluster):
    cfg = _cfg("env.max_episode_steps=10")
    pool = SimHostPool(cfg.env, cfg.cluster, seed=0)
    try:
        res = pool.rollout({"kind": "random"}, 25, reset_seed=0)
        assert len(res) == 2
        r = concat_rollouts(res)
        assert r["obs"].shape == (25, 4, pool.spec["obs_dim"]) and isinstance(r["obs"], np.ndarray)
        assert r["actions"].shape == (25, 4, 4)
        # 25 steps with a 10-step limit: every env finished 2 episodes, all truncated
        assert len(r["episodes"]) == 8 and all(e["length"] == 10 for e in r["episodes"])
        assert r["truncated"].sum() == 8 and not r["terminated"].any()
        # next_obs of a truncated step is the final observation, obs of the next step the reset one
        t = 9
        assert not np.array_equal(r["next_obs"][t], r["obs"][t + 1])
        np.testing.assert_array_equal(r["next_obs"][t - 1], r["obs"][t])
        # same seed, same policy seed -> same data; in-process host gives the same numbers
        again = concat_rollouts(pool.rollout({"kind": "random"}, 25, reset_seed=0))
        assert not np.array_equal(again["actions"], r["actions"])  # new policy seed per call...
        local = SimHostImpl({"num_envs": 2, "max_episode_steps": 10}, seed=0, host_index=0)
        lr = local.rollout({"kind": "random"}, 5, reset_seed=0, policy_seed=1)
        pr = pool.hosts[0].rollout.remote({"kind": "random"}, 5, 0, False, 1)
        np.testing.assert_array_equal(lr["obs"], ray_cluster.get(pr)["obs"])  # ...but seeds reproduce
        local.close()
    finally:
        pool.shutdown()


def test_snapshot_restore_through_actor(ray_cluster):
    cfg = _cfg()
    pool = SimHostPool(cfg.env, cfg.cluster, seed=1)
    try:
        h = pool.hosts[0]
        snap = ray_cluster.get(h.snapshot.remote())
        spec = {"kind": "random"}
        orig = ray_cluster.get(h.rollout.remote(spec, 5, None, False, 3))
        ray_cluster.get(h.restore.remote(snap))
        a = ray_cluster.get(h.rollout.remote(spec, 5, None, False, 3))
        ray_cluster.get(h.restore.remote(snap))
        b = ray_cluster.get(h.rollout.remote(spec, 5, None, False, 3))
        # bit-identical between restores; close to the original continuation (contact caches are not saved)
        np.testing.assert_array_equal(a["obs"], b["obs"])
        np.testing.assert_array_equal(a["rewards"], b["rewards"])
        np.testing.assert_allclose(a["obs"], orig["obs"], atol=1e-3)
    finally:
        pool.shutdown()


def test_killed_simhost_is_restarted_and_rollout_redone(ray_cluster):
    """SIGKILL a real SimHost process mid-rollout: the caller still gets a complete result."""
    cfg = _cfg("cluster.max_restarts=2")
    pool = SimHostPool(cfg.env, cfg.cluster, seed=0)
    try:
        victim_pid = pool.pids()[0]
        steps = 1500  # about 5 s of work per host on a 2-core machine (300 steps took 1.2 s)
        result = {}

        def run():
            result["r"] = pool.rollout({"kind": "random"}, steps)

        cpu0 = cpu_seconds(victim_pid)
        th = threading.Thread(target=run)
        th.start()
        # kill as soon as the victim is busy with the rollout, not after a guessed delay
        deadline = time.monotonic() + 60
        while cpu_seconds(victim_pid) - cpu0 < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert th.is_alive()
        os.kill(victim_pid, signal.SIGKILL)
        th.join(timeout=240)
        assert not th.is_alive()
        res = result["r"]
        assert len(res) == 2 and all(r["obs"].shape == (steps, 2, pool.spec["obs_dim"]) for r in res)
        assert np.isfinite(res[0]["obs"]).all()
        new_pids = pool.pids()
        assert new_pids[0] != victim_pid  # a new process serves host 0
    finally:
        pool.shutdown()


def test_dead_host_without_restarts_is_a_clear_error(ray_cluster):
    cfg = _cfg("cluster.max_restarts=0", "cluster.num_hosts=1")
    pool = SimHostPool(cfg.env, cfg.cluster)
    try:
        os.kill(pool.pids()[0], signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(OffrlError, match="SimHost died"):
            pool.rollout({"kind": "random"}, 5)
    finally:
        pool.shutdown()


def test_unknown_env_id_in_actor_is_offrl_error(ray_cluster):
    cfg = _cfg("env.id=NoSuchTask-v0", "cluster.num_hosts=1", "cluster.max_restarts=0")
    with pytest.raises(OffrlError, match="unknown env id 'NoSuchTask-v0'"):
        SimHostPool(cfg.env, cfg.cluster)


def test_bad_control_mode_in_actor_is_offrl_error(ray_cluster):
    cfg = _cfg("env.control_mode=no_such_mode", "cluster.num_hosts=1", "cluster.max_restarts=0")
    with pytest.raises(OffrlError, match="cannot build PickCube-v1") as e:
        SimHostPool(cfg.env, cfg.cluster)
    assert "\n" not in str(e.value)
