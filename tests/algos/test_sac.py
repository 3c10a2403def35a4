"""RLPD-style SAC: the TD target, learning on a one-step task, and the temperature's direction."""

import pytest
import torch

from offrl.algos.networks import GaussianActor
from offrl.algos.sac import SACLearner, hl_gauss_target, sac_critic_target
from offrl.config import FinetuneConfig


def _learner(**over):
    kw = dict(update="sac", replay=True, updates_per_round=1, batch_size=64, offline_ratio=0.0, replay_size=4096,
              sac_ensemble=4, sac_subset=2, actor_lr=3e-3, critic_lr=3e-3, grad_clip=0.0, target_kl=None)
    kw.update(over)
    torch.manual_seed(0)
    actor = GaussianActor(2, 1, hidden=(32,), log_std_init=-1.0)
    return SACLearner(actor, FinetuneConfig(**kw), critic_hidden=(32, 32), seed=0)


def _bandit(n, g):
    """One-step episodes: obs random, reward -(a - 0.5)^2, terminal."""
    obs = torch.randn(n, 2, generator=g)
    a = torch.rand(n, 1, generator=g) * 2 - 1
    return {"obs": obs, "actions": a, "raw_actions": a, "logprob": torch.zeros(n),
            "rewards": -(a[:, 0] - 0.5) ** 2, "next_obs": obs, "terminated": torch.ones(n, dtype=torch.bool)}


def test_target_is_the_min_of_a_random_target_subset_minus_the_entropy_term():
    lr = _learner()
    g = torch.Generator().manual_seed(3)
    b = _bandit(8, g)
    b["terminated"][:4] = False
    y = sac_critic_target(lr.critics, lr.actor, b["rewards"], b["next_obs"], b["terminated"], 0.9, 2,
                          torch.Generator().manual_seed(7))
    # the terminal half bootstraps nothing
    assert torch.allclose(y[4:], b["rewards"][4:])
    # the others: between r + 0.9 (min over all heads - alpha logp) and r + 0.9 (max over heads - alpha logp)
    with torch.no_grad():
        g2 = torch.Generator().manual_seed(7)
        d = lr.actor.dist(b["next_obs"])
        pre = d.mean + d.stddev * torch.randn(d.mean.shape, generator=g2)
        a2 = lr.actor._scale(pre.clamp(-1, 1))
        logp = d.log_prob(pre).sum(-1)
        qs = lr.critics.q_target(b["next_obs"], a2)
        pick = torch.randperm(4, generator=g2)[:2]
        expect = b["rewards"] + 0.9 * (qs[pick].min(0).values - lr.critics.log_alpha.exp() * logp)
    assert torch.allclose(y[:4], expect[:4], atol=1e-6)
    assert (qs.min(0).values[:4] <= qs[pick].min(0).values[:4]).all()
    # without the entropy backup (RLPD's ManiSkill setting): the same heads and sample, no - alpha log pi
    y0 = sac_critic_target(lr.critics, lr.actor, b["rewards"], b["next_obs"], b["terminated"], 0.9, 2,
                           torch.Generator().manual_seed(7), backup_entropy=False)
    assert torch.allclose(y0[4:], b["rewards"][4:])
    assert torch.allclose(y0[:4], (b["rewards"] + 0.9 * qs[pick].min(0).values)[:4], atol=1e-6)
    assert not torch.allclose(y0[:4], y[:4])
    # n-step rows (finetune.n_step): a per-row discount gamma^nsteps, the same heads and sample
    k = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    yk = sac_critic_target(lr.critics, lr.actor, b["rewards"], b["next_obs"], b["terminated"], 0.9 ** k, 2,
                           torch.Generator().manual_seed(7))
    soft = qs[pick].min(0).values - lr.critics.log_alpha.exp() * logp
    assert torch.allclose(yk[:4], (b["rewards"] + 0.9 ** k * soft)[:4], atol=1e-6)
    assert torch.allclose(yk[4:], b["rewards"][4:])


def test_gradient_step_discounts_each_row_by_its_nsteps():
    """A minibatch of two-step rows at gamma 0.9 trains exactly as one-step rows at gamma 0.81."""
    g = torch.Generator().manual_seed(5)
    b = _bandit(64, g)
    b["terminated"][:32] = False
    two, plain = _learner(gamma=0.9), _learner(gamma=0.81)
    m2 = two.gradient_step({**b, "nsteps": torch.full((64,), 2.0)})
    m1 = plain.gradient_step(b)
    assert m2 == pytest.approx(m1, rel=1e-6)
    m_one = _learner(gamma=0.9).gradient_step({**b, "nsteps": torch.ones(64)})
    assert m_one["critic_loss"] != pytest.approx(m1["critic_loss"], rel=1e-6)


