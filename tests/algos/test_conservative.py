"""CQL, BRAC and the critic corrections (VIB, DR3, dropout, L2/L1, residual) on fixed tensors (pure torch)."""

import math

import pytest
import torch
from torch import nn

from offrl.algos.conservative import cql_gap, gaussian_kl
from offrl.algos.critics import (CriticMLP, Critics, Residual, VIB, correction_loss, dr3_term, vib_kl,
                                 weight_penalty)
from offrl.algos.networks import GaussianActor
from offrl.config import load_config
from offrl.platform.pretrain import build_learner


def _batch(n=64, obs_dim=3, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(n, obs_dim, generator=g), actions=torch.rand(n, act_dim, generator=g) * 2 - 1,
                rewards=torch.rand(n, generator=g), next_obs=torch.randn(n, obs_dim, generator=g),
                next_actions=torch.rand(n, act_dim, generator=g) * 2 - 1,
                terminated=torch.zeros(n, dtype=torch.bool), truncated=torch.zeros(n, dtype=torch.bool),
                mc_return=torch.rand(n, generator=g))


def _learner(algo, *extra, obs_dim=3, act_dim=2):
    cfg = load_config(None, [f"pretrain.algo={algo}", "policy.hidden=[32,32]", "critic.hidden=[32,32]", *extra])
    learner, _ = build_learner(cfg, obs_dim, act_dim, [-1.0] * act_dim, [1.0] * act_dim)
    return learner


# --------------------------------------------------------------------------------------------- CQL
def test_cql_gap_on_a_hand_computed_case():
    # one head, one state, two sampled actions: Q = 1 (density 1) and Q = 3 (density 2); data action Q = 0.5
    q_data = torch.tensor([[0.5]])
    q_samples = torch.tensor([[[1.0], [3.0]]])
    log_density = torch.tensor([[0.0], [math.log(2.0)]])
    # log((e^(1-0) + e^(3-log 2)) / 2) - 0.5
    expected = math.log((math.e + math.exp(3.0) / 2.0) / 2.0) - 0.5
    assert cql_gap(q_data, q_samples, log_density).item() == pytest.approx(expected, rel=1e-6)


def test_cql_gap_of_a_constant_q_under_uniform_samples_is_the_log_volume():
    # Q constant in a: log int exp(Q) da - Q = log(volume); the box [-1, 1]^2 has volume 4
    q_data = torch.full((2, 5), 0.7)
    q_samples = torch.full((2, 8, 5), 0.7)
    log_density = torch.full((8, 5), -math.log(4.0))
    assert torch.allclose(cql_gap(q_data, q_samples, log_density), torch.full((2,), math.log(4.0)))


def test_cql_makes_q_prefer_dataset_actions():
    # every dataset action is +0.5 in both dims; CQL pushes Q down elsewhere in the box, plain TD does not
    def train(alpha):
        torch.manual_seed(0)
        learner = _learner("cql", f"pretrain.cql_alpha={alpha}", "pretrain.critic_lr=3e-3", "pretrain.cql_samples=4")
        b = _batch()
        b["actions"] = torch.full_like(b["actions"], 0.5)
        learner.fit_normalizers(b["obs"])
        for _ in range(150):
            learner.update(b)
        q = learner.critics.q.min
        far = torch.full_like(b["actions"], -0.9)
        with torch.no_grad():
            return float((q(b["obs"], b["actions"]) - q(b["obs"], far)).mean())

    conservative, plain = train(5.0), train(0.0)
    assert conservative > 0.5, conservative
    assert conservative > plain + 0.5, (conservative, plain)


def test_cql_lagrange_raises_the_weight_while_the_gap_exceeds_its_target():
    learner = _learner("cql", "pretrain.cql_lagrange=true", "pretrain.cql_target_gap=-100", "pretrain.cql_alpha=1")
    b = _batch()
    learner.fit_normalizers(b["obs"])
    first = learner.update(b)["cql_alpha"]
    for _ in range(5):
        last = learner.update(b)["cql_alpha"]
    assert last > first


# -------------------------------------------------------------------------------------------- BRAC
def _fixed_gaussian(mean, log_std, obs_dim=3):
    a = GaussianActor(obs_dim, len(mean), hidden=[4], log_std_init=0.0)
    with torch.no_grad():
        for p in a.net.parameters():
            p.zero_()
        a.net[-1].bias.copy_(torch.tensor(mean))
        a.log_std.copy_(torch.tensor(log_std))
    return a


