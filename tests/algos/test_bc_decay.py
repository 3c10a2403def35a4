"""finetune.bc_decay: the DAPG term's weight is bc_coef * bc_decay**round (DAPG's schedule), on every learner."""

import pytest
import torch

from offrl.algos.finetune import FinetuneLearner
from offrl.algos.networks import GaussianActor
from offrl.algos.sac import SACLearner
from offrl.config import FinetuneConfig


def _demos(n=64):
    g = torch.Generator().manual_seed(7)
    return {"obs": torch.randn(n, 3, generator=g), "actions": torch.rand(n, 2, generator=g) * 2 - 1}


def _actor():
    torch.manual_seed(0)
    return GaussianActor(3, 2, hidden=(32,), log_std_init=-1.0)


def _ppo(**over):
    cfg = FinetuneConfig(advantage="mc", update="ppo", epochs=1, minibatches=1, target_kl=None, **over)
    return FinetuneLearner(_actor(), cfg, seed=0, offline=_demos())


def _round(n=64):
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(n, 3, generator=g)
    a = torch.rand(n, 2, generator=g) * 2 - 1
    return {"obs": obs, "actions": a, "raw_actions": a, "logprob": torch.zeros(n), "adv": torch.randn(n, generator=g)}


def test_the_weight_falls_by_the_decay_each_round_and_stays_put_without_it():
    lr, flat = _ppo(bc_coef=0.4, bc_decay=0.5), _ppo(bc_coef=0.4)
    weights = []
    for k in range(4):
        lr.iteration = flat.iteration = k
        weights.append(lr.bc_weight())
        assert flat.bc_weight() == 0.4
    assert weights == pytest.approx([0.4, 0.2, 0.1, 0.05])


def test_the_actor_loss_at_round_k_is_the_constant_term_with_the_decayed_weight():
    """Round 2 at bc_coef 0.4 and decay 0.5 gives the loss (and the logged weight) of round 0 at bc_coef 0.1:
    the same offline rows drawn, only the weight differs."""
    decayed, const = _ppo(bc_coef=0.4, bc_decay=0.5), _ppo(bc_coef=0.1)
    decayed.iteration = 2
    b = _round()
    loss_d, m_d = decayed._actor_loss(b, b["adv"])
    loss_c, m_c = const._actor_loss(b, b["adv"])
    assert float(loss_d.detach()) == pytest.approx(float(loss_c.detach()), rel=1e-6)
    assert m_d["bc_weight"] == pytest.approx(0.1) and m_c["bc_weight"] == 0.1
    assert m_d["bc_loss"] == m_c["bc_loss"]


def test_sac_uses_the_decayed_weight_too():
    def sac(**over):
        kw = dict(update="sac", replay=True, updates_per_round=1, batch_size=32, offline_ratio=0.0,
                  replay_size=256, sac_ensemble=2, sac_subset=2, grad_clip=0.0, target_kl=None)
        lr = SACLearner(_actor(), FinetuneConfig(**kw, **over), critic_hidden=(16,), seed=0, offline=_demos())
        g = torch.Generator().manual_seed(2)
        obs = torch.randn(64, 3, generator=g)
        a = torch.rand(64, 2, generator=g) * 2 - 1
        lr.replay.add({"obs": obs, "actions": a, "raw_actions": a, "logprob": torch.zeros(64),
                       "rewards": torch.zeros(64), "next_obs": obs, "terminated": torch.zeros(64, dtype=torch.bool)})
        return lr

    decayed, const = sac(bc_coef=1.0, bc_decay=0.9), sac(bc_coef=0.81)
    decayed.iteration = 2
    md, mc = decayed.update_replay(), const.update_replay()
    assert md["bc_weight"] == pytest.approx(0.81) and mc["bc_weight"] == pytest.approx(0.81)
    assert md["bc_loss"] == mc["bc_loss"]
    for p, q in zip(decayed.actor.parameters(), const.actor.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
