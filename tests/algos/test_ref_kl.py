"""finetune.ref_kl_coef: the anchor to the start policy, KL(start || policy) added to the actor losses."""

import pytest
import torch

from offrl.algos.finetune import FinetuneLearner
from offrl.algos.networks import GaussianActor
from offrl.config import ConfigError, FinetuneConfig, load_config


def _learner(update="awr", **over):
    torch.manual_seed(0)
    actor = GaussianActor(3, 2, hidden=(32,), log_std_init=-1.0)
    cfg = FinetuneConfig(advantage="mc", update=update, epochs=4, minibatches=4, actor_lr=3e-3, target_kl=None,
                         **over)
    return FinetuneLearner(actor, cfg, seed=0)


def _signal_free_round(lr, g, n=256):
    """The policy's own samples on fixed states, with advantages drawn independently of the actions."""
    obs = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = lr.actor.dist(obs)
        raw = d.mean + d.stddev * torch.randn(d.mean.shape, generator=g)
        logp = d.log_prob(raw).sum(-1)
    return obs, {"obs": obs, "actions": raw.clamp(-1, 1), "raw_actions": raw, "logprob": logp,
                 "adv": torch.randn(n, generator=g)}


def test_the_anchor_is_the_kl_from_the_start_policy_and_enters_the_loss():
    lr = _learner(ref_kl_coef=0.5)
    obs = torch.randn(64, 3)
    assert float(lr.ref_kl(obs).detach()) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        lr.actor.log_std.add_(0.3)
    start = torch.distributions.Normal(torch.zeros(2), torch.full((2,), torch.e ** -1.0))
    now = torch.distributions.Normal(torch.zeros(2), torch.full((2,), torch.e ** -0.7))
    assert float(lr.ref_kl(obs).detach()) == pytest.approx(float(torch.distributions.kl_divergence(start, now).sum()), rel=1e-5)
    _, b = _signal_free_round(lr, torch.Generator().manual_seed(1), 64)
    loss, pm = lr._actor_loss(b, b["adv"])
    plain, _ = FinetuneLearner._rule_loss(lr, b, b["adv"])
    assert float(loss - plain) == pytest.approx(0.5 * pm["ref_kl"], rel=1e-5)
    assert "ref_actor" in lr.modules() and not any(p.requires_grad for p in lr.ref_actor.parameters())
    assert "ref_actor" not in _learner().modules()


@pytest.mark.parametrize("update", ["awr", "push_away", "ppo"])
def test_signal_free_rounds_walk_less_far_with_the_anchor(update):
    """Twenty rounds whose advantages carry nothing: the unanchored policy walks away from the start (the drift
    of bench/noise_round.py), the anchored one stays within a fraction of that distance."""
    walked = {}
    for coef in (0.0, 1.0):
        lr = _learner(update, ref_kl_coef=coef)
        start = GaussianActor(3, 2, hidden=(32,), log_std_init=-1.0)
        start.load_state_dict(lr.actor.state_dict())
        g = torch.Generator().manual_seed(2)
        for _ in range(20):
            obs, b = _signal_free_round(lr, g)
            lr.update(b)
        with torch.no_grad():
            walked[coef] = float(torch.distributions.kl_divergence(start.dist(obs), lr.actor.dist(obs)).sum(-1).mean())
    assert walked[0.0] > 0.05
    assert walked[1.0] < 0.5 * walked[0.0]


@pytest.mark.parametrize("override, words", [("finetune.ref_kl_coef=-0.1", "must be a finite number >= 0"),
                                             ("finetune.ref_kl_coef=nan", "finite number")])
def test_bad_anchor_weights_are_refused_with_the_key_named(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.path == "finetune.ref_kl_coef" and words in str(e.value)


def test_sac_refuses_the_anchor():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["finetune.update=sac", "finetune.replay=true", "finetune.ref_kl_coef=1"])
    assert e.value.path == "finetune.ref_kl_coef" and "sac" in str(e.value)