def test_brac_divergence_is_the_closed_form_gaussian_kl():
    actor = _fixed_gaussian([0.2, -0.1], [math.log(0.3), math.log(0.5)])
    behavior = _fixed_gaussian([0.0, 0.4], [math.log(0.2), math.log(0.5)])
    obs = torch.randn(7, 3)

    def kl(m1, s1, m2, s2):
        return math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5

    expected = kl(0.2, 0.3, 0.0, 0.2) + kl(-0.1, 0.5, 0.4, 0.5)
    assert torch.allclose(gaussian_kl(actor, behavior, obs), torch.full((7,), expected), atol=1e-6)


def test_brac_value_penalty_lowers_the_target_by_gamma_beta_divergence():
    learner = _learner("brac", "pretrain.brac_beta=2.0", "pretrain.gamma=0.9")
    behavior = _fixed_gaussian([0.3, 0.3], [math.log(0.2)] * 2)
    learner.set_behavior(behavior)
    b = _batch(8)
    with torch.no_grad():
        d = gaussian_kl(learner.actor, behavior, b["next_obs"])
        penalised = learner.bootstrap_target(b)
        learner.pc = learner.pc.__class__(**{**learner.pc.__dict__, "brac_penalty": "policy"})
        free = learner.bootstrap_target(b)
    assert torch.allclose(free - penalised, 0.9 * 2.0 * d, atol=1e-5)


def test_brac_policy_penalty_pulls_the_actor_to_the_behaviour_policy():
    learner = _learner("brac", "pretrain.brac_beta=10.0", "pretrain.brac_penalty=policy", "pretrain.actor_lr=3e-3")
    behavior = _fixed_gaussian([0.6, -0.6], [math.log(0.3)] * 2)
    learner.set_behavior(behavior)
    b = _batch()
    learner.fit_normalizers(b["obs"])
    before = float(gaussian_kl(learner.actor, behavior, b["obs"]).detach().mean())
    for _ in range(100):
        m = learner.update(b)
    after = float(gaussian_kl(learner.actor, behavior, b["obs"]).detach().mean())
    assert after < 0.5 * before, (before, after)
    assert m["brac_divergence"] == pytest.approx(after, rel=0.5)


def test_brac_refuses_a_behaviour_policy_with_other_bounds():
    learner = _learner("brac")
    other = GaussianActor(3, 2, hidden=[4], action_low=[-2, -2], action_high=[2, 2])
    with pytest.raises(ValueError, match="does not match the actor"):
        learner.set_behavior(other)


# ------------------------------------------------------------------------------------- corrections
def test_vib_kl_on_fixed_tensors():
    mu = torch.tensor([[0.5, -1.0]])
    log_var = torch.tensor([[0.0, math.log(4.0)]])
    # 0.5 * [(0.25 + 1 - 1 - 0) + (1 + 4 - 1 - log 4)]
    expected = 0.5 * (0.25 + 4.0 - math.log(4.0))
    assert vib_kl(mu, log_var).item() == pytest.approx(expected, rel=1e-6)


def test_vib_layer_samples_in_training_and_uses_the_mean_in_eval():
    layer = VIB(4, 3)
    x = torch.randn(5, 4)
    layer.eval()
    z1, kl = layer(x)
    mu, log_var = layer.enc(x).chunk(2, -1)
    assert torch.equal(z1, mu) and torch.allclose(kl, vib_kl(mu, log_var))
    layer.train()
    assert not torch.equal(layer(x)[0], mu)


def test_dr3_term_on_fixed_tensors():
    feat = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [3.0, 1.0]]])       # [H=2, B=2, f=2]
    nfeat = torch.tensor([[[2.0, 1.0], [5.0, 4.0]], [[0.5, 7.0], [1.0, 1.0]]])
    # row 0: (2 + 2) + (0.5 + 0) = 4.5; row 1: (0 + 4) + (3 + 1) = 8
    assert dr3_term(feat, nfeat).item() == pytest.approx((4.5 + 8.0) / 2)
    assert dr3_term(feat, nfeat, torch.tensor([1.0, 0.0])).item() == pytest.approx(4.5)


def test_weight_penalty_counts_weights_not_biases():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.fill_(100.0)
    assert weight_penalty([lin], 0.1, 0.0).item() == pytest.approx(0.1 * 5.0)
    assert weight_penalty([lin], 0.0, 0.5).item() == pytest.approx(0.5 * 3.0)


def _corrections(**kw):
    base = dict(vib_size=0, vib_weight=0.0, dr3_weight=0.0, dropout=0.0, weight_decay=0.0, l1=0.0, residual=False)
    return load_config(None, [f"critic.{k}={v}" for k, v in {**base, **kw}.items()]).critic