@pytest.mark.parametrize("bins", [0, 51], ids=["regression", "hl_gauss"])
def test_sac_learns_a_one_step_task(bins):
    """Q fits the reward and the actor's mean moves to the best action 0.5, with regression heads and with
    HL-Gauss classification heads (sac_critic_bins)."""
    lr = _learner(updates_per_round=400, sac_critic_bins=bins, sac_value_range=(-2.5, 0.5))
    g = torch.Generator().manual_seed(1)
    lr.replay.add(_bandit(2048, g))
    obs = torch.randn(256, 2, generator=g)
    before = lr.actor.dist(obs).mean.mean().item()
    m = lr.update_replay()
    after = lr.actor.dist(obs).mean
    assert abs(after.mean().item() - 0.5) < 0.15 < abs(before - 0.5) + 0.15
    test = _bandit(256, g)
    q = lr.critics.q(test["obs"], test["actions"]).mean(0)
    assert (q - test["rewards"]).pow(2).mean() < 0.02
    assert m["grad_steps"] == 400 and {"critic_loss", "policy_loss", "alpha", "entropy", "q_mean"} <= set(m)


def test_hl_gauss_target_is_a_histogram_whose_mean_is_the_target():
    edges = torch.linspace(-1.5, 1.5, 102)
    width = float(edges[1] - edges[0])
    y = torch.tensor([-1.2, -0.03, 0.0, 0.37, 0.95, 1.49, 2.5])
    p = hl_gauss_target(y, edges, 0.75 * width)
    centres = (edges[1:] + edges[:-1]) / 2
    assert p.shape == (7, 101) and (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(7))
    assert torch.allclose((p @ centres)[:5], y[:5], atol=1e-4)               # inside the span: the mean is y
    assert (p @ centres)[6] < 1.5 and (p @ centres)[6] > 1.45                 # outside: clipped to the span
    assert (p.argmax(-1)[:5] == torch.bucketize(y[:5], edges) - 1).all()      # the mode is y's own bin
    wide = hl_gauss_target(y, edges, 3 * width)
    assert ((wide > 1e-3).sum(-1) > (p > 1e-3).sum(-1)).all()                 # sigma sets how far it smears


def test_temperature_falls_when_the_policy_is_more_random_than_the_target():
    lr = _learner(updates_per_round=50, sac_target_entropy=-5.0)  # a 1-D Gaussian with std 0.37 has entropy ~0.4
    lr.replay.add(_bandit(512, torch.Generator().manual_seed(2)))
    a0 = lr.critics.log_alpha.exp().item()
    lr.update_replay()
    assert lr.critics.log_alpha.exp().item() < a0


def _rising(n, g):
    """One-step episodes whose reward rises with the action (best at the bound +1)."""
    b = _bandit(n, g)
    b["rewards"] = b["actions"][:, 0].clone()
    return b


def test_the_bound_penalty_keeps_the_mean_near_the_action_bounds():
    """With the straight-through clip a Q that rises with the action drags the mean ever further past the
    bound; sac_bound_coef's penalty ||mu - clip(mu)||^2 holds it near the bound."""
    means = {}
    for coef in (0.0, 1.0):
        lr = _learner(updates_per_round=600, sac_bound_coef=coef)
        g = torch.Generator().manual_seed(4)
        lr.replay.add(_rising(2048, g))
        lr.update_replay()
        means[coef] = lr.actor.dist(torch.randn(256, 2, generator=g)).mean.mean().item()
    assert means[1.0] > 0.8  # it still goes to the best action
    assert means[1.0] < 1.6 < means[0.0], means


def test_target_kl_ends_the_rounds_actor_steps_and_the_critics_go_on():
    """With target_kl the actor stops once it has moved that far from the round's start (on the round's first
    minibatch); the critics take every step. Without it the actor takes all of them."""
    out = {}
    for kl in (None, 0.05):
        lr = _learner(updates_per_round=300, target_kl=kl)
        lr.replay.add(_rising(2048, torch.Generator().manual_seed(5)))
        q0 = [p.clone() for p in lr.critics.q.parameters()]
        out[kl] = lr.update_replay()
        # the critics moved in both cases
        assert any(not torch.equal(a, b) for a, b in zip(q0, lr.critics.q.parameters()))
    assert out[None]["actor_steps"] == 300 and out[None]["round_kl"] > 0.5
    assert 1 <= out[0.05]["actor_steps"] < 300
    # it stops on the first step past the bound: one step's overshoot at most
    assert 0.05 < out[0.05]["round_kl"] < 0.2
    assert out[0.05]["grad_steps"] == 300


