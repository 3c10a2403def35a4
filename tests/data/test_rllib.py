"""RLlib peers (offrl.data.rllib): the export RLlib reads, real RLlib training, conversion to offrl actors."""

import json

import numpy as np
import pytest
import torch

from offrl.data import OfflineDataset
from offrl.data.rllib import (RLlibExport, RLlibPeerConfig, build_rllib_config, conversion_error, export_dataset,
                              read_export, rllib_actions, save_rllib_checkpoint, to_gaussian_actor, train_rllib)
from offrl.errors import OffrlError

from .conftest import make_episode, synthetic_meta

OBS, ACT = 5, 2


@pytest.fixture
def small_ds(tmp_path) -> OfflineDataset:
    """Six episodes in ManiSkill's file format (saved and loaded back): four end terminated (the last two of
    them with success), two are cut by the time limit (truncated, not terminated)."""
    eps = []
    for i, T in enumerate((7, 12, 9, 15, 11, 8)):
        e = make_episode(T, obs_dim=OBS, act_dim=ACT, seed=i)
        if i >= 4:
            e.terminated[:] = False
            e.truncated[-1] = True
        e.success[:] = False
        if i in (2, 3):
            e.success[-1] = True
        eps.append(e)
    return OfflineDataset.load(OfflineDataset(eps, synthetic_meta(OBS)).save(tmp_path / "small.h5"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_export_round_trip(small_ds, tmp_path):
    exp = export_dataset(small_ds, tmp_path / "exp", reward="rewards", success_bonus=2.5, repeats=3, batch_size=16,
                         seed=1)
    n = small_ds.num_steps  # 62 transitions x 3 repeats = 186 rows, trimmed to 11 batches of 16 = 176
    assert exp.rows == 3 * n // 16 * 16 == 176
    back = read_export(exp.path)
    assert len(back) == len(small_ds)
    for e, d in zip(back, small_ds.episodes):
        assert len(e["actions"]) == d.length and len(e["obs"]) == d.length + 1
        np.testing.assert_allclose(e["actions"], d.actions, atol=1e-6)
        np.testing.assert_array_equal(e["obs"], d.obs)
        np.testing.assert_array_equal(e["terminated"], d.terminated)
        np.testing.assert_array_equal(e["truncated"], d.truncated)
        bonus = 2.5 * (d.terminated & d.success)  # offrl's terminal success bonus, on successful episodes only
        np.testing.assert_allclose(e["rewards"], d.rewards["rewards"] + bonus, rtol=1e-6)
    # RLlib's default column names, rows shuffled (not in episode order)
    import pyarrow.parquet as pq

    tab = pq.read_table(exp.data_dir)
    assert tab.column_names == ["eps_id", "t", "obs", "actions", "rewards", "new_obs", "terminateds", "truncateds"]
    assert tab.column("t").to_pylist()[:n] != sorted(tab.column("t").to_pylist()[:n])
    meta = json.loads((exp.path / "offrl_rllib.json").read_text())
    assert meta["transitions"] == n and meta["reward"] == "rewards" and meta["success_bonus"] == 2.5
    assert RLlibExport.load(exp.path).meta == meta


def test_export_scales_actions_to_unit_box(small_ds, tmp_path):
    low, high = [-2.0, 0.0], [2.0, 4.0]
    shifted = OfflineDataset([make_episode(6, obs_dim=OBS, act_dim=ACT, seed=9)], synthetic_meta(OBS))
    shifted.episodes[0].actions[:] = np.array([[-2.0, 0.0], [2.0, 4.0], [0.0, 2.0], [1, 1], [-1, 3], [0.5, 0.5]])
    exp = export_dataset(shifted, tmp_path / "exp", reward=None, action_low=low, action_high=high)
    import pyarrow.parquet as pq

    a = np.stack(pq.read_table(exp.data_dir).column("actions").to_numpy(zero_copy_only=False))
    assert a.min() >= -1.0 and a.max() <= 1.0 and exp.reward is None
    np.testing.assert_allclose(read_export(exp.path)[0]["actions"], shifted.episodes[0].actions, atol=1e-6)
    with pytest.raises(OffrlError) as e:
        export_dataset(shifted, tmp_path / "exp2", reward=None)  # default [-1, 1] bounds do not hold these
    assert "outside the action bounds" in _one_line(e)


def test_bad_inputs_are_one_line(small_ds, tmp_path):
    with pytest.raises(OffrlError) as e:
        RLlibPeerConfig(steps=0).check()
    assert "steps must be >= 1" in _one_line(e)
    with pytest.raises(OffrlError) as e:
        RLlibPeerConfig(steps=11).check()  # no divisor in 2..10
    assert "e.g. 12" in _one_line(e)
    with pytest.raises(OffrlError) as e:
        RLlibPeerConfig(algo="cql", bc_iters=100).check()
    assert "bc_iters" in _one_line(e)
    no_reward = export_dataset(small_ds, tmp_path / "bc_only", reward=None)
    with pytest.raises(OffrlError) as e:  # refused before Ray starts
        train_rllib(no_reward, RLlibPeerConfig(algo="cql", steps=10))
    assert "needs rewards" in _one_line(e)
    with pytest.raises(OffrlError) as e:
        export_dataset(small_ds, tmp_path / "dense", reward="dense")
    assert "no 'dense' rewards" in _one_line(e)
    with pytest.raises(OffrlError) as e:
        export_dataset(small_ds, tmp_path / "bc_only", reward=None)
    assert "exists already" in _one_line(e)
    with pytest.raises(OffrlError) as e:
        RLlibExport.load(tmp_path)
    assert "not an RLlib export" in _one_line(e)


def test_cql_module_converts_both_ways(small_ds, tmp_path):
    """An (untrained) RLlib CQL module: tanh-squashed mean and RLlib's own explore=False action both convert."""
    exp = export_dataset(small_ds, tmp_path / "exp", reward="rewards", action_low=[-1, -1], action_high=[1, 1])
    torch.manual_seed(0)
    rl_cfg = build_rllib_config(exp, RLlibPeerConfig(algo="cql", steps=10, hidden=(32, 16)))
    module = rl_cfg.get_rl_module_spec().build()
    with torch.no_grad():  # a larger last layer, so that tanh(mean) and clip(mean) differ visibly
        module.pi.net.mlp[0].weight.mul_(20.0)
    obs = np.random.default_rng(0).normal(0, 2, (200, OBS)).astype(np.float32)
    tanh_actor, arch = to_gaussian_actor(module, exp.action_low, exp.action_high)
    clip_actor, _ = to_gaussian_actor(module, exp.action_low, exp.action_high, squash="clip")
    assert arch["squash"] == "tanh" and arch["hidden"] == [32, 16] and arch["activation"] == "relu"
    assert conversion_error(module, tanh_actor, obs) < 1e-6
    assert conversion_error(module, clip_actor, obs, squash="clip") < 1e-6
    squashed = rllib_actions(module, obs, [-1, -1], [1, 1])
    clipped = rllib_actions(module, obs, [-1, -1], [1, 1], "clip")
    assert np.abs(squashed - clipped).max() > 0.05  # the two deterministic actions are not the same policy
    # RLlib's explore=False action skips the tanh: the pi head's mean output clipped into the bounds
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        mean = module.forward_inference({Columns.OBS: torch.as_tensor(obs)})[Columns.ACTION_DIST_INPUTS][:, :ACT]
    np.testing.assert_allclose(clipped, np.clip(mean.numpy(), -1, 1), atol=1e-6)
    np.testing.assert_allclose(squashed, np.tanh(mean.numpy()), atol=1e-6)


def test_bc_trains_and_converts(small_ds, tmp_path, ray_cluster):
    from offrl.algos.networks import build_actor
    from offrl.platform.checkpoint import checkpoint_json, load_checkpoint
    from offrl.platform.pretrain import actor_spec
    from offrl.platform.rollout import build_policy

    exp = export_dataset(small_ds, tmp_path / "exp", reward=None, repeats=4, batch_size=32)
    cfg = RLlibPeerConfig(algo="bc", steps=20, batch_size=32, hidden=(32, 32))
    logs = []
    module, info = train_rllib(exp, cfg, log=logs.append)
    assert info["gradient_steps"] == 20 and info["iters_per_update"] == 10 and logs
    assert np.isfinite(info["last_losses"]["policy_loss"])
    obs = np.concatenate([e.obs for e in small_ds.episodes]).astype(np.float32)
    actor, arch = to_gaussian_actor(module, exp.action_low, exp.action_high)
    assert arch["squash"] == "clip"
    assert conversion_error(module, actor, obs) < 1e-6
    # an offrl checkpoint that offrl eval reads: the same actions through build_actor/load_checkpoint/build_policy
    ckpt = save_rllib_checkpoint(module, exp, tmp_path / "run" / "checkpoints", 20, config={}, extra=info,
                                 check_obs=obs)
    state = checkpoint_json(ckpt, "training_state/state.json")
    assert state["algo"] == "rllib_bc" and state["actor_arch"] == arch and state["gradient_steps"] == 20
    loaded = build_actor(state["actor_arch"])
    load_checkpoint(ckpt, {"actor": loaded}, parts=["actor"], restore_rng=False)
    policy = build_policy(actor_spec(loaded, state["actor_arch"], deterministic=True), sim=None)
    acts, _ = policy(obs, None)
    np.testing.assert_allclose(acts, rllib_actions(module, obs, exp.action_low, exp.action_high), atol=1e-6)


def test_a_free_log_std_bc_module_converts(small_ds, tmp_path):
    """free_log_std (a state-independent log std, a parameter of RLlib's pi head): the converted actor's mean
    acts exactly like RLlib, and its log std is that parameter; CQL refuses the option."""
    exp = export_dataset(small_ds, tmp_path / "exp", reward=None)
    torch.manual_seed(0)
    module = build_rllib_config(exp, RLlibPeerConfig(algo="bc", steps=10, hidden=(32, 16),
                                                     free_log_std=True)).get_rl_module_spec().build()
    head = module._pi_head  # noqa: SLF001
    with torch.no_grad():
        head.log_std.copy_(torch.tensor([-1.5, -0.5]))
    obs = np.random.default_rng(0).normal(0, 2, (200, OBS)).astype(np.float32)
    actor, arch = to_gaussian_actor(module, exp.action_low, exp.action_high)
    assert arch["squash"] == "clip" and conversion_error(module, actor, obs) < 1e-6
    assert torch.allclose(actor.log_std, torch.tensor([-1.5, -0.5]))
    with pytest.raises(OffrlError, match="free_log_std is for bc"):
        RLlibPeerConfig(algo="cql", steps=10, free_log_std=True).check()


@pytest.mark.slow  # ~10 s on a quiet machine: RLlib's CQL offline path (lr=None, placeholder env, 10 updates/iter)
def test_cql_trains_on_rewards_and_converts(small_ds, tmp_path, ray_cluster):
    exp = export_dataset(small_ds, tmp_path / "exp", reward="rewards", success_bonus=1.0, repeats=4, batch_size=32)
    cfg = RLlibPeerConfig(algo="cql", steps=10, batch_size=32, hidden=(32, 32), num_actions=2)
    module, info = train_rllib(exp, cfg, log=lambda *a: None)
    assert info["gradient_steps"] == 10 and info["target_tau"] == pytest.approx(1 - 0.995 ** 10)
    assert {"qf_loss", "cql_loss", "policy_loss"} <= set(info["last_losses"])
    obs = np.concatenate([e.obs for e in small_ds.episodes]).astype(np.float32)
    ckpt = save_rllib_checkpoint(module, exp, tmp_path / "ckpts", 10, config={}, extra=info, check_obs=obs)
    from offrl.platform.checkpoint import checkpoint_json

    state = checkpoint_json(ckpt, "training_state/state.json")
    assert state["algo"] == "rllib_cql" and state["actor_arch"]["squash"] == "tanh"
    assert state["conversion_max_abs_error"] < 1e-6