def test_each_correction_adds_its_formula_to_the_critic_loss():
    torch.manual_seed(0)
    b = _batch(16)
    mask = torch.tensor([1.0] * 12 + [0.0] * 4)
    # VIB: vib_weight * (sum over heads of mean KL + V's mean KL), measured in eval mode (KL is deterministic)
    c = Critics(3, 2, [8, 8], vib_size=4)
    loss, m = correction_loss(c, _corrections(vib_size=4, vib_weight=0.3), b["obs"], b["actions"], b["next_obs"],
                              None, mask, True)
    _, _, kq = c.q.forward_aux(b["obs"], b["actions"])
    kv = c.v.forward_aux(b["obs"])[2]
    assert loss.item() == pytest.approx(0.3 * (kq.sum(0).mean() + kv.mean()).item(), rel=1e-5)
    # DR3: dr3_weight * mean over non-terminal rows of sum_i phi_i(s, a) . phi_i(s', a')
    c = Critics(3, 2, [8, 8])
    loss, m = correction_loss(c, _corrections(dr3_weight=0.05), b["obs"], b["actions"], b["next_obs"],
                              b["next_actions"], mask, True)
    x = torch.cat([c.q.normalizer(b["obs"]), b["actions"]], -1)
    nx = torch.cat([c.q.normalizer(b["next_obs"]), b["next_actions"]], -1)
    body = [nn.Sequential(*list(h)[:-1]) for h in c.q.heads]
    dots = sum((f(x) * f(nx)).sum(-1) for f in body)
    assert loss.item() == pytest.approx(0.05 * dots[:12].mean().item(), rel=1e-5)
    assert m["dr3"] == pytest.approx(dots[:12].mean().item(), rel=1e-5)
    # L2 and L1 on every weight matrix of V and Q (not the target copy)
    loss, _ = correction_loss(c, _corrections(weight_decay=0.01, l1=0.002), b["obs"], b["actions"], b["next_obs"],
                              None, mask, True)
    ws = [mod.weight for net in (c.q, c.v) for mod in net.modules() if isinstance(mod, nn.Linear)]
    expected = sum(0.01 * w.pow(2).sum() + 0.002 * w.abs().sum() for w in ws)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # none on: nothing added
    loss, m = correction_loss(c, _corrections(), b["obs"], b["actions"], b["next_obs"], None, mask, True)
    assert loss.item() == 0.0 and m == {}


def test_dropout_and_residual_change_the_network_as_documented():
    net = CriticMLP(3, 1, [8, 8], dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in net) == 2
    x = torch.randn(64, 3)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))
    res = CriticMLP(3, 1, [8, 8], residual=True)
    assert isinstance(res[2], Residual)
    h = res[1](res[0](x))
    assert torch.allclose(res(x), res[3](h + torch.relu(res[2].lin(h))))
    with pytest.raises(ValueError, match="equal hidden widths"):
        CriticMLP(3, 1, [8, 16], residual=True)
    # without corrections the layers (and so the checkpoint keys) are a plain MLP's
    assert [type(m).__name__ for m in CriticMLP(3, 1, [8, 8])] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_corrections_change_the_iql_critic_step():
    b = _batch()

    def q_after(*extra):
        torch.manual_seed(0)
        learner = _learner("bc+iql", *extra)
        learner.fit_normalizers(b["obs"])
        m = learner.update(b)
        return learner.critics.q(b["obs"], b["actions"]).detach(), m

    plain, m0 = q_after()
    dr3, m1 = q_after("critic.dr3_weight=1.0")
    assert "dr3" in m1 and "dr3" not in m0
    assert not torch.allclose(plain, dr3)


@pytest.mark.parametrize("override, key", [
    ("critic.dropout=1.5", "critic.dropout"),
    ("critic.vib_size=-1", "critic.vib_size"),
    ("critic.dr3_weight=.nan", "critic.dr3_weight"),
    ("critic.weight_decay=-1", "critic.weight_decay"),
    ("pretrain.cql_alpha=-1", "pretrain.cql_alpha"),
    ("pretrain.cql_samples=0", "pretrain.cql_samples"),
    ("pretrain.brac_beta=.inf", "pretrain.brac_beta"),
])
def test_bad_correction_and_conservative_values_name_the_key(override, key):
    from offrl.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_residual_needs_equal_widths_in_the_config():
    from offrl.config import ConfigError

    with pytest.raises(ConfigError, match="critic.residual"):
        load_config(None, ["critic.residual=true", "critic.hidden=[64,32]"])
