"""finetune.rule_coef: the weight of the update rule's own loss; 0 is the demos-only (DAPG term alone) control."""

import pytest
import torch

from offrl.algos.finetune import FinetuneLearner
from offrl.algos.networks import GaussianActor
from offrl.config import ConfigError, FinetuneConfig, load_config


def _learner(update="ppo", offline=None, **over):
    torch.manual_seed(0)
    actor = GaussianActor(3, 2, hidden=(32,), log_std_init=-1.0)
    cfg = FinetuneConfig(advantage="mc", update=update, epochs=2, minibatches=2, actor_lr=3e-3, target_kl=None,
                         **over)
    return FinetuneLearner(actor, cfg, seed=0, offline=offline)


def _round(lr, n=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 3, generator=g)
    with torch.no_grad():
        d = lr.actor.dist(obs)
        raw = d.mean + d.stddev * torch.randn(d.mean.shape, generator=g)
        logp = d.log_prob(raw).sum(-1)
    return {"obs": obs, "actions": raw.clamp(-1, 1), "raw_actions": raw, "logprob": logp,
            "adv": torch.randn(n, generator=g)}


def _demos(n=64):
    g = torch.Generator().manual_seed(7)
    return {"obs": torch.randn(n, 3, generator=g), "actions": torch.rand(n, 2, generator=g) * 2 - 1}


@pytest.mark.parametrize("update", ["ppo", "awr", "push_away"])
def test_the_rule_loss_is_scaled_by_rule_coef(update):
    half, full = _learner(update, rule_coef=0.5), _learner(update)
    b = _round(full)
    loss, _ = half._actor_loss(b, b["adv"])
    ref, _ = full._actor_loss(b, b["adv"])
    assert float(loss.detach()) == pytest.approx(0.5 * float(ref.detach()), rel=1e-6)


@pytest.mark.parametrize("update", ["ppo", "awr", "push_away"])
def test_rule_coef_zero_leaves_the_actor_to_the_dapg_term_alone(update):
    """With rule_coef 0 and no other term the actor does not move; with the DAPG term it moves, and exactly as a
    learner whose rounds carry other advantages: the advantages no longer reach the actor."""
    frozen = _learner(update, rule_coef=0.0)
    before = [p.detach().clone() for p in frozen.actor.parameters()]
    frozen.update(_round(frozen))
    assert all(torch.equal(a, p) for a, p in zip(before, frozen.actor.parameters()))

    moved = {}
    for seed in (1, 2):
        lr = _learner(update, offline=_demos(), rule_coef=0.0, bc_coef=0.5)
        b = _round(lr)
        b["adv"] = torch.randn(b["adv"].shape, generator=torch.Generator().manual_seed(seed))
        lr.update(b)
        moved[seed] = [p.detach().clone() for p in lr.actor.parameters()]
    assert any(not torch.equal(a, p) for a, p in zip(before, moved[1]))
    assert all(torch.equal(a, p) for a, p in zip(moved[1], moved[2]))


@pytest.mark.parametrize("override, words", [("finetune.rule_coef=-1", "must be a finite number >= 0"),
                                             ("finetune.rule_coef=nan", "finite number"),
                                             ("finetune.rule_coef=inf", "finite number")])
def test_bad_rule_weights_are_refused_with_the_key_named(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.path == "finetune.rule_coef" and words in str(e.value)


def test_sac_refuses_rule_coef():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["finetune.update=sac", "finetune.replay=true", "finetune.rule_coef=0"])
    assert e.value.path == "finetune.rule_coef" and "sac" in str(e.value)
