"""Soft actor-critic in the style of RLPD (Ball et al. 2023): the off-policy reference row of finetuning.

``finetune.update: sac`` (with ``finetune.replay: true``) trains, on the same replay + offline minibatches
as the other replay rules (:func:`offrl.algos.replay.mixed_batch`):

* an ensemble of ``E`` Q networks with LayerNorm after every hidden layer (RLPD's critic), each regressed on
  ``y = r + gamma (1 - term) (min_{i in Z} Q_target,i(s', a') - alpha log pi(a' | s'))`` with
  ``a' ~ pi(. | s')`` and ``Z`` a random subset of ``M`` target heads (random ensemble distillation, REDQ);
  ``finetune.sac_backup_entropy: false`` drops the ``- alpha log pi`` term from the target (RLPD's ManiSkill
  configs do), so the temperature shapes the actor but never the 0/1 reward's Q values; with
  ``finetune.n_step: n > 1`` the rows are n-step transitions (:func:`offrl.algos.replay.n_step`) and the
  discount of each row is ``gamma^nsteps`` (the entropy term only at the bootstrap state); with
  ``finetune.sac_critic_bins: K > 0`` each head classifies instead of regressing: K bins over
  ``sac_value_range``, cross-entropy against the target's HL-Gauss histogram (:func:`hl_gauss_target`), Q the
  expected bin centre (what the actor, the targets and the Q filter read);
* the actor on ``L = E_s[ alpha log pi(a~ | s) - mean_i Q_i(s, a~) ]`` with the reparameterised sample
  ``a~ = mu(s) + sigma eps`` (log-prob of the unclipped sample, as :class:`offrl.algos.networks.GaussianActor`
  defines it for ``squash="clip"``). The critics see ``a~`` clipped into the bounds, with a straight-through
  gradient: clipping's zero gradient outside the bounds would otherwise strand a mean that drifted past them
  early, when Q is still noise (measured on a one-step task: the mean ended at 1.53 for a best action 0.5);
* ``+ bound_coef * mean ||mu(s) - clip(mu(s))||^2``: the straight-through gradient lets a fresh Q, which
  extrapolates linearly past the action bounds, drag the mean far outside them (measured on PickCube:
  KL(pi_before || pi_after) of 3,700 after the first 200-step actor round, success 0.45 -> 0.00); the
  quadratic penalty on the out-of-bounds part of the mean holds it near the bounds (``finetune.sac_bound_coef``);
* ``+ bc_coef * -mean log pi(a_demo | s_demo)`` on offline rows when ``finetune.bc_coef > 0`` (the DAPG term
  every other rule has), times ``bc_decay ** round`` (``finetune.bc_decay``, DAPG's schedule; 1 keeps it constant);
  with ``finetune.bc_q_filter`` only on the rows whose demo action the critics rate above the policy's mean
  action (the Q filter of Nair et al. 2018), so the demos stop holding the actor where Q has found better;
* a trust region per round: once KL(pi at the round's start || pi) on the round's first minibatch exceeds
  ``finetune.target_kl``, the round's remaining steps train the critics only. A fresh ensemble's action
  gradient is mostly extrapolation; the stop lets the critics catch up with each small policy change
  before the next one, as PPO's early stop does on the on-policy path;
* the temperature on ``L(alpha) = -log alpha * E[log pi(a~ | s) + H_target]`` (SAC v2's automatic tuning),
  ``H_target = -act_dim / 2`` by default (RLPD's choice);
* Polyak-averaged target heads (``tau``).

The actor starts from the pretrained policy like every other rule; the critics start fresh. Batch contract:
:mod:`offrl.algos.replay`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from offrl.algos.networks import GaussianActor, RunningNorm, _ACTIVATIONS
from offrl.algos.optim import guarded_step
from offrl.algos.finetune import RoundLearner
from offrl.algos.replay import ReplayBuffer


def ln_mlp(in_dim: int, out_dim: int, hidden: Sequence[int], activation: str = "relu",
           layer_norm: bool = True) -> nn.Sequential:
    """Linear-LayerNorm-act-...-Linear (LayerNorm keeps Q from extrapolating wildly off the data, Ball et al.)."""
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), *([nn.LayerNorm(h)] if layer_norm else []), act()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class QEnsemble(nn.Module):
    """``E`` Q(s, a) heads on normalised observations; ``forward`` returns ``[E, B]``.

    With ``bins = K > 0`` each head is a classifier over ``K`` bins of equal width spanning ``value_range``
    (HL-Gauss, Imani and White 2018; Farebrother et al. 2024): ``logits`` gives ``[E, B, K]`` and Q is the
    expectation of the bin centres under its softmax; :func:`hl_gauss_target` is what the logits learn."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 size: int = 10, layer_norm: bool = True, bins: int = 0,
                 value_range: Sequence[float] = (-2.0, 2.0)):
        super().__init__()
        self.normalizer = RunningNorm(obs_dim)
        self.bins = int(bins)
        self.heads = nn.ModuleList([ln_mlp(obs_dim + act_dim, max(self.bins, 1), hidden, activation, layer_norm)
                                    for _ in range(size)])
        self.batched = False  # True: the batched forward (the same function; see _forward_batched)
        self.obs_keep: Optional[torch.Tensor] = None  # entries seen (1) and held at zero (0); None: all seen
        if self.bins:
            lo, hi = (float(v) for v in value_range)
            self.register_buffer("edges", torch.linspace(lo, hi, self.bins + 1), persistent=False)
            self.bin_width = (hi - lo) / self.bins

    @property
    def centres(self) -> torch.Tensor:
        return (self.edges[1:] + self.edges[:-1]) / 2

    def _out(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Each head's output, ``[E, B, max(bins, 1)]``."""
        o = self.normalizer(obs)
        x = torch.cat([o if self.obs_keep is None else o * self.obs_keep.to(o), actions], -1)
        if self.batched:
            return self._forward_batched(x)
        return torch.stack([h(x) for h in self.heads])

    def logits(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if not self.bins:
            raise ValueError("a regression Q ensemble (bins=0) has no logits")
        return self._out(obs, actions)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        out = self._out(obs, actions)
        if self.bins:
            return out.softmax(-1) @ self.centres
        return out.squeeze(-1)

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as the loop over heads, as one batched matrix product a layer: each layer's
        weights are stacked to ``[E, out, in]`` on the fly (the parameters stay per head, so checkpoints and
        optimizers do not change). Fewer, larger kernels: what a GPU wants; on one CPU core it is a wash."""
        heads = list(self.heads)
        h = x.unsqueeze(0).expand(len(heads), *x.shape)                      # [E, B, in]
        for i, layer in enumerate(heads[0]):
            if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                w = torch.stack([hd[i].weight for hd in heads])                # [E, out, in] or [E, out]
                b = torch.stack([hd[i].bias for hd in heads]).unsqueeze(1)     # [E, 1, out]
            if isinstance(layer, nn.Linear):
                h = torch.baddbmm(b, h, w.transpose(1, 2))
            elif isinstance(layer, nn.LayerNorm):
                h = nn.functional.layer_norm(h, layer.normalized_shape, eps=layer.eps) * w.unsqueeze(1) + b
            else:
                h = layer(h)                                                   # the activation, elementwise
        return h


def hl_gauss_target(y: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """HL-Gauss: the mass a normal ``N(y, sigma^2)`` puts in each bin, renormalised to the bins' span, ``[B, K]``.
    Its mean is ``y`` up to the clipping at the span's ends (tested)."""
    cdf = torch.special.ndtr((edges.unsqueeze(0) - y.clamp(edges[0], edges[-1]).unsqueeze(1)) / sigma)
    mass = cdf[:, 1:] - cdf[:, :-1]
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)


class SACCritics(nn.Module):
    """The Q ensemble, its target copy and the log temperature (one module, one checkpoint part)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str, size: int,
                 layer_norm: bool, init_alpha: float, bins: int = 0, value_range: Sequence[float] = (-2.0, 2.0)):
        super().__init__()
        self.q = QEnsemble(obs_dim, act_dim, hidden, activation, size, layer_norm, bins, value_range)
        self.q_target = copy.deepcopy(self.q)
        self.q_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))

    def view_as(self, actor: GaussianActor) -> None:
        """Both Q ensembles see the observation as ``actor`` does: its hidden entries held at zero, its
        normaliser's std floor (not state: a checkpoint's reader sets it again from the run's config)."""
        for q in (self.q, self.q_target):
            q.normalizer.min_std = actor.normalizer.min_std
            q.obs_keep = actor.obs_keep.clone() if actor.obs_ignore else None

    @torch.no_grad()
    def polyak(self, tau: float) -> None:
        for pt, p in zip(self.q_target.parameters(), self.q.parameters()):
            pt.mul_(1 - tau).add_(p, alpha=tau)


def _sample(actor: GaussianActor, obs: torch.Tensor, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised (action in bounds, log-prob) with gradients through the mean and the std."""
    d = actor.dist(obs)
    eps = torch.randn(d.mean.shape, generator=generator, dtype=d.mean.dtype, device=d.mean.device)
    pre = d.mean + d.stddev * eps
    if actor.squash == "tanh":
        u = torch.tanh(pre)
        return actor._scale(u), (d.log_prob(pre) - torch.log(1 - u.pow(2) + 1e-6)).sum(-1)
    # straight-through clip: the critics see the clipped action, the gradient passes as if unclipped, so a
    # mean that left the bounds still feels dQ/da at the bound (a plain clip would cut it off for good)
    u = pre + (pre.clamp(-1.0, 1.0) - pre).detach()
    return actor._scale(u), d.log_prob(pre).sum(-1)


def out_of_bounds(actor: GaussianActor, obs: torch.Tensor) -> torch.Tensor:
    """mean_s || mu(s) - clip(mu(s), -1, 1) ||^2 on the pre-squash mean (0 while the mean is in bounds)."""
    if actor.squash == "tanh":
        return torch.zeros(())
    mu = actor.dist(obs).mean
    return (mu - mu.clamp(-1.0, 1.0)).pow(2).sum(-1).mean()


def sac_critic_target(critics: SACCritics, actor: GaussianActor, rewards: torch.Tensor, next_obs: torch.Tensor,
                      terminated: torch.Tensor, gamma: Union[float, torch.Tensor], subset: int,
                      generator: Optional[torch.Generator] = None, backup_entropy: bool = True) -> torch.Tensor:
    """y = r + gamma (1 - term) (min over a random subset of target heads - alpha log pi), ``[B]``;
    without the entropy term when ``backup_entropy`` is false (RLPD's ManiSkill configs). ``gamma`` may be a
    ``[B]`` tensor: ``gamma^nsteps`` of n-step rows (:func:`offrl.algos.replay.n_step`)."""
    with torch.no_grad():
        a2, logp2 = _sample(actor, next_obs, generator)
        qs = critics.q_target(next_obs, a2)                                   # [E, B]
        pick = torch.randperm(qs.shape[0], generator=generator)[:subset]
        q2 = qs[pick].min(0).values
        if backup_entropy:
            q2 = q2 - critics.log_alpha.exp() * logp2
        return rewards + gamma * (1.0 - terminated.float()) * q2


class SACLearner(RoundLearner):
    """RLPD-style SAC on replay + offline minibatches; the FinetuneLearner interface the loop uses."""

    def __init__(self, actor: GaussianActor, cfg: Any, critic_hidden: Sequence[int] = (256, 256),
                 critic_activation: str = "relu", seed: int = 0,
                 offline: Optional[Mapping[str, torch.Tensor]] = None,
                 bc_data: Optional[Mapping[str, torch.Tensor]] = None):
        self.cfg, self.actor, self.offline, self.bc_data = cfg, actor, offline, bc_data
        if cfg.offline_ratio > 0 and offline is None:
            raise ValueError("sac with offline_ratio > 0 needs offline data")
        self.critics = SACCritics(actor.obs_dim, actor.act_dim, critic_hidden, critic_activation, cfg.sac_ensemble,
                                  cfg.sac_layer_norm, cfg.sac_init_alpha, cfg.sac_critic_bins, cfg.sac_value_range)
        for m in (self.critics.q.normalizer, self.critics.q_target.normalizer):
            m.load_state_dict(actor.normalizer.state_dict())
        if cfg.sac_critic_obs == "actor":
            self.critics.view_as(actor)
        self.target_entropy = (-actor.act_dim / 2.0 if cfg.sac_target_entropy is None
                               else float(cfg.sac_target_entropy))
        self.replay = ReplayBuffer(cfg.replay_size, actor.obs_dim, actor.act_dim)
        self.actor_opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critics.q.parameters(), lr=cfg.critic_lr)
        self.alpha_opt = torch.optim.Adam([self.critics.log_alpha], lr=cfg.critic_lr)
        self._init_rounds(seed)

    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, what: str) -> None:
        guarded_step(opt, loss, params, self.cfg.grad_clip,
                     f"sac {what} loss became {{loss}} at finetuning round {self.iteration}; "
                     "the last good checkpoint is kept (lower the learning rates)")

    def update_replay(self, train_actor: bool = True) -> dict[str, float]:
        """``updates_per_round`` steps: critics on every minibatch, then actor and temperature on every
        ``sac_actor_every``-th."""
        cfg = self.cfg
        actor_on, actor_steps = train_actor, 0   # the round's trust region (target_kl) can end the actor early
        step = 0

        def one_step(b: Mapping[str, torch.Tensor]) -> dict[str, float]:
            nonlocal actor_on, actor_steps, step
            step += 1
            actor_now = actor_on and step % cfg.sac_actor_every == 0
            m = self.gradient_step(b, actor_now)
            if actor_now:
                actor_steps += 1
                if cfg.target_kl is not None and self.kl_from_round_start() > cfg.target_kl:
                    actor_on = False
            return m

        out = self._replay_rounds(one_step)
        if train_actor:
            out["actor_steps"] = float(actor_steps)
        return out

    def gradient_step(self, b: Mapping[str, torch.Tensor], train_actor: bool = True) -> dict[str, float]:
        """One gradient step on minibatch ``b``: the critics, then (``train_actor``) actor and temperature.
        Runs on whatever device the modules and ``b`` are on (``bench/sac_step_cost.py`` times it)."""
        cfg, c = self.cfg, self.critics
        gamma = cfg.gamma if "nsteps" not in b else cfg.gamma ** b["nsteps"]
        y = sac_critic_target(c, self.actor, b["rewards"], b["next_obs"], b["terminated"], gamma,
                              cfg.sac_subset, self.gen, cfg.sac_backup_entropy)
        if c.q.bins:  # HL-Gauss: cross-entropy of each head's bins against the target's smoothed histogram
            logits = c.q.logits(b["obs"], b["actions"])                       # [E, B, K]
            p = hl_gauss_target(y, c.q.edges, cfg.sac_hl_sigma * c.q.bin_width)
            q_loss = -(p.unsqueeze(0) * logits.log_softmax(-1)).sum(-1).mean(1).sum()
            qs = logits.detach().softmax(-1) @ c.q.centres
        else:
            qs = c.q(b["obs"], b["actions"])
            q_loss = (qs - y.unsqueeze(0)).pow(2).mean(1).sum()
        self._step(self.critic_opt, q_loss, c.q.parameters(), "critic")
        c.polyak(cfg.sac_tau)
        m = {"critic_loss": float(q_loss.detach()), "q_mean": float(qs.detach().mean())}
        if not train_actor:
            return m
        a, logp = _sample(self.actor, b["obs"], self.gen)
        alpha = c.log_alpha.exp().detach()
        pi_loss = (alpha * logp - c.q(b["obs"], a).mean(0)).mean()
        loss = pi_loss + cfg.sac_bound_coef * out_of_bounds(self.actor, b["obs"])
        loss = self.with_bc_term(loss, b["obs"].shape[0], m)
        if self.cfg.bc_q_filter and self.cfg.bc_coef > 0:
            m["bc_kept"] = self.bc_kept
        self._step(self.actor_opt, loss, self.actor.parameters(), "actor")
        a_loss = -(c.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self._step(self.alpha_opt, a_loss, [c.log_alpha], "temperature")
        m.update(policy_loss=float(pi_loss.detach()), entropy=float(-logp.detach().mean()),
                 alpha=float(c.log_alpha.exp().detach()))
        return m

    def bc_keep(self, obs: torch.Tensor, actions: torch.Tensor) -> Optional[torch.Tensor]:
        """``bc_q_filter``: the Q filter of Nair et al. (2018): a demo row is imitated only where the critics
        rate its action above the policy's own (mean) action, ``mean_i Q_i(s, a_demo) > mean_i Q_i(s, mu(s))``;
        the kept share is logged as ``bc_kept``."""
        if not self.cfg.bc_q_filter:
            return None
        with torch.no_grad():
            mine, _ = self.actor.act(obs, deterministic=True)
            keep = (self.critics.q(obs, actions).mean(0) > self.critics.q(obs, mine).mean(0)).float()
        self.bc_kept = float(keep.mean())
        return keep

    # -- checkpoint plumbing (the rest comes from RoundLearner)
    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "sac_critics": self.critics}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_opt, "sac_critics": self.critic_opt, "sac_alpha": self.alpha_opt}
