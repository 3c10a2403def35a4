"""Advantage estimators and update rules: hand-computed 3-step cases, identities, random cases."""

import math

import pytest
import torch

from offrl.algos.advantages import (critic_advantage, discounted_returns, gae, mc_rerollout_advantage,
                                    td0_advantage)
from offrl.algos.policy_losses import awr_loss, normalize, ppo_loss, push_away_awr_loss, value_loss

E = math.e


def col(*x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype).reshape(-1, 1)


R, V, NV = col(1.0, 0.0, 2.0), col(1.0, 2.0, 3.0), col(2.0, 3.0, 4.0)
F = col(False, False, False, dtype=torch.bool)


def test_gae_hand_computed():
    # gamma = lam = 0.5: delta = [1 + 1 - 1, 0 + 1.5 - 2, 2 + 2 - 3] = [1, -0.5, 1]
    # A2 = 1; A1 = -0.5 + 0.25 * 1 = -0.25; A0 = 1 + 0.25 * -0.25 = 0.9375
    adv, ret = gae(R, V, NV, F, F, 0.5, 0.5)
    assert adv.flatten().tolist() == pytest.approx([0.9375, -0.25, 1.0])
    assert ret.flatten().tolist() == pytest.approx([1.9375, 1.75, 4.0])


def test_gae_termination_vs_truncation():
    term = col(False, True, False, dtype=torch.bool)
    # terminated at t=1: delta1 = 0 - 2 = -2 (no bootstrap) and the recursion stops: A0 = 1 + 0.25 * -2
    adv, _ = gae(R, V, NV, term, F, 0.5, 0.5)
    assert adv.flatten().tolist() == pytest.approx([0.5, -2.0, 1.0])
    # truncated at t=1: delta1 bootstraps from V(final obs) = 3: -0.5, recursion stops: A0 = 1 + 0.25 * -0.5
    adv, _ = gae(R, V, NV, F, term, 0.5, 0.5)
    assert adv.flatten().tolist() == pytest.approx([0.875, -0.5, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_gae_identities_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    T, N = 7, 4
    r, v, nv = (torch.randn(T, N, generator=g) for _ in range(3))
    term = torch.rand(T, N, generator=g) < 0.2
    trunc = (torch.rand(T, N, generator=g) < 0.2) & ~term
    # along each env, V(s_{t+1}) of a non-boundary step is the next row's V(s)
    nv[:-1] = torch.where(term[:-1] | trunc[:-1], nv[:-1], v[1:])
    gamma = 0.9
    a1, ret1 = gae(r, v, nv, term, trunc, gamma, 1.0)
    torch.testing.assert_close(a1, discounted_returns(r, term, trunc, nv, gamma) - v)
    a0, _ = gae(r, v, nv, term, trunc, gamma, 0.0)
    torch.testing.assert_close(a0, td0_advantage(r, v, nv, term, gamma))
    # the loop matches a direct per-env recursion
    lam = 0.7
    a, _ = gae(r, v, nv, term, trunc, gamma, lam)
    for n in range(N):
        nxt = 0.0
        for t in reversed(range(T)):
            d = r[t, n] + gamma * (0.0 if term[t, n] else nv[t, n]) - v[t, n]
            nxt = d + gamma * lam * (0.0 if (term[t, n] or trunc[t, n]) else nxt)
            assert a[t, n].item() == pytest.approx(float(nxt), abs=1e-5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="values has shape"):
        gae(R, V[:2], NV, F, F, 0.9, 0.9)
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        gae(R.flatten(), V.flatten(), NV.flatten(), F.flatten(), F.flatten(), 0.9, 0.9)


def test_discounted_returns_bootstrap_only_on_truncation():
    # gamma 0.5, r = [1, 0, 2]; truncated at t=1 with V(final) = 3 -> G1 = 0 + 0.5*3, G0 = 1 + 0.5*1.5
    trunc = col(False, True, False, dtype=torch.bool)
    g = discounted_returns(R, F, trunc, NV, 0.5)
    assert g.flatten().tolist() == pytest.approx([1.75, 1.5, 4.0])
    g = discounted_returns(R, trunc, F, NV, 0.5)  # the same step terminated: no bootstrap
    assert g.flatten().tolist() == pytest.approx([1.0, 0.0, 4.0])


def test_mc_and_critic_advantages():
    q = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    v = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    a, qm, vm = mc_rerollout_advantage(q, v)
    assert a.tolist() == [1.0, -0.5] and qm.tolist() == [2.0, 0.0] and vm.tolist() == [1.0, 0.5]
    assert critic_advantage(torch.tensor([2.0]), torch.tensor([0.5])).tolist() == [1.5]
    with pytest.raises(ValueError):
        mc_rerollout_advantage(q, v[:1])


def test_ppo_hand_computed():
    # ratios [1, 2, 0.5], A = [1, 1, -1], clip 0.2:
    # min terms: [1, min(2, 1.2) = 1.2, min(-0.5, -0.8) = -0.8] -> loss = -(1.4 / 3)
    logp = torch.tensor([0.0, math.log(2), math.log(0.5)], requires_grad=True)
    loss, m = ppo_loss(logp, torch.zeros(3), torch.tensor([1.0, 1.0, -1.0]), clip=0.2)
    assert loss.item() == pytest.approx(-1.4 / 3)
    assert m["clipfrac"] == pytest.approx(2 / 3)
    # approx_kl = mean((r - 1) - log r) = (0 + (1 - ln 2) + (-0.5 + ln 2)) / 3 = 0.5 / 3
    assert m["approx_kl"] == pytest.approx(0.5 / 3)
    loss.backward()
    # clipped samples carry no gradient; the unclipped one has d(-r A / 3)/dlogp = -r A / 3 = -1/3
    assert logp.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0])


