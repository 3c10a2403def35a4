"""Conservative offline RL: CQL (Kumar et al. 2020) and BRAC (Wu et al. 2019), ``pretrain.algo: cql | brac``.

Both train a SAC-style actor (:class:`offrl.algos.networks.GaussianActor`, reparameterised samples) against
twin Q critics with Polyak targets, on the same batch contract as :mod:`offrl.algos.offline` (plus
``next_actions`` for DR3). Per gradient step, with ``a' ~ pi(.|s')`` and ``a~ ~ pi(.|s)`` (reparameterised):

Critics::

    y        = r + gamma (1 - term) [ min_i Q_target,i(s', a') - [BRAC-v] beta D(s') ]
    L_TD     = sum_i E (Q_i(s, a) - y)^2
    gap_i    = E_s[ log (1/3N) sum_j exp(Q_i(s, a_j) - log mu(a_j | s)) - Q_i(s, a_data) ]         (CQL only)
    L_CQL    = alpha_cql * sum_i gap_i        (or alpha' (gap_i - target_gap) with the Lagrange version)
    L_V      = E L2_0.5( min_i Q_target,i(s, a) - V(s) )
    L_critic = L_TD + L_CQL + L_V + correction_loss (VIB / DR3 / L2 / L1, :mod:`offrl.algos.critics`)

The ``3N`` actions ``a_j`` are ``N`` uniform samples in the action box, ``N`` policy samples at ``s`` and ``N``
at ``s'`` (CQL(H) with importance sampling, Kumar et al. 2020 appendix F); ``mu`` is each proposal's density
of the action in env units (for clipped Gaussians the unclipped density: an approximation at the bounds).
``gap_i`` is therefore an estimate of ``log int exp Q_i(s, a) da - Q_i(s, a_data)``: for a Q that is constant
in ``a`` it equals ``sum_d log(high_d - low_d)``, the log-volume of the action box, not 0.

Actor::

    L_pi = E[ alpha log pi(a~|s) - min_i Q_i(s, a~) ] + [BRAC] beta D(s) + bound_coef * out_of_bounds(mu)
    (the first ``bc_warmup_steps`` steps replace -min Q by -log pi(a_data|s): CQL's policy warm-up)
    L_alpha = -log alpha * E[ log pi(a~|s) + H_target ]

BRAC's divergence is the KL between the actor's and the behaviour policy's pre-squash Gaussians,
``D(s) = KL(N(mu(s), sigma) || N(mu_b(s), sigma_b))``, exact in closed form. For ``tanh`` squashing it is the
KL of the action distributions (KL is invariant under the shared bijection); for clipping it is an upper
bound (clipping is a function of the sample, and KL can only shrink under one). The behaviour policy is a
BC checkpoint or BC trained at the start of the run; it stays frozen.

V is kept (fitted to the mean of Q on dataset actions) so that a CQL/BRAC checkpoint starts ``offrl
finetune`` with any estimator, as the IQL/SARSA checkpoints do.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from offrl.algos.bc import bc_loss
from offrl.algos.critics import Critics, correction_loss, expectile_loss
from offrl.algos.networks import GaussianActor
from offrl.algos.offline import LearnerState
from offrl.algos.optim import guarded_step
from offrl.algos.sac import _sample, out_of_bounds


class Temperatures(nn.Module):
    """The entropy temperature log alpha and CQL's Lagrange multiplier log alpha' (one checkpoint part)."""

    def __init__(self, alpha: float, cql_alpha: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_cql_alpha = nn.Parameter(torch.tensor(math.log(max(cql_alpha, 1e-6))))


def cql_gap(q_data: torch.Tensor, q_samples: torch.Tensor, log_density: torch.Tensor) -> torch.Tensor:
    """CQL's conservative gap per head, ``[H]``.

    ``q_data [H, B]``: Q at the dataset actions; ``q_samples [H, M, B]``: Q at ``M`` sampled actions;
    ``log_density [M, B]``: log-density of each sample under its proposal. Returns
    ``mean_b ( logsumexp_j (q_samples - log_density) - log M - q_data )``.
    """
    m = q_samples.shape[1]
    lse = torch.logsumexp(q_samples - log_density.unsqueeze(0), dim=1) - math.log(m)
    return (lse - q_data).mean(-1)


def gaussian_kl(actor: GaussianActor, behavior: GaussianActor, obs: torch.Tensor) -> torch.Tensor:
    """``KL(pi(.|s) || pi_b(.|s))`` of the pre-squash Gaussians, summed over action dims, ``[B]``."""
    return torch.distributions.kl_divergence(actor.dist(obs), behavior.dist(obs)).sum(-1)


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])


class ConservativeLearner(LearnerState):
    """CQL / BRAC learner with the interface of :class:`offrl.algos.offline.OfflineLearner`."""

    def __init__(self, actor: GaussianActor, critics: Critics, pc: Any, critic_cfg: Any, seed: int = 0):
        self.actor, self.critics, self.pc, self.ccfg = actor, critics, pc, critic_cfg
        self.algo = pc.algo
        self.gamma, self.tau, self.target_tau, self.grad_clip = pc.gamma, pc.tau, pc.target_tau, pc.grad_clip
        self.bc_kind = pc.bc_loss
        self.temps = Temperatures(pc.entropy_alpha, pc.cql_alpha)
        self.target_entropy = -float(actor.act_dim) if pc.target_entropy is None else float(pc.target_entropy)
        self.actor_opt = torch.optim.Adam(actor.parameters(), lr=pc.actor_lr)
        self.critic_opt = torch.optim.Adam(list(critics.v.parameters()) + list(critics.q.parameters()),
                                           lr=pc.critic_lr)
        self.alpha_opt = torch.optim.Adam([self.temps.log_alpha], lr=pc.actor_lr)
        self.cql_alpha_opt = torch.optim.Adam([self.temps.log_cql_alpha], lr=pc.critic_lr)
        self.behavior: Optional[GaussianActor] = None
        self._init_state(seed)
        self.critic_mode = pc.algo

    # ------------------------------------------------------------------ data
    def fit_normalizers(self, obs: torch.Tensor, critic_obs: Optional[torch.Tensor] = None) -> None:
        self.actor.normalizer.update(obs)
        self.critics.update_normalizers(obs if critic_obs is None else critic_obs)

    def set_behavior(self, behavior: GaussianActor) -> None:
        """BRAC's frozen behaviour policy (same action bounds and squashing as the actor)."""
        a = self.actor
        if (behavior.squash != a.squash or not torch.equal(behavior.action_low, a.action_low)
                or not torch.equal(behavior.action_high, a.action_high)):
            raise ValueError(f"the behaviour policy ({behavior.squash}, bounds {behavior.action_low.tolist()}.."
                             f"{behavior.action_high.tolist()}) does not match the actor ({a.squash}, bounds "
                             f"{a.action_low.tolist()}..{a.action_high.tolist()})")
        behavior.requires_grad_(False)
        behavior.eval()
        self.behavior = behavior

    def train_behavior(self, behavior: GaussianActor, data: Mapping[str, torch.Tensor], steps: int,
                       batch_size: int, lr: float) -> float:
        """BC (``pretrain.bc_loss``) of ``behavior`` on ``data`` for ``steps`` steps; returns the last loss."""
        behavior.normalizer.load_state_dict(self.actor.normalizer.state_dict())
        behavior.requires_grad_(True)
        behavior.train()
        opt = torch.optim.Adam(behavior.parameters(), lr=lr)
        n = data["obs"].shape[0]
        loss = torch.zeros(())
        for i in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=self.gen)
            loss, _ = bc_loss(behavior, data["obs"][idx], data["actions"][idx], self.bc_kind)
            guarded_step(opt, loss, behavior.parameters(), self.grad_clip,
                         f"behaviour-policy BC loss became {{loss}} at step {i}")
        self.set_behavior(behavior)
        return float(loss.detach())

    # ---------------------------------------------------------------- update
    def _opt_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, what: str) -> None:
        guarded_step(opt, loss, params, self.grad_clip,
                     f"{self.algo} {what} loss became {{loss}} at step {self.step}; "
                     "lower the learning rate or cql_alpha / brac_beta")

    def _divergence(self, obs: torch.Tensor) -> torch.Tensor:
        if self.behavior is None:
            raise RuntimeError("brac needs a behaviour policy (set_behavior) before its first update")
        return gaussian_kl(self.actor, self.behavior, obs)

    def _box_log_volume(self) -> torch.Tensor:
        return torch.log(self.actor.action_high - self.actor.action_low).sum()

    def _log_density(self, logp_u: torch.Tensor) -> torch.Tensor:
        """log-density of an env-unit action from the log-density of its [-1, 1] image."""
        return logp_u - torch.log((self.actor.action_high - self.actor.action_low) / 2.0).sum()

    def conservative_gap(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor,
                         q_data: torch.Tensor) -> torch.Tensor:
        """CQL's per-head gap on a batch (sampled actions from this learner's generator), ``[H]``."""
        n, b = self.pc.cql_samples, obs.shape[0]
        a = self.actor
        low, high = a.action_low, a.action_high
        u = torch.rand((n, b, a.act_dim), generator=self.gen)
        a_unif = low + u * (high - low)
        logd_unif = (-self._box_log_volume()).expand(n, b)
        with torch.no_grad():
            a_cur, lp_cur = _sample(a, _repeat(obs, n), self.gen)
            a_nxt, lp_nxt = _sample(a, _repeat(next_obs, n), self.gen)
        acts = torch.cat([a_unif.reshape(n * b, -1), a_cur, a_nxt])                  # [3nB, A]
        logd = torch.cat([logd_unif.reshape(-1), self._log_density(lp_cur), self._log_density(lp_nxt)])
        qs = self.critics.q(obs.repeat(3 * n, 1), acts)                               # [H, 3nB]
        h = qs.shape[0]
        return cql_gap(q_data, qs.view(h, 3 * n, b), logd.view(3 * n, b))

    def update(self, batch: Mapping[str, torch.Tensor],
               critic_batch: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, float]:
        """One critic step (TD + conservative term + V + corrections), then one actor and temperature step."""
        if critic_batch is not None:
            raise ValueError(f"{self.algo} trains actor and critics on the same data (no pretrain.critic_dataset)")
        b, c, pc, a = batch, self.critics, self.pc, self.actor
        m: dict[str, float] = {}
        term = b["terminated"].float()
        with torch.no_grad():
            a2, _ = _sample(a, b["next_obs"], self.gen)
            q2 = c.q_target.min(b["next_obs"], a2)
            if self.algo == "brac" and pc.brac_penalty == "value":
                div2 = self._divergence(b["next_obs"])
                q2 = q2 - pc.brac_beta * div2
            y = b["rewards"] + self.gamma * (1.0 - term) * q2
        qs = c.q(b["obs"], b["actions"])
        td = (qs - y.unsqueeze(0)).pow(2).mean(1).sum()
        loss = td
        m.update(q_loss=float(td.detach()), q_mean=float(qs.detach().mean()))
        if self.algo == "cql":
            gap = self.conservative_gap(b["obs"], b["actions"], b["next_obs"], qs)
            if pc.cql_lagrange:
                w = self.temps.log_cql_alpha.exp().clamp(0.0, 1e6)
                loss = loss + (w.detach() * (gap - pc.cql_target_gap)).sum()
                w_loss = -(w * (gap.detach() - pc.cql_target_gap)).sum()
                self._opt_step(self.cql_alpha_opt, w_loss, [self.temps.log_cql_alpha], "cql multiplier")
                m["cql_alpha"] = float(w.detach())
            else:
                loss = loss + pc.cql_alpha * gap.sum()
            m["cql_gap"] = float(gap.detach().mean())
        with torch.no_grad():
            q_t = c.q_target.min(b["obs"], b["actions"])
        v = c.v(b["obs"])
        v_loss = expectile_loss(q_t - v, self.tau)
        loss = loss + v_loss
        m.update(v_loss=float(v_loss.detach()), v_mean=float(v.detach().mean()))
        corr, cm = correction_loss(c, self.ccfg, b["obs"], b["actions"], b["next_obs"], a2, 1.0 - term, True)
        loss = loss + corr
        m.update(cm)
        self._opt_step(self.critic_opt, loss, self.critic_opt.param_groups[0]["params"], "critic")
        c.polyak(self.target_tau)

        a_new, logp = _sample(a, b["obs"], self.gen)
        alpha = self.temps.log_alpha.exp().detach()
        if self.step < pc.bc_warmup_steps:
            objective = a.log_prob(b["obs"], b["actions"])
        else:
            objective = c.q(b["obs"], a_new).min(0).values
        pi_loss = (alpha * logp - objective).mean() + out_of_bounds(a, b["obs"])
        if self.algo == "brac":
            div = self._divergence(b["obs"])
            pi_loss = pi_loss + pc.brac_beta * div.mean()
            m["brac_divergence"] = float(div.detach().mean())
        self._opt_step(self.actor_opt, pi_loss, a.parameters(), "actor")
        a_loss = -(self.temps.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self._opt_step(self.alpha_opt, a_loss, [self.temps.log_alpha], "temperature")
        m.update(actor_loss=float(pi_loss.detach()), entropy=float(-logp.detach().mean()), alpha=float(alpha))
        self.step += 1
        return m

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def bootstrap_target(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The TD target with the policy's mean action at ``s'`` (deterministic, for logging), ``[B]``."""
        a2, _ = self.actor.act(d["next_obs"], deterministic=True)
        q2 = self.critics.q_target.min(d["next_obs"], a2)
        if self.algo == "brac" and self.pc.brac_penalty == "value" and self.behavior is not None:
            q2 = q2 - self.pc.brac_beta * self._divergence(d["next_obs"])
        return d["rewards"] + self.gamma * (1.0 - d["terminated"].float()) * q2

    @torch.no_grad()
    def validate(self, data: Mapping[str, torch.Tensor],
                 critic_data: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, float]:
        from offrl.algos.offline import critic_validation

        self.actor.eval()
        self.critics.eval()
        try:
            loss, _ = bc_loss(self.actor, data["obs"], data["actions"], self.bc_kind)
            out = {"actor_val_loss": float(loss)}
            out.update(critic_validation(self.critics, data, self.bootstrap_target(data)))
        finally:
            self.actor.train()
            self.critics.train()
        return out

    def workflow_metrics(self, train_sample: Mapping[str, torch.Tensor],
                         val: Optional[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        from offrl.algos.offline import workflow_metrics

        return workflow_metrics(self.actor, self.critics, self.bootstrap_target, train_sample, val)

    # ------------------------------------------------------------ checkpoint
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"actor": self.actor, "critics": self.critics, "temperatures": self.temps}
        if self.behavior is not None:
            mods["behavior"] = self.behavior
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_opt, "critics": self.critic_opt, "alpha": self.alpha_opt,
                "cql_alpha": self.cql_alpha_opt}