def test_dapg_term_draws_its_rows_from_bc_data_when_given():
    """finetune.bc_dataset: the DAPG term's rows come from bc_data, not from the offline mix (the same draw)."""
    g = torch.Generator().manual_seed(5)
    mix, demos = _bandit(40, g), _bandit(30, g)
    lr = _learner(bc_coef=1.0)
    lr.offline = mix
    for data in (mix, demos):
        lr.bc_data = None if data is mix else demos
        lr.gen.manual_seed(11)
        got = lr.bc_loss(16)
        idx = torch.randint(0, data["obs"].shape[0], (16,), generator=torch.Generator().manual_seed(11))
        want = -lr.actor.log_prob(data["obs"][idx], data["actions"][idx]).mean()
        assert torch.allclose(got, want)


def test_bc_mean_only_moves_the_mean_as_the_full_term_does_and_leaves_the_std():
    """finetune.bc_mean_only: the DAPG term's gradient on the mean equals the full log-likelihood's; the std
    gets none of it (with the full term, demos closer than one std pull the std down)."""
    g = torch.Generator().manual_seed(4)
    off = {"obs": torch.randn(64, 2, generator=g), "actions": torch.rand(64, 1, generator=g) * 0.2 - 0.1}
    grads = {}
    for mean_only in (False, True):
        lr = _learner(bc_coef=1.0, bc_mean_only=mean_only)
        lr.offline = off
        lr.gen.manual_seed(0)
        lr.actor.zero_grad()
        lr.bc_loss(32).backward()
        grads[mean_only] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                            for n, p in lr.actor.named_parameters()}
    assert grads[False]["log_std"].abs().sum() > 0 and grads[False]["log_std"].sum() > 0  # pulls the std down
    assert torch.equal(grads[True]["log_std"], torch.zeros_like(grads[True]["log_std"]))
    for n in grads[False]:
        if n != "log_std":
            assert torch.allclose(grads[True][n], grads[False][n], atol=1e-7), n


