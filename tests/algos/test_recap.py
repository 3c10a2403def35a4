"""RECAP (advantage-conditioned policy, guidance) and the distributional value: the pure-torch parts."""

import numpy as np
import pytest
import torch

from offrl.algos.critics import (Critics, VNet, categorical_projection, categorical_value_loss, mc_critic_loss,
                                 value_support)
from offrl.algos.finetune import FinetuneLearner
from offrl.algos.networks import (INDICATOR_NEGATIVE, INDICATOR_NONE, INDICATOR_POSITIVE, GaussianActor,
                                  with_indicator)
from offrl.algos.policy_losses import drop_indicator, recap_indicator
from offrl.config import FinetuneConfig, load_config
from offrl.errors import ConfigError


def test_indicator_labels_follow_the_percentile_rule():
    adv = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for pct in (10.0, 50.0, 70.0, 95.0):
        ind, thr = recap_indicator(adv, pct)
        assert thr == pytest.approx(float(np.percentile(adv.numpy(), pct)), abs=1e-5)
        assert torch.equal(ind == INDICATOR_POSITIVE, adv > thr)
        assert torch.equal(ind == INDICATOR_NEGATIVE, adv <= thr)
        assert abs(float((ind == INDICATOR_POSITIVE).float().mean()) - (1 - pct / 100)) < 0.002
    # a fixed threshold replaces the percentile, in the advantages' own units
    ind, thr = recap_indicator(torch.tensor([-1.0, 0.0, 0.2, 0.5]), 50.0, threshold=0.1)
    assert thr == 0.1 and ind.tolist() == [INDICATOR_NEGATIVE, INDICATOR_NEGATIVE, INDICATOR_POSITIVE,
                                           INDICATOR_POSITIVE]


def test_indicator_dropout_frequency():
    ind = torch.full((200_000,), INDICATOR_POSITIVE, dtype=torch.long)
    for p in (0.0, 0.1, 0.3, 0.7):
        out = drop_indicator(ind, p, torch.Generator().manual_seed(1))
        frac = float((out == INDICATOR_NONE).float().mean())
        assert abs(frac - p) < 0.005, (p, frac)
        assert set(out.unique().tolist()) <= {INDICATOR_NONE, INDICATOR_POSITIVE}


def _trained_indicator_actor(guidance):
    torch.manual_seed(0)
    actor, _ = with_indicator(GaussianActor(6, 3, (32, 32)), {"obs_dim": 6, "act_dim": 3, "hidden": [32, 32]},
                              guidance)
    with torch.no_grad():
        actor.indicator.weight.normal_()  # conditions that differ, as after training
    return actor


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_the_guided_mean_is_the_formula(w):
    actor = _trained_indicator_actor(w)
    obs = torch.randn(16, 6)
    none = actor.dist(obs, torch.full((16,), INDICATOR_NONE)).mean
    pos = actor.dist(obs, torch.full((16,), INDICATOR_POSITIVE)).mean
    guided = actor.dist(obs)
    assert torch.allclose(guided.mean, none + (1 + w) * (pos - none), atol=1e-6)
    assert torch.allclose(guided.stddev, actor.dist(obs, torch.full((16,), INDICATOR_NONE)).stddev)
    # the acting policy's deterministic action is the guided mean, clipped into the bounds
    a, _ = actor.act(obs, deterministic=True)
    assert torch.allclose(a, guided.mean.clamp(-1, 1), atol=1e-6)
    if w > 0:  # and guidance changes something once the conditions differ
        assert not torch.allclose(guided.mean, pos)


@pytest.mark.parametrize("w", [0.0, 3.0])
def test_an_upgraded_actor_acts_identically_at_step_0(w):
    torch.manual_seed(0)
    old = GaussianActor(6, 3, (32, 32), min_log_std=-3.0)
    old.normalizer.update(torch.randn(100, 6) * 3 + 1)
    arch = {"obs_dim": 6, "act_dim": 3, "hidden": [32, 32], "min_log_std": -3.0}
    new, new_arch = with_indicator(old, arch, w)
    assert new_arch["indicator"] is True and new_arch["guidance"] == w
    obs = torch.randn(32, 6)
    for det in (True, False):
        a0 = old.act_raw(obs, det, torch.Generator().manual_seed(5))
        a1 = new.act_raw(obs, det, torch.Generator().manual_seed(5))
        for x, y in zip(a0, a1):
            assert torch.equal(x, y)
    act = torch.rand(32, 3) * 2 - 1
    for c in (INDICATOR_NONE, INDICATOR_POSITIVE, INDICATOR_NEGATIVE):
        assert torch.equal(new.log_prob(obs, act, torch.full((32,), c)), old.log_prob(obs, act))
    # the architecture dict rebuilds the same acting policy (what SimHosts and checkpoints do)
    again = GaussianActor(**new_arch)
    again.load_state_dict(new.state_dict())
    assert torch.equal(again.act(obs, True)[0], old.act(obs, True)[0])


