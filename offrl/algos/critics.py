"""Critics and their offline losses (pure torch; no Ray, no simulator, no I/O).

Batch shapes: ``obs [B, d]``, ``actions [B, a]``, ``rewards/terminated [B]``. All losses return
``(loss, metrics)`` where metrics are python floats.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from offrl.algos.networks import RunningNorm, mlp


class VNet(nn.Module):
    """State value V(s): MLP on normalized observations, output ``[B]``."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu"):
        super().__init__()
        self.normalizer = RunningNorm(obs_dim)
        self.net = mlp(obs_dim, 1, hidden, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalizer(obs)).squeeze(-1)


class QNet(nn.Module):
    """Action value Q(s, a), optionally twin (two heads; ``forward`` returns both ``[2, B]`` or ``[1, B]``)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 twin: bool = True):
        super().__init__()
        self.normalizer = RunningNorm(obs_dim)
        self.heads = nn.ModuleList([mlp(obs_dim + act_dim, 1, hidden, activation) for _ in range(2 if twin else 1)])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.normalizer(obs), actions], -1)
        return torch.stack([h(x).squeeze(-1) for h in self.heads])

    def min(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min over heads (clipped double Q), ``[B]``."""
        return self.forward(obs, actions).min(0).values


class Critics(nn.Module):
    """V(s), Q(s, a) (twin by default) and a Polyak-averaged target copy of Q."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 twin: bool = True):
        super().__init__()
        self.v = VNet(obs_dim, hidden, activation)
        self.q = QNet(obs_dim, act_dim, hidden, activation, twin)
        self.q_target = copy.deepcopy(self.q)
        for p in self.q_target.parameters():
            p.requires_grad_(False)

    def update_normalizers(self, obs: torch.Tensor) -> None:
        for m in (self.v.normalizer, self.q.normalizer, self.q_target.normalizer):
            m.update(obs)

    @torch.no_grad()
    def polyak(self, tau: float) -> None:
        """target <- (1 - tau) * target + tau * online."""
        for pt, p in zip(self.q_target.parameters(), self.q.parameters()):
            pt.mul_(1 - tau).add_(p, alpha=tau)

    @torch.no_grad()
    def advantage(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """A(s, a) = min_i Q_target,i(s, a) - V(s), ``[B]``."""
        return self.q_target.min(obs, actions) - self.v(obs)


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Asymmetric L2 (Kostrikov et al. 2021, IQL eq. 2): mean |tau - 1(diff < 0)| * diff^2.

    ``tau = 0.5`` gives half the mean squared error (SARSA-style mean regression); ``tau > 0.5`` leans
    towards the upper expectile of ``diff``'s distribution.
    """
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff.pow(2)).mean()


def td_target(rewards: torch.Tensor, next_v: torch.Tensor, terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * V(s').

    Truncation is not termination: a time-limit cut still bootstraps from V(s') (``next_obs`` of a
    truncated step is the episode's final observation), a terminal state does not.
    """
    return rewards + gamma * (1.0 - terminated.float()) * next_v


def iql_value_loss(critics: Critics, obs: torch.Tensor, actions: torch.Tensor, tau: float) -> tuple[torch.Tensor, dict]:
    """L_V = E[ L2_tau( min_i Q_target,i(s, a) - V(s) ) ]  (IQL eq. 5)."""
    with torch.no_grad():
        q = critics.q_target.min(obs, actions)
    v = critics.v(obs)
    loss = expectile_loss(q - v, tau)
    return loss, {"v_loss": float(loss.detach()), "v_mean": float(v.detach().mean())}


def iql_q_loss(critics: Critics, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
               next_obs: torch.Tensor, terminated: torch.Tensor, gamma: float) -> tuple[torch.Tensor, dict]:
    """L_Q = sum_i E[ (r + gamma (1 - term) V(s') - Q_i(s, a))^2 ]  (IQL eq. 6)."""
    with torch.no_grad():
        y = td_target(rewards, critics.v(next_obs), terminated, gamma)
    qs = critics.q(obs, actions)
    loss = (qs - y.unsqueeze(0)).pow(2).mean(1).sum()
    return loss, {"q_loss": float(loss.detach()), "q_mean": float(qs.detach().mean())}


def mc_critic_loss(critics: Critics, obs: torch.Tensor, actions: torch.Tensor,
                   returns: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Regress V(s) and every Q head on the discounted Monte-Carlo return G_t of the dataset."""
    v = critics.v(obs)
    qs = critics.q(obs, actions)
    v_loss = (v - returns).pow(2).mean()
    q_loss = (qs - returns.unsqueeze(0)).pow(2).mean(1).sum()
    return v_loss + q_loss, {"v_loss": float(v_loss.detach()), "q_loss": float(q_loss.detach()),
                             "v_mean": float(v.detach().mean()), "q_mean": float(qs.detach().mean())}


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Policy-extraction weights exp(beta * A), clipped at ``max_weight`` (IQL eq. 7; AWR)."""
    return torch.exp(beta * adv).clamp(max=max_weight)
