"""The online finetuning learner: one class for every (advantage estimator, update rule) pair.

It owns the actor, the value net (GAE; trained online), the pretrained Q/V critics (IQL, SARSA;
optionally trained online) and their optimizers. Advantages are computed by the pure functions of
:mod:`offrl.algos.advantages`; updates use the losses of :mod:`offrl.algos.policy_losses`. The loop
that feeds it lives in :mod:`offrl.platform.finetune`.

Batch contract of :meth:`FinetuneLearner.update` (flat ``[B]`` unless noted): obs ``[B, d]``,
actions ``[B, a]`` (as executed; critics use them), raw_actions ``[B, a]`` (the unclipped sample whose
log-prob is ``logprob``; optional), logprob (behaviour policy), adv, returns (value targets, GAE only), rewards,
next_obs ``[B, d]``, terminated (critic training).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from offrl.algos.advantages import critic_advantage, gae
from offrl.algos.critics import Critics, VNet, iql_q_loss, iql_value_loss
from offrl.algos.networks import GaussianActor
from offrl.algos.optim import guarded_step
from offrl.algos.policy_losses import awr_loss, normalize, ppo_loss, push_away_awr_loss, value_loss
from offrl.errors import OffrlError


class FinetuneLearner:
    """Advantage estimator x update rule, both chosen by config (``cfg`` is a FinetuneConfig)."""

    def __init__(self, actor: GaussianActor, cfg: Any, value: Optional[VNet] = None,
                 critics: Optional[Critics] = None, seed: int = 0):
        self.cfg = cfg
        self.actor = actor
        self.value = value
        self.critics = critics
        if cfg.advantage == "gae" and value is None:
            raise ValueError("GAE needs a value net")
        if cfg.advantage in ("iql", "sarsa") and critics is None:
            raise OffrlError(f"finetune.advantage={cfg.advantage} needs pretrained critics in the checkpoint "
                             "(pretrain with algo bc+iql or bc+sarsa)")
        self.actor_opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr)
        self.value_opt = torch.optim.Adam(value.parameters(), lr=cfg.critic_lr) if value is not None else None
        self.critic_opt = None
        if critics is not None and cfg.critic_online and cfg.advantage in ("iql", "sarsa"):
            self.critic_opt = torch.optim.Adam(list(critics.v.parameters()) + list(critics.q.parameters()),
                                               lr=cfg.critic_lr)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.iteration = 0
        self.updates = 0

    @property
    def tau(self) -> float:
        return 0.5 if self.cfg.advantage == "sarsa" else self.cfg.expectile

    # ----------------------------------------------------------------------------- advantages
    @torch.no_grad()
    def gae_advantages(self, rollout: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE on a ``[T, N]`` rollout; the last row bootstraps from V(next_obs)."""
        T, N = rollout["rewards"].shape
        v = self.value(rollout["obs"].reshape(T * N, -1)).reshape(T, N)
        nv = self.value(rollout["next_obs"].reshape(T * N, -1)).reshape(T, N)
        return gae(rollout["rewards"], v, nv, rollout["terminated"], rollout["truncated"], self.cfg.gamma,
                   self.cfg.gae_lambda)

    @torch.no_grad()
    def critic_advantages(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """A = min_i Q_target,i(s, a) - V(s) from the (pre)trained expectile critics."""
        return critic_advantage(self.critics.q_target.min(obs, actions), self.critics.v(obs))

    # -------------------------------------------------------------------------------- updates
    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, what: str) -> None:
        guarded_step(opt, loss, params, self.cfg.grad_clip,
                     f"{what} loss became {{loss}} at finetuning round {self.iteration}; "
                     "the last good checkpoint is kept (lower the learning rate or the AWR temperature)")

    def update(self, batch: Mapping[str, torch.Tensor], train_actor: bool = True) -> dict[str, float]:
        """Epochs x minibatches of the chosen rule on one round's data; returns averaged metrics."""
        cfg = self.cfg
        B = batch["obs"].shape[0]
        if B == 0:
            return {}
        adv_all = batch["adv"]
        if cfg.update != "ppo" and cfg.normalize_advantage:
            adv_all = normalize(adv_all)
        mb = max(1, B // cfg.minibatches)
        hist: dict[str, list[float]] = {}
        epochs_done = 0
        stop = False
        for _ in range(cfg.epochs):
            perm = torch.randperm(B, generator=self.gen)
            for s in range(0, B, mb):
                idx = perm[s:s + mb]
                m = self._minibatch({k: v[idx] for k, v in batch.items()}, adv_all[idx], train_actor)
                for k, v in m.items():
                    hist.setdefault(k, []).append(v)
                if cfg.update == "ppo" and cfg.target_kl is not None and m.get("approx_kl", 0.0) > cfg.target_kl:
                    stop = True
                    break
            epochs_done += 1
            if stop:
                break
        self.updates += 1
        out = {k: float(np.mean(v)) for k, v in hist.items()}
        out["epochs"] = float(epochs_done)
        return out

    def _minibatch(self, b: Mapping[str, torch.Tensor], adv: torch.Tensor, train_actor: bool) -> dict[str, float]:
        cfg = self.cfg
        m: dict[str, float] = {}
        obs, act = b["obs"], b["actions"]
        if train_actor:
            # log-probs on the raw (unclipped) sample: the behaviour log-prob was computed on it
            logp = self.actor.log_prob(obs, b.get("raw_actions", act))
            if cfg.update == "ppo":
                a = normalize(adv) if cfg.normalize_advantage else adv
                loss, pm = ppo_loss(logp, b["logprob"], a, cfg.clip)
                ent = self.actor.entropy(obs).mean()
                loss = loss - cfg.ent_coef * ent
                pm["entropy"] = float(ent.detach())
            elif cfg.update == "awr":
                loss, pm = awr_loss(logp, adv, cfg.beta, cfg.max_weight)
                with torch.no_grad():
                    lr = logp - b["logprob"]
                    pm["approx_kl"] = float(((lr.exp() - 1) - lr).mean())
            else:
                loss, pm = push_away_awr_loss(logp, b["logprob"], adv, cfg.beta, cfg.max_weight, cfg.push_alpha,
                                              cfg.push_max)
                with torch.no_grad():
                    lr = logp - b["logprob"]
                    pm["approx_kl"] = float(((lr.exp() - 1) - lr).mean())
            self._step(self.actor_opt, loss, self.actor.parameters(), "policy")
            m.update(pm)
        if self.value_opt is not None and "returns" in b:
            vl = value_loss(self.value(obs), b["returns"])
            self._step(self.value_opt, cfg.vf_coef * vl if cfg.update == "ppo" else vl, self.value.parameters(), "value")
            m["value_loss"] = float(vl.detach())
        if self.critic_opt is not None and "next_obs" in b:
            v_loss, _ = iql_value_loss(self.critics, obs, act, self.tau)
            q_loss, _ = iql_q_loss(self.critics, obs, act, b["rewards"], b["next_obs"], b["terminated"], cfg.gamma)
            self._step(self.critic_opt, v_loss + q_loss, self.critic_opt.param_groups[0]["params"], "critic")
            self.critics.polyak(0.005)
            m["critic_loss"] = float((v_loss + q_loss).detach())
        return m

    # ----------------------------------------------------------------------------- checkpoint
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"actor": self.actor}
        if self.value is not None:
            mods["value"] = self.value
        if self.critics is not None:
            mods["critics"] = self.critics
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: o for k, o in (("actor", self.actor_opt), ("value", self.value_opt), ("critics", self.critic_opt))
                if o is not None}

    def generators(self) -> dict[str, torch.Generator]:
        return {"finetune": self.gen}

    def extra_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "updates": self.updates}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.updates = int(state.get("updates", 0))