def _round_batch(obs: torch.Tensor, act: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor) -> dict:
    """One on-policy round in :meth:`FinetuneLearner.update`'s batch contract (zero returns and rewards)."""
    B = obs.shape[0]
    return {"obs": obs, "actions": act, "raw_actions": act, "logprob": logp, "adv": adv, "returns": torch.zeros(B),
            "rewards": torch.zeros(B), "next_obs": torch.zeros_like(obs), "terminated": torch.zeros(B, dtype=torch.bool)}


def test_recap_learner_trains_the_conditions_apart():
    """Maximum likelihood with the indicator: on data where good actions are +0.5 and bad ones -0.5, the
    positive condition's mean moves to the good actions, the negative one to the bad ones."""
    cfg = FinetuneConfig(update="recap", advantage="gae", offline_ratio=0.0, actor_lr=3e-3, epochs=20,
                         recap_percentile=50.0, recap_drop=0.2)
    actor, _ = with_indicator(GaussianActor(2, 1, (32,)), {"obs_dim": 2, "act_dim": 1, "hidden": [32]}, 0.0)
    learner = FinetuneLearner(actor, cfg, value=VNet(2, [16]), seed=0)
    g = torch.Generator().manual_seed(0)
    B = 512
    adv = torch.randn(B, generator=g)
    act = torch.where(adv > 0, 0.5, -0.5).unsqueeze(-1) + 0.05 * torch.randn(B, 1, generator=g)
    m = learner.update(_round_batch(torch.randn(B, 2, generator=g), act, torch.zeros(B), adv))
    assert m["recap_pos"] == pytest.approx(0.5, abs=0.01)
    assert m["recap_dropped"] == pytest.approx(0.2, abs=0.05)
    obs = torch.randn(64, 2)
    pos = actor.dist(obs, torch.full((64,), INDICATOR_POSITIVE)).mean.mean()
    neg = actor.dist(obs, torch.full((64,), INDICATOR_NEGATIVE)).mean.mean()
    none = actor.dist(obs, torch.full((64,), INDICATOR_NONE)).mean.mean()
    assert pos > 0.3 and neg < -0.3 and abs(none) < 0.2, (pos, neg, none)


def test_the_categorical_projection_on_hand_computed_cases():
    sup = value_support(5, 0.0, 1.0)  # 0, 0.25, 0.5, 0.75, 1
    assert torch.allclose(sup, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # 0.3 lies 1/5 of the way from 0.25 to 0.5: 0.8 to 0.25, 0.2 to 0.5
    p = categorical_projection(torch.tensor([[0.3]]), torch.ones(1, 1), sup)
    assert torch.allclose(p, torch.tensor([[0.0, 0.8, 0.2, 0.0, 0.0]]))
    # on a support point: all of it there; outside the support: clipped onto the ends
    p = categorical_projection(torch.tensor([[0.5, 2.0, -1.0]]), torch.tensor([[0.5, 0.25, 0.25]]), sup)
    assert torch.allclose(p, torch.tensor([[0.25, 0.0, 0.5, 0.0, 0.25]]))
    # C51's Bellman target: r + gamma z with r = 0.1, gamma = 0.5 on next-state mass (0, 0, 1, 0, 0) at z = 0.5
    # -> the atom 0.35 splits 0.6 / 0.4 between 0.25 and 0.5; the mean is kept
    z = sup.unsqueeze(0)
    nxt = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    p = categorical_projection(0.1 + 0.5 * z, nxt, sup)
    assert torch.allclose(p, torch.tensor([[0.0, 0.6, 0.4, 0.0, 0.0]]))
    assert float((p * sup).sum()) == pytest.approx(0.35)
    # a spread next-state distribution: mass 0.5 at z=0 and at z=1 -> atoms 0.1 and 0.6
    p = categorical_projection(0.1 + 0.5 * z, torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.5]]), sup)
    assert torch.allclose(p, torch.tensor([[0.3, 0.2, 0.3, 0.2, 0.0]]))
    assert float((p * sup).sum()) == pytest.approx(0.35)
    assert torch.allclose(p.sum(-1), torch.ones(1))


def test_the_distributional_value_is_the_categoricals_mean_and_learns_returns():
    torch.manual_seed(0)
    v = VNet(3, [32], distributional=(11, 0.0, 1.0))
    obs = torch.randn(8, 3)
    probs = torch.softmax(v.logits(obs), -1)
    assert torch.allclose(v(obs), (probs * torch.linspace(0, 1, 11)).sum(-1))
    # two states with returns 0.2 and 0.9: cross-entropy to the projection fits both means
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    g = torch.tensor([0.2, 0.9])
    opt = torch.optim.Adam(v.parameters(), lr=1e-2)
    for _ in range(300):
        loss = categorical_value_loss(v.logits(x), g, v.support)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(v(x), g, atol=0.02)
    # the MC critic loss takes the same path for V and every Q head
    c = Critics(3, 2, [16], distributional=(5, 0.0, 1.0))
    loss, m = mc_critic_loss(c, torch.randn(4, 3), torch.randn(4, 2), torch.rand(4))
    assert torch.isfinite(loss) and 0.0 <= m["v_mean"] <= 1.0 and c.q(torch.randn(4, 3), torch.randn(4, 2)).shape == (2, 4)


