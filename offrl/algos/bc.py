"""Behaviour cloning learner (pure torch): maximum likelihood of dataset actions under a Gaussian actor.

Loss (Pomerleau 1988; maximum-likelihood form):  L = - E_{(s,a)~D} [ log pi(a|s) ]
or, with ``loss="mse"``, L = E || mu(s) - a ||^2 on the deterministic mean.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from offrl.algos.networks import GaussianActor
from offrl.algos.optim import guarded_step


def bc_loss(actor: GaussianActor, obs: torch.Tensor, actions: torch.Tensor, kind: str = "mle") -> tuple[torch.Tensor, dict]:
    """BC loss on a batch ``obs [B, d]``, ``actions [B, a]``; returns (loss, metrics)."""
    if obs.shape[0] != actions.shape[0]:
        raise ValueError(f"batch sizes differ: obs {tuple(obs.shape)} vs actions {tuple(actions.shape)}")
    if kind == "mse":
        mu = actor._scale(torch.tanh(actor.dist(obs).mean) if actor.squash == "tanh" else actor.dist(obs).mean)
        loss = (mu - actions).pow(2).sum(-1).mean()
    else:
        loss = -actor.log_prob(obs, actions).mean()
    return loss, {"loss": float(loss.detach())}


class BCLearner:
    """Owns the actor and its optimizer; ``update(batch) -> metrics``; full ``state_dict`` for exact resume."""

    def __init__(self, actor: GaussianActor, lr: float = 3e-4, loss: str = "mle", weight_decay: float = 0.0,
                 grad_clip: float = 1.0, seed: int = 0):
        self.actor = actor
        self.loss_kind = loss
        self.grad_clip = grad_clip
        self.opt = torch.optim.Adam(actor.parameters(), lr=lr, weight_decay=weight_decay)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.step = 0

    def sample(self, data: Mapping[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
        """A minibatch drawn with the learner's own generator (part of its saved state)."""
        n = next(iter(data.values())).shape[0]
        idx = torch.randint(0, n, (batch_size,), generator=self.gen)
        return {k: v[idx] for k, v in data.items()}

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.actor.train()
        loss, metrics = bc_loss(self.actor, batch["obs"], batch["actions"], self.loss_kind)
        guarded_step(self.opt, loss, self.actor.parameters(), self.grad_clip,
                     "BC loss became {loss} at step " + str(self.step))
        self.step += 1
        return metrics

    # -- checkpoint plumbing
    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.opt}

    def generators(self) -> dict[str, torch.Generator]:
        return {"bc": self.gen}

    def extra_state(self) -> dict[str, Any]:
        return {"learner_step": self.step}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.step = int(state.get("learner_step", 0))
