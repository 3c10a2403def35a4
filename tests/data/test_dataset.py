"""The dataset API: transitions, MC returns, reward selection, splits, statistics, merging."""

import numpy as np
import pytest
import torch

from offrl.data import OfflineDataset
from offrl.errors import OffrlError

from .conftest import make_episode, synthetic_meta


def test_transitions_line_up_with_episodes(expert_ds):
    t = expert_ds.transitions()
    N = expert_ds.num_steps
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "obs": (N, 42), "next_obs": (N, 42), "action": (N, 4), "reward": (N,), "terminated": (N,),
        "truncated": (N,), "last": (N,), "episode": (N,), "step": (N,), "success": (N,)}
    assert t["obs"].dtype == torch.float32 and t["terminated"].dtype == torch.bool and t["episode"].dtype == torch.int64
    same = t["episode"][1:] == t["episode"][:-1]
    torch.testing.assert_close(t["next_obs"][:-1][same], t["obs"][1:][same])  # next_obs[t] == obs[t+1] in an episode
    assert int(t["last"].sum()) == len(expert_ds) and bool(t["last"][-1])
    assert torch.equal(t["last"], torch.cat([~same, torch.tensor([True])]))
    e = expert_ds.episode(2)
    sel = t["episode"] == 2
    assert torch.equal(t["action"][sel], e["action"]) and torch.equal(t["obs"][sel], e["obs"][:-1])
    assert torch.equal(t["next_obs"][sel][-1], e["obs"][-1])
    assert torch.equal(t["step"][sel], torch.arange(int(sel.sum())))
    # expert data: every episode ends terminated by success, none truncated
    assert bool(t["terminated"][t["last"]].all()) and not bool(t["truncated"].any())