def test_awr_hand_computed():
    # w = exp(A / 1) = [1, e, 1/e]; loss = -(1*-1 + e*-2 + (1/e)*-0.5) / 3
    logp = torch.tensor([-1.0, -2.0, -0.5])
    adv = torch.tensor([0.0, 1.0, -1.0])
    loss, m = awr_loss(logp, adv, beta=1.0, max_weight=20.0)
    assert loss.item() == pytest.approx((1 + 2 * E + 0.5 / E) / 3, rel=1e-6)
    loss, m = awr_loss(logp, adv, beta=1.0, max_weight=2.0)  # e clipped to 2
    assert loss.item() == pytest.approx((1 + 4 + 0.5 / E) / 3, rel=1e-6)
    assert m["weight_max"] == pytest.approx(2.0)


def test_push_away_hand_computed_and_bounded():
    # A = [1, -1, -2], beta 1, alpha 0.5, delta 1; logp - old = [0, -1.5, 0.5]
    # t0 (A >= 0): -e * logp = e;  t1: 0.5 * e * max(-1.5, -1) = -0.5 e (at the floor, no gradient)
    # t2: 0.5 * e^2 * 0.5 = 0.25 e^2;  loss = (e - 0.5 e + 0.25 e^2) / 3
    logp = torch.tensor([-1.0, -2.5, -0.5], requires_grad=True)
    old = torch.tensor([-1.0, -1.0, -1.0])
    loss, m = push_away_awr_loss(logp, old, torch.tensor([1.0, -1.0, -2.0]), beta=1.0, max_weight=20.0,
                                 alpha=0.5, max_push=1.0)
    assert loss.item() == pytest.approx((E - 0.5 * E + 0.25 * E * E) / 3, rel=1e-6)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-E / 3, 0.0, 0.5 * E * E / 3], rel=1e-6)
    assert m["push_frac"] == pytest.approx(2 / 3)
    # bounded: sending the pushed action's likelihood to 0 cannot lower the loss past the floor
    tiny = torch.tensor([-1.0, -1e6, -1e6])
    low, _ = push_away_awr_loss(tiny, old, torch.tensor([1.0, -1.0, -2.0]), beta=1.0, alpha=0.5, max_push=1.0)
    assert low.item() == pytest.approx((E - 0.5 * E - 0.5 * E * E) / 3, rel=1e-6)


def test_normalize_scale_only_keeps_exact_zeros_and_signs():
    # MC's round: most pairs' re-rollouts all failed (A = 0 exactly), one did better, one worse
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.6, -0.2])
    std = float(adv.std())
    centred = normalize(adv)
    assert (centred[:4] < 0).all()  # centring turns the zeros negative: push-away would push them down
    assert float(centred.mean()) == pytest.approx(0.0, abs=1e-6)
    scaled = normalize(adv, center=False)
    assert scaled.tolist() == pytest.approx((adv / std).tolist(), rel=1e-6)
    assert (scaled[:4] == 0).all() and scaled[4] > 0 > scaled[5]
    assert normalize(torch.tensor([0.3]), center=False).tolist() == pytest.approx([0.3])
    assert normalize(torch.tensor([0.3])).tolist() == pytest.approx([0.0])


def test_value_loss_clip():
    v, r, old = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0])
    assert value_loss(v, r).item() == pytest.approx(2.0)
    assert value_loss(v, r, old, clip=0.5).item() == pytest.approx(2.0)  # max(4, 1.5^2) / 2


@pytest.mark.parametrize("center, pushed", [(True, 0.9), (False, 0.0)])
def test_push_away_round_pushes_the_zero_advantages_only_when_centring(center, pushed):
    """An MC-like round, 90% exact zeros and 10% positive: centring makes the zeros the pushed-down side."""
    from offrl.algos.critics import VNet
    from offrl.algos.finetune import FinetuneLearner
    from offrl.algos.networks import GaussianActor
    from offrl.config import FinetuneConfig
    cfg = FinetuneConfig(advantage="mc", update="push_away", center_advantage=center, epochs=1, minibatches=1,
                         target_kl=None)
    actor = GaussianActor(3, 2, hidden=(8,))
    learner = FinetuneLearner(actor, cfg, value=VNet(3, [8]), seed=0)
    g = torch.Generator().manual_seed(0)
    B = 100
    obs, act = torch.randn(B, 3, generator=g), torch.randn(B, 2, generator=g)
    adv = torch.zeros(B)
    adv[:10] = 0.5
    with torch.no_grad():
        logp = actor.log_prob(obs, act)
    m = learner.update({"obs": obs, "actions": act, "raw_actions": act, "logprob": logp, "adv": adv})
    assert m["push_frac"] == pytest.approx(pushed)
