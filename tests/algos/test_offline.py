"""Offline losses and the offline learner on synthetic data with known answers."""

import pytest
import torch

from offrl.algos.critics import Critics, awr_weights, expectile_loss, iql_q_loss, td_target
from offrl.algos.networks import GaussianActor
from offrl.algos.offline import OfflineLearner
from offrl.errors import OffrlError


def test_expectile_loss_hand_computed():
    # diff = [2, -1, 0.5], tau = 0.7 -> weights [0.7, 0.3, 0.7]
    # 0.7*4 + 0.3*1 + 0.7*0.25 = 2.8 + 0.3 + 0.175 = 3.275; mean = 1.091666...
    diff = torch.tensor([2.0, -1.0, 0.5])
    assert expectile_loss(diff, 0.7).item() == pytest.approx(3.275 / 3)
    # tau = 0.5 is half the MSE (SARSA mean regression): 0.5 * (4 + 1 + 0.25) / 3
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * 5.25 / 3)


def test_expectile_minimiser_is_the_expectile():
    """Minimising the expectile loss over a constant gives the tau-expectile (above the mean for tau > 0.5)."""
    x = torch.tensor([0.0, 0.0, 0.0, 1.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(500):
        opt.zero_grad()
        expectile_loss(x - v, 0.9).backward()
        opt.step()
    # expectile e solves 0.9 * (1 - e) = 0.1 * 3e  ->  e = 0.9 / 1.2 = 0.75
    assert v.item() == pytest.approx(0.75, abs=1e-4)


def test_td_target_bootstraps_on_truncation_not_termination():
    r = torch.tensor([1.0, 1.0, 1.0])
    next_v = torch.tensor([10.0, 10.0, 10.0])
    terminated = torch.tensor([False, True, False])
    # step 2 is truncated (time limit): it still bootstraps, only the terminated one does not
    y = td_target(r, next_v, terminated, 0.8)
    assert y.tolist() == pytest.approx([9.0, 1.0, 9.0])


def test_q_loss_would_differ_if_truncation_were_termination():
    torch.manual_seed(0)
    c = Critics(3, 1, hidden=(8,))
    obs, act = torch.randn(4, 3), torch.randn(4, 1)
    r, nobs = torch.ones(4), torch.randn(4, 3)
    terminated = torch.tensor([False, False, False, True])
    truncated = torch.tensor([False, True, False, False])
    good, _ = iql_q_loss(c, obs, act, r, nobs, terminated, 0.9)
    merged, _ = iql_q_loss(c, obs, act, r, nobs, terminated | truncated, 0.9)
    assert not torch.isclose(good, merged)


def test_awr_weights_clip():
    w = awr_weights(torch.tensor([0.0, 1.0, 10.0]), beta=3.0, max_weight=100.0)
    assert w.tolist() == pytest.approx([1.0, float(torch.exp(torch.tensor(3.0))), 100.0])


def _chain_data(n_eps=40, T=5, gamma=0.5):
    """Episodes on a 1-D chain: obs = [t / T], reward 1 at the last step, terminated there.

    The MC return of step t is gamma^(T-1-t): known in closed form.
    """
    obs, nobs, act, rew, term, trunc, ret = [], [], [], [], [], [], []
    for _ in range(n_eps):
        for t in range(T):
            obs.append([t / T])
            nobs.append([(t + 1) / T])
            act.append([0.0])
            rew.append(1.0 if t == T - 1 else 0.0)
            term.append(t == T - 1)
            trunc.append(False)
            ret.append(gamma ** (T - 1 - t))
    f = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    return {"obs": f(obs), "next_obs": f(nobs), "actions": f(act), "rewards": f(rew),
            "terminated": f(term, torch.bool), "truncated": f(trunc, torch.bool), "mc_return": f(ret)}


def _train(learner, data, steps=400, bs=64):
    n = data["obs"].shape[0]
    hist = []
    for _ in range(steps):
        idx = torch.randint(0, n, (bs,), generator=learner.gen)
        hist.append(learner.update({k: v[idx] for k, v in data.items()}))
    return hist


def test_critic_mc_fits_known_returns():
    torch.manual_seed(0)
    data = _chain_data()
    c = Critics(1, 1, hidden=(64, 64))
    learner = OfflineLearner(None, c, actor_mode=None, critic_mode="mc", critic_lr=3e-3)
    learner.fit_normalizers(data["obs"])
    hist = _train(learner, data, 600)
    assert hist[-1]["v_loss"] < 0.1 * hist[0]["v_loss"]
    with torch.no_grad():
        v = c.v(torch.tensor([[t / 5] for t in range(5)]))
    assert v.tolist() == pytest.approx([0.5 ** (4 - t) for t in range(5)], abs=0.05)


@pytest.mark.parametrize("tau", [0.7, 0.5])
def test_iql_and_sarsa_learn_the_chain_values(tau):
    torch.manual_seed(1)
    data = _chain_data(gamma=0.5)
    c = Critics(1, 1, hidden=(64, 64))
    learner = OfflineLearner(None, c, actor_mode=None, critic_mode="expectile", tau=tau, gamma=0.5,
                             critic_lr=3e-3, target_tau=0.05)
    learner.fit_normalizers(data["obs"])
    _train(learner, data, 1500)
    val = learner.validate(data)
    assert val["td_error"] < 0.01
    # one action per state, deterministic chain: every expectile equals the return
    assert val["mc_error"] < 0.01


@pytest.mark.parametrize("mode", ["bc", "awr"])
def test_actor_losses_decrease(mode):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(512, 4, generator=g)
    act = torch.tanh(obs[:, :2])
    data = {"obs": obs, "actions": act, "rewards": torch.zeros(512), "next_obs": obs,
            "terminated": torch.zeros(512, dtype=torch.bool), "truncated": torch.zeros(512, dtype=torch.bool),
            "mc_return": torch.zeros(512)}
    actor = GaussianActor(4, 2, hidden=(32, 32))
    critics = Critics(4, 2, hidden=(16,)) if mode == "awr" else None
    learner = OfflineLearner(actor, critics, actor_mode=mode, critic_mode="expectile" if critics else None,
                             actor_lr=3e-3)
    learner.fit_normalizers(obs)
    before = learner.validate(data)["actor_val_loss"]
    _train(learner, data, 300)
    assert learner.validate(data)["actor_val_loss"] < before - 1.0


def test_nan_loss_is_a_clear_error():
    actor = GaussianActor(2, 1, hidden=(8,))
    learner = OfflineLearner(actor, None, actor_mode="bc", critic_mode=None)
    batch = {"obs": torch.tensor([[float("nan"), 0.0]]), "actions": torch.zeros(1, 1)}
    with pytest.raises(OffrlError, match="actor loss became nan"):
        learner.update(batch)