def test_q_filter_imitates_only_the_demos_the_critics_rate_above_the_policy():
    """finetune.bc_q_filter (Nair et al. 2018): with critics fitted to a one-step task (best action 0.5) and a
    policy whose mean sits near 0, demos at 0.5 (better than the policy) are imitated and demos at -0.9
    (worse) are dropped; the DAPG term is the mean over all rows of the kept rows' -log pi."""
    lr = _learner(updates_per_round=400, bc_coef=1.0, bc_q_filter=True)
    g = torch.Generator().manual_seed(5)
    lr.replay.add(_bandit(2048, g))
    lr.update_replay(train_actor=False)  # the critics only: the actor keeps its mean near 0
    obs = torch.randn(64, 2, generator=g)
    good = torch.arange(64) % 2 == 0
    lr.offline = {"obs": obs, "actions": torch.where(good, 0.5, -0.9).unsqueeze(1)}
    keep = lr.bc_keep(lr.offline["obs"], lr.offline["actions"])
    assert torch.equal(keep, good.float())
    assert lr.bc_kept == 0.5
    lr.gen.manual_seed(0)
    filtered = lr.bc_loss(32)
    lr.gen.manual_seed(0)
    idx = torch.randint(0, 64, (32,), generator=lr.gen)
    logp = lr.actor.log_prob(obs[idx], lr.offline["actions"][idx])
    assert torch.allclose(filtered, -(good[idx].float() * logp).mean())
    # the gradient pulls the mean towards the kept demos (0.5) only: one step raises it
    before = lr.actor.dist(obs).mean.mean().item()
    opt = torch.optim.SGD(lr.actor.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        lr.bc_loss(64).backward()
        opt.step()
    assert lr.actor.dist(obs).mean.mean().item() > before + 0.05
    # off (the default): every row counts
    assert _learner(bc_coef=1.0).bc_keep(obs, lr.offline["actions"]) is None


def test_a_round_is_its_gradient_steps_on_the_mixed_minibatches():
    """update_replay = gradient_step on each minibatch the round draws (the step bench/sac_step_cost.py times)."""
    from offrl.algos.replay import mixed_batch

    a, b = _learner(updates_per_round=3), _learner(updates_per_round=3)
    g = torch.Generator().manual_seed(4)
    data = _bandit(256, g)
    a.replay.add(data)
    b.replay.add(data)
    a.update_replay()
    for _ in range(3):
        b.gradient_step(mixed_batch(b.replay, None, 64, 0.0, b.gen))
    for pa, pb in zip(list(a.actor.parameters()) + list(a.critics.parameters()),
                      list(b.actor.parameters()) + list(b.critics.parameters())):
        assert torch.equal(pa, pb)
    assert torch.equal(a.gen.get_state(), b.gen.get_state())


def test_actor_every_k_steps_the_critics_on_every_one():
    """finetune.sac_actor_every=3: a round of 6 steps is the critics on all six minibatches and the actor and
    temperature on the 3rd and 6th (RLPD's several critic steps per actor step)."""
    from offrl.algos.replay import mixed_batch

    a, b = _learner(updates_per_round=6, sac_actor_every=3), _learner(updates_per_round=6)
    data = _bandit(256, torch.Generator().manual_seed(4))
    a.replay.add(data)
    b.replay.add(data)
    out = a.update_replay()
    for i in range(6):
        b.gradient_step(mixed_batch(b.replay, None, 64, 0.0, b.gen), train_actor=i % 3 == 2)
    for pa, pb in zip(list(a.actor.parameters()) + list(a.critics.parameters()),
                      list(b.actor.parameters()) + list(b.critics.parameters())):
        assert torch.equal(pa, pb)
    assert out["actor_steps"] == 2 and out["grad_steps"] == 6
    assert float(a.critics.log_alpha) != float(_learner().critics.log_alpha)  # the temperature stepped too


@pytest.mark.gpu
def test_the_gradient_step_runs_on_a_gpu():
    lr = _learner()
    lr.actor.to("cuda")
    lr.critics.to("cuda")
    lr.gen = None
    b = {k: v.to("cuda") for k, v in _bandit(64, torch.Generator().manual_seed(5)).items()}
    before = [p.detach().clone() for p in lr.critics.q.parameters()]
    m = lr.gradient_step(b)
    assert all(p.is_cuda for p in lr.critics.parameters())
    assert any(not torch.equal(p0, p) for p0, p in zip(before, lr.critics.q.parameters()))
    assert m["critic_loss"] >= 0 and "alpha" in m


def test_step_cost_bench_prints_a_table_and_refuses_bad_sizes():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "sac_step_cost.py"
    ok = subprocess.run([sys.executable, str(script), "--devices", "cpu", "--ensembles", "2", "--steps", "2",
                         "--warmup", "1", "--hidden", "16", "--forwards", "loop", "batched"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    rows = [ln.split("|") for ln in ok.stdout.splitlines() if ln.startswith("| cpu | 2 |")]
    assert [r[3].strip() for r in rows] == ["loop", "batched"] and rows[0][5].strip() == "1.000"
    assert float(rows[1][4]) > 0
    bad = subprocess.run([sys.executable, str(script), "--steps", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


def test_the_batched_ensemble_is_the_same_function_with_the_same_gradients():
    from offrl.algos.sac import QEnsemble

    torch.manual_seed(0)
    q = QEnsemble(5, 2, hidden=(16, 16), size=4)
    obs, act = torch.randn(32, 5), torch.rand(32, 2) * 2 - 1
    loop = q(obs, act)
    loop.pow(2).sum().backward()
    g_loop = [p.grad.clone() for p in q.parameters()]
    q.zero_grad()
    q.batched = True
    batched = q(obs, act)
    batched.pow(2).sum().backward()
    assert batched.shape == loop.shape == (4, 32)
    assert torch.allclose(batched, loop, atol=1e-5)
    assert all(torch.allclose(a, b.grad, atol=1e-5) for a, b in zip(g_loop, q.parameters()))


def test_critics_see_the_observation_as_the_actor_does_when_asked():
    def build(view):
        torch.manual_seed(0)
        actor = GaussianActor(3, 1, hidden=(16,), obs_ignore=[2], obs_min_std=0.5)
        actor.normalizer.update(torch.randn(200, 3) * torch.tensor([1.0, 0.01, 1.0]))
        cfg = FinetuneConfig(update="sac", replay=True, offline_ratio=0.0, sac_ensemble=2, sac_critic_obs=view)
        return SACLearner(actor, cfg, critic_hidden=(16,), seed=0).critics

    obs, a = torch.randn(5, 3), torch.zeros(5, 1)
    moved = obs.clone()
    moved[:, 2] += 3.0  # an entry the actor does not see
    full, seen = build("full"), build("actor")
    assert not torch.allclose(full.q(obs, a), full.q(moved, a))
    for q in (seen.q, seen.q_target):
        assert torch.equal(q(obs, a), q(moved, a)) and q.normalizer.min_std == 0.5
    assert full.q.normalizer.min_std is None and full.q.obs_keep is None
    # entry 1 hardly varies in the data: the actor's floor bounds how far a 0.2 deviation reaches the critic
    nudged = obs.clone()
    nudged[:, 1] = 0.2
    assert float(seen.q.normalizer(nudged)[0, 1].abs()) < 0.5 < float(full.q.normalizer(nudged)[0, 1].abs())
