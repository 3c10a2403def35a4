"""The online finetuning learner: one class for every (advantage estimator, update rule) pair.

It owns the actor, the value net (GAE; trained online), the pretrained Q/V critics (IQL, SARSA;
optionally trained online), their optimizers, and for off-policy finetuning the replay buffer and the
offline data. Advantages are computed by the pure functions of :mod:`offrl.algos.advantages`; updates
use the losses of :mod:`offrl.algos.policy_losses`. The loop that feeds it lives in
:mod:`offrl.platform.finetune`.

Two paths, chosen by ``finetune.replay``:

* on-policy (:meth:`FinetuneLearner.update`): epochs x minibatches over one round's samples with the
  round's advantages;
* replay (:meth:`FinetuneLearner.update_replay`): ``updates_per_round`` gradient steps, each on a fresh
  minibatch mixing the replay buffer and the offline data (:func:`offrl.algos.replay.mixed_batch`). On each
  minibatch the critics take one expectile step, then the advantages ``A = min_i Q_target,i(s, a) - V(s)``
  are recomputed with the updated critics and drive one AWR / push-away actor step (IQL's online
  finetuning, Kostrikov et al. 2021; AWAC, Nair et al. 2020).

``recap`` (Physical Intelligence's RECAP) labels every sample with ``I = A > threshold`` (a percentile of
the round's advantages on the on-policy path, of each minibatch's on the replay path, or a fixed value),
replaces the label by ``none`` with probability ``recap_drop`` and maximises ``log pi(a | s, I)``. On the
on-policy path every minibatch also takes offline rows at ``offline_ratio`` of its size: labelled by the
critics when the estimator has them (IQL, SARSA), positive otherwise (GAE, MC: the data are successful
demonstrations). On the replay path the offline rows are already in the minibatch and the critics label them.

Both add ``bc_coef * -mean log pi(a | s)`` over an offline minibatch to every actor loss when
``bc_coef > 0`` (DAPG's behaviour-cloning term, Rajeswaran et al. 2018), weighted down by ``bc_decay`` a round
when that is below 1 (DAPG's schedule).

Batch contract of :meth:`FinetuneLearner.update` (flat ``[B]`` unless noted): obs ``[B, d]``,
actions ``[B, a]`` (as executed; critics use them), raw_actions ``[B, a]`` (the unclipped sample whose
log-prob is ``logprob``; optional), logprob (behaviour policy), adv, returns (value targets, GAE only), rewards,
next_obs ``[B, d]``, terminated (critic training), logprob_start (optional: the policy at the round's start,
for ``approx_kl`` when the batch holds earlier rounds' samples, ``finetune.keep_rounds``).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from offrl.algos.advantages import critic_advantage, gae
from offrl.algos.critics import Critics, VNet, categorical_value_loss, iql_q_loss, iql_value_loss
from offrl.algos.networks import INDICATOR_NONE, INDICATOR_POSITIVE, GaussianActor
from offrl.algos.optim import guarded_step
from offrl.algos.policy_losses import (awr_loss, drop_indicator, normalize, ppo_loss, push_away_awr_loss,
                                       recap_indicator, recap_loss, value_loss)
from offrl.algos.replay import ReplayBuffer, mixed_batch
from offrl.errors import OffrlError


class RoundLearner:
    """What the finetuning loop needs of every learner: round counters, the generator, replay rounds.

    Subclasses set ``cfg``, ``replay``, ``offline`` and ``bc_data`` and call :meth:`_init_rounds`."""

    bc_data: Optional[Mapping[str, torch.Tensor]] = None  # the DAPG term's own rows (None: the offline data's)

    def _init_rounds(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))
        self.iteration = 0
        self.updates = 0

    def _replay_rounds(self, one_step: Any) -> dict[str, float]:
        """``updates_per_round`` x ``one_step(minibatch) -> metrics`` on fresh replay + offline minibatches;
        returns the averaged metrics plus ``grad_steps``."""
        cfg = self.cfg
        hist: dict[str, list[float]] = {}
        for i in range(cfg.updates_per_round):
            b = mixed_batch(self.replay, self.offline, cfg.batch_size, cfg.offline_ratio, self.gen)
            if i == 0:  # the policy on the round's first minibatch, before any step: for round_kl
                with torch.no_grad():
                    self._probe = (b["obs"], self.actor.dist(b["obs"]))
            m = {"offline_frac": float(b["offline"].float().mean()), **one_step(b)}
            for k, v in m.items():
                hist.setdefault(k, []).append(v)
        self.updates += 1
        out = {k: float(np.mean(v)) for k, v in hist.items()}
        out["grad_steps"] = float(cfg.updates_per_round)
        out["round_kl"] = self.kl_from_round_start()  # updates_per_round >= 1: the probe is always set
        return out

    def kl_from_round_start(self) -> float:
        """KL(pi at the round's start || pi now) on the round's first minibatch (``round_kl`` so far)."""
        obs, before = self._probe
        with torch.no_grad():
            return float(torch.distributions.kl_divergence(before, self.actor.dist(obs)).sum(-1).mean())

    def bc_loss(self, n: int) -> torch.Tensor:
        """-mean log pi(a | s) over ``n`` rows drawn uniformly from ``bc_data`` (``finetune.bc_dataset``) or,
        without it, the offline data (the DAPG term); with
        ``bc_mean_only`` the std is a constant in it; rows that :meth:`bc_keep` weighs 0 add nothing (the
        mean stays over all ``n``, so the term's scale falls with the share of rows filtered out)."""
        off = self.offline if self.bc_data is None else self.bc_data
        idx = torch.randint(0, off["obs"].shape[0], (int(n),), generator=self.gen)
        obs, actions = off["obs"][idx], off["actions"][idx]
        logp = self.actor.log_prob(obs, actions, detach_std=self.cfg.bc_mean_only)
        keep = self.bc_keep(obs, actions)
        return -logp.mean() if keep is None else -(keep * logp).mean()

    def bc_keep(self, obs: torch.Tensor, actions: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-row 0/1 weights of the DAPG term on these offline rows (None: every row counts)."""
        return None

    def bc_weight(self) -> float:
        """The DAPG term's weight this round: ``bc_coef * bc_decay ** iteration`` (``bc_decay`` 1: exactly
        ``bc_coef``, as 1.0 ** k is 1.0)."""
        return self.cfg.bc_coef * self.cfg.bc_decay ** self.iteration

    def with_bc_term(self, loss: torch.Tensor, n: int, metrics: dict[str, float]) -> torch.Tensor:
        """``loss`` plus the weighted DAPG term on ``n`` offline rows when ``bc_coef > 0`` (its loss and weight
        go into ``metrics``); ``loss`` itself otherwise."""
        if self.cfg.bc_coef <= 0:
            return loss
        bc, w = self.bc_loss(n), self.bc_weight()
        metrics.update(bc_loss=float(bc.detach()), bc_weight=w)
        return loss + w * bc

    def generators(self) -> dict[str, torch.Generator]:
        return {"finetune": self.gen}

    def extra_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "updates": self.updates}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.updates = int(state.get("updates", 0))


class FinetuneLearner(RoundLearner):
    """Advantage estimator x update rule, both chosen by config (``cfg`` is a FinetuneConfig)."""

    def __init__(self, actor: GaussianActor, cfg: Any, value: Optional[VNet] = None,
                 critics: Optional[Critics] = None, seed: int = 0,
                 offline: Optional[Mapping[str, torch.Tensor]] = None,
                 bc_data: Optional[Mapping[str, torch.Tensor]] = None):
        self.cfg = cfg
        # offline transitions in the replay batch contract (logprob: the start policy's, see the loop)
        self.offline, self.bc_data = offline, bc_data
        if (cfg.bc_coef > 0 or (cfg.replay and cfg.offline_ratio > 0)) and offline is None:
            raise ValueError("bc_coef > 0 and replay with offline_ratio > 0 need offline data")
        if cfg.update == "recap" and getattr(actor, "indicator", None) is None:
            raise ValueError("update recap needs an indicator policy (networks.with_indicator)")
        self.replay = ReplayBuffer(cfg.replay_size, actor.obs_dim, actor.act_dim) if cfg.replay else None
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
        # the start policy, frozen: the anchor of ref_kl_coef (saved with the checkpoint for an exact --resume)
        self.ref_actor = copy.deepcopy(actor).requires_grad_(False) if cfg.ref_kl_coef > 0 else None
        self.recap_thr = 0.0  # the indicator threshold of the latest round (on-policy) or minibatch (replay)
        self._init_rounds(seed)

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
        if cfg.update == "recap":  # labels from the raw advantages: a fixed threshold is in their units
            ind, self.recap_thr = recap_indicator(adv_all, cfg.recap_percentile, cfg.recap_threshold)
            batch = {**batch, "indicator": ind}
        if cfg.update != "ppo" and cfg.normalize_advantage:
            adv_all = normalize(adv_all, center=cfg.center_advantage)
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
                # the trust region of every rule with a behaviour log-prob (PPO, AWR, push-away): a round whose
                # few, noisy advantages would refit the policy far from the data stops early instead
                if cfg.target_kl is not None and m.get("approx_kl", 0.0) > cfg.target_kl:
                    stop = True
                    break
            epochs_done += 1
            if stop:
                break
        self.updates += 1
        out = {k: float(np.mean(v)) for k, v in hist.items()}
        out["epochs"] = float(epochs_done)
        return out

    def _recap_rows(self, b: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(obs, actions, indicators) RECAP learns from on a minibatch: its rows, plus on the on-policy path
        ``offline_ratio`` offline rows, labelled by the critics (IQL, SARSA) or positive (GAE, MC)."""
        cfg = self.cfg
        obs, act, ind = b["obs"], b.get("raw_actions", b["actions"]), b["indicator"]
        if cfg.replay or self.offline is None or cfg.offline_ratio <= 0:
            return obs, act, ind
        n = int(round(obs.shape[0] * cfg.offline_ratio / (1.0 - cfg.offline_ratio)))
        if n < 1:
            return obs, act, ind
        off = self.offline
        idx = torch.randint(0, off["obs"].shape[0], (n,), generator=self.gen)
        o, a = off["obs"][idx], off["actions"][idx]
        if self.critics is not None and cfg.advantage in ("iql", "sarsa"):
            i, _ = recap_indicator(self.critic_advantages(o, a), threshold=self.recap_thr)
        else:
            i = torch.full((n,), INDICATOR_POSITIVE, dtype=torch.long)
        return torch.cat([obs, o]), torch.cat([act, a]), torch.cat([ind, i])

    def _actor_loss(self, b: Mapping[str, torch.Tensor], adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The update rule's loss on a minibatch, weighted by ``rule_coef`` (plus the BC term when ``bc_coef > 0``
        and the anchor when ``ref_kl_coef > 0``)."""
        cfg = self.cfg
        loss, pm = self._rule_loss(b, adv)
        loss = cfg.rule_coef * loss  # 1.0 * x is exact: the default changes no bit
        loss = self.with_bc_term(loss, b["obs"].shape[0], pm)
        if self.ref_actor is not None:
            kl = self.ref_kl(b["obs"])
            loss = loss + cfg.ref_kl_coef * kl
            pm["ref_kl"] = float(kl.detach())
        return loss, pm

    def ref_kl(self, obs: torch.Tensor) -> torch.Tensor:
        """mean over ``obs`` of KL(start policy(. | s) || policy(. | s)), summed over action dimensions."""
        with torch.no_grad():
            ref = self.ref_actor.dist(obs)
        return torch.distributions.kl_divergence(ref, self.actor.dist(obs)).sum(-1).mean()

    def _rule_loss(self, b: Mapping[str, torch.Tensor], adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``finetune.update`` alone on a minibatch."""
        cfg = self.cfg
        obs, act = b["obs"], b["actions"]
        if cfg.update == "recap":
            o, a, ind = self._recap_rows(b)
            cond = drop_indicator(ind, cfg.recap_drop, self.gen)
            loss, pm = recap_loss(self.actor.log_prob(o, a, cond))
            pm.update(recap_pos=float((ind == INDICATOR_POSITIVE).float().mean()),
                      recap_dropped=float((cond == INDICATOR_NONE).float().mean()), recap_thr=self.recap_thr)
            return loss, pm
        # log-probs on the raw (unclipped) sample: the behaviour log-prob was computed on it
        logp = self.actor.log_prob(obs, b.get("raw_actions", act))
        if cfg.update == "ppo":
            a = normalize(adv) if cfg.normalize_advantage else adv
            loss, pm = ppo_loss(logp, b["logprob"], a, cfg.clip)
            ent = self.actor.entropy(obs).mean()
            loss = loss - cfg.ent_coef * ent
            pm["entropy"] = float(ent.detach())
        else:
            if cfg.update == "awr":
                loss, pm = awr_loss(logp, adv, cfg.beta, cfg.max_weight)
            else:
                loss, pm = push_away_awr_loss(logp, b["logprob"], adv, cfg.beta, cfg.max_weight, cfg.push_alpha,
                                              cfg.push_max)
            with torch.no_grad():  # the step from the policy at the round's start (= behaviour unless keep_rounds > 1)
                lr = logp - b.get("logprob_start", b["logprob"])
                pm["approx_kl"] = float(((lr.exp() - 1) - lr).mean())
        return loss, pm

    def _critic_step(self, b: Mapping[str, torch.Tensor]) -> float:
        """One expectile step of V and Q (tau: ``expectile``, 0.5 for SARSA) and a Polyak target update."""
        obs, act = b["obs"], b["actions"]
        v_loss, _ = iql_value_loss(self.critics, obs, act, self.tau)
        q_loss, _ = iql_q_loss(self.critics, obs, act, b["rewards"], b["next_obs"], b["terminated"], self.cfg.gamma)
        self._step(self.critic_opt, v_loss + q_loss, self.critic_opt.param_groups[0]["params"], "critic")
        self.critics.polyak(0.005)
        return float((v_loss + q_loss).detach())

    def _minibatch(self, b: Mapping[str, torch.Tensor], adv: torch.Tensor, train_actor: bool) -> dict[str, float]:
        cfg = self.cfg
        m: dict[str, float] = {}
        if train_actor:
            loss, pm = self._actor_loss(b, adv)
            self._step(self.actor_opt, loss, self.actor.parameters(), "policy")
            m.update(pm)
        if self.value_opt is not None and "returns" in b:
            if self.value.distributional:  # cross-entropy to the lambda-return's projection on the support
                vl = categorical_value_loss(self.value.logits(b["obs"]), b["returns"], self.value.support)
            else:
                vl = value_loss(self.value(b["obs"]), b["returns"])
            self._step(self.value_opt, cfg.vf_coef * vl if cfg.update == "ppo" else vl, self.value.parameters(), "value")
            m["value_loss"] = float(vl.detach())
        if self.critic_opt is not None and "next_obs" in b:
            m["critic_loss"] = self._critic_step(b)
        return m

    def update_replay(self, train_actor: bool = True) -> dict[str, float]:
        """``updates_per_round`` steps on replay + offline minibatches; advantages recomputed on each one
        with the critics just updated. Returns averaged metrics, including the minibatch advantages'
        ``adv_mean`` / ``adv_std`` / ``pos_ratio`` and the offline share ``offline_frac``."""
        cfg = self.cfg

        def one_step(b: Mapping[str, torch.Tensor]) -> dict[str, float]:
            m: dict[str, float] = {}
            if self.critic_opt is not None:
                m["critic_loss"] = self._critic_step(b)
            adv = self.critic_advantages(b["obs"], b["actions"])
            m.update(adv_mean=float(adv.mean()), adv_std=float(adv.std()), pos_ratio=float((adv > 0).float().mean()))
            if cfg.update == "recap":
                ind, self.recap_thr = recap_indicator(adv, cfg.recap_percentile, cfg.recap_threshold)
                b = {**b, "indicator": ind}
            if train_actor:
                a = normalize(adv, center=cfg.center_advantage) if cfg.normalize_advantage else adv
                loss, pm = self._actor_loss(b, a)
                self._step(self.actor_opt, loss, self.actor.parameters(), "policy")
                # approx_kl against log-probs written by many past policies (and by the start policy for the
                # demo rows) measures no step and explodes once the policy narrows; round_kl is the step here
                pm.pop("approx_kl", None)
                m.update(pm)
            return m

        return self._replay_rounds(one_step)

    # ----------------------------------------------------------------------------- checkpoint
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"actor": self.actor}
        if self.ref_actor is not None:
            mods["ref_actor"] = self.ref_actor
        if self.value is not None:
            mods["value"] = self.value
        if self.critics is not None:
            mods["critics"] = self.critics
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: o for k, o in (("actor", self.actor_opt), ("value", self.value_opt), ("critics", self.critic_opt))
                if o is not None}