@pytest.mark.parametrize("override, key", [
    ("finetune.recap_percentile=0", "finetune.recap_percentile"),
    ("finetune.recap_percentile=100", "finetune.recap_percentile"),
    ("finetune.recap_percentile=150", "finetune.recap_percentile"),
    ("finetune.recap_cfg_weight=-0.5", "finetune.recap_cfg_weight"),
    ("finetune.recap_drop=1.0", "finetune.recap_drop"),
    ("critic.distributional.bins=1", "critic.distributional.bins"),
    ("critic.distributional={bins: 11, v_min: 1.0, v_max: 0.0}", "critic.distributional.v_max"),
])
def test_bad_recap_and_distributional_values_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_guidance_without_dropout_and_distributional_bootstrapped_critics_are_refused():
    with pytest.raises(ConfigError, match="finetune.recap_drop"):
        load_config(None, ["finetune.update=recap", "finetune.recap_cfg_weight=1", "finetune.recap_drop=0"])
    with pytest.raises(ConfigError, match="critic.distributional"):
        load_config(None, ["pretrain.algo=bc+iql", "critic.distributional.bins=11"])
    assert load_config(None, ["pretrain.algo=bc+critic_mc", "critic.distributional.bins=11"]).critic.distributional.bins == 11


def _dp(**kw):
    from offrl.algos.sequence import DiffusionPolicy

    return DiffusionPolicy(obs_dim=3, act_dim=2, obs_horizon=2, pred_horizon=8, action_horizon=4, widths=(16, 32),
                           step_embed_dim=8, kernel_size=3, groups=4, **kw)


def test_diffusion_guidance_is_cfg_on_the_noise_and_an_upgrade_samples_identically():
    from offrl.algos.sequence import with_indicator_diffusion

    torch.manual_seed(0)
    net = _dp()
    net.normalizer.fit(torch.randn(50, 2, 3), torch.rand(50, 8, 2) * 2 - 1)
    arch = {"kind": "diffusion", "obs_dim": 3, "act_dim": 2, "obs_horizon": 2, "pred_horizon": 8,
            "action_horizon": 4, "widths": [16, 32], "step_embed_dim": 8, "kernel_size": 3, "groups": 4}
    up, up_arch = with_indicator_diffusion(net, arch, guidance=2.0)
    assert up_arch["indicator"] is True and up_arch["guidance"] == 2.0
    obs = torch.randn(4, 2, 3)
    torch.testing.assert_close(up.predict(obs, torch.Generator().manual_seed(1)),
                               net.predict(obs, torch.Generator().manual_seed(1)), rtol=0, atol=0)
    # once the conditions differ: the sampled noise is eps_none + (1 + w) (eps_pos - eps_none)
    with torch.no_grad():
        up.indicator.weight.normal_()
    x, k, cond = torch.randn(4, 8, 2), torch.tensor(5), up._cond(obs)
    e_none = up.unet(x, k, up._with(cond, INDICATOR_NONE))
    e_pos = up.unet(x, k, up._with(cond, INDICATOR_POSITIVE))
    torch.testing.assert_close(up.guided_noise(x, k, cond), e_none + 3.0 * (e_pos - e_none))
    up.guidance = 0.0
    torch.testing.assert_close(up.guided_noise(x, k, cond), e_pos)
    # training conditions each row on its indicator; a policy without one refuses indicators
    loss, _ = up.loss(obs, torch.rand(4, 8, 2) * 2 - 1, torch.Generator().manual_seed(0),
                      torch.tensor([INDICATOR_POSITIVE, INDICATOR_NEGATIVE, INDICATOR_NONE, INDICATOR_POSITIVE]))
    loss.backward()
    assert float(up.indicator.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="no indicator"):
        net.loss(obs, torch.rand(4, 8, 2), None, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("update", ["awr", "push_away", "ppo"])
def test_the_kl_trust_region_stops_every_on_policy_rule(update):
    """A round whose advantages single out a few samples (most exactly zero, as sparse MC re-rollouts give)
    refits the policy far from its data; ``target_kl`` ends the round's epochs early for every rule with a
    behaviour log-prob, and ``null`` runs them all."""
    def run(target_kl):
        torch.manual_seed(0)
        actor = GaussianActor(2, 1, (32,))
        cfg = FinetuneConfig(update=update, advantage="gae", actor_lr=3e-3, epochs=8, minibatches=4,
                             target_kl=target_kl)
        learner = FinetuneLearner(actor, cfg, value=VNet(2, [16]), seed=0)
        g = torch.Generator().manual_seed(1)
        B = 80
        obs = torch.randn(B, 2, generator=g)
        with torch.no_grad():
            act = actor.dist(obs).sample()
            logp = actor.log_prob(obs, act)
        adv = torch.zeros(B)
        adv[:6] = 0.3  # six lucky re-rollouts, the rest zero
        return learner.update(_round_batch(obs, act, logp, adv))

    free, guarded = run(None), run(0.01)
    assert free["epochs"] == 8
    assert guarded["epochs"] < 8
    assert guarded["approx_kl"] < free["approx_kl"]
