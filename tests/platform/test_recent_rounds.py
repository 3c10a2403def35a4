"""finetune.keep_rounds: on-policy AWR / push-away learn from the last K rounds, re-scored every round."""

import copy

import numpy as np
import pytest
import torch

from offrl.algos.critics import VNet
from offrl.algos.finetune import FinetuneLearner
from offrl.algos.networks import GaussianActor
from offrl.config import ConfigError, FinetuneConfig, load_config
from offrl.platform.estimators import GAE, Estimator, MonteCarlo, RecentRounds, Round

T, N, OBS, ACT = 5, 3, 4, 2


def _round(it: int, actor: GaussianActor, g: torch.Generator) -> Round:
    """A fake [T, N] rollout of ``actor`` in the loop's round contract."""
    obs = torch.randn(T, N, OBS, generator=g)
    with torch.no_grad():
        d = actor.dist(obs.reshape(T * N, OBS))
        raw = d.mean + d.stddev * torch.randn(d.mean.shape, generator=g)
        logp = d.log_prob(raw).sum(-1)
    data = {"obs": obs.numpy(), "next_obs": torch.randn(T, N, OBS, generator=g).numpy(),
            "rewards": (torch.rand(T, N, generator=g) < 0.2).float().numpy(),
            "terminated": np.zeros((T, N), bool), "truncated": np.zeros((T, N), bool)}
    data["terminated"][2, 1] = True
    batch = {"obs": obs.reshape(T * N, OBS), "actions": raw.clamp(-1, 1), "raw_actions": raw, "logprob": logp,
             "rewards": torch.from_numpy(data["rewards"]).reshape(-1)}
    return Round(it, {}, [], data, batch)


def _learner(update: str = "awr", keep: int = 3) -> FinetuneLearner:
    torch.manual_seed(0)
    cfg = FinetuneConfig(advantage="gae", update=update, keep_rounds=keep, epochs=1, minibatches=1)
    return FinetuneLearner(GaussianActor(OBS, ACT, hidden=(8,)), cfg, value=VNet(OBS, [8]), seed=0)


def test_gae_rounds_are_rescored_with_the_current_value_net():
    learner, est, recent = _learner(), GAE(), RecentRounds(3)
    g = torch.Generator().manual_seed(1)
    rounds, first = [], []
    for it in range(1, 5):
        rnd = _round(it, learner.actor, g)
        rounds.append(rnd)
        batch, _ = est.advantages(learner, rnd)
        first.append(batch["adv"])
        out = recent.merge(est, learner, rnd, batch)
        kept = rounds[-3:][::-1]  # newest first, at most 3 rounds
        assert out["obs"].shape[0] == len(kept) * T * N and len(recent) == len(kept)
        for j, r in enumerate(kept):
            rows = slice(j * T * N, (j + 1) * T * N)
            fresh, _ = est.advantages(learner, r)  # GAE with the value net as it is now
            assert torch.equal(out["adv"][rows], fresh["adv"]) and torch.equal(out["returns"][rows], fresh["returns"])
            assert torch.equal(out["logprob"][rows], r.batch["logprob"])  # each sample's behaviour log-prob
            if j > 0:  # an earlier round: not the advantages it had when it was collected
                assert not torch.allclose(out["adv"][rows], first[r.iteration - 1])
        with torch.no_grad():
            assert torch.allclose(out["logprob_start"], learner.actor.log_prob(out["obs"], out["raw_actions"]))
        # the learner moves the value net and the actor between rounds: kept rounds must see the change
        learner.update(out)


def test_mc_keeps_each_pairs_rerolled_advantage_and_the_state_round_trips():
    learner, recent = _learner(), RecentRounds(2)
    est = MonteCarlo.__new__(MonteCarlo)  # keep/readvantage need no pool
    g = torch.Generator().manual_seed(2)
    batches = []
    for it in range(1, 4):
        b = {**_round(it, learner.actor, g).batch}
        b["adv"] = torch.randn(T * N, generator=g)
        batches.append(b)
        out = recent.merge(est, learner, None, b)
    assert torch.equal(out["adv"], torch.cat([batches[2]["adv"], batches[1]["adv"]]))
    again = RecentRounds(2)
    again.load_state_dict(recent.state_dict(), len(recent))
    nxt = {**batches[0], "adv": torch.zeros(T * N)}
    a, b = recent.merge(est, learner, None, nxt), again.merge(est, learner, None, nxt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    empty = RecentRounds(2)
    empty.load_state_dict({"_empty": torch.zeros(0)}, 0)  # what a checkpoint of an empty buffer holds
    assert len(empty) == 0


def test_signal_free_rounds_drift_less_with_kept_rounds():
    """With every advantage 0, a round of AWR is maximum likelihood on the policy's own exploration noise: a
    256 x 256 actor fits one round's 400 samples and its mean walks. Regressing on the last 8 rounds averages
    that noise (KL from the start after 10 rounds; 0.28-0.49 of the one-round drift over seeds 0-3)."""
    drift = {}
    for keep in (1, 8):
        torch.manual_seed(0)
        actor = GaussianActor(OBS, ACT, hidden=(256, 256))
        learner = FinetuneLearner(actor, FinetuneConfig(advantage="mc", update="awr", keep_rounds=keep), seed=0)
        start = copy.deepcopy(actor)
        g = torch.Generator().manual_seed(3)
        probe = torch.randn(500, OBS, generator=g)
        recent = RecentRounds(keep)
        for _ in range(10):
            obs = torch.randn(400, OBS, generator=g)
            with torch.no_grad():
                d = actor.dist(obs)
                raw = d.mean + d.stddev * torch.randn(d.mean.shape, generator=g)
            b = {"obs": obs, "actions": raw.clamp(-1, 1), "raw_actions": raw, "logprob": d.log_prob(raw).sum(-1),
                 "adv": torch.zeros(400)}
            learner.update(recent.merge(Estimator(), learner, None, b) if keep > 1 else b)
        with torch.no_grad():
            drift[keep] = float(torch.distributions.kl_divergence(start.dist(probe), actor.dist(probe)).sum(-1).mean())
    assert 0 < drift[8] < 0.6 * drift[1], drift


@pytest.mark.parametrize("over, msg", [(["finetune.keep_rounds=0"], "must be >= 1"),
                                       (["finetune.keep_rounds=-3"], "must be >= 1"),
                                       (["finetune.keep_rounds=nan"], "keep_rounds"),
                                       (["finetune.keep_rounds=2.5"], "keep_rounds")])
def test_keep_rounds_refuses_bad_values(over, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, over)
    assert "keep_rounds" in str(e.value)