def test_mc_returns_by_hand():
    # rewards [1, 0, 2] and [3], gamma 0.5:
    #   G = [1 + 0.5 * (0 + 0.5 * 2), 0 + 0.5 * 2, 2] = [1.5, 1.0, 2.0];  second episode G = [3]
    ds = OfflineDataset([make_episode(3, rewards=[1, 0, 2]), make_episode(1, rewards=[3])], synthetic_meta())
    torch.testing.assert_close(ds.mc_returns(0.5), torch.tensor([1.5, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(ds.mc_returns(1.0), torch.tensor([3.0, 2.0, 2.0, 3.0]))  # reverse cumulative sum
    torch.testing.assert_close(ds.mc_returns(0.0), torch.tensor([1.0, 0.0, 2.0, 3.0]))  # the rewards themselves
    with pytest.raises(OffrlError, match="gamma"):
        ds.mc_returns(1.5)


@pytest.mark.parametrize("gamma", [0.8, 0.99])
def test_mc_returns_match_a_loop_on_real_data(expert_ds, gamma):
    g = expert_ds.mc_returns(gamma, reward="sparse").numpy()
    ref = []
    for r in expert_ds.episode_rewards("sparse"):
        acc, out = 0.0, []
        for x in r[::-1]:
            acc = x + gamma * acc
            out.append(acc)
        ref += out[::-1]
    np.testing.assert_allclose(g, ref, rtol=1e-6)
    # sparse reward 1 only at the final (successful) step: G_0 = gamma^(T-1)
    first = g[expert_ds.transitions()["step"].numpy() == 0]
    np.testing.assert_allclose(first, gamma ** (expert_ds.lengths - 1.0), rtol=1e-5)


def test_reward_selection(expert_ds):
    e = expert_ds.episodes[0]
    assert expert_ds.reward_keys == ["rewards", "rewards_dense", "rewards_normalized_dense", "rewards_sparse"]
    assert np.array_equal(expert_ds.episode_rewards("sparse")[0], e.rewards["rewards_sparse"])
    assert np.array_equal(expert_ds.episode_rewards("rewards")[0], e.rewards["rewards"])
    # 'rewards' were recorded in the env's reward mode (normalized_dense), the same numbers
    np.testing.assert_allclose(e.rewards["rewards"], e.rewards["rewards_normalized_dense"])
    np.testing.assert_allclose(e.rewards["rewards_dense"], 5 * e.rewards["rewards_normalized_dense"], rtol=1e-5)
    assert np.array_equal(expert_ds.episode_rewards("success")[0], e.success.astype(np.float32))
    with pytest.raises(OffrlError, match="no 'shaped' rewards; available: rewards, rewards_dense"):
        expert_ds.transitions(reward="shaped")
    only = OfflineDataset([make_episode(2)], synthetic_meta())  # reward_mode sparse, no rewards_sparse stored
    assert np.array_equal(only.episode_rewards("sparse")[0], only.episodes[0].rewards["rewards"])


def test_split_is_deterministic_disjoint_and_complete(expert_ds):
    train, val = expert_ds.split(0.25, seed=3)
    assert (len(train), len(val)) == (15, 5)
    ids = lambda d: [e.info["episode_seed"] for e in d.episodes]  # noqa: E731
    assert not set(ids(train)) & set(ids(val))
    assert sorted(ids(train) + ids(val)) == sorted(ids(expert_ds))
    t2, v2 = expert_ds.split(0.25, seed=3)
    assert ids(v2) == ids(val) and ids(t2) == ids(train)
    assert ids(expert_ds.split(0.25, seed=4)[1]) != ids(val)
    assert len(expert_ds.split(0.01, seed=0)[1]) == 1  # at least one validation episode
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(OffrlError, match="val_fraction"):
            expert_ds.split(bad)
    with pytest.raises(OffrlError, match="at least 2 episodes"):
        expert_ds.subset([0]).split(0.5)


def test_normalization_statistics(expert_ds):
    obs = np.concatenate([e.obs for e in expert_ds.episodes]).astype(np.float64)
    s = expert_ds.obs_stats()
    np.testing.assert_allclose(s.mean.numpy(), obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.std.numpy(), obs.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.min.numpy(), obs.min(0).astype(np.float32))
    a = expert_ds.action_stats()
    assert a.mean.shape == (4,) and float(a.min.min()) >= -1 and float(a.max.max()) <= 1
    z = s.normalize(torch.as_tensor(obs, dtype=torch.float32))
    assert torch.isfinite(z).all()  # constant columns (std 0) do not divide by zero
    moving = s.std > 1e-3
    torch.testing.assert_close(z.mean(0)[moving], torch.zeros(int(moving.sum())), atol=1e-3, rtol=0)
    assert set(s.to_numpy()) == {"mean", "std", "min", "max"}


def test_merge_concatenates_and_refuses_mismatches(tmp_path, expert_ds):
    a = expert_ds.subset(range(3))
    b = expert_ds.subset(range(3, 5))
    a.path, b.path = tmp_path / "a.h5", tmp_path / "b.h5"
    m = OfflineDataset.merge([a, b])
    assert len(m) == 5 and m.num_steps == a.num_steps + b.num_steps
    assert m.episodes[3].info["offrl_source"] == "b.h5#0"
    np.testing.assert_array_equal(m.episodes[4].obs, b.episodes[1].obs)

    def variant(**changes):
        d = OfflineDataset(b.episodes, {**b.meta, "offrl": dict(b.meta["offrl"])}, tmp_path / "b.h5")
        for key, value in changes.items():
            if key == "env_id":
                d.meta["env_info"] = {**d.meta["env_info"], "env_id": value}
            elif key == "control_mode":
                d.episodes = [type(e)(**{**e.__dict__, "info": {**e.info, "control_mode": value}}) for e in d.episodes]
            elif key == "obs_layout":
                d.meta["offrl"]["obs_layout"] = value
            elif key == "reward_mode":
                d.meta["offrl"]["reward_mode"] = value
        return d

    layout = [list(x) for x in a.obs_layout]
    layout[0], layout[1] = layout[1], layout[0]  # same sizes, different order
    for changes, words in [
        ({"env_id": "PickSingleYCB-v1"}, "env id PickSingleYCB-v1 != PickCube-v1"),
        ({"control_mode": "pd_joint_delta_pos"}, "control mode pd_joint_delta_pos != pd_ee_delta_pos"),
        ({"obs_layout": layout}, "observation layout differs (field agent/qvel:9 vs agent/qpos:9)"),
        ({"reward_mode": "sparse"}, "'rewards' were recorded in reward mode sparse != normalized_dense"),
    ]:
        with pytest.raises(OffrlError) as e:
            OfflineDataset.merge([a, variant(**changes)])
        assert str(e.value) == f"cannot merge {tmp_path / 'b.h5'} with {tmp_path / 'a.h5'}: {words}"
    other = OfflineDataset([make_episode(2, obs_dim=42)], synthetic_meta(42))
    with pytest.raises(OffrlError, match="action size 2 != 4"):
        OfflineDataset.merge([a, other])


def test_success_bonus_in_rewards_and_mc_returns():
    # the bonus goes on the final, successful step only: [1, 0, 2 + 4] and [3 + 4]
    ds = OfflineDataset([make_episode(3, rewards=[1, 0, 2]), make_episode(1, rewards=[3])], synthetic_meta())
    t = ds.transitions(success_bonus=4.0)
    torch.testing.assert_close(t["reward"], torch.tensor([1.0, 0.0, 6.0, 7.0]))
    torch.testing.assert_close(ds.mc_returns(0.5, success_bonus=4.0), torch.tensor([2.5, 3.0, 6.0, 7.0]))
    torch.testing.assert_close(ds.transitions()["reward"], torch.tensor([1.0, 0.0, 2.0, 3.0]))  # default: none
    # a truncated (unsuccessful) episode gets nothing
    e = make_episode(2, rewards=[1, 1])
    e.terminated[:] = False
    e.truncated[-1] = True
    e.success[:] = False
    torch.testing.assert_close(OfflineDataset([e], synthetic_meta()).transitions(success_bonus=4.0)["reward"],
                               torch.tensor([1.0, 1.0]))
    # without success flags the bonus cannot be placed: one clear error
    e2 = make_episode(2, rewards=[1, 1])
    e2.success = None
    with pytest.raises(OffrlError, match="success flags"):
        OfflineDataset([e2], synthetic_meta()).transitions(success_bonus=4.0)
